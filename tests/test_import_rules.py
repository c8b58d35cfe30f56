"""The import boundaries of DESIGN.md: the pure library imports no service code, the API process never imports
torch or user code, the worker never imports FastAPI, and the API and the services never import the worker (only
the CLI, the composition root of both processes, does)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _full_imports(package: str) -> dict[str, set[str]]:
    """Every absolute module a package's files import (at the top or inside a function), by file."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names = found.setdefault(str(path.relative_to(ROOT)), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return found


def _imports(package: str) -> set[str]:
    return {name.split(".")[0] for names in _full_imports(package).values() for name in names}


def test_pruning_imports_no_service_code() -> None:
    forbidden = {"server", "worker", "sqlalchemy", "fastapi", "celery", "alembic", "starlette", "kombu"}
    assert _imports("pruning") & forbidden == set()


def test_worker_never_imports_fastapi_or_the_api() -> None:
    assert _imports("worker") & {"fastapi", "starlette", "uvicorn"} == set()
    for path in (ROOT / "worker").rglob("*.py"):
        assert "server.api" not in path.read_text(), path


def test_the_api_and_the_services_never_import_the_worker() -> None:
    # Task names, queues and the broker app live in server.services.dispatch; only server/cli.py wires the worker.
    for package in ("server/api", "server/services", "server/db"):
        for path, names in _full_imports(package).items():
            assert {n for n in names if n == "worker" or n.startswith("worker.")} == set(), path
    importers = {
        path for path, names in _full_imports("server").items() if any(n.split(".")[0] == "worker" for n in names)
    }
    assert importers <= {"server/cli.py"}, importers


def test_the_worker_sends_through_the_dispatcher_and_names_no_queue() -> None:
    # The other direction: the worker takes task names and queues from server.services.dispatch, never its own.
    for path in (ROOT / "worker").rglob("*.py"):
        text = path.read_text()
        for literal in ('"experiments.run"', '"evaluations.run"', '"evaluations.resolve"', '"evaluations.export"',
                        'queue="', "send_task(", '.split(".", 1)'):
            assert literal not in text, (path, literal)


def test_the_api_process_never_imports_the_worker(tmp_path: Path) -> None:
    # A started app (its lifespan builds the dispatcher and its broker app) that served a request.
    modules = _modules_after(
        "from server.settings import Settings; from server.api.main import create_app; "
        "from fastapi.testclient import TestClient; "
        f"settings = Settings(home={str(tmp_path)!r}, database_url='sqlite:///{tmp_path}/api.db'); "
        "client = TestClient(create_app(settings)).__enter__(); "
        "assert client.get('/readyz').status_code == 200"
    )
    assert "server.services.dispatch" in modules and "celery" in modules
    assert {m for m in modules if m == "worker" or m.startswith("worker.")} == set()


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
