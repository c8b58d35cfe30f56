"""One runner, two transports: the same seed gives the same history whether the emits are drained in the worker
(in-process) or sent through a broker (the Celery transport, its sends taken here in the order they were made).

Both run the real use cases (:func:`worker.runner.advance`, :func:`worker.runner.evaluate`) on a real SQLite
database with real task processes; only the broker between the Celery transport's sends and the next task is a
list in this test, so the order of work is the broker's FIFO order on one worker.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from pruning.search.configs import parse_algorithm_config
from server.db.migrate import upgrade
from server.db.models import Event, Experiment, Trial
from server.db.session import make_engine, make_session_factory
from server.services.dispatch import ADVANCE
from server.services.experiments import create_experiment
from server.services.runs import SEARCH_TRIAL
from server.settings import Settings
from tests.conftest import seed_digits
from worker.runner import CeleryTransport, RunContext, advance, evaluate, run_experiment

BASE = {"config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "base_algo": "l1", "seed": 11}
SPECS = {
    "annealing": {**BASE, "algorithm": "annealing", "start_temperature": 100, "stop_temperature": 40,
                  "cool_down_rate": 0.7, "batch_size": 2},
    "netadapt": {**BASE, "algorithm": "netadapt", "target_resource_ratio": 0.8, "initial_reduction": 0.1,
                 "short_term_finetune_epochs": 0, "resource": "flops"},
}


@pytest.fixture
def env(tmp_path: Path, digits_weights: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, Any]]:
    seed_digits(tmp_path, digits_weights)
    monkeypatch.setenv("PRUNEHUB_HOME", str(tmp_path))
    url = f"sqlite:///{tmp_path}/transports.db"
    upgrade(url)
    settings = Settings(home=tmp_path, database_url=url, artifacts_dir=tmp_path / "artifacts",
                        allowed_entrypoints=["examples."], worker_heartbeat_s=0.5)
    engine = make_engine(url)
    yield settings, make_session_factory(engine)
    engine.dispose()


def _create(factory: sessionmaker[Session], spec: dict[str, Any]) -> int:
    with factory() as session:
        experiment = create_experiment(session, owner="local", name="transports", entrypoint="examples.digits",
                                       config=parse_algorithm_config(spec), allowed_prefixes=["examples."])
        session.commit()
        return experiment.id


def _run_through_broker(experiment_id: int, settings: Settings, factory: sessionmaker[Session]) -> list[str]:
    broker: deque[tuple[str, int]] = deque([(ADVANCE, experiment_id)])
    ctx = RunContext(factory, settings, "broker-worker", CeleryTransport(lambda *m: broker.append(m), factory,
                                                                           settings))
    outcomes = []
    while broker:
        task, target = broker.popleft()
        outcomes.append(advance(target, ctx) if task == ADVANCE else evaluate(target, ctx))
    return outcomes


def _history(factory: sessionmaker[Session], experiment_id: int) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    with factory() as session:
        trials = session.scalars(
            select(Trial).where(Trial.experiment_id == experiment_id, SEARCH_TRIAL).order_by(Trial.seq)
        ).all()
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        rows = [(t.seq, t.job_key, t.status, round(t.score or 0.0, 9), t.flops, t.context.get("decision"),
                 t.attempts) for t in trials]
        best = session.get(Trial, experiment.best_trial_id) if experiment.best_trial_id else None
        summary = {
            "status": experiment.status,
            "best": best.job_key if best else None,
            "model": bool(best and (best.extra or {}).get("model_artifact")),
            "lease_owner": experiment.lease_owner,
        }
        return rows, summary


@pytest.mark.parametrize("algorithm", sorted(SPECS))
def test_both_transports_give_the_same_history(env: tuple[Settings, Any], algorithm: str) -> None:
    settings, factory = env
    inprocess = _create(factory, SPECS[algorithm])
    assert run_experiment(inprocess, session_factory=factory, settings=settings, worker_id="w") == "succeeded"
    brokered = _create(factory, SPECS[algorithm])
    outcomes = _run_through_broker(brokered, settings, factory)
    assert outcomes[-1] == "experiment succeeded", outcomes  # the export job, whose record advanced to the end
    history_a, summary_a = _history(factory, inprocess)
    history_b, summary_b = _history(factory, brokered)
    assert len(history_a) >= 3
    assert history_a == history_b
    assert summary_a == summary_b == {"status": "succeeded", "best": summary_a["best"], "model": True,
                                      "lease_owner": None}
    # The broker transport records each send on its row (the reaper's in-flight rule); the in-process one never
    # leaves the worker, so its rows say nothing was sent.
    with factory() as session:
        sent = {experiment_id: session.scalars(select(Trial.enqueued_at).where(Trial.experiment_id == experiment_id))
                .all() for experiment_id in (inprocess, brokered)}
        assert all(at is None for at in sent[inprocess]) and all(at is not None for at in sent[brokered])
        # Resolve and export ran as jobs of the same path, not in the history (no export when the best trial kept
        # its model, as NetAdapt's do).
        kinds = session.scalars(
            select(Trial.kind).where(Trial.experiment_id == brokered, ~SEARCH_TRIAL).order_by(Trial.seq)
        ).all()
        assert kinds[0] == "resolve" and kinds[1:] in ([], ["export"])
        events = [e.kind for e in session.scalars(select(Event).where(Event.experiment_id == brokered))]
        assert events.count("problem") == 1 and events.count("model") == len(kinds) - 1


def test_a_broken_task_module_fails_the_experiment_on_both(env: tuple[Settings, Any]) -> None:
    settings, factory = env
    strict = settings.model_copy(update={"allowed_entrypoints": ["nothing."]})
    inprocess, brokered = _create(factory, SPECS["annealing"]), _create(factory, SPECS["annealing"])
    assert run_experiment(inprocess, session_factory=factory, settings=strict, worker_id="w") == "failed"
    assert _run_through_broker(brokered, strict, factory)[-1] == "failed"
    with factory() as session:
        errors = [session.get(Experiment, i).error for i in (inprocess, brokered)]  # type: ignore[union-attr]
    assert errors[0] == errors[1] and "not allowed" in (errors[0] or "")


def test_a_sequential_search_costs_a_handful_of_statements_per_job(env: tuple[Settings, Any]) -> None:
    """Each job of a one-job-per-step search is recorded, told, asked and the next one claimed in one transaction
    (the advance joins the record; the worker goes on with the job it inserted under its lease): six statements
    per job (lock the trial and experiment, the result, the tally, the state, the next trial, the events). Two
    transactions, a broker hop and a dozen statements per job were the orchestration cost this replaced.

    Counted as the difference between a longer and a shorter run, so the start-up (claim, resolve) and the export
    do not count, and only on the thread that runs the jobs (the lease heartbeat beats by the clock)."""
    settings, factory = env
    engine = factory.kw["bind"]
    runner = threading.get_ident()

    def statements_and_jobs(max_trials: int) -> tuple[int, int]:
        spec = {**SPECS["annealing"], "batch_size": 1, "stop_temperature": 1, "cool_down_rate": 0.8,
                "max_trials": max_trials}
        experiment_id = _create(factory, spec)
        statements: list[str] = []

        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if threading.get_ident() == runner and not statement.startswith("SELECT experiments.status"):
                statements.append(statement)  # not the cancel poll either: it asks once per second of a job

        event.listen(engine, "before_cursor_execute", count)
        try:
            outcome = run_experiment(experiment_id, session_factory=factory, settings=settings, worker_id="w")
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert outcome == "succeeded"
        history, _ = _history(factory, experiment_id)
        return len(statements), len(history)

    short, long = statements_and_jobs(4), statements_and_jobs(12)
    assert (short[1], long[1]) == (4, 12)
    per_job = (long[0] - short[0]) / (long[1] - short[1])
    assert per_job <= 6, f"{per_job:.1f} statements per job"
