"""The import boundaries of DESIGN.md: the pure library imports no service code, the API process never imports
torch or user code, the worker never imports FastAPI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_pruning_imports_no_service_code() -> None:
    forbidden = {"server", "worker", "sqlalchemy", "fastapi", "celery", "alembic", "starlette", "kombu"}
    assert _imports("pruning") & forbidden == set()


def test_worker_never_imports_fastapi_or_the_api() -> None:
    assert _imports("worker") & {"fastapi", "starlette", "uvicorn"} == set()
    for path in (ROOT / "worker").rglob("*.py"):
        assert "server.api" not in path.read_text(), path


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_the_api_process_never_imports_torch_or_user_code() -> None:
    modules = _modules_after(
        "from server.api.main import create_app; app = create_app(migrate=False); "
        "from fastapi.testclient import TestClient; import server.api.routes.experiments"
    )
    assert "torch" not in modules
    assert "examples.digits" not in modules
    assert "optuna" not in modules


def test_the_worker_parent_does_not_import_torch() -> None:
    # CUDA must never be initialised in Celery's prefork parent: torch is imported by the task, in the child.
    modules = _modules_after(
        "from server.settings import get_settings; from worker.celery_app import make_celery; "
        "from worker.tasks import register_tasks; app = make_celery(get_settings()); register_tasks(app); "
        "import worker.signals"
    )
    assert "torch" not in modules
    assert "fastapi" not in modules
