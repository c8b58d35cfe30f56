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
    loss_x1000,
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


def _train_dense() -> nn.Module:
    trained = init_model()
    opt = optimizer(trained)
    loss = criterion()
    for epoch in range(EPOCHS):
        trainer(trained, opt, loss, epoch)
    return trained


def model() -> nn.Module:
    """The pretrained network, a fresh copy on every call (trained once, then loaded from the cache)."""
    return cached_model(NarrowResidualDigits, _cache_path(), _train_dense)


def loss_task() -> SimpleNamespace:
    """This task with 1000 × cross-entropy as its evaluator (entrypoint
    ``bench.tasks.narrow_shifted_digits:loss_task``)."""
    return SimpleNamespace(
        model=model,
        evaluator=loss_x1000,
        dummy_input=dummy_input,
        trainer=trainer,
        fine_tuner=fine_tuner,
        optimizer=optimizer,
        criterion=criterion,
        init_model=init_model,
        calibration_data=calibration_data,
    )
