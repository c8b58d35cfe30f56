"""Benchmark task: ``bench.tasks.shifted_digits`` with the residual net at half its width (8 and 16 channels).

Why: the full-width net has capacity to spare at FLOPs x0.25 (uniform pruning, fine-tuned two epochs, scores within
0.15 pt of the dense model on shifted digits), so no distribution can be shown to be better there. At half width
the pruned net is short of channels and the distribution decides how much of the accuracy comes back. Same data,
trainer, fine-tuner, calibration batches and evaluators as ``bench.tasks.shifted_digits``; trained 30 epochs on
first use and cached under ``$PRUNEHUB_HOME/bench/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from torch import nn

from bench.tasks.residual_digits import ResidualDigits
from bench.tasks.shifted_digits import (
    calibration_data,
    dummy_input,
    evaluator,
    fine_tuner,
    loss_task_of,
    train_dense,
    trainer,
)
from examples.digits import SEED, cached_model, criterion, optimizer, seeded

__all__ = [
    "calibration_data",
    "criterion",
    "dummy_input",
    "evaluator",
    "fine_tuner",
    "init_model",
    "loss_task",
    "model",
    "optimizer",
    "trainer",
]

EPOCHS = 30
_CACHE_VERSION = "v1"


class NarrowResidualDigits(ResidualDigits):
    """:class:`~bench.tasks.residual_digits.ResidualDigits` at width 8."""

    def __init__(self) -> None:
        super().__init__(width=8)


def init_model() -> nn.Module:
    """The untrained network, seeded."""
    return seeded(NarrowResidualDigits, SEED)


def _cache_path() -> Path:
    home = Path(os.environ.get("PRUNEHUB_HOME", ".prunehub"))
    return home / "bench" / f"narrow-shifted-digits-{_CACHE_VERSION}.safetensors"


def model() -> nn.Module:
    """The pretrained network, a fresh copy on every call (trained once, then loaded from the cache)."""
    return cached_model(NarrowResidualDigits, _cache_path(), lambda: train_dense(init_model, EPOCHS))


def loss_task() -> SimpleNamespace:
    """This task with 1000 × cross-entropy as its evaluator (entrypoint
    ``bench.tasks.narrow_shifted_digits:loss_task``)."""
    return loss_task_of(model, init_model)
