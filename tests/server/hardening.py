"""An in-process API on SQLite or on the machine's PostgreSQL, with keys for two owners (the hardening tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.main import create_app
from server.db.session import make_engine, make_session_factory
from server.services.auth import create_key
from server.settings import Settings

VALID: dict[str, Any] = {
    "name": "ok",
    "entrypoint": "examples.digits",
    "algorithm": "uniform",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
}


class NoDispatch:
    """Stores nothing and sends nothing: these tests are about what the API accepts."""

    def send(self, task: str, target_id: int) -> None:
        pass

    def enqueue_experiment(self, experiment_id: int) -> None:
        pass

    def ping(self) -> None:
        pass


@dataclass
class Api:
    client: TestClient
    keys: dict[str, str]
    database_url: str

    def auth(self, owner: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[owner]}"}


def database_url(backend: str, tmp_path: Path) -> str:
    """A fresh, empty database of ``backend`` ("sqlite" or "postgresql"); PostgreSQL skips when not configured."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/api.db"
    url = os.environ.get("PRUNEHUB_TEST_DATABASE_URL")
    if not url:
        pytest.skip("PRUNEHUB_TEST_DATABASE_URL not set")
    from tests.conftest import _reset_postgres

    _reset_postgres(url)
    return url


@contextmanager
def running_api(backend: str, tmp_path: Path, **overrides: Any) -> Iterator[Api]:
    url = database_url(backend, tmp_path)
    settings = Settings(
        home=tmp_path,
        database_url=url,
        broker_url="filesystem://",
        artifacts_dir=tmp_path / "artifacts",
        allowed_entrypoints=["examples."],
        bootstrap_local_key=False,
        **overrides,
    )
    app = create_app(settings, dispatcher=NoDispatch())  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as client:
        engine = make_engine(url)
        with make_session_factory(engine)() as session:
            keys = {"alice": create_key(session, "alice"), "bob": create_key(session, "bob")}
            session.commit()
        engine.dispose()
        yield Api(client, keys, url)



@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """A real HTTP server (uvicorn, in a thread) of the API for ``settings``, without a broker; yields its URL."""
    import threading
    import time

    import uvicorn

    from tests.conftest import free_port

    port = free_port()
    app = create_app(settings, dispatcher=NoDispatch())  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
