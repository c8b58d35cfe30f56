"""Benchmark task whose user code costs nothing: a tiny model and an evaluator that returns a constant at once.

Running a search on it through the real service measures what prunehub itself costs per trial (database writes,
broker round trips, the supervised child process, shrinking and counting a tiny model).
"""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def model() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


def evaluator(model: nn.Module) -> float:
    return 1.0


def dummy_input() -> torch.Tensor:
    return torch.zeros(1, 1, 4, 4)


def trainer(model: nn.Module, optimizer, criterion, epoch: int, callback=None) -> None:  # type: ignore[no-untyped-def]
    return None
