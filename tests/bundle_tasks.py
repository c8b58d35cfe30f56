"""Task packages written into a temporary folder for the bundle tests: code that is installed nowhere.

``write_task_package(root)`` writes ``root/acme_tasks/`` (a tiny MLP on fixed random data: it runs a search in
about a second). Importing its ``probe`` module records what the task process sees (environment, ``sys.path``,
whether the service's packages import) into ``$HOME/probe.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY = '''
"""A tiny classifier on fixed random data: the smallest real task."""
import torch
from torch import nn

from acme_tasks.data import batches


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def evaluator(net):
    x, y = batches()
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def dummy_input():
    return torch.zeros(1, 8)


def trainer(net, optimizer, criterion, epoch, callback=None):
    x, y = batches()
    net.train()
    optimizer.zero_grad()
    loss = criterion(net(x), y)
    loss.backward()
    if callback is not None:
        callback()
    optimizer.step()
'''

DATA = '''
import torch


def batches():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
'''

PROBE = '''
"""Records what the task process sees, then behaves as the tiny task."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pruning

from acme_tasks.tiny import dummy_input, evaluator, model, trainer  # noqa: F401

Path(os.environ["HOME"], "probe.json").write_text(json.dumps({
    "env": dict(os.environ),
    "sys_path": sys.path,
    "cwd": os.getcwd(),
    "server_spec": importlib.util.find_spec("server") is not None,
    "worker_spec": importlib.util.find_spec("worker") is not None,
    "pruning_file": pruning.__file__,
}))
'''

NEEDS_MISSING = '''
import torch  # installed: fine
import prunehub_missing_dependency_xyz  # installed nowhere

from acme_tasks.tiny import dummy_input, evaluator, model  # noqa: F401
'''

SPEC: dict[str, Any] = {
    "name": "tiny bundled",
    "entrypoint": "acme_tasks.tiny",
    "algorithm": "uniform",
    "config_list": [{"sparsity": 0.5, "op_types": ["Linear"]}, {"exclude": True, "op_names": ["4"]}],
    "base_algo": "l1",
    "seed": 0,
}


def write_task_package(root: Path, *, marker: str = "") -> Path:
    """Write ``root/acme_tasks`` (plus a ``__pycache__`` and a ``.pyc`` the bundler must skip); returns ``root``.
    ``marker`` goes into a comment, so two calls with different markers give different bundles."""
    package = root / "acme_tasks"
    (package / "__pycache__").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f"# {marker}\n")
    (package / "tiny.py").write_text(TINY)
    (package / "data.py").write_text(DATA)
    (package / "probe.py").write_text(PROBE)
    (package / "needs_missing.py").write_text(NEEDS_MISSING)
    (package / "__pycache__" / "tiny.cpython-311.pyc").write_bytes(b"stale bytecode")
    (package / "stray.pyc").write_bytes(b"stale bytecode")
    return root
