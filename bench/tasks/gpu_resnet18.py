"""GPU check task (``bench/gpu_check.py``): a ResNet-18-shaped model on random 3x64x64 inputs.

Every evaluation prints one ``prunehub-gpu-check`` line to the worker's log with the device the model ran on, the
task process id and how many times ``torch.cuda.synchronize`` has been called in this process so far (counted by a
wrapper installed at import), so the check can tell the model ran on CUDA and latency was measured synchronised.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from bench.models import ResNet18, randomise

_syncs = 0
if torch.cuda.is_available():
    _real_synchronize = torch.cuda.synchronize

    def _counting_synchronize(device: object = None) -> None:
        global _syncs
        _syncs += 1
        _real_synchronize(device)  # type: ignore[arg-type]

    torch.cuda.synchronize = _counting_synchronize  # type: ignore[assignment]


def report(model: nn.Module, task: str) -> None:
    """Print the line ``bench/gpu_check.py`` reads from the worker's log."""
    device = str(next(model.parameters()).device)
    print("prunehub-gpu-check " + json.dumps({"task": task, "device": device, "pid": os.getpid(),
                                              "synchronize_calls": _syncs}), flush=True)


def model() -> nn.Module:
    return randomise(ResNet18(classes=10), seed=0).eval()


def dummy_input() -> torch.Tensor:
    return torch.zeros(1, 3, 64, 64)


def evaluator(net: nn.Module) -> float:
    report(net, "resnet18")
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 64, 64, generator=generator).to(device)
    with torch.no_grad():
        logits = net(x)
    return float(logits.softmax(1).max(1).values.mean())  # a deterministic score of the pruned weights


def trainer(model: nn.Module, optimizer, criterion, epoch: int, callback=None) -> None:  # type: ignore[no-untyped-def]
    return None
