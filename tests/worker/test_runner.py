"""The runner called directly (no broker) on a real SQLite database: leases, replay, cancel."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pruning.search.configs import parse_algorithm_config
from server.db.migrate import upgrade
from server.db.models import Event, Experiment, Trial, utcnow
from server.db.session import make_engine, make_session_factory
from server.services.experiments import cancel_experiment, create_experiment
from server.services.runs import SEARCH_TRIAL
from server.settings import Settings
from tests.conftest import seed_digits
from worker.runner import run_experiment

SPEC = {
    "algorithm": "uniform",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
    "base_algo": "l1",
}


@pytest.fixture
def env(
    tmp_path: Path, digits_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    seed_digits(tmp_path, digits_weights)
    monkeypatch.setenv("PRUNEHUB_HOME", str(tmp_path))
    url = f"sqlite:///{tmp_path}/runner.db"
    upgrade(url)
    settings = Settings(
        home=tmp_path, database_url=url, artifacts_dir=tmp_path / "artifacts", allowed_entrypoints=["examples."],
        worker_heartbeat_s=0.2,
    )
    engine = make_engine(url)
    yield settings, make_session_factory(engine)
    engine.dispose()


def _create(factory: sessionmaker[Session], **overrides: object) -> int:
    with factory() as session:
        experiment = create_experiment(
            session,
            owner="local",
            name="runner test",
            entrypoint="examples.digits",
            config=parse_algorithm_config({**SPEC, **overrides}),
            allowed_prefixes=["examples."],
        )
        session.commit()
        return experiment.id


def _run(settings: Settings, factory: sessionmaker[Session], experiment_id: int, worker: str = "w1") -> str:
    return run_experiment(experiment_id, session_factory=factory, settings=settings, worker_id=worker)


def test_runs_to_success_and_logs_events(env: tuple[Settings, sessionmaker[Session]]) -> None:
    settings, factory = env
    experiment_id = _create(factory)
    assert _run(settings, factory, experiment_id) == "succeeded"
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None and experiment.lease_owner is None and experiment.attempts == 1
        assert experiment.problem is not None and experiment.search_state is not None
        kinds = [e.kind for e in session.scalars(select(Event).where(Event.experiment_id == experiment_id))]
        assert kinds[0] == "status" and "trial" in kinds and "best" in kinds and kinds[-1] == "status"


def test_a_duplicate_delivery_exits_while_the_lease_is_live(env: tuple[Settings, sessionmaker[Session]]) -> None:
    settings, factory = env
    experiment_id = _create(factory)
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        experiment.status, experiment.lease_owner, experiment.heartbeat_at = "running", "other-worker", utcnow()
        session.commit()
    assert _run(settings, factory, experiment_id) == "skipped"
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None and experiment.lease_owner == "other-worker" and experiment.attempts == 0
        assert session.scalars(select(Trial)).all() == []
    # The other worker died: its lease goes stale and the next delivery takes over.
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        experiment.heartbeat_at = utcnow() - timedelta(seconds=settings.lease_grace_s + 1)
        session.commit()
    assert _run(settings, factory, experiment_id) == "succeeded"


def test_a_takeover_waits_for_the_dead_workers_job_lease_instead_of_dropping_it(
    env: tuple[Settings, sessionmaker[Session]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker died mid-job. Its job's lease was renewed by the job's own heartbeat (and set when the job
    # started), so it outlives the experiment's lease by up to a heartbeat: the next worker takes over the stale
    # experiment while the job still looks held. It must wait for that lease to go stale and run the job, not skip
    # it and drain (which released the experiment with its step unfinished: the reaper then re-sent the job and
    # the experiment was claimed a third time, seen in CI as attempts == 3 after one SIGKILL).
    settings, factory = env
    settings = settings.model_copy(update={"lease_grace_s": 1.0})
    experiment_id = _create(factory)
    now = utcnow()
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        experiment.status, experiment.lease_owner, experiment.attempts = "running", "w-dead", 1
        experiment.heartbeat_at = now - timedelta(seconds=settings.lease_grace_s + 0.1)  # just stale
        job = Trial(experiment_id=experiment_id, seq=0, step=0, job_key="resolve", kind="resolve", status="running",
                    lease_owner="w-dead", heartbeat_at=now, attempts=1, distribution={}, context={},
                    extra={"job": {"kind": "resolve"}})
        session.add(job)
        session.commit()
        job_id = job.id
    from server.services import runs

    taken = []
    take = runs.take_trial_lease
    monkeypatch.setattr(runs, "take_trial_lease", lambda trial, worker: (taken.append(utcnow()), take(trial, worker)))
    assert _run(settings, factory, experiment_id) == "succeeded"
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None and experiment.attempts == 2 and experiment.lease_owner is None
        job = session.get(Trial, job_id)
        assert job is not None and job.status == "succeeded" and job.attempts == 2  # run once more, by us
    assert taken[0] >= now + timedelta(seconds=settings.lease_grace_s)  # not before its lease went stale


def test_recorded_trials_are_replayed_not_re_evaluated(env: tuple[Settings, sessionmaker[Session]]) -> None:
    settings, factory = env
    experiment_id = _create(factory)
    # A previous run recorded the job's trial, then died before telling the strategy.
    with factory() as session:
        session.add(
            Trial(
                experiment_id=experiment_id, seq=1, job_key="uniform-0", kind="evaluate", status="succeeded",
                distribution={}, score=0.123456, context={},
            )
        )
        session.commit()
    assert _run(settings, factory, experiment_id) == "succeeded"
    with factory() as session:
        trials = session.scalars(select(Trial).where(Trial.experiment_id == experiment_id, SEARCH_TRIAL)).all()
        assert len(trials) == 1
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None and experiment.best_score == 0.123456


def test_cancelled_before_start_is_not_run(env: tuple[Settings, sessionmaker[Session]]) -> None:
    settings, factory = env
    experiment_id = _create(factory)
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        cancel_experiment(session, experiment)
        session.commit()
    assert _run(settings, factory, experiment_id) == "skipped"
    with factory() as session:
        assert session.get(Experiment, experiment_id).status == "cancelled"  # type: ignore[union-attr]


def test_allow_list_is_enforced_again_in_the_worker(env: tuple[Settings, sessionmaker[Session]]) -> None:
    settings, factory = env
    experiment_id = _create(factory)
    strict = settings.model_copy(update={"allowed_entrypoints": ["mycompany."]})
    assert _run(strict, factory, experiment_id) == "failed"
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None and "not allowed" in (experiment.error or "")


def test_reaper_resends_only_what_has_no_message_in_flight(env: tuple[Settings, sessionmaker[Session]]) -> None:
    from server.services.runs import experiments_to_resend

    settings, factory = env
    fresh_queued = _create(factory)
    send_failed = _create(factory)
    waiting = _create(factory)  # queued behind a busy worker for minutes: its message is still in the broker
    long_lost = _create(factory)
    live = _create(factory)
    stale = _create(factory)
    old, older = utcnow() - timedelta(seconds=120), utcnow() - timedelta(seconds=7200)
    with factory() as session:
        for experiment_id, status, beat, sent in (
            (send_failed, "queued", None, None),
            (waiting, "queued", None, old),
            (long_lost, "queued", None, older),
            (live, "running", utcnow(), old),
            (stale, "running", old, older + timedelta(seconds=1)),
        ):
            experiment = session.get(Experiment, experiment_id)
            assert experiment is not None
            experiment.status, experiment.heartbeat_at, experiment.created_at = status, beat, older
            experiment.enqueued_at = sent
            experiment.lease_owner = "w-dead" if status == "running" else None
        session.commit()
        assert experiments_to_resend(session, grace_s=30, lost_s=3600) == [send_failed, long_lost, stale]
        session.commit()
        # Recorded as sent: the next rounds send nothing, however long the worker stays dead or busy.
        assert experiments_to_resend(session, grace_s=30, lost_s=3600) == []
        # Once a worker took the message (its heartbeat is newer) and then died, the experiment is sent again.
        experiment = session.get(Experiment, stale)
        assert experiment is not None
        experiment.enqueued_at, experiment.heartbeat_at = old, old + timedelta(seconds=60)
        session.commit()
        assert experiments_to_resend(session, grace_s=30, lost_s=3600) == [stale]
    assert fresh_queued not in (send_failed, waiting, stale)


def test_reaper_resends_distributed_jobs_only(env: tuple[Settings, sessionmaker[Session]]) -> None:
    # An in-process trial runs inside its experiment (whose lease the reaper watches), never from a message.
    from server.services.runs import trials_to_resend

    settings, factory = env
    experiment_id = _create(factory)
    old = utcnow() - timedelta(seconds=120)
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        experiment.status = "running"
        trials = {
            name: Trial(experiment_id=experiment_id, seq=seq, job_key=name, kind="evaluate", status=status, step=step,
                        lease_owner="w-dead" if status == "running" else None, heartbeat_at=beat, created_at=old,
                        enqueued_at=sent, distribution={}, context={})
            for seq, (name, status, step, beat, sent) in enumerate(
                (
                    ("in-process", "running", None, old, None),
                    ("stale", "running", 1, old, old - timedelta(seconds=1)),
                    ("live", "running", 1, utcnow(), old),
                    ("waiting", "pending", 1, None, old),
                    ("send failed", "pending", 1, None, None),
                ),
                start=1,
            )
        }
        session.add_all(trials.values())
        session.commit()
        expected = sorted([trials["stale"].id, trials["send failed"].id])
        assert trials_to_resend(session, grace_s=30, lost_s=3600) == expected
        session.commit()
        assert trials_to_resend(session, grace_s=30, lost_s=3600) == []


def test_an_experiment_redelivered_too_often_fails_instead_of_looping(
    env: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, factory = env
    experiment_id = _create(factory)
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        experiment.status, experiment.attempts, experiment.lease_owner = "running", settings.max_attempts, "w-dead"
        experiment.heartbeat_at = utcnow() - timedelta(seconds=settings.lease_grace_s + 5)
        session.commit()
    assert _run(settings, factory, experiment_id) == "skipped"
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None and experiment.status == "failed"
        assert "max_attempts=3" in (experiment.error or "")


def test_max_minutes_and_max_trials_end_a_search_with_what_it_found(
    env: tuple[Settings, sessionmaker[Session]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, factory = env
    long_annealing = {"algorithm": "annealing", "start_temperature": 100, "stop_temperature": 1,
                      "cool_down_rate": 0.999}  # thousands of proposals if nothing stopped it
    by_trials = _create(factory, **long_annealing, max_trials=3)
    assert _run(settings, factory, by_trials) == "succeeded"
    # Each evaluation sleeps 0.5 s, so the time budget, not the schedule, ends this one.
    monkeypatch.setenv("PRUNEHUB_TEST_EVAL_DELAY", "0.5")
    with factory() as session:
        experiment = create_experiment(
            session, owner="local", name="timed", entrypoint="tests.tasks.slow_evaluator",
            config=parse_algorithm_config({**SPEC, **long_annealing, "max_minutes": 0.4}),
            allowed_prefixes=["tests."],
        )
        session.commit()
        by_time = experiment.id
    timed_settings = settings.model_copy(update={"allowed_entrypoints": ["tests."]})
    started = time.monotonic()
    assert _run(timed_settings, factory, by_time) == "succeeded"
    elapsed = time.monotonic() - started
    with factory() as session:
        trials = session.scalars(select(Trial).where(Trial.experiment_id == by_trials, SEARCH_TRIAL)).all()
        assert len(trials) == 3
        experiment = session.get(Experiment, by_time)
        assert experiment is not None and "max_minutes" in (experiment.phase or "")
        timed = session.scalars(select(Trial).where(Trial.experiment_id == by_time, SEARCH_TRIAL)).all()
        assert 1 <= len(timed) <= 0.4 * 60 / 0.5 + 1
    assert elapsed < 0.4 * 60 + 60  # the budget plus one job and the best model's rebuild
