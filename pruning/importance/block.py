"""Block sparsity for Linear weights (TensorFlow model_pruning's ``block_height``/``block_width``).

The weight matrix is tiled into ``(block_height, block_width)`` blocks (the last row/column of blocks
may be partial); each block is scored by pooling its element scores (``avg`` or ``max``), whole blocks
are pruned, and the block mask is expanded back to the weight's shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional

__all__ = ["block_scores", "expand_block_mask"]


def block_scores(scores: Tensor, block: tuple[int, int], pooling: str = "avg") -> Tensor:
    """Pool a 2-D score tensor over blocks; returns ``(ceil(H/bh), ceil(W/bw))`` block scores.

    Partial edge blocks are pooled over their real elements only (no padding enters an average).
    """
    if scores.dim() != 2:
        raise ValueError(f"block sparsity needs a 2-D weight, got shape {tuple(scores.shape)}")
    bh, bw = block
    x = scores.float().unsqueeze(0).unsqueeze(0)
    if pooling == "max":
        return functional.max_pool2d(x, (bh, bw), ceil_mode=True).squeeze(0).squeeze(0)
    if pooling != "avg":
        raise ValueError(f"block pooling must be 'avg' or 'max', got {pooling!r}")
    rows, cols = math.ceil(scores.shape[0] / bh), math.ceil(scores.shape[1] / bw)
    pad = (0, cols * bw - scores.shape[1], 0, rows * bh - scores.shape[0])
    sums = functional.avg_pool2d(functional.pad(x, pad), (bh, bw), divisor_override=1)
    counts = functional.avg_pool2d(functional.pad(torch.ones_like(x), pad), (bh, bw), divisor_override=1)
    return (sums / counts).squeeze(0).squeeze(0)


def expand_block_mask(block_mask: Tensor, block: tuple[int, int], shape: tuple[int, ...]) -> Tensor:
    """Expand a block mask to an element mask of `shape` (cropping partial edge blocks)."""
    bh, bw = block
    full = block_mask.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)
    return full[: shape[0], : shape[1]].contiguous()
