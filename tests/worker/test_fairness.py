"""Fair starts across owners (issue 15, finding 1), with real workers on SQLite and on PostgreSQL: a free worker
starts the queued experiment of the owner with the fewest running (then the oldest), whatever the broker's order,
and ``PRUNEHUB_MAX_RUNNING_PER_OWNER`` holds with two workers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from server.db.models import Experiment
from server.db.session import make_engine, make_session_factory
from server.services.auth import create_key
from tests.conftest import LiveService, _run_live, wait_terminal

pytestmark = [pytest.mark.integration]

SPEC = {
    "entrypoint": "tests.tasks.counting_evaluator",
    "algorithm": "uniform",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
    "base_algo": "l1",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    name = "embedded_env" if request.param == "sqlite" else "services_env"
    return dict(request.getfixturevalue(name))


def _env(env: dict[str, str], home: Path, **extra: str) -> dict[str, str]:
    return {**env, "PRUNEHUB_TEST_EVAL_DELAY": "0.5", "PRUNEHUB_TEST_COUNT_FILE": str(home / "n.txt"), **extra}


def _client(live: LiveService, owner: str) -> httpx.Client:
    engine = make_engine(live.env["PRUNEHUB_DATABASE_URL"])
    with make_session_factory(engine)() as session:
        key = create_key(session, owner)
        session.commit()
    engine.dispose()
    return httpx.Client(base_url=live.url, timeout=30, headers={"Authorization": f"Bearer {key}"})


def _submit(client: httpx.Client, name: str) -> int:
    response = client.post("/experiments", json={**SPEC, "name": name})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def _rows(live: LiveService, ids: list[int]) -> dict[int, Experiment]:
    engine = create_engine(live.env["PRUNEHUB_DATABASE_URL"])
    with make_session_factory(engine)() as session:
        rows = {e.id: e for e in session.scalars(select(Experiment).where(Experiment.id.in_(ids)))}
    engine.dispose()
    return rows


class TestOneWorker:
    @pytest.fixture
    def live(self, database_env: dict[str, str], tmp_path: Path) -> Iterator[LiveService]:
        yield from _run_live(LiveService(tmp_path, _env(database_env, tmp_path)))

    def test_another_owners_experiment_starts_before_the_rest_of_a_long_queue(self, live: LiveService) -> None:
        with _client(live, "alice") as alice, _client(live, "bob") as bob:
            queue = [_submit(alice, f"alice {i}") for i in range(3)]
            deadline = time.monotonic() + 120
            while _rows(live, queue[:1])[queue[0]].status == "queued":  # alice has one running: bob has fewer
                assert time.monotonic() < deadline, live.logs()
                time.sleep(0.1)
            bobs = _submit(bob, "bob")
            waiting = [i for i, row in _rows(live, queue).items() if row.status == "queued"]
            assert len(waiting) >= 2, "the worker drained alice's queue before bob submitted"
            for experiment_id in [*queue, bobs]:
                assert wait_terminal(alice if experiment_id != bobs else bob, experiment_id)["status"] == "succeeded"
        rows = _rows(live, [*queue, bobs])
        started = {i: rows[i].started_at for i in rows}
        assert all(started[bobs] < started[i] for i in waiting), (started, waiting)  # type: ignore[operator]


class TestTwoWorkersCapped:
    @pytest.fixture
    def live(self, database_env: dict[str, str], tmp_path: Path) -> Iterator[LiveService]:
        env = _env(database_env, tmp_path, PRUNEHUB_MAX_RUNNING_PER_OWNER="1")
        for service in _run_live(LiveService(tmp_path, env)):
            service.start_worker()
            yield service

    def test_an_owner_never_has_two_running(self, live: LiveService) -> None:
        with _client(live, "alice") as alice, _client(live, "bob") as bob:
            queue = [_submit(alice, f"alice {i}") for i in range(2)]
            bobs = _submit(bob, "bob")
            for experiment_id in queue:
                assert wait_terminal(alice, experiment_id)["status"] == "succeeded"
            assert wait_terminal(bob, bobs)["status"] == "succeeded"
        rows = _rows(live, queue)
        spans = sorted((rows[i].started_at, rows[i].finished_at) for i in queue)
        for (_, first_end), (next_start, _) in zip(spans, spans[1:], strict=False):
            assert first_end is not None and next_start is not None
            assert next_start >= first_end, spans  # started only after the previous one of alice's ended
