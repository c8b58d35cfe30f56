"""GPU check task (``bench/gpu_check.py``): the evaluator takes 1 GiB of GPU memory and then sleeps for minutes,
so the check can cancel the experiment mid-job and see the memory come back once the task process is killed."""

from __future__ import annotations

import time

import torch
from torch import nn

from bench.tasks.gpu_resnet18 import dummy_input, model, report, trainer

__all__ = ["dummy_input", "evaluator", "model", "trainer"]


def evaluator(net: nn.Module) -> float:
    device = next(net.parameters()).device
    held = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device=device)  # 1 GiB
    report(net, "hold")
    time.sleep(600)
    return float(held[0])
