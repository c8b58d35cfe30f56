"""Benchmark task: a small depthwise-separable network (MobileNet-v1 style, BatchNorm after every convolution) on
scikit-learn's 8x8 digits, with ``examples.digits``' split, optimizer, trainer, fine-tuner and evaluator (imported
from it).

Its channel groups are coupled through the depthwise convolutions: a depthwise 3x3 (``groups == channels``) keeps
exactly the channels its input has, so the pointwise 1x1 before it, the depthwise after it and their BatchNorms
are one group; pruning the pointwise's filters removes the same channels from the depthwise layer.

Also exposes ``calibration_data()`` (training inputs in batches, for BatchNorm recalibration of candidates) and
``loss_x1000`` (1000 × cross-entropy on the held-out split); the entrypoint
``bench.tasks.depthwise_digits:loss_task`` is this task with that loss as its evaluator (``optimize_mode:
minimize``): the benchmark's check that searches work on any score scale and direction.
Weights are trained on first use (a few seconds) and cached under ``$PRUNEHUB_HOME/bench/``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from examples.digits import (
    SEED,
    _data,
    cached_model,
    criterion,
    dummy_input,
    evaluator,
    fine_tuner,
    optimizer,
    seeded,
    trainer,
)

__all__ = [
    "DepthwiseDigits",
    "calibration_data",
    "criterion",
    "dummy_input",
    "evaluator",
    "fine_tuner",
    "init_model",
    "loss_task",
    "loss_x1000",
    "model",
    "optimizer",
    "trainer",
]

EPOCHS = 15
CALIBRATION_BATCH = 64
_CACHE_VERSION = "v1"


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """depthwise 3x3 (stride) + BN + ReLU, then pointwise 1x1 to ``cout`` + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class DepthwiseDigits(nn.Module):
    """stem 3x3 (16) → separable 16→32 → separable 32→64 (stride 2, 4x4) → separable 64→64 → pool → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = _separable(16, 32, 1)
        self.block2 = _separable(32, 64, 2)
        self.block3 = _separable(64, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _cache_path() -> Path:
    home = Path(os.environ.get("PRUNEHUB_HOME", ".prunehub"))
    return home / "bench" / f"depthwise-digits-{_CACHE_VERSION}.safetensors"


def init_model() -> nn.Module:
    """The untrained network, seeded."""
    return seeded(DepthwiseDigits, SEED)


def model() -> nn.Module:
    """The pretrained network, a fresh copy on every call (trained once, then loaded from the cache)."""
    return cached_model(DepthwiseDigits, _cache_path(), _train_dense)


def _train_dense() -> nn.Module:
    trained = init_model()
    opt = optimizer(trained)
    loss = criterion()
    for epoch in range(EPOCHS):
        trainer(trained, opt, loss, epoch)
    return trained


def calibration_data() -> Iterator[torch.Tensor]:
    """Training inputs in fixed batches of 64 (no labels): what BatchNorm recalibration of a candidate runs."""
    x_train = _data()[0]
    for start in range(0, len(x_train), CALIBRATION_BATCH):
        yield x_train[start : start + CALIBRATION_BATCH]


def loss_x1000(model: nn.Module) -> float:
    """1000 × the mean cross-entropy on the held-out split (lower is better: ``optimize_mode: minimize``)."""
    _, _, x_test, y_test = _data()
    model.eval()
    with torch.no_grad():
        return 1000.0 * float(nn.functional.cross_entropy(model(x_test), y_test))


def loss_task() -> SimpleNamespace:
    """This task with :func:`loss_x1000` as its evaluator (entrypoint ``bench.tasks.depthwise_digits:loss_task``)."""
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
