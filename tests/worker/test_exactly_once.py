"""Each job runs exactly once, with real worker processes and a lease grace and reaper interval shorter than a job:
two workers never both run a job, a SIGKILLed worker's job runs again on the other, and the reaper never floods
the broker while experiments wait. Executions are counted outside the database: the task module
``tests.tasks.counting_evaluator`` appends a line per evaluator call."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.engine import Engine

from server.db.models import Event, Experiment, Trial
from server.services.runs import SEARCH_TRIAL
from tests.conftest import LiveService, _run_live, wait_terminal, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHORT_LEASE = {
    "PRUNEHUB_WORKER_HEARTBEAT_S": "0.3",
    "PRUNEHUB_LEASE_GRACE_S": "1.5",
    "PRUNEHUB_REAPER_INTERVAL_S": "0.3",
}
BASE = {
    "entrypoint": "tests.tasks.counting_evaluator",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
    "base_algo": "l1",
    "seed": 3,
}
UNIFORM = {**BASE, "name": "one long job", "algorithm": "uniform"}
ANNEALING = {**BASE, "name": "annealing", "algorithm": "annealing", "start_temperature": 100,
             "stop_temperature": 30, "cool_down_rate": 0.8}  # 6 proposals + the start


def _live(env: dict[str, str], home: Path, delay: float) -> Iterator[LiveService]:
    counted = {**env, **SHORT_LEASE, "PRUNEHUB_TEST_EVAL_DELAY": str(delay),
               "PRUNEHUB_TEST_COUNT_FILE": str(home / "evaluations.txt")}
    yield from _run_live(LiveService(home, counted))


@pytest.fixture
def engine(live: LiveService) -> Iterator[Engine]:
    made = create_engine(live.env["PRUNEHUB_DATABASE_URL"])
    yield made
    made.dispose()


def _executions(live: LiveService) -> int:
    path = live.home / "evaluations.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _expected_executions(engine: Engine, experiment_id: int) -> int:
    # One evaluator call per trial attempt and per rebuild of the best model (a "model" event).
    with engine.connect() as conn:
        attempts = conn.execute(select(func.sum(Trial.attempts)).where(Trial.experiment_id == experiment_id,
                                                                        SEARCH_TRIAL))
        rebuilds = conn.execute(
            select(func.count()).where(Event.experiment_id == experiment_id, Event.kind == "model")
        )
        return int(attempts.scalar() or 0) + int(rebuilds.scalar() or 0)


def _trial_attempts(engine: Engine, experiment_id: int) -> list[int]:
    with engine.connect() as conn:
        query = select(Trial.attempts).where(Trial.experiment_id == experiment_id, SEARCH_TRIAL).order_by(Trial.seq)
        return list(conn.execute(query).scalars())


class TestTwoWorkersEmbedded:
    @pytest.fixture
    def live(self, embedded_env: dict[str, str], tmp_path: Path) -> Iterator[LiveService]:
        yield from _live(embedded_env, tmp_path, delay=4.0)  # a job longer than the grace and the reaper interval

    def test_a_long_job_runs_once(self, live: LiveService, engine: Engine) -> None:
        live.start_worker()  # an idle second worker whose reaper watches the first
        with live.http() as client:
            experiment_id = client.post("/experiments", json=UNIFORM).json()["id"]
            final = wait_terminal(client, experiment_id, timeout=240)
        assert final["status"] == "succeeded" and final["attempts"] == 1, (final, live.logs())
        assert _trial_attempts(engine, experiment_id) == [1]
        assert _executions(live) == 1, live.logs()


class TestTwoWorkersServices:
    @pytest.fixture
    def live(self, services_env: dict[str, str], tmp_path: Path) -> Iterator[LiveService]:
        yield from _live(services_env, tmp_path, delay=1.5)

    def test_every_job_runs_once(self, live: LiveService, engine: Engine) -> None:
        live.start_worker()
        with live.http() as client:
            experiment_id = client.post("/experiments", json=ANNEALING).json()["id"]
            final = wait_terminal(client, experiment_id, timeout=300)
        assert final["status"] == "succeeded" and final["attempts"] == 1, (final, live.logs())
        attempts = _trial_attempts(engine, experiment_id)
        assert attempts == [1] * 7
        assert _executions(live) == _expected_executions(engine, experiment_id) == 7 + 1  # + the best's rebuild

    def test_a_sigkilled_workers_job_runs_again_on_the_other(self, live: LiveService, engine: Engine) -> None:
        live.start_worker()
        with live.http() as client:
            experiment_id = client.post("/experiments", json=ANNEALING).json()["id"]

            def mid_job() -> tuple[str, int] | None:
                # A job whose evaluator started (its line is written) and has not finished yet.
                with engine.connect() as conn:
                    owner = conn.execute(select(Experiment.lease_owner).where(Experiment.id == experiment_id))
                    finished = conn.execute(
                        select(func.count()).where(Trial.experiment_id == experiment_id, SEARCH_TRIAL,
                                                   Trial.status.in_(("succeeded", "failed")))
                    )
                    running = conn.execute(
                        select(Trial.seq).where(Trial.experiment_id == experiment_id, Trial.status == "running")
                    ).scalar()
                    holder = owner.scalar()
                done = int(finished.scalar() or 0)
                if holder and running is not None and running >= 2 and _executions(live) > done:
                    return holder, running
                return None

            holder, seq = wait_until(mid_job, "the second job to be mid-run")
            child_pid = int(holder.rsplit(":", 1)[1])
            parent_pid = int(Path(f"/proc/{child_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            victim = next(w for w in live.workers if w.pid == parent_pid)
            os.killpg(victim.pid, signal.SIGKILL)  # the whole worker: no warm shutdown, no redelivery
            victim.wait()
            final = wait_terminal(client, experiment_id, timeout=300)
        assert final["status"] == "succeeded" and final["attempts"] == 2, (final, live.logs())
        attempts = _trial_attempts(engine, experiment_id)
        assert attempts == [2 if i + 1 == seq else 1 for i in range(7)], attempts
        assert _executions(live) == _expected_executions(engine, experiment_id) == 7 + 1 + 1


class TestQueueBehindABusyWorker:
    @pytest.fixture
    def live(self, embedded_env: dict[str, str], tmp_path: Path) -> Iterator[LiveService]:
        # 100 waiting + 2 lost + the busy one, from one owner: above the default queued-per-owner cap.
        yield from _live({**embedded_env, "PRUNEHUB_MAX_QUEUED_PER_OWNER": "1000"}, tmp_path, delay=1.0)

    def test_the_broker_holds_one_message_per_waiting_experiment(self, live: LiveService, engine: Engine) -> None:
        queue = live.home / "broker" / "queue"
        most = 0

        def messages() -> int:
            nonlocal most
            count = sum(1 for _ in queue.iterdir())
            most = max(most, count)
            return count

        with live.http() as client:
            busy = client.post("/experiments", json={**ANNEALING, "stop_temperature": 1,
                                                     "cool_down_rate": 0.99}).json()["id"]
            wait_until(lambda: client.get(f"/experiments/{busy}").json()["status"] == "running", "the busy run")
            waiting = [client.post("/experiments", json={**UNIFORM, "name": f"waiting {i}"}).json()["id"]
                       for i in range(100)]
            assert client.get(f"/experiments/{busy}").json()["status"] == "running"

            def lost_send(count: int) -> int:
                # As if the API's send after its commit had failed: stored, queued, no message.
                created = client.post("/experiments", json={**UNIFORM, "name": "lost"}).json()["id"]
                wait_until(lambda: messages() >= count, "the lost one's message")  # the API did send it: take it out
                with engine.begin() as conn:
                    conn.execute(update(Experiment).where(Experiment.id == created).values(enqueued_at=None))
                for path in queue.iterdir():
                    if f'"argsrepr": "[{created}]"' in path.read_text(errors="replace"):
                        path.unlink()
                        break
                else:
                    raise AssertionError("the lost experiment's message is not in the broker folder")
                return created

            def resent(experiment_id: int) -> bool:
                messages()
                with engine.connect() as conn:
                    sent = conn.execute(select(Experiment.enqueued_at).where(Experiment.id == experiment_id))
                    return sent.scalar() is not None

            # Two lost sends, each found by the reaper after the grace: by the second, every waiting experiment
            # has been older than the grace for several reaper rounds, and none was sent again.
            first = lost_send(len(waiting) + 1)
            wait_until(lambda: resent(first), "the reaper to send the first lost experiment", timeout=60)
            second = lost_send(len(waiting) + 2)
            wait_until(lambda: resent(second), "the reaper to send the second lost experiment", timeout=60)
            assert client.get(f"/experiments/{busy}").json()["status"] == "running", "not busy for the whole test"
            with engine.connect() as conn:
                queued = conn.execute(select(func.count()).where(Experiment.status == "queued")).scalar()
            assert queued == len(waiting) + 2
            assert messages() == len(waiting) + 2 and most <= len(waiting) + 2, (most, live.logs())
            with engine.begin() as conn:  # let the worker stop quickly
                conn.execute(update(Experiment).where(Experiment.status == "queued").values(status="cancelled"))
            client.post(f"/experiments/{busy}/cancel")
