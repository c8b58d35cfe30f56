"""A tiny real task for the search tests: small CNNs on scikit-learn's bundled 8x8 digits, trained briefly.

Seeded and CPU-only; training a network takes about a second. ``make_task("plain" | "residual")`` returns a
:class:`pruning.task.Task` whose ``model()`` is a fresh copy of the trained network.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from pruning.task import Task

SEED = 0
BATCH_SIZE = 64


class PlainDigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


class ResidualDigitsCNN(nn.Module):
    """A stem and one residual block: conv1/bn1, conv3/bn3 and the add are one coupled channel group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 24, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(24)
        self.conv4 = nn.Conv2d(24, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(x))))))
        x = torch.relu(self.conv4(nn.functional.max_pool2d(x, 2)))
        return self.fc(x.mean(dim=(2, 3)))


@lru_cache(maxsize=1)
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def trainer(model: nn.Module, optimizer, criterion, epoch: int, callback=None) -> None:  # type: ignore[no-untyped-def]
    x_train, y_train, _, _ = data()
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


def evaluator(model: nn.Module) -> float:
    _, _, x_test, y_test = data()
    model.eval()
    with torch.no_grad():
        return float((model(x_test).argmax(dim=1) == y_test).float().mean())


def dummy_input() -> torch.Tensor:
    return torch.zeros(1, 1, 8, 8)


@lru_cache(maxsize=4)
def trained_state(kind: str, epochs: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    net = PlainDigitsCNN() if kind == "plain" else ResidualDigitsCNN()
    opt = optimizer(net)
    loss = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        trainer(net, opt, loss, epoch)
    return {name: value.clone() for name, value in net.state_dict().items()}


def make_task(kind: str = "plain", scale: float = 1.0) -> Task:
    """The task; ``scale`` multiplies the evaluator's accuracy (to check scale independence)."""
    state = trained_state(kind)

    def model() -> nn.Module:
        net = PlainDigitsCNN() if kind == "plain" else ResidualDigitsCNN()
        net.load_state_dict(state)
        net.eval()
        return net

    def scaled_evaluator(net: nn.Module) -> float:
        return scale * evaluator(net)

    return Task(
        entrypoint=f"tests.digits_{kind}",
        model=model,
        evaluator=scaled_evaluator,
        dummy_input=dummy_input,
        trainer=trainer,
        optimizer=optimizer,
    )
