"""The API's one-statement reads (:class:`server.api.deps.Reader`): on PostgreSQL they run on psycopg's own asyncio
connections on the event loop, elsewhere on a pooled connection on a thread. Both give ``GET /experiments/{id}``
the same row as the session path the routes that change an experiment use, a database that cannot be reached is
the API's 503, and a connection the server dropped is replaced. Real PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from pruning.search.base import Job, Result
from pruning.search.configs import parse_algorithm_config
from server.api.deps import Reader
from server.api.routes.experiments import _public
from server.db.migrate import upgrade
from server.db.models import TrialStatus
from server.db.session import make_engine, make_session_factory
from server.services import experiments as service
from server.services import runs
from server.services.experiments import create_experiment
from tests.conftest import free_port

SPEC = {"algorithm": "uniform", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "base_algo": "l1"}


def _experiment_with_a_best_trial(engine: Engine) -> int:
    factory = make_session_factory(engine)
    with factory() as session:
        experiment = create_experiment(session, owner="local", name="read", entrypoint="examples.digits",
                                       config=parse_algorithm_config(SPEC), allowed_prefixes=["examples."])
        session.flush()
        trial = runs.add_trial(session, experiment.id, Job(key="k-1", distribution={"conv1": 0.5}),
                               status=TrialStatus.running)
        runs.record_result(session, trial, Result(key="k-1", score=0.93, overall_sparsity=0.5,
                                                  requested={"conv1": 0.5}, achieved={"conv1": 0.5}))
        session.flush()
        experiment.best_trial_id, experiment.best_score = trial.id, 0.93
        session.commit()
        return experiment.id


def _both_bodies(engine: Engine, experiment_id: int) -> tuple[str, str]:
    with make_session_factory(engine)() as session:
        through_session = _public(service.experiment_detail(session, experiment_id)).model_dump_json()

    async def read() -> Any:
        reader = Reader(engine)
        try:
            return await reader.row(service.detail_statement(), {"experiment_id": experiment_id})
        finally:
            await reader.close()

    through_reader = _public(service.visible_detail(asyncio.run(read()), experiment_id)).model_dump_json()
    return through_session, through_reader


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_the_reader_gives_the_row_the_session_gives(database: str, services_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    url = services_env["PRUNEHUB_DATABASE_URL"] if database == "postgresql" else f"sqlite:///{tmp_path}/read.db"
    upgrade(url)
    engine = make_engine(url)
    try:
        experiment_id = _experiment_with_a_best_trial(engine)
        through_session, through_reader = _both_bodies(engine, experiment_id)
        assert through_reader == through_session
        assert '"best":{"trial_id":' in through_reader and '"trials_count":1' in through_reader
        assert (Reader(engine)._native is not None) == (database == "postgresql")
    finally:
        engine.dispose()


def test_an_unreachable_database_is_the_apis_503_error() -> None:
    # Nothing listens there: connecting fails, which the API's handler answers 503 "unreachable" (no statement).
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing", pool_size=1)

    async def read() -> None:
        await Reader(engine).row(service.detail_statement(), {"experiment_id": 1})

    with pytest.raises(DBAPIError) as raised:
        asyncio.run(read())
    assert raised.value.statement is None
    engine.dispose()


def test_a_connection_the_server_dropped_is_replaced(services_env: dict[str, str]) -> None:
    url = services_env["PRUNEHUB_DATABASE_URL"]
    upgrade(url)
    engine = make_engine(url)
    experiment_id = _experiment_with_a_best_trial(engine)
    params = {"experiment_id": experiment_id}

    async def reads() -> list[Any]:
        reader = Reader(engine)
        outcomes: list[Any] = []
        try:
            first = await reader.row(service.detail_statement(), params)
            pid = await reader.row(text("SELECT pg_backend_pid() AS pid"), {})
            with engine.connect() as admin:  # the server ends that session, as a restart would
                admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid.pid})
            try:
                await reader.row(service.detail_statement(), params)
                outcomes.append("read")
            except DBAPIError as exc:
                outcomes.append(("lost", exc.connection_invalidated))
            outcomes += [first, await reader.row(service.detail_statement(), params)]
        finally:
            await reader.close()
        return outcomes

    try:
        lost, first, again = asyncio.run(reads())
        assert lost == ("lost", True)  # that read is a 503 "connection lost; retry"
        assert again == first  # the next one connected afresh
    finally:
        engine.dispose()
