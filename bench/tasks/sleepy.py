"""Benchmark task standing in for GPU work: the evaluator sleeps a fixed time (``PRUNEHUB_BENCH_SLEEP`` seconds,
default 0.5), then returns a score that depends on the pruned weights, so searches make real, deterministic
decisions. The model is tiny, so what is not sleep is prunehub's own cost."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class FourConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = torch.relu(conv(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def model() -> nn.Module:
    torch.manual_seed(0)
    return FourConvs().eval()


def evaluator(net: nn.Module) -> float:
    time.sleep(float(os.environ.get("PRUNEHUB_BENCH_SLEEP", "0.5")))
    with torch.no_grad():
        # The fraction of weight magnitude kept: a deterministic score that prefers pruning small filters.
        kept = sum(float(p.abs().sum()) for name, p in net.named_parameters() if "weight" in name)
    return kept


def dummy_input() -> torch.Tensor:
    return torch.zeros(1, 1, 8, 8)
