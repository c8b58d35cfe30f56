"""FastAPI dependencies as ``Annotated`` aliases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import anyio.to_thread
import psycopg
from fastapi import Depends, HTTPException, Path, Request
from psycopg.rows import namedtuple_row
from sqlalchemy import Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import Executable

from server.services.auth import KeyCache, Principal, authenticate
from server.services.dispatch import Dispatcher
from server.settings import Settings

__all__ = ["DispatcherDep", "ExperimentId", "PrincipalDep", "Reader", "ReaderDep", "SessionDep", "SettingsDep"]


# Ids are 32-bit integers in every database we run on; a larger number is a 422, not a driver overflow.
ExperimentId = Annotated[int, Path(ge=1, le=2_147_483_647, description="the experiment's id")]


async def get_session(request: Request) -> AsyncIterator[Session]:
    # Async so that FastAPI does not hop to the threadpool twice (enter and exit) per request: making a Session
    # does no I/O (it connects at its first query, on the route's thread); closing it returns the connection to
    # the pool with a rollback, which is I/O and goes to a thread.
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            # Shielded: a client that went away must not leave the connection checked out.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(session.close)
        else:
            session.close()  # never connected: no I/O


class Reader:
    """The API's one-statement reads (``GET /experiments/{id}``, its most polled route): :meth:`row` runs a statement
    outside any transaction (one statement is consistent on its own) and returns its first row.

    On PostgreSQL through psycopg the statement runs on the event loop, on a few of psycopg's own asyncio connections
    (:class:`_NativeReads`): no thread hop (a queue, a thread switch and the event loop's wake-up per read) and no
    SQLAlchemy execution around the driver's (``bench.service`` measures the route against ``/healthz``). Elsewhere
    (SQLite) it runs on a pooled connection in autocommit on one threadpool thread. One per app, made in its
    lifespan; :meth:`close` at its end.
    """

    THREADS = 8
    """Reads run on at most this many threads (or native connections) at once; the others wait on the event loop. A
    read is a millisecond of Python with the GIL held around a round trip, so 32 of them on 32 threads only took
    turns at the GIL (and the switches between them were the tail latency under load), while a few keep the
    database busy."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._limiter = anyio.CapacityLimiter(self.THREADS)
        self._native = _NativeReads.of(engine, self.THREADS)

    async def row(self, statement: Executable, params: dict[str, Any]) -> Any:
        """The first row of ``statement`` with ``params`` (``None`` without one), its columns as attributes. A
        database that cannot be reached raises :class:`~sqlalchemy.exc.DBAPIError`, as SQLAlchemy does (a 503)."""
        if self._native is not None:
            return await self._native.first(statement, params)

        def run() -> Any:
            with self._engine.connect() as connection:
                return connection.execute(statement, params).first()

        # Not abandoned on cancellation: a client that goes away waits for the thread, which closes the connection.
        return await anyio.to_thread.run_sync(run, limiter=self._limiter)

    async def close(self) -> None:
        """Close the native connections (the pooled ones go with the engine)."""
        if self._native is not None:
            await self._native.close()


class _NativeReads:
    """psycopg ``AsyncConnection``s (autocommit, rows as named tuples) for :meth:`Reader.row` on PostgreSQL: at most
    ``size`` open, each connected when first needed and closed when a statement on it fails with a database error
    (a restarted server): that read is a 503, the next connects afresh. A statement is compiled once for the engine's
    dialect (its SQL and constant parameters), so the row is the one SQLAlchemy would return, column for column."""

    def __init__(self, conninfo: str, dialect: Dialect, size: int) -> None:
        self._conninfo, self._dialect = conninfo, dialect
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._compiled: dict[int, tuple[Executable, str, dict[str, Any]]] = {}

    @classmethod
    def of(cls, engine: Engine, size: int) -> _NativeReads | None:
        """The native reads for ``engine``'s database, or ``None`` unless it is PostgreSQL through psycopg."""
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            return None
        return cls(engine.url.set(drivername="postgresql").render_as_string(hide_password=False), engine.dialect,
                   size)

    def _sql(self, statement: Executable) -> tuple[str, dict[str, Any]]:
        known = self._compiled.get(id(statement))
        if known is None or known[0] is not statement:
            compiled = statement.compile(dialect=self._dialect)  # type: ignore[attr-defined]
            known = (statement, str(compiled), dict(compiled.params))
            if len(self._compiled) >= 64:
                self._compiled.clear()  # the routes' statements are built once; anything else is not kept forever
            self._compiled[id(statement)] = known
        return known[1], known[2]

    async def first(self, statement: Executable, params: dict[str, Any]) -> Any:
        sql, constants = self._sql(statement)
        # Shielded: a request cancelled mid-read still gives its connection back (or closes it), never half-read.
        with anyio.CancelScope(shield=True):
            async with self._slots:
                connection = self._idle.pop() if self._idle else None
                try:
                    if connection is None:
                        connection = await psycopg.AsyncConnection.connect(
                            self._conninfo, autocommit=True, row_factory=namedtuple_row
                        )
                    cursor = await connection.execute(sql, {**constants, **params})  # type: ignore[arg-type]
                    row = await cursor.fetchone()
                except psycopg.Error as exc:
                    if connection is not None:
                        await connection.close()
                    lost = isinstance(exc, psycopg.OperationalError)
                    # No statement: connecting failed (the handler's "unreachable"); a lost connection is "lost".
                    raise DBAPIError.instance(sql if connection is not None else None, params, exc, psycopg.Error,
                                              connection_invalidated=lost and connection is not None) from exc
                self._idle.append(connection)
                return row

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()


# Plain lookups on app.state are async: FastAPI runs a sync dependency on the threadpool, a hop for nothing.
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher  # type: ignore[no-any-return]


async def get_reader(request: Request) -> Reader:
    return request.app.state.reader  # type: ignore[no-any-return]


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
ReaderDep = Annotated[Reader, Depends(get_reader)]


def _look_up_key(request: Request, token: str, cache: KeyCache) -> Principal | None:
    with request.app.state.session_factory() as session:
        return authenticate(session, token, cache)


async def get_principal(request: Request) -> Principal:
    """The caller of ``Authorization: Bearer <key>``; 401 without a live key.

    A key this process found live within ``PRUNEHUB_AUTH_CACHE_S`` is answered from its cache on the event loop,
    with no session and no thread; any other is looked up in a session of its own on a thread (see
    :class:`server.services.auth.KeyCache`)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    cache: KeyCache = request.app.state.key_cache
    principal = None
    if scheme.lower() == "bearer":
        principal = cache.get_token(token)
        if principal is None:
            principal = await anyio.to_thread.run_sync(_look_up_key, request, token, cache)
    if principal is None:
        raise HTTPException(
            status_code=401,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>' (prunehub keys create)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
