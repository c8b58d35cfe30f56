"""The embedded default's files are private: PRUNEHUB_HOME is 0700, prunehub.db and its WAL/SHM files 0600, both
for a new home and for one an older version left world-readable."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.main import create_app
from server.settings import Settings


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # what most shells give: files 0644, folders 0755
    yield
    os.umask(previous)


def _start(home: Path) -> TestClient:
    settings = Settings(
        home=home, database_url=f"sqlite:///{home}/prunehub.db", broker_url="filesystem://",
        artifacts_dir=home / "artifacts", allowed_entrypoints=["examples."],
    )
    return TestClient(create_app(settings))


def _check_private(home: Path) -> None:
    assert _mode(home) == 0o700
    database = home / "prunehub.db"
    companions = [database.with_name(database.name + suffix) for suffix in ("-wal", "-shm")]
    assert all(path.exists() for path in [database, *companions])  # WAL mode, a connection open
    for path in [database, *companions, home / "api-key"]:
        assert _mode(path) == 0o600, (path, oct(_mode(path)))


def test_a_new_home_is_private(tmp_path: Path, usual_umask: None) -> None:
    home = tmp_path / "home"
    with _start(home) as client:
        assert client.get("/readyz").status_code == 200
        _check_private(home)


def test_an_existing_world_readable_home_is_made_private_at_start(tmp_path: Path, usual_umask: None) -> None:
    home = tmp_path / "home"
    with _start(home):
        pass
    os.chmod(home, 0o755)
    for name in ("prunehub.db", "prunehub.db-wal", "prunehub.db-shm"):
        path = home / name
        path.touch()
        os.chmod(path, 0o644)
    with _start(home) as client:
        assert client.get("/readyz").status_code == 200
        _check_private(home)
