"""Benchmark task: the residual net of ``bench.tasks.residual_digits`` on a harder, larger version of scikit-learn's
8x8 digits: each digit is placed somewhere on a 12x12 canvas.

Why another task: on the plain digits split a network pruned to FLOPs x0.25 and fine-tuned two epochs nearly
recovers the dense accuracy (uniform pruning keeps 357 of 360 held-out images), so no distribution can be shown to
be better there, and one held-out image is 0.28 points. Here the digit's position varies, the network has to learn
translation invariance with few channels, and pruning costs accuracy a better distribution can win back; the held-out
set is every test digit at 9 positions (3,240 images), so one image is 0.03 points.

- training: the same 80% split as ``examples.digits``; every epoch places each digit at a random offset (0-4 pixels
  in each axis, drawn from a generator seeded by the epoch, so training is reproducible);
- held-out: the 20% split, each digit at the 9 offsets {0, 2, 4}²; :func:`evaluator` is the accuracy on those,
  ``loss_task`` the same task scored by 1000 × cross-entropy (``optimize_mode: minimize``);
- optimizer, loss and the fine-tuner's cosine-decayed learning rate as in ``examples.digits``.

Imports torch, scikit-learn and safetensors only. Weights are trained on first use (under a minute on a CPU) and
cached under ``$PRUNEHUB_HOME/bench/``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from bench.tasks.residual_digits import ResidualDigits
from examples.digits import BATCH_SIZE, SEED, _data, cached_model, criterion, optimizer, seeded

__all__ = [
    "calibration_data",
    "criterion",
    "dummy_input",
    "evaluator",
    "fine_tuner",
    "init_model",
    "loss_task",
    "loss_task_of",
    "loss_x1000",
    "model",
    "optimizer",
    "train_dense",
    "trainer",
]

CANVAS = 12
EPOCHS = 20
_CACHE_VERSION = "v1"


def _place(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Each 1x8x8 image pasted onto a zero 1xCANVASxCANVAS canvas at its (row, col) offset."""
    out = torch.zeros(len(images), 1, CANVAS, CANVAS)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        out[i, :, r : r + 8, c : c + 8] = images[i]
    return out


@lru_cache(maxsize=1)
def _held_out() -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x_test, y_test = _data()
    span = CANVAS - 8
    corners = (0, span // 2, span)
    offsets = [(r, c) for r in corners for c in corners]
    xs = [_place(x_test, torch.full((len(x_test),), r), torch.full((len(x_test),), c)) for r, c in offsets]
    return torch.cat(xs), y_test.repeat(len(offsets))


def _shifted_train(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split with every digit at a random offset, drawn from a generator seeded by ``epoch``."""
    x_train, y_train, _, _ = _data()
    generator = torch.Generator().manual_seed(SEED * 1000 + 7 + epoch)
    span = CANVAS - 8 + 1
    rows = torch.randint(0, span, (len(x_train),), generator=generator)
    cols = torch.randint(0, span, (len(x_train),), generator=generator)
    return _place(x_train, rows, cols), y_train


def init_model() -> nn.Module:
    """The untrained network, seeded."""
    return seeded(ResidualDigits, SEED)


def trainer(model: nn.Module, optimizer, criterion, epoch: int, callback=None) -> None:  # type: ignore[no-untyped-def]
    """One epoch over the training split at this epoch's offsets, shuffled with a seed derived from ``epoch``."""
    x_train, y_train = _shifted_train(epoch)
    model.train()
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(SEED * 1000 + epoch))
    for start in range(0, len(order), BATCH_SIZE):
        idx = order[start : start + BATCH_SIZE]
        optimizer.zero_grad()
        loss = criterion(model(x_train[idx]), y_train[idx])
        loss.backward()
        if callback is not None:
            callback()
        optimizer.step()


def fine_tuner(model: nn.Module, epochs: int = 1) -> None:
    """Fine-tune ``epochs`` epochs with the training optimizer, its learning rate decayed to zero along a cosine over
    the call's steps (as ``examples.digits.fine_tuner``)."""
    opt = optimizer(model)
    base_lr = [group["lr"] for group in opt.param_groups]
    steps = epochs * -(-len(_data()[1]) // BATCH_SIZE)
    done = 0

    def decay() -> None:
        nonlocal done
        factor = 0.5 * (1.0 + math.cos(math.pi * min(done, steps) / steps))
        for group, lr in zip(opt.param_groups, base_lr, strict=True):
            group["lr"] = lr * factor
        done += 1

    loss = criterion()
    for epoch in range(epochs):
        trainer(model, opt, loss, epoch, callback=decay)


def calibration_data() -> Iterator[torch.Tensor]:
    """Training inputs (at epoch 0's offsets) in a fixed shuffled order, one batch at a time, for BatchNorm
    recalibration of candidates."""
    x_train, _ = _shifted_train(0)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(SEED + 1))
    for start in range(0, len(order), BATCH_SIZE):
        yield x_train[order[start : start + BATCH_SIZE]]


def evaluator(model: nn.Module) -> float:
    """Accuracy on the held-out split at its 9 offsets (3,240 images), in [0, 1]."""
    x_test, y_test = _held_out()
    model.eval()
    with torch.no_grad():
        predicted = model(x_test).argmax(dim=1)
    return float((predicted == y_test).float().mean())


def loss_x1000(model: nn.Module) -> float:
    """1000 × the mean cross-entropy on the held-out images (lower is better: ``optimize_mode: minimize``)."""
    x_test, y_test = _held_out()
    model.eval()
    with torch.no_grad():
        return 1000.0 * float(nn.functional.cross_entropy(model(x_test), y_test))


def dummy_input() -> torch.Tensor:
    return torch.zeros(1, 1, CANVAS, CANVAS)


def _cache_path() -> Path:
    home = Path(os.environ.get("PRUNEHUB_HOME", ".prunehub"))
    return home / "bench" / f"shifted-digits-{_CACHE_VERSION}.safetensors"


def train_dense(init: Callable[[], nn.Module], epochs: int) -> nn.Module:
    """``init()`` trained ``epochs`` epochs on the shifted training split (the dense weights a cache holds)."""
    trained = init()
    opt = optimizer(trained)
    loss = criterion()
    for epoch in range(epochs):
        trainer(trained, opt, loss, epoch)
    return trained


def model() -> nn.Module:
    """The pretrained network, a fresh copy on every call (trained once, then loaded from the cache)."""
    return cached_model(ResidualDigits, _cache_path(), lambda: train_dense(init_model, EPOCHS))


def loss_task() -> SimpleNamespace:
    """This task with :func:`loss_x1000` as its evaluator (entrypoint ``bench.tasks.shifted_digits:loss_task``)."""
    return loss_task_of(model, init_model)


def loss_task_of(model: Callable[[], nn.Module], init_model: Callable[[], nn.Module]) -> SimpleNamespace:
    """The shifted-digits loss task of another network: its ``model`` and ``init_model``, this module's rest."""
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
