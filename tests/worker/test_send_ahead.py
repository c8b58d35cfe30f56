"""A job sent ahead of its commit: the worker starts the new step's first job in its task process before the
transaction that inserted it commits (:func:`worker.runner._send_ahead`), and the request after the commit only
waits for the answer. Each job still runs once; a job whose transaction failed is killed, never answered to
another request. Real task processes throughout; the evaluator counts its calls in a file
(``tests.tasks.counting_evaluator``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pruning.search.configs import parse_algorithm_config
from server.db.migrate import upgrade
from server.db.models import Trial
from server.db.session import make_engine, make_session_factory
from server.services import runs
from server.services.experiments import create_experiment
from server.settings import Settings
from tests.conftest import seed_digits
from worker import isolation
from worker.runner import open_task_process, run_experiment

TASK = "tests.tasks.counting_evaluator"
SPEC = {"algorithm": "annealing", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "base_algo": "l1",
        "start_temperature": 100, "stop_temperature": 30, "cool_down_rate": 0.7, "seed": 5}  # 4 proposals + start


@pytest.fixture
def env(tmp_path: Path, digits_weights: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, Any]]:
    seed_digits(tmp_path, digits_weights)
    monkeypatch.setenv("PRUNEHUB_HOME", str(tmp_path))
    monkeypatch.setenv("PRUNEHUB_TEST_COUNT_FILE", str(tmp_path / "evaluations.txt"))
    monkeypatch.setenv("PRUNEHUB_TEST_EVAL_DELAY", "0.3")
    url = f"sqlite:///{tmp_path}/ahead.db"
    upgrade(url)
    settings = Settings(home=tmp_path, database_url=url, artifacts_dir=tmp_path / "artifacts",
                        allowed_entrypoints=["examples.", "tests."], worker_heartbeat_s=0.5)
    engine = make_engine(url)
    yield settings, make_session_factory(engine)
    engine.dispose()


def _evaluations(settings: Settings) -> int:
    path = settings.home / "evaluations.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _problem_and_job(settings: Settings, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    with open_task_process(TASK, settings) as child:
        problem = child.request("resolve", {"config": parse_algorithm_config(SPEC).model_dump(mode="json")})["problem"]
    units = [unit["name"] for unit in problem["pruning"]["units"]]
    return problem, {"key": key, "distribution": {name: 0.5 for name in units}}


def _send_ahead(settings: Settings, problem: dict[str, Any], job: dict[str, Any]) -> bool:
    return isolation.send_ahead(TASK, list(settings.allowed_entrypoints), {"problem": problem, "job": job},
                                artifacts_dir=str(settings.artifacts_dir), device=settings.device,
                                memory_limit_mb=settings.job_memory_limit_mb)


def test_a_job_sent_ahead_runs_once_and_answers_its_own_request(env: tuple[Settings, Any]) -> None:
    settings, _ = env
    problem, job = _problem_and_job(settings, "ahead-1")
    started = time.monotonic()
    assert _send_ahead(settings, problem, job)
    assert time.monotonic() - started < 0.3  # it returned while the job runs (its evaluator sleeps 0.3 s)
    with open_task_process(TASK, settings) as child:
        answer = child.request("job", {"problem": problem, "job": job})
        assert answer["result"]["key"] == "ahead-1" and answer["result"]["status"] == "succeeded"
        assert not child.has_ahead
        again = child.request("job", {"problem": problem, "job": {**job, "key": "after"}})
    assert again["result"]["key"] == "after"
    assert _evaluations(settings) == 2  # the job sent ahead ran once, not again for its request


def test_a_job_sent_ahead_for_nothing_is_never_taken_for_another(env: tuple[Settings, Any]) -> None:
    settings, _ = env
    problem, job = _problem_and_job(settings, "ahead-2")
    assert _send_ahead(settings, problem, job)
    with open_task_process(TASK, settings) as child:
        # Another job's request: the process running the one sent ahead is killed, a new one answers this one.
        answer = child.request("job", {"problem": problem, "job": {**job, "key": "other"}})
    assert answer["result"]["key"] == "other"
    assert _send_ahead(settings, problem, {**job, "key": "dropped"})
    with open_task_process(TASK, settings) as child:
        pid = child.pid
    assert _send_ahead(settings, problem, {**job, "key": "dropped-too"})
    isolation.drop_ahead()  # its transaction failed: the process running it goes
    with open_task_process(TASK, settings) as child:
        assert child.pid != pid
        answer = child.request("job", {"problem": problem, "job": {**job, "key": "fresh"}})
    assert answer["result"]["key"] == "fresh"


def _create(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        experiment = create_experiment(session, owner="local", name="ahead", entrypoint=TASK,
                                       config=parse_algorithm_config(SPEC), allowed_prefixes=["examples.", "tests."])
        session.commit()
        return experiment.id


def _search_trials(factory: sessionmaker[Session], experiment_id: int) -> list[Trial]:
    with factory() as session:
        return list(session.scalars(select(Trial).where(
            Trial.experiment_id == experiment_id, Trial.kind.not_in(list(runs.SERVICE_KINDS))).order_by(Trial.seq)))


def test_a_sequential_search_sends_each_next_job_ahead_and_runs_it_once(
    env: tuple[Settings, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, factory = env
    sent: list[bool] = []
    send = isolation.send_ahead

    def counted(*args: Any, **kwargs: Any) -> bool:
        sent.append(send(*args, **kwargs))
        return sent[-1]

    monkeypatch.setattr(isolation, "send_ahead", counted)
    experiment_id = _create(factory)
    assert run_experiment(experiment_id, session_factory=factory, settings=settings, worker_id="w") == "succeeded"
    trials = _search_trials(factory, experiment_id)
    assert len(trials) == 5 and all(t.status == "succeeded" for t in trials)
    assert sent == [True] * len(trials)  # every job started ahead of its commit (the first: of the resolve's record)
    assert _evaluations(settings) == len(trials) + 1  # each job once, and the export's evaluation


def test_a_failed_joined_advance_kills_the_job_it_sent_ahead_and_the_search_goes_on(
    env: tuple[Settings, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, factory = env
    add_trials = runs.add_trials
    failed: list[int] = []

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("lease_first") is not None and not failed:
            failed.append(1)
            raise RuntimeError("the joined advance failed after its job was sent ahead")
        return add_trials(*args, **kwargs)

    monkeypatch.setattr(runs, "add_trials", fails_once)
    experiment_id = _create(factory)
    assert run_experiment(experiment_id, session_factory=factory, settings=settings, worker_id="w") == "succeeded"
    assert failed == [1]
    trials = _search_trials(factory, experiment_id)
    assert len(trials) == 5 and all(t.status == "succeeded" for t in trials)
    assert len({t.job_key for t in trials}) == 5
    # The job killed with its process may have reached its evaluator before the kill: at most one extra call.
    assert len(trials) + 1 <= _evaluations(settings) <= len(trials) + 2
