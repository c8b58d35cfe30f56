"""Shared fixtures: real services, real processes.

* ``embedded_env``: SQLite file + Celery filesystem transport in a temporary folder (the embedded default).
* ``services_env``: the machine's PostgreSQL and Redis, from ``PRUNEHUB_TEST_DATABASE_URL`` /
  ``PRUNEHUB_TEST_REDIS_URL``. When those variables are set (``.ci/run`` sets them) and a server is unreachable,
  the tests FAIL; they skip only when the variables are unset.
* ``LiveService``: a real ``prunehub serve`` (uvicorn) and real ``prunehub worker`` processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(home: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNEHUB_")}
    env.update(
        {
            "PRUNEHUB_HOME": str(home),
            "PRUNEHUB_DATABASE_URL": f"sqlite:///{home}/prunehub.db",
            "PRUNEHUB_BROKER_URL": "filesystem://",
            "PRUNEHUB_ARTIFACTS_DIR": str(home / "artifacts"),
            "PRUNEHUB_ALLOWED_ENTRYPOINTS": "examples.,tests.",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


@dataclass
class LiveService:
    """An API server and worker processes started from the CLI, with their logs in ``home``."""

    home: Path
    env: dict[str, str]
    port: int = 0
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        """The local admin key the API created on its first start (the embedded default)."""
        return (self.home / "api-key").read_text().strip()

    def http(self, **kwargs: object) -> httpx.Client:
        """An HTTP client of the live API that sends the local key."""
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers, **kwargs)  # type: ignore[arg-type]

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.home / log_name, "ab")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args],
            env=self.env,
            cwd=self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "server.cli", "db", "upgrade"], env=self.env, cwd=self.home, check=True,
            capture_output=True,
        )

    def start_api(self) -> None:
        self.port = free_port()
        self.api = self._spawn(["serve", "--port", str(self.port)], "api.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"API exited: {(self.home / 'api.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("API did not start in 60 s")

    def start_worker(self, queues: str | None = None) -> subprocess.Popen[bytes]:
        args = ["worker", "--loglevel", "INFO"] + (["--queues", queues] if queues else [])
        worker = self._spawn(args, f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.home.glob("*.log"))
        )

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*self.workers, self.api]:
            if process is None:
                continue
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 120, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy and return that; fail naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def wait_terminal(client: httpx.Client, experiment_id: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/experiments/{experiment_id}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id} not finished after {timeout}s: {body}")


@pytest.fixture(scope="session")
def digits_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits example's pretrained weights, trained once per test session."""
    home = tmp_path_factory.mktemp("digits-home")
    subprocess.run(
        [sys.executable, "-c", "import examples.digits as d; d.model()"],
        env=base_env(home),
        cwd=ROOT,
        check=True,
    )
    (path,) = (home / "examples").glob("digits-cnn-*.safetensors")
    return path


def seed_digits(home: Path, weights: Path) -> None:
    """Put the cached digits weights where a process with PRUNEHUB_HOME=home looks for them."""
    target = home / "examples"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(weights, target / weights.name)


@pytest.fixture
def embedded_env(tmp_path: Path, digits_weights: Path) -> dict[str, str]:
    seed_digits(tmp_path, digits_weights)
    return base_env(tmp_path)


def _reset_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("DROP TABLE IF EXISTS trials, events, experiments, api_keys, bundles, alembic_version CASCADE")
            )
    finally:
        engine.dispose()


@pytest.fixture
def services_env(tmp_path: Path, digits_weights: Path) -> dict[str, str]:
    """Environment for the real PostgreSQL + Redis; fails (never skips) when configured but unreachable."""
    database_url = os.environ.get("PRUNEHUB_TEST_DATABASE_URL")
    redis_url = os.environ.get("PRUNEHUB_TEST_REDIS_URL")
    if not database_url or not redis_url:
        pytest.skip("PRUNEHUB_TEST_DATABASE_URL / PRUNEHUB_TEST_REDIS_URL not set")
    import redis
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(database_url)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL at {database_url} is not reachable: {exc}")
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=3)
        client.ping()
        client.flushdb()  # stale task messages of an earlier run would point at reused ids
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Redis at {redis_url} is not reachable: {exc}")
    _reset_postgres(database_url)
    seed_digits(tmp_path, digits_weights)
    return base_env(tmp_path, PRUNEHUB_DATABASE_URL=database_url, PRUNEHUB_BROKER_URL=redis_url)


@pytest.fixture
def live_embedded(embedded_env: dict[str, str], tmp_path: Path) -> Iterator[LiveService]:
    service = LiveService(tmp_path, embedded_env)
    yield from _run_live(service)


@pytest.fixture
def live_services(services_env: dict[str, str], tmp_path: Path) -> Iterator[LiveService]:
    service = LiveService(tmp_path, services_env)
    yield from _run_live(service)


def _run_live(service: LiveService) -> Iterator[LiveService]:
    # This test process reads the same cached example weights as the service's processes.
    previous_home = os.environ.get("PRUNEHUB_HOME")
    os.environ["PRUNEHUB_HOME"] = str(service.home)
    try:
        service.migrate()
        service.start_api()
        service.start_worker()
        yield service
    except BaseException:
        print(service.logs())
        raise
    finally:
        service.stop()
        if previous_home is None:
            os.environ.pop("PRUNEHUB_HOME", None)
        else:
            os.environ["PRUNEHUB_HOME"] = previous_home
