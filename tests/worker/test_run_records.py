"""The runner's record helpers in :mod:`server.services.runs` and :class:`worker.runner.TrialLeases`, called directly
on SQLite and (when configured) PostgreSQL: what their one-statement forms write is what one statement per row wrote."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from pruning.search.base import Job
from pruning.search.configs import parse_algorithm_config
from server.db.migrate import upgrade
from server.db.models import Experiment, Trial, TrialStatus, utcnow
from server.db.session import make_engine, make_session_factory
from server.services import runs
from server.services.dispatch import ADVANCE, EVALUATE
from server.services.experiments import create_experiment
from server.settings import Settings
from tests.conftest import _reset_postgres
from worker.runner import TrialLeases, may_have_ended

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/records.db"
    else:
        url = os.environ.get("PRUNEHUB_TEST_DATABASE_URL", "")
        if not url:
            pytest.skip("PRUNEHUB_TEST_DATABASE_URL not set")
        _reset_postgres(url)
    upgrade(url)
    engine = make_engine(url, pre_ping=False)
    yield make_session_factory(engine)
    engine.dispose()


def _experiment(factory: sessionmaker[Session], algorithm: str = "uniform", **config: Any) -> int:
    spec = {"algorithm": algorithm, "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], **config}
    with factory() as session:
        experiment = create_experiment(
            session, owner="local", name="records", entrypoint="examples.digits",
            config=parse_algorithm_config(spec), allowed_prefixes=["examples."],
        )
        session.commit()
        return experiment.id


def _jobs(n: int) -> list[Job]:
    return [Job(key=f"job-{i}", kind="evaluate", distribution={"conv1": 0.1 * i}, context={"iteration": i})
            for i in range(n)]


def _statements(session: Session) -> list[str]:
    seen: list[str] = []
    event.listen(session.get_bind(), "before_cursor_execute",
                 lambda _c, _cur, statement, *_a: seen.append(statement.split()[0].upper()))
    return seen


def _columns(trial: Trial) -> dict[str, Any]:
    skip = {"id", "created_at"}
    return {c.key: getattr(trial, c.key) for c in Trial.__table__.columns if c.key not in skip}


def test_a_steps_trials_go_in_one_insert_and_match_one_at_a_time(factory: sessionmaker[Session]) -> None:
    batched_id, single_id = _experiment(factory), _experiment(factory)
    jobs = _jobs(4)
    with factory() as session:
        statements = _statements(session)
        added = runs.add_trials(session, batched_id, jobs, status=TrialStatus.pending, step=1)
        if session.get_bind().dialect.name == "postgresql":
            # One INSERT ... RETURNING for the step (SQLAlchemy's insertmanyvalues; on SQLite it inserts the rows
            # one by one, its RETURNING giving no order to match them by).
            assert statements.count("INSERT") == 1
        assert [t.seq for t in added] == [1, 2, 3, 4] and all(t.id is not None for t in added)
        for job in jobs:
            runs.add_trial(session, single_id, job, status=TrialStatus.pending, step=1)
        session.commit()
    with factory() as session:
        def rows(experiment_id: int) -> list[dict[str, Any]]:
            trials = session.scalars(select(Trial).where(Trial.experiment_id == experiment_id).order_by(Trial.seq))
            return [{**_columns(t), "experiment_id": None} for t in trials]

        assert rows(batched_id) == rows(single_id)
        assert len(rows(batched_id)) == 4


def test_trials_by_key_and_the_tally(factory: sessionmaker[Session]) -> None:
    experiment_id = _experiment(factory)
    with factory() as session:
        assert runs.tally_trials(session, experiment_id) == runs.TrialTally(0, 0, 0, 0, 0)
        runs.add_job_trial(session, experiment_id, key=runs.RESOLVE_KEY, kind=runs.RESOLVE_KIND,
                           job={"kind": "resolve"}, step=0, seq=0, status=TrialStatus.succeeded)
        first, second, third = runs.add_trials(session, experiment_id, _jobs(3), status=TrialStatus.pending, step=1)
        first.status, second.status = TrialStatus.succeeded.value, TrialStatus.failed.value
        session.flush()
        assert runs.tally_trials(session, experiment_id) == runs.TrialTally(
            unfinished=1, finished=2, last_seq=3, exports=0, in_step=0)
        assert runs.tally_trials(session, experiment_id, 1).in_step == 3  # the step's search trials
        assert runs.tally_trials(session, experiment_id, 0).in_step == 0  # the resolve job is not one
        assert runs.tally_trials(session, experiment_id).finished == runs.finished_trials(session, experiment_id)
        runs.add_job_trial(session, experiment_id, key=runs.EXPORT_KEY, kind=runs.EXPORT_KIND, job={}, step=2)
        assert runs.tally_trials(session, experiment_id) == runs.TrialTally(
            unfinished=2, finished=2, last_seq=4, exports=1, in_step=0)
        found = runs.trials_by_key(session, experiment_id, ["job-0", "job-2", "elsewhere"])
        assert {k: t.id for k, t in found.items()} == {"job-0": first.id, "job-2": third.id}
        assert runs.trials_by_key(session, experiment_id, ["job-1"]) == {"job-1": second}
        assert runs.trials_by_key(session, experiment_id, []) == {}


def test_record_sent_marks_each_row_of_a_batch(factory: sessionmaker[Session]) -> None:
    experiment_id = _experiment(factory)
    with factory() as session:
        trials = runs.add_trials(session, experiment_id, _jobs(3), status=TrialStatus.pending, step=1)
        session.commit()
        ids = [t.id for t in trials]
    with factory() as session:
        statements = _statements(session)
        runs.record_sent(session, [(EVALUATE, ids[0]), (EVALUATE, ids[2]), (ADVANCE, experiment_id), ("other", 1)])
        assert statements.count("UPDATE") == 2  # one per table
        session.commit()
    with factory() as session:
        sent = {t.id: t.enqueued_at for t in session.scalars(select(Trial).where(Trial.experiment_id == experiment_id))}
        assert sent[ids[0]] is not None and sent[ids[2]] is not None and sent[ids[1]] is None
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None and experiment.enqueued_at is not None
        runs.record_sent(session, [(EVALUATE, ids[0])], sent=False)
        session.commit()
        assert session.get(Trial, ids[0]).enqueued_at is None  # type: ignore[union-attr]


def _running(factory: sessionmaker[Session], owners: list[str]) -> list[int]:
    experiment_id = _experiment(factory)
    stale = utcnow() - timedelta(hours=1)
    with factory() as session:
        trials = runs.add_trials(session, experiment_id, _jobs(len(owners)), status=TrialStatus.running, step=1)
        for trial, owner in zip(trials, owners, strict=True):
            trial.lease_owner, trial.heartbeat_at = owner, stale
        session.commit()
        return [t.id for t in trials]


def _heartbeats(factory: sessionmaker[Session], ids: list[int]) -> list[Any]:
    with factory() as session:
        beats = {t.id: t.heartbeat_at for t in session.scalars(select(Trial).where(Trial.id.in_(ids)))}
        return [beats[i] for i in ids]


def test_renew_trial_leases_renews_only_this_workers_in_one_update(factory: sessionmaker[Session]) -> None:
    ids = _running(factory, ["w1", "w1", "w2"])
    before = _heartbeats(factory, ids)
    with factory() as session:
        statements = _statements(session)
        assert runs.renew_trial_leases(session, ids, "w1") == 2
        assert statements == ["UPDATE"]
        assert runs.renew_trial_leases(session, [], "w1") == 0
        session.commit()
    after = _heartbeats(factory, ids)
    assert after[0] > before[0] and after[1] > before[1] and after[2] == before[2]


def test_trial_leases_renew_every_held_trial_and_stop(factory: sessionmaker[Session]) -> None:
    ids = _running(factory, ["w1", "w1", "w2", "w1"])
    before = _heartbeats(factory, ids)
    leases = TrialLeases(factory, interval=0.05)
    try:
        with leases.hold(ids[0], "w1"), leases.hold(ids[1], "w1"), leases.hold(ids[2], "w2"):
            assert leases.held() == {ids[0]: "w1", ids[1]: "w1", ids[2]: "w2"}
            deadline = time.monotonic() + 30
            while _heartbeats(factory, ids)[:3] == before[:3] and time.monotonic() < deadline:
                time.sleep(0.05)  # the thread's beats, not a direct renew()
            assert all(a > b for a, b in zip(_heartbeats(factory, ids)[:3], before[:3], strict=True))
        assert leases.held() == {}
        assert _heartbeats(factory, ids)[3] == before[3]  # never held: never renewed
        released = _heartbeats(factory, ids)
        assert leases.renew() == 0  # nothing held: no statement, nothing renewed
        with leases.hold(ids[3], "w1"):
            assert leases.renew() == 1
    finally:
        leases.close()
    assert not any(t.name == "trial-leases" and t.is_alive() for t in threading.enumerate())
    after_close = _heartbeats(factory, ids)
    time.sleep(0.2)
    assert _heartbeats(factory, ids) == after_close  # stopped: no beat after close
    assert after_close[:3] >= released[:3]


def test_only_an_advance_that_ended_a_run_or_a_failed_job_kicks_the_queue() -> None:
    for outcome in ("succeeded", "failed", "cancelled"):
        assert may_have_ended(ADVANCE, outcome)
    for outcome in ("step 3: 1 job(s)", "step still running", "terminal", "exporting"):
        assert not may_have_ended(ADVANCE, outcome)
    assert may_have_ended(EVALUATE, "failed")
    for outcome in ("experiment succeeded", "experiment failed", "experiment cancelled"):
        assert may_have_ended(EVALUATE, outcome)  # the advance the job's record joined ended the run
    for outcome in ("succeeded", "cancelled", "skipped", "done", "retrying", "missing"):
        assert not may_have_ended(EVALUATE, outcome)


# ------------------------------------------------------------------------------------------ the kept search state


def _search(factory: sessionmaker[Session], tmp_path: Path, *, forget: bool, steps: int = 6) -> list[Any]:
    """Advance an annealing search on the synthetic problem for ``steps`` steps, recording each job's result
    from :class:`FakeExecutor` as the worker would, through the broker transport's advance; ``forget`` drops
    the kept states before every advance (each then reads its state back from the row). Returns the trials."""
    from tests.pruning.search.fakes import FakeExecutor, fake_problem
    from worker import runner

    problem = fake_problem()
    settings = Settings(home=tmp_path, database_url="sqlite://", artifacts_dir=tmp_path / "artifacts",
                        allowed_entrypoints=["examples."])
    experiment_id = _experiment(factory, algorithm="annealing", max_trials=40)
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        experiment.status, experiment.problem = "running", problem.model_dump(mode="json")
        session.commit()
    sent: list[tuple[str, int]] = []
    ctx = runner.RunContext(factory, settings, "w", runner.CeleryTransport(lambda *m: sent.append(m), factory,
                                                                           settings))
    executor = FakeExecutor()
    for _ in range(steps):
        if forget:
            runner._kept.clear()
        sent.clear()
        assert runner.advance(experiment_id, ctx).startswith("step")
        for _task, trial_id in sent:
            with factory() as session:
                trial = session.get(Trial, trial_id)
                assert trial is not None
                job = Job.model_validate(trial.extra["job"])
                runs.record_result(session, trial, executor(problem, job))
                session.commit()
    with factory() as session:
        trials = session.scalars(select(Trial).where(Trial.experiment_id == experiment_id).order_by(Trial.seq))
        return [(t.seq, t.job_key, t.distribution, t.context, t.status) for t in trials]


def test_a_kept_state_continues_as_the_stored_one_would(factory: sessionmaker[Session], tmp_path: Path) -> None:
    from worker import runner

    runner._kept.clear()
    kept = _search(factory, tmp_path, forget=False)
    assert runner._kept  # the last advance kept its state
    assert kept == _search(factory, tmp_path, forget=True)


def test_a_kept_state_is_not_used_once_the_stored_one_changed(factory: sessionmaker[Session], tmp_path: Path) -> None:
    from worker import runner

    runner._kept.clear()
    _search(factory, tmp_path, forget=False, steps=2)
    with factory() as session:
        experiment = session.scalars(select(Experiment).order_by(Experiment.id.desc())).first()
        assert experiment is not None
        key = runner._state_key(experiment)
        assert key in runner._kept
        kept_state = runner._kept[key][2]
        # Another coordinator advanced it: a new state, a new version.
        experiment.search_state = {**experiment.search_state, "phase": "advanced elsewhere"}  # type: ignore[dict-item]
        experiment.state_version += 1
        session.commit()
        assert runner._load(experiment)[2].phase == "advanced elsewhere"
        assert runner._load(experiment)[2] is not runner._load(experiment)[2]  # nothing kept for it: read each time
    with factory() as session:
        experiment = session.get(Experiment, key[0])
        assert experiment is not None
        # The id and version kept, but another experiment's row (another database's, created at another time).
        experiment.state_version = key[2]
        experiment.created_at = experiment.created_at + timedelta(seconds=1)
        session.commit()
        assert runner._load(experiment)[2] is not kept_state
        assert key in runner._kept  # still kept for its own experiment
    runner._kept.clear()


def test_a_rolled_back_advance_keeps_nothing(factory: sessionmaker[Session]) -> None:
    from worker import runner

    experiment_id = _experiment(factory)
    runner._kept.clear()
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        runner._keep_state(session, experiment, ("config", "strategy", "state"))
        session.rollback()
    assert runner._kept == {}
    with factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        runner._keep_state(session, experiment, ("config", "strategy", "state"))
        session.commit()
    assert list(runner._kept.values()) == [("config", "strategy", "state")]
    runner._kept.clear()
