"""The append-only event log of an experiment."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.models import Event

__all__ = ["add_event", "events_after"]


def add_event(session: Session, experiment_id: int, kind: str, **payload: Any) -> Event:
    """Append an event in the caller's transaction (it commits with the change it describes)."""
    event = Event(experiment_id=experiment_id, kind=kind, payload=payload)
    session.add(event)
    return event


def events_after(
    session: Session, experiment_id: int, after_id: int | None = None, limit: int = 500, *, up_to: int | None = None
) -> list[Event]:
    """The experiment's events with an id above ``after_id`` (all when ``None``) and at most ``up_to``, oldest
    first, at most ``limit`` of them.

    Event ids only grow, so ``after_id`` is a resume point: the live stream sends each event's id and a client
    that reconnects with the last id it saw gets exactly what it missed.
    """
    query = select(Event).where(Event.experiment_id == experiment_id)
    if after_id is not None:
        query = query.where(Event.id > after_id)
    if up_to is not None:
        query = query.where(Event.id <= up_to)
    return list(session.scalars(query.order_by(Event.id).limit(limit)))
