"""Benchmark task: a small residual network (BatchNorm, identity and 1x1-projection skips) on scikit-learn's
8x8 digits, with ``examples.digits``' split, optimizer, trainer, fine-tuner and evaluator (imported from it).

Its channel groups are coupled: the stem and both blocks of stage 1 feed one chain of residual adds (one
16-channel group), the stage-2 projection and both stage-2 blocks another (32 channels). A pruner that masks
those convolutions independently loses, physically, only the channels every member gave up.

Imports torch, scikit-learn and safetensors only (through ``examples.digits`` and ``bench.models``), so
``bench/nni_reference.py`` loads it in NNI's environment.
Weights are trained on first use (a few seconds) and cached under ``$PRUNEHUB_HOME/bench/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from bench.models import BasicBlock
from examples.digits import (
    SEED,
    cached_model,
    criterion,
    dummy_input,
    evaluator,
    fine_tuner,
    optimizer,
    seeded,
    trainer,
)

__all__ = ["criterion", "dummy_input", "evaluator", "fine_tuner", "init_model", "model", "optimizer", "trainer"]

EPOCHS = 15
_CACHE_VERSION = "v2"


class ResidualDigits(nn.Module):
    """stem 3x3 (w) → 2 blocks at w ch, 8x8 → 2 blocks at 2w ch, 4x4 (projection skip) → pool → fc; w = 16."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, width, 1))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _cache_path() -> Path:
    home = Path(os.environ.get("PRUNEHUB_HOME", ".prunehub"))
    return home / "bench" / f"residual-digits-{_CACHE_VERSION}.safetensors"


def init_model() -> nn.Module:
    """The untrained network, seeded."""
    return seeded(ResidualDigits, SEED)


def model() -> nn.Module:
    """The pretrained network, a fresh copy on every call (trained once, then loaded from the cache)."""
    return cached_model(ResidualDigits, _cache_path(), _train_dense)


def _train_dense() -> nn.Module:
    trained = init_model()
    opt = optimizer(trained)
    loss = criterion()
    for epoch in range(EPOCHS):
        trainer(trained, opt, loss, epoch)
    return trained
