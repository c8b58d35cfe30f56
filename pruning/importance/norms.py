"""``l1`` and ``l2``: norms of each output filter (structured)."""

from __future__ import annotations

from torch import Tensor, nn

from pruning.importance.base import Importance, channel_rows, effective_weight, is_batchnorm, out_axis

__all__ = ["L1Importance", "L2Importance"]


class _NormImportance(Importance):
    p: int = 1

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        if is_batchnorm(module):
            return None
        w = effective_weight(module)
        return channel_rows(w, out_axis(module)).norm(p=self.p, dim=1)


class L1Importance(_NormImportance):
    """Sum of |w| over each output filter (Li et al., 2017)."""

    p = 1


class L2Importance(_NormImportance):
    """Euclidean norm of each output filter."""

    p = 2
