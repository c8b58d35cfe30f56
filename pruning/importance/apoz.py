"""``apoz``: Average Percentage of Zeros of each channel's activation (Hu et al., 2016)."""

from __future__ import annotations

from torch import Tensor, nn

from pruning.importance.activation import ActivationImportance

__all__ = ["APoZImportance"]


class APoZImportance(ActivationImportance):
    """``1 - APoZ`` per output channel: channels that are mostly zero after ReLU are pruned first."""

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        count, zeros, _ = self._stats(name)
        return (1.0 - zeros / count).float()
