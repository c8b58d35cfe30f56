"""Benchmark task: a small residual network (BatchNorm, identity and 1x1-projection skips) on scikit-learn's
8x8 digits, with the same split, trainer contract and evaluator as ``examples.digits``.

Its channel groups are coupled: the stem and both blocks of stage 1 feed one chain of residual adds (one
16-channel group), the stage-2 projection and both stage-2 blocks another (32 channels). A pruner that masks
those convolutions independently loses, physically, only the channels every member gave up.

Imports torch, scikit-learn and safetensors only, so ``bench/nni_reference.py`` loads it in NNI's environment.
Weights are trained on first use (a few seconds) and cached under ``$PRUNEHUB_HOME/bench/``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

SEED = 0
EPOCHS = 15
BATCH_SIZE = 32
_CACHE_VERSION = "v2"


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


class ResidualDigits(nn.Module):
    """stem 3x3 (16) → 2 blocks at 16 ch, 8x8 → 2 blocks at 32 ch, 4x4 (projection skip) → pool → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(_Block(16, 16, 1), _Block(16, 16, 1))
        self.layer2 = nn.Sequential(_Block(16, 32, 2), _Block(32, 32, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


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
    return home / "bench" / f"residual-digits-{_CACHE_VERSION}.safetensors"


def init_model() -> nn.Module:
    """The untrained network, seeded."""
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    net = ResidualDigits()
    torch.random.set_rng_state(state)
    return net


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def criterion() -> nn.Module:
    return nn.CrossEntropyLoss()


def trainer(model: nn.Module, optimizer, criterion, epoch: int, callback=None) -> None:  # type: ignore[no-untyped-def]
    """One epoch over the training split, shuffled with a seed derived from ``epoch``."""
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
    opt = optimizer(model)
    loss = criterion()
    for epoch in range(epochs):
        trainer(model, opt, loss, epoch)


def evaluator(model: nn.Module) -> float:
    """Accuracy on the held-out 20% split."""
    _, _, x_test, y_test = _data()
    model.eval()
    with torch.no_grad():
        predicted = model(x_test).argmax(dim=1)
    return float((predicted == y_test).float().mean())


def dummy_input() -> torch.Tensor:
    return torch.zeros(1, 1, 8, 8)


def model() -> nn.Module:
    """The pretrained network, a fresh copy on every call (trained once, then loaded from the cache)."""
    from safetensors.torch import load_file, save_file

    path = _cache_path()
    net = ResidualDigits()
    if path.exists():
        net.load_state_dict(load_file(str(path)))
    else:
        trained = init_model()
        opt = optimizer(trained)
        loss = criterion()
        for epoch in range(EPOCHS):
            trainer(trained, opt, loss, epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(trained.state_dict(), str(tmp))
        os.replace(tmp, path)
        net.load_state_dict(trained.state_dict())
    net.eval()
    return net
