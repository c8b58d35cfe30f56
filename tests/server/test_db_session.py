"""What ``make_engine`` asks of PostgreSQL when it connects (no server needed: the connect is stopped there)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event

from server.db.session import make_engine


class _Stop(Exception):
    pass


def _connect_params(url: str, **kwargs: Any) -> dict[str, Any]:
    engine = make_engine(url, **kwargs)
    seen: dict[str, Any] = {}

    @event.listens_for(engine, "do_connect")
    def _capture(_dialect, _record, _cargs, cparams):  # type: ignore[no-untyped-def]
        seen.update(cparams)
        raise _Stop

    with pytest.raises(_Stop):
        engine.connect()
    engine.dispose()
    return seen


def test_a_worker_engine_has_postgresql_end_its_idle_transactions() -> None:
    params = _connect_params("postgresql+psycopg://u@127.0.0.1:1/db", idle_in_transaction_s=2.5)
    assert params["options"] == "-c idle_in_transaction_session_timeout=2500"


def test_the_urls_own_options_are_kept() -> None:
    url = "postgresql+psycopg://u@127.0.0.1:1/db?options=-c%20statement_timeout%3D9000"
    params = _connect_params(url, idle_in_transaction_s=30)
    assert params["options"] == "-c statement_timeout=9000 -c idle_in_transaction_session_timeout=30000"


def test_without_the_timeout_nothing_is_added() -> None:
    assert "options" not in _connect_params("postgresql+psycopg://u@127.0.0.1:1/db")
    assert "options" not in _connect_params("postgresql+psycopg://u@127.0.0.1:1/db", idle_in_transaction_s=0)


def test_pre_ping_is_on_unless_turned_off() -> None:
    url = "postgresql+psycopg://u@127.0.0.1:1/db"
    assert make_engine(url).pool._pre_ping
    assert not make_engine(url, pre_ping=False).pool._pre_ping  # the workers' engines (worker.signals)
