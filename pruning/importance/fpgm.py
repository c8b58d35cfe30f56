"""``fpgm``: filters closest to the geometric median (He et al., 2019)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pruning.importance.base import Importance, channel_rows, effective_weight, is_batchnorm, out_axis

__all__ = ["FPGMImportance"]


class FPGMImportance(Importance):
    """Sum of Euclidean distances from each filter to all others in its layer.

    The filter with the smallest sum is nearest the geometric median, hence the most replaceable by
    the others, and is pruned first.
    """

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        if is_batchnorm(module):
            return None
        w = effective_weight(module)
        flat = channel_rows(w, out_axis(module)).double()  # double: sums of many distances tie less by rounding
        return torch.cdist(flat, flat).sum(dim=1).float()
