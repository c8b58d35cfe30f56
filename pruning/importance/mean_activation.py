"""``mean_activation``: mean ReLU activation of each channel (Molchanov et al., 2017)."""

from __future__ import annotations

from torch import Tensor, nn

from pruning.importance.activation import ActivationImportance

__all__ = ["MeanActivationImportance"]


class MeanActivationImportance(ActivationImportance):
    """Mean of ``relu(output)`` per output channel: weakly activated channels are pruned first."""

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        count, _, total = self._stats(name)
        return (total / count).float()
