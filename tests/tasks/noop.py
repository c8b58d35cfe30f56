"""A task that costs nothing: a tiny network and a constant evaluator (load tests, orchestration overhead)."""

from __future__ import annotations

import torch
from torch import nn


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def evaluator(net: nn.Module) -> float:
    return 1.0


def dummy_input() -> torch.Tensor:
    return torch.zeros(1, 1, 8, 8)
