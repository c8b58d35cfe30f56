"""Importance criteria: one small class per base algorithm, one call from a layer to its scores.

>>> from torch import nn
>>> get_importance("l1")("conv", nn.Conv2d(1, 2, 1)).shape
torch.Size([2])
"""

from __future__ import annotations

from typing import Any

from pruning.importance.apoz import APoZImportance
from pruning.importance.base import Importance
from pruning.importance.block import block_scores, expand_block_mask
from pruning.importance.fpgm import FPGMImportance
from pruning.importance.level import LevelImportance
from pruning.importance.mean_activation import MeanActivationImportance
from pruning.importance.norms import L1Importance, L2Importance
from pruning.importance.slim import SlimImportance
from pruning.importance.taylorfo import MeasureOnlyOptimizer, TaylorFOImportance, run_trainer_measuring
from pruning.importance.wanda import WandaImportance

__all__ = [
    "APoZImportance",
    "FPGMImportance",
    "Importance",
    "L1Importance",
    "L2Importance",
    "LevelImportance",
    "MeanActivationImportance",
    "MeasureOnlyOptimizer",
    "SlimImportance",
    "TaylorFOImportance",
    "WandaImportance",
    "block_scores",
    "expand_block_mask",
    "get_importance",
    "run_trainer_measuring",
]

_CRITERIA: dict[str, type[Importance]] = {
    "level": LevelImportance,
    "wanda": WandaImportance,
    "l1": L1Importance,
    "l2": L2Importance,
    "fpgm": FPGMImportance,
    "slim": SlimImportance,
    "taylorfo": TaylorFOImportance,
    "apoz": APoZImportance,
    "mean_activation": MeanActivationImportance,
}


def get_importance(base_algo: str, **options: Any) -> Importance:
    """A fresh criterion for `base_algo` (statistics criteria keep per-call state, so never shared).

    `options` go to the criterion's constructor, e.g. ``get_importance("taylorfo", batches=8)``.
    """
    try:
        cls = _CRITERIA[base_algo]
    except KeyError:
        raise ValueError(f"unknown base algorithm {base_algo!r}; expected one of {sorted(_CRITERIA)}") from None
    return cls(**options)
