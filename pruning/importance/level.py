"""``level``: element magnitude (fine-grained)."""

from __future__ import annotations

from torch import Tensor, nn

from pruning.importance.base import Importance, effective_weight, is_batchnorm

__all__ = ["LevelImportance"]


class LevelImportance(Importance):
    """|w| per weight element; the smallest magnitudes are pruned first."""

    structured = False

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        if is_batchnorm(module):
            return None
        return effective_weight(module).abs()
