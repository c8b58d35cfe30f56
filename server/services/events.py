"""The append-only event log of an experiment."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event as orm_event
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from server.db.models import Event

__all__ = ["add_event", "events_after"]

_PENDING = "prunehub.pending_events"


def add_event(session: Session, experiment_id: int, kind: str, **payload: Any) -> None:
    """Append an event in the caller's transaction (it commits with the change it describes).

    A transaction's events are inserted together as it commits, in one statement: added one by one, each was an
    INSERT of its own at the next query's autoflush (four or five per trial of a search).
    """
    if not session.in_transaction():
        session.begin()  # as session.add would: the event belongs to this transaction, ended by its commit or not
    pending = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = []
        orm_event.listen(session, "before_commit", _add_pending)
        orm_event.listen(session, "after_transaction_end", _drop_pending)
    pending.append({"experiment_id": experiment_id, "kind": kind, "payload": payload})


def _add_pending(session: Session) -> None:
    pending = session.info.get(_PENDING)
    if pending:
        rows = list(pending)
        pending.clear()
        session.execute(insert(Event), rows)  # no ORM objects, no RETURNING: one executemany, ids in this order


def _drop_pending(session: Session, transaction: Any) -> None:
    # A transaction that ended without committing (a rollback, a close) takes its events with it.
    pending = session.info.get(_PENDING)
    if pending and transaction.parent is None:
        pending.clear()


def events_after(
    session: Session, experiment_id: int, after_id: int | None = None, limit: int = 500, *, up_to: int | None = None
) -> list[Event]:
    """The experiment's events with an id above ``after_id`` (all when ``None``) and at most ``up_to``, oldest
    first, at most ``limit`` of them.

    Event ids only grow, so ``after_id`` is a resume point: the live stream sends each event's id and a client
    that reconnects with the last id it saw gets exactly what it missed.
    """
    _add_pending(session)  # this transaction's own events too
    query = select(Event).where(Event.experiment_id == experiment_id)
    if after_id is not None:
        query = query.where(Event.id > after_id)
    if up_to is not None:
        query = query.where(Event.id <= up_to)
    return list(session.scalars(query.order_by(Event.id).limit(limit)))
