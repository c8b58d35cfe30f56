"""FastAPI dependencies as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Concatenate, ParamSpec, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from server.services.auth import KeyCache, Principal, authenticate
from server.services.dispatch import Dispatcher
from server.settings import Settings

__all__ = ["DispatcherDep", "ExperimentId", "PrincipalDep", "Reader", "ReaderDep", "SessionDep", "SettingsDep"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

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
    """One read of an ``async`` route: ``await reader(work, *args)`` runs ``work(connection, *args)`` on a pooled
    connection in autocommit, on one threadpool thread, and gives the connection back on that thread.

    For a read that is one statement (``GET /experiments/{id}``, the API's most polled route): a single statement is
    consistent on its own, so it needs no transaction, and a session (its setup, its BEGIN and ROLLBACK round trips,
    an ORM instance per row) cost more than the query. It shares the app's engine and pool (one pool, sized in
    :func:`server.api.main.create_app`). One per app, made in its lifespan.
    """

    THREADS = 8
    """Reads run on at most this many threads at once; the others wait on the event loop. A read is a millisecond
    of Python with the GIL held around a round trip, so 32 of them on 32 threads only took turns at the GIL (and
    the switches between them were the tail latency under load), while a few threads keep the database busy."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._limiter = anyio.CapacityLimiter(self.THREADS)

    async def __call__(
        self, work: Callable[Concatenate[Connection, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        def run() -> _T:
            with self._engine.connect() as connection:
                return work(connection, *args, **kwargs)

        # Not abandoned on cancellation: a client that goes away waits for the thread, which closes the connection.
        return await anyio.to_thread.run_sync(run, limiter=self._limiter)


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
