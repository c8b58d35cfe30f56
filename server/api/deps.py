"""FastAPI dependencies as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.orm import Session

from server.services.auth import Principal, authenticate
from server.services.dispatch import Dispatcher
from server.settings import Settings

__all__ = ["DispatcherDep", "ExperimentId", "PrincipalDep", "SessionDep", "SettingsDep"]

# Ids are 32-bit integers in every database we run on; a larger number is a 422, not a driver overflow.
ExperimentId = Annotated[int, Path(ge=1, le=2_147_483_647, description="the experiment's id")]


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher  # type: ignore[no-any-return]


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def get_principal(request: Request, session: SessionDep) -> Principal:
    """The caller of ``Authorization: Bearer <key>``; 401 without a live key."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    principal = authenticate(session, token.strip()) if scheme.lower() == "bearer" else None
    if principal is None:
        raise HTTPException(
            status_code=401,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>' (prunehub keys create)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
