"""Task module: a small CNN on scikit-learn's bundled 8x8 digits (real data, no download).

The pretrained weights are trained on first use (about ten seconds on a CPU) and cached under
``$PRUNEHUB_HOME/examples/`` (default ``.prunehub/examples/``), so later calls of :func:`model` load them.
Held-out accuracy of the dense model is about 98%.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

SEED = 0
EPOCHS = 12
BATCH_SIZE = 32
_CACHE_VERSION = "v1"


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions with BatchNorm, one pooling, two Linear layers: 1x8x8 -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


@lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=SEED, stratify=digits.target
    )
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _cache_path() -> Path:
    home = Path(os.environ.get("PRUNEHUB_HOME", ".prunehub"))
    return home / "examples" / f"digits-cnn-{_CACHE_VERSION}.safetensors"


def seeded(build: Callable[[], nn.Module], seed: int = SEED) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` (the same initial weights every call), leaving the caller's
    random state as it was."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(generator_state)


def cached_model(build: Callable[[], nn.Module], path: Path, train: Callable[[], nn.Module]) -> nn.Module:
    """A fresh ``build()`` with the weights cached at ``path`` (safetensors), in eval mode; on first use
    ``train()`` makes them and they are written atomically, so concurrent workers never read half a file."""
    from safetensors.torch import load_file, save_file

    net = build()
    if path.exists():
        net.load_state_dict(load_file(str(path)))
    else:
        trained = train()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(trained.state_dict(), str(tmp))
        os.replace(tmp, path)
        net.load_state_dict(trained.state_dict())
    net.eval()
    return net


def init_model() -> nn.Module:
    """The untrained network, seeded (the same initial weights every call)."""
    return seeded(DigitsCNN)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def criterion() -> nn.Module:
    return nn.CrossEntropyLoss()


def trainer(model: nn.Module, optimizer, criterion, epoch: int, callback=None) -> None:  # type: ignore[no-untyped-def]
    """One epoch over the training split, shuffled with a seed derived from ``epoch`` (reproducible)."""
    x_train, y_train, _, _ = _data()
    model.train()
    generator = torch.Generator().manual_seed(SEED * 1000 + epoch)
    order = torch.randperm(len(y_train), generator=generator)
    for start in range(0, len(order), BATCH_SIZE):
        idx = order[start : start + BATCH_SIZE]
        optimizer.zero_grad()
        loss = criterion(model(x_train[idx]), y_train[idx])
        loss.backward()
        if callback is not None:
            callback()
        optimizer.step()


def fine_tuner(model: nn.Module, epochs: int = 1) -> None:
    """Fine-tune a pruned model for ``epochs`` epochs: the training optimizer with its learning rate decayed to zero
    along a cosine over the call's steps.

    Why a schedule: at a constant 0.05 (the rate the dense net is trained from scratch with) a freshly pruned net's
    accuracy jumps around from one epoch to the next (uniform at FLOPs x0.25 on ``bench.tasks.residual_digits``:
    0.983, 0.897, 0.947 after 1, 2, 3 epochs), so a comparison after a fixed fine-tune would rank luck. Decayed,
    it settles (0.978, 0.992, 0.997). Both from ``python -m bench.finetune_stability``.
    """
    opt = optimizer(model)
    base_lr = [group["lr"] for group in opt.param_groups]
    steps = epochs * -(-len(_data()[1]) // BATCH_SIZE)
    done = 0

    def decay() -> None:  # the trainer calls it before each optimizer step
        nonlocal done
        factor = 0.5 * (1.0 + math.cos(math.pi * min(done, steps) / steps))
        for group, lr in zip(opt.param_groups, base_lr, strict=True):
            group["lr"] = lr * factor
        done += 1

    loss = criterion()
    for epoch in range(epochs):
        trainer(model, opt, loss, epoch, callback=decay)


def calibration_data() -> Iterator[torch.Tensor]:
    """Training inputs in a fixed shuffled order, one batch at a time: prunehub re-estimates BatchNorm statistics
    on the first few before it scores a pruned candidate (no labels, no weight update)."""
    x_train, _, _, _ = _data()
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(SEED + 1))
    for start in range(0, len(order), BATCH_SIZE):
        yield x_train[order[start : start + BATCH_SIZE]]


def evaluator(model: nn.Module) -> float:
    """Accuracy on the held-out 20% split, in [0, 1]."""
    _, _, x_test, y_test = _data()
    model.eval()
    with torch.no_grad():
        predicted = model(x_test).argmax(dim=1)
    return float((predicted == y_test).float().mean())


def dummy_input() -> torch.Tensor:
    return torch.zeros(1, 1, 8, 8)


def _train_dense() -> nn.Module:
    net = init_model()
    opt = optimizer(net)
    loss = criterion()
    for epoch in range(EPOCHS):
        trainer(net, opt, loss, epoch)
    net.eval()
    return net


def model() -> nn.Module:
    """The pretrained CNN, a fresh copy on every call (trained once, then loaded from the cache)."""
    return cached_model(DigitsCNN, _cache_path(), _train_dense)
