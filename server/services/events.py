"""The append-only event log of an experiment."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from server.db.models import Event

__all__ = ["add_event"]


def add_event(session: Session, experiment_id: int, kind: str, **payload: Any) -> Event:
    """Append an event in the caller's transaction (it commits with the change it describes)."""
    event = Event(experiment_id=experiment_id, kind=kind, payload=payload)
    session.add(event)
    return event
