"""Fixtures for the pruning library tests: a duck-typed user task on synthetic data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn


class DuckTask:
    """The user-task contract of DESIGN.md on a fixed synthetic data set (seeded, CPU, tiny)."""

    def __init__(
        self,
        make_model: Callable[[], nn.Module],
        inputs: Tensor,
        labels: Tensor,
        batch_size: int = 8,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self._make_model = make_model
        self.inputs, self.labels, self.batch_size = inputs, labels, batch_size
        self.loss_fn = loss_fn
        self.trainer_calls = 0
        self.evaluator_calls = 0

    def model(self) -> nn.Module:
        return self._make_model()

    def dummy_input(self) -> Tensor:
        return self.inputs[:2].clone()

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def make_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def evaluator(self, model: nn.Module) -> float:
        self.evaluator_calls += 1
        model.eval()
        with torch.no_grad():
            correct = 0
            for start in range(0, len(self.inputs), self.batch_size):
                out = model(self.inputs[start : start + self.batch_size])
                correct += int((out.argmax(1) == self.labels[start : start + self.batch_size]).sum())
        return correct / len(self.inputs)

    def trainer(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Any,
        epoch: int,
        callback: Callable[[], None] | None = None,
    ) -> None:
        self.trainer_calls += 1
        model.train()
        for start in range(0, len(self.inputs), self.batch_size):
            optimizer.zero_grad()
            out = model(self.inputs[start : start + self.batch_size])
            target = self.labels[start : start + self.batch_size]
            loss = self.loss_fn(out, target) if self.loss_fn else criterion(out, target)
            loss.backward()
            if callback is not None:
                callback()
            optimizer.step()


def synthetic(shape: tuple[int, ...], classes: int, n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen), torch.randint(0, classes, (n,), generator=gen)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    # Tiny models: one intra-op thread avoids oversubscription when other suites share the CPU.
    torch.set_num_threads(1)
    torch.manual_seed(0)
