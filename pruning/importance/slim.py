"""``slim``: BatchNorm scaling factors (Network Slimming, Liu et al., 2017)."""

from __future__ import annotations

from torch import Tensor, nn

from pruning.importance.base import Importance, effective_weight, is_batchnorm

__all__ = ["SlimImportance"]


class SlimImportance(Importance):
    """|gamma| of the BatchNorm in the channel group; convolutions and Linears carry no score.

    Network Slimming ranks all channels globally: `pruning.pruner.global_distribution` turns the raw
    scores into a per-unit distribution for a target overall sparsity.
    """

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        if not is_batchnorm(module) or module.weight is None:
            return None
        return effective_weight(module).abs()
