"""GPU check task (``bench/gpu_check.py``): four 4096 x 4096 Linear layers, the size at which 2:4 sparsity pays,
timed on a 2048 x 4096 batch.

Every evaluation prints one ``prunehub-gpu-check`` line to the worker's log (as ``bench.tasks.gpu_resnet18`` does)
with counters kept since the task process started: ``torch.cuda.synchronize`` calls, calls into the
semi-structured kernels (``torch._cslt_sparse_mm`` for cuSPARSELt, ``torch._sparse_semi_structured_mm``/``addmm``
for CUTLASS, the functions ``torch.sparse.semi_structured`` calls at run time), and ``synchronised_sparse_passes``:
synchronisations that followed at least one sparse-kernel call. A later evaluation in the same task process so
reports whether the earlier trials' semi-structured timing ran the kernel and synchronised after each pass. The
wrappers only count: nothing is printed inside a timed pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

HIDDEN = 4096
BATCH = 2048
_counts = {"synchronize_calls": 0, "sparse_kernel_calls": 0, "synchronised_sparse_passes": 0}
_pending = False


def _counting_kernel(real: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _pending
        _counts["sparse_kernel_calls"] += 1
        _pending = True
        return real(*args, **kwargs)

    return wrapper


if torch.cuda.is_available():
    _real_synchronize = torch.cuda.synchronize

    def _counting_synchronize(device: object = None) -> None:
        global _pending
        _real_synchronize(device)  # type: ignore[arg-type]
        _counts["synchronize_calls"] += 1
        if _pending:
            _counts["synchronised_sparse_passes"] += 1
            _pending = False

    torch.cuda.synchronize = _counting_synchronize  # type: ignore[assignment]
    for _name in ("_cslt_sparse_mm", "_sparse_semi_structured_mm", "_sparse_semi_structured_addmm"):
        if hasattr(torch, _name):
            setattr(torch, _name, _counting_kernel(getattr(torch, _name)))


class NMLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.fc4(x)


def model() -> nn.Module:
    torch.manual_seed(0)
    return NMLinear().eval()


def dummy_input() -> torch.Tensor:
    return torch.zeros(BATCH, HIDDEN)


def evaluator(net: nn.Module) -> float:
    device = next(net.parameters()).device
    print("prunehub-gpu-check " + json.dumps({"task": "nm_linear", "device": str(device), "pid": os.getpid(),
                                              **_counts}), flush=True)
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        return float(net(x).abs().mean())  # a deterministic score of the pruned weights
