"""The live event stream of an experiment (server-sent events), read from the append-only ``events`` table."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.api.deps import ExperimentId, PrincipalDep, SessionDep
from server.api.schemas import ErrorPublic
from server.db.models import Event, Experiment, ExperimentStatus
from server.services import experiments as service
from server.services.errors import InvalidInput
from server.services.events import events_after

__all__ = ["format_event", "router"]

router = APIRouter(prefix="/experiments", tags=["experiments"])

POLL_INTERVAL_S = 0.5
HEARTBEAT_S = 15.0
BATCH = 500
# PostgreSQL hands out ids at insert and commits later, so an event can become visible after one with a higher
# id (a cancel from the API while a worker records a trial). A live stream therefore re-reads the last few
# seconds of ids and skips what it already sent; only ids older than this window count as settled.
SETTLE_S = 5.0
RETRY_MS = 2000


def format_event(event: Event) -> str:
    """One SSE message: ``id`` is the event's id (the resume point), ``event`` its kind, ``data`` one JSON line."""
    data: dict[str, Any] = {
        "id": event.id,
        "experiment_id": event.experiment_id,
        "kind": event.kind,
        "created_at": event.created_at.isoformat() if event.created_at else None,
        **(event.payload or {}),
    }
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(data, default=str)}\n\n"


def _poll(
    session_factory: sessionmaker[Session], experiment_id: ExperimentId, floor: int | None, cursor: int | None
) -> tuple[list[Event], bool]:
    """(events, terminal) from one short-lived session, closed before returning (the loaded rows stay readable).

    Reads the events above ``cursor`` (the highest id sent) and, when ``floor`` lags behind it, the unsettled ids
    between the two (the caller skips those it already sent).
    """
    with session_factory() as session:
        # Status first: a terminal status is committed together with its own event, so every event of a
        # terminal experiment is visible to the reads that follow.
        status = session.scalar(select(Experiment.status).where(Experiment.id == experiment_id))
        late = []
        if cursor is not None and (floor is None or floor < cursor):
            late = events_after(session, experiment_id, floor, 10 * BATCH, up_to=cursor)
        rows = events_after(session, experiment_id, cursor, BATCH)
        terminal = status is None or ExperimentStatus(status).terminal
        return [*late, *rows], terminal and len(rows) < BATCH


# Event ids are at most a signed 64-bit integer (BIGINT on PostgreSQL); a larger resume point is a 422 before
# the stream starts, not a 200 and then a driver overflow that aborts it.
MAX_EVENT_ID = 2**63 - 1


def _parse_last_id(header: str | None, query: int | None) -> int | None:
    if header is None or not header.strip():
        return query
    text = header.strip()
    if not text.isascii() or not text.isdigit() or int(text) > MAX_EVENT_ID:
        raise InvalidInput(
            f"Last-Event-ID must be an event id (an integer from 0 to {MAX_EVENT_ID})", field="Last-Event-ID"
        )
    return int(text)


@router.get(
    "/{experiment_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": ErrorPublic}},
    response_class=StreamingResponse,
)
async def stream_events(
    experiment_id: ExperimentId,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    last_event_id: str | None = Header(None, alias="Last-Event-ID", max_length=40),
    after: int | None = Query(
        None,
        ge=0,
        le=MAX_EVENT_ID,
        description="resume after this event id (for clients that cannot set the Last-Event-ID header)",
    ),
) -> StreamingResponse:
    """Server-sent events of an experiment, oldest first: ``status`` {status, error?}, ``progress``
    {done, total, phase}, ``trial`` {trial_id, seq, status, score, overall_sparsity, flops_ratio, params_ratio,
    context, error}, ``best`` {trial_id, score}, ``problem``.

    Each message's ``id`` is the event's id in the append-only log: reconnect with ``Last-Event-ID: <id>`` (or
    ``?after=<id>``) to get exactly what was missed. The stream ends once the experiment is terminal and every
    event was sent; a ``: keepalive`` comment is sent every 15 s while nothing happens.

    Example::

        curl -N -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/experiments/1/events
    """
    resume = _parse_last_id(last_event_id, after)  # 422 before the stream starts
    service.get_experiment(session, experiment_id, principal.scope)  # 404 before the stream starts
    session.close()  # the stream opens its own short sessions; none stays open while it sleeps
    session_factory: sessionmaker[Session] = request.app.state.session_factory

    async def messages() -> AsyncIterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        floor = resume  # every id at or below it was sent (or the client had it) and is settled
        cursor = resume  # the highest id sent
        sent: set[int] = set()  # ids sent above the floor
        seen: deque[tuple[float, int]] = deque()  # (when, cursor then): the floor follows once settled
        last_write = time.monotonic()
        while True:
            batch, terminal = await anyio.to_thread.run_sync(_poll, session_factory, experiment_id, floor, cursor)
            now = time.monotonic()
            fresh = [event for event in batch if event.id not in sent]
            for event in fresh:
                yield format_event(event)
            if fresh:
                sent.update(event.id for event in fresh)
                cursor = max(cursor or 0, *(event.id for event in fresh))
                last_write = now
                seen.append((now, cursor))
            while seen and now - seen[0][0] >= SETTLE_S:
                _, floor = seen.popleft()  # cursors only grow, so a settled one is at or above the floor
                sent = {i for i in sent if i > floor}
            if terminal and not fresh:
                return
            if now - last_write >= HEARTBEAT_S:
                last_write = now
                yield ": keepalive\n\n"
            if await request.is_disconnected():
                return
            await anyio.sleep(POLL_INTERVAL_S)

    return StreamingResponse(
        messages(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"},
    )
