"""N:M semi-structured sparsity: in every group of M consecutive input weights of a Linear row, N are kept.

The mask is built from the base algorithm's element scores (``level``: |W|; ``wanda``: |W| x ||X_j||), group by
group along the input dimension, per output row. ``2:4`` (and ``1:4``, which is stricter) is the pattern NVIDIA's
sparse tensor cores run, and the layout ``torch.sparse.to_sparse_semi_structured`` takes: a dense, contiguous
2-D ``(out_features, in_features)`` tensor whose zeros follow the 2:4 pattern along each row, on CUDA, in
float16/bfloat16 (or float32/int8 with the CUTLASS backend), with both dimensions multiples of the backend's
minimum tile (16..64 rows, 16..128 columns, see ``_DTYPE_SHAPE_CONSTRAINTS`` in ``torch/sparse/semi_structured.py``).
``4:8`` has no PyTorch kernel: it is masked and exported the same way, and nothing is timed for it.

GPT-2's ``Conv1D`` stores its weight transposed, ``(in_features, out_features)``: its groups run along axis 0,
and the tensor to hand to the kernel is ``weight.t().contiguous()``.

This module imports nothing heavy at the top: the API validates patterns with :func:`parse_pattern`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "PATTERN_MS",
    "kernel_shape_ok",
    "nm_keep_mask",
    "parse_pattern",
    "pattern_text",
    "satisfies_pattern",
    "semi_structured_kernel",
]

# M = 4 is the hardware pattern (2:4, and 1:4 which satisfies it); M = 8 (4:8 and the like) is the next
# pattern the literature studies (e.g. SparseGPT, Wanda report 4:8). Larger M is close to unstructured.
PATTERN_MS = (4, 8)
_PATTERN = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")
# The smallest (rows, columns) a weight needs for every backend in torch/sparse/semi_structured.py at fp16/bf16:
# CUTLASS asks for multiples of (32, 64), cuSPARSELt for (16, 16).
_KERNEL_MIN_SHAPE = (32, 64)


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; ValueError saying what is wrong (N < M, M in :data:`PATTERN_MS`).

    >>> parse_pattern("2:4")
    (2, 4)
    """
    match = _PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if m not in PATTERN_MS:
        raise ValueError(f"pattern {text!r}: M must be one of {list(PATTERN_MS)}")
    if not n < m:
        raise ValueError(f"pattern {text!r}: N must be below M (N of every M weights are kept)")
    return n, m


def pattern_text(pattern: tuple[int, int]) -> str:
    """``(2, 4)`` -> ``"2:4"``."""
    return f"{pattern[0]}:{pattern[1]}"


def nm_keep_mask(scores: Tensor, pattern: tuple[int, int], input_axis: int = 1) -> Tensor:
    """Boolean keep-mask shaped like the 2-D `scores`: in every group of M consecutive entries along `input_axis`
    (per output row), the N highest scores survive. On ties the lower index is pruned first, as elsewhere."""
    import torch

    n, m = pattern
    if scores.dim() != 2:
        raise ValueError(f"N:M needs a 2-D weight, got shape {tuple(scores.shape)}")
    rows = scores if input_axis == 1 else scores.t()
    if rows.shape[1] % m:
        raise ValueError(f"N:M {n}:{m}: {rows.shape[1]} input features are not a multiple of {m}")
    grouped = torch.nan_to_num(rows.detach().double(), nan=float("-inf")).reshape(rows.shape[0], -1, m)
    # A stable ascending sort puts the M - N lowest (lower index first on ties) in front: those go.
    order = torch.sort(grouped, dim=-1, stable=True).indices
    keep = torch.ones_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], False)
    keep = keep.reshape(rows.shape)
    return keep if input_axis == 1 else keep.t().contiguous()


def satisfies_pattern(weight: Tensor, pattern: tuple[int, int], input_axis: int = 1) -> bool:
    """Whether every group of M consecutive input weights of every row holds at most N non-zeros."""
    n, m = pattern
    rows = weight if input_axis == 1 else weight.t()
    if rows.dim() != 2 or rows.shape[1] % m:
        return False
    nonzero = (rows.detach() != 0).reshape(rows.shape[0], -1, m).sum(dim=-1)
    return bool((nonzero <= n).all())


def kernel_shape_ok(out_features: int, in_features: int) -> bool:
    """Whether a ``(out_features, in_features)`` fp16/bf16 weight meets every semi-structured backend's tile."""
    rows, cols = _KERNEL_MIN_SHAPE
    return out_features % rows == 0 and in_features % cols == 0


def semi_structured_kernel(device: Any) -> str | None:
    """Why the semi-structured kernel cannot run on `device`, or ``None`` when it can (CUDA, compute
    capability >= 8.0). Each N:M trial records it, so that it says why no speed-up was measured rather than
    fake one."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return f"device {dev.type!r} has no semi-structured sparse kernel (CUDA with compute capability >= 8.0 has)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return f"compute capability {major}.{minor} < 8.0 has no semi-structured sparse tensor cores"
    return None
