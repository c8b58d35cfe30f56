"""FastAPI dependencies as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.orm import Session

from server.services.auth import KeyCache, Principal, authenticate
from server.services.dispatch import Dispatcher
from server.settings import Settings

__all__ = ["DispatcherDep", "ExperimentId", "PrincipalDep", "SessionDep", "SettingsDep", "run_and_close"]

_T = TypeVar("_T")

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
            session.close()  # never connected, or closed by run_and_close: no I/O


async def run_and_close(session: Session, work: Callable[[Session], _T], *, single_read: bool = False) -> _T:
    """``work(session)`` then ``session.close()``, on one threadpool thread: what an ``async`` route calls to do its
    database work in a single hop (a sync route costs two: the route, then the session's close).

    ``single_read``: ``work`` runs one SELECT and writes nothing, so it runs in autocommit. A single statement
    is consistent on its own, and the BEGIN before it and the ROLLBACK that returns the connection were two of
    the request's three round trips to the database."""

    def run() -> _T:
        try:
            if single_read and not session.in_transaction():  # (a key lookup may have begun one: keep it)
                session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            return work(session)
        finally:
            session.close()

    with anyio.CancelScope(shield=True):  # the close must happen even when the client has gone
        result = await anyio.to_thread.run_sync(run)
    return result


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher  # type: ignore[no-any-return]


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


async def get_principal(request: Request, session: SessionDep) -> Principal:
    """The caller of ``Authorization: Bearer <key>``; 401 without a live key.

    A key this process found live within ``PRUNEHUB_AUTH_CACHE_S`` is answered from its cache on the event loop;
    any other is looked up on a thread (see :class:`server.services.auth.KeyCache`)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    cache: KeyCache = request.app.state.key_cache
    principal = None
    if scheme.lower() == "bearer":
        principal = cache.get_token(token)
        if principal is None:
            principal = await anyio.to_thread.run_sync(authenticate, session, token, cache)
    if principal is None:
        raise HTTPException(
            status_code=401,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>' (prunehub keys create)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
