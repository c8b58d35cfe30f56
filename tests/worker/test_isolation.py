"""User code runs in a supervised child process: hangs, crashes, exits and memory hogs fail the experiment with a
readable reason; cancel kills the child; the worker process itself is never harmed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from pruning.search.configs import parse_algorithm_config
from server.db.migrate import upgrade
from server.db.models import Experiment, Trial
from server.db.session import make_engine, make_session_factory
from server.services.experiments import cancel_experiment, create_experiment
from server.settings import Settings
from tests.conftest import seed_digits
from worker.isolation import describe_exit
from worker.runner import run_experiment

pytestmark = pytest.mark.integration

SPEC = {"algorithm": "uniform", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "base_algo": "l1"}


@pytest.fixture
def env(tmp_path: Path, digits_weights: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    seed_digits(tmp_path, digits_weights)
    monkeypatch.setenv("PRUNEHUB_HOME", str(tmp_path))
    url = f"sqlite:///{tmp_path}/isolation.db"
    upgrade(url)
    settings = Settings(
        home=tmp_path, database_url=url, artifacts_dir=tmp_path / "artifacts",
        allowed_entrypoints=["examples.", "tests."], worker_heartbeat_s=0.5, job_timeout_s=20,
        job_memory_limit_mb=3000,
    )
    engine = make_engine(url)
    yield settings, make_session_factory(engine)
    engine.dispose()


def _create(factory: sessionmaker[Session], entrypoint: str) -> int:
    with factory() as session:
        experiment = create_experiment(
            session, owner="local", name=entrypoint, entrypoint=entrypoint, config=parse_algorithm_config(SPEC),
            allowed_prefixes=["examples.", "tests."],
        )
        session.commit()
        return experiment.id


def _error(factory: sessionmaker[Session], experiment_id: int) -> tuple[str, str]:
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        return experiment.status, experiment.error or ""


CASES = [("abort", "SIGABRT"), ("exit_", "exited with status 3"), ("hog", "MemoryError"), ("hang", "job_timeout")]


def test_misbehaving_user_code_fails_the_experiment_with_a_reason(env) -> None:  # type: ignore[no-untyped-def]
    settings, factory = env
    for attr, reason in CASES:
        # Only the hang waits for the time limit; the memory hog must reach its limit first even on a busy machine.
        settings = settings.model_copy(update={"job_timeout_s": 5 if attr == "hang" else 60})
        experiment_id = _create(factory, f"tests.tasks.misbehaving:{attr}")
        started = time.monotonic()
        status = run_experiment(experiment_id, session_factory=factory, settings=settings, worker_id="w")
        assert status == "failed", attr
        final_status, error = _error(factory, experiment_id)
        assert final_status == "failed"
        assert reason in error, (attr, error)
        assert time.monotonic() - started < 60
    # The same worker process goes on to serve a healthy experiment.
    good = _create(factory, "examples.digits")
    assert run_experiment(good, session_factory=factory, settings=settings, worker_id="w") == "succeeded"


def test_cancel_while_running_kills_the_child_within_seconds(env) -> None:  # type: ignore[no-untyped-def]
    settings, factory = env
    experiment_id = _create(factory, "tests.tasks.misbehaving:hang")
    outcome: dict[str, str] = {}
    runner = threading.Thread(
        target=lambda: outcome.setdefault(
            "status", run_experiment(experiment_id, session_factory=factory, settings=settings, worker_id="w")
        )
    )
    runner.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the job is running in its child
        with factory() as session:
            if session.query(Trial).filter_by(experiment_id=experiment_id, status="running").count():
                break
        time.sleep(0.2)
    children = _child_pids()
    assert children, "no task process found"
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        cancel_experiment(session, experiment)
        session.commit()
    cancelled_at = time.monotonic()
    runner.join(30)
    assert outcome.get("status") == "cancelled"
    assert time.monotonic() - cancelled_at < 10
    assert _error(factory, experiment_id)[0] == "cancelled"
    for pid in children:
        assert not _alive(pid), f"task process {pid} still alive"


def _child_pids() -> list[int]:
    """Task processes started by this test process (other test sessions on the machine have their own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"worker.child" in cmdline and parent == os.getpid():
                pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_exit_descriptions() -> None:
    assert "segmentation fault" in describe_exit(-11)
    assert "out-of-memory" in describe_exit(-9)
    assert "status 3" in describe_exit(3)
