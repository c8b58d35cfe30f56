"""The package's lazy names: each is the object its static import names, and config/task names stay torch-free."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pruning

INIT = Path(pruning.__file__)


def _static_imports() -> dict[str, str]:
    """name -> module of the ``if TYPE_CHECKING:`` imports in ``pruning/__init__.py``."""
    tree = ast.parse(INIT.read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }


def test_every_public_name_is_its_static_import() -> None:
    static = _static_imports()
    assert sorted(static) == sorted(pruning.__all__)
    for name, module in static.items():
        # The lookup itself: `pruning.shrink` is the submodule once that is imported, not the function.
        assert pruning.__getattr__(name) is getattr(importlib.import_module(module), name), name


def test_config_and_task_names_do_not_import_torch() -> None:
    code = "import sys, pruning; pruning.SparsityDistribution; pruning.load_task; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=INIT.parent.parent, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
