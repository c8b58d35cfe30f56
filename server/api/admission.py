"""Admission control: the API serves at most ``limit`` requests at once, so it can never stall on its own pool.

Why: every request that reaches a route holds a pooled database connection from its first query until its
session closes, and runs its synchronous parts on the threadpool. Without a bound, a burst admits more requests than
there are connections; the threads then wait on the pool while the requests that hold connections wait for a
thread, until SQLAlchemy's pool timeout turns the burst into 500s (issue 15: 55 concurrent requests stalled for
30 s). With at most ``limit`` requests admitted, and the pool and the threadpool sized above ``limit`` (see
:func:`server.api.main.create_app`), an admitted request always finds a connection and a thread.

A request over the limit waits in a queue for up to ``wait_s``; a free slot goes to the waiting request whose
caller (its ``Authorization`` header) has the fewest requests in flight, oldest first, so one owner's burst does
not delay another owner's request by more than one request's time. A request that waited ``wait_s``, or that
finds ``max_queue`` requests already waiting, is answered ``503`` with ``Retry-After`` at once.

Not counted: ``/healthz`` and ``/readyz`` (they must answer while the API is saturated: ``/readyz`` reports it),
and the dashboard's static files. An event stream holds its slot only until its headers go out: it then reads
the database in short sessions, never holding a connection while it waits.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["Admission", "AdmissionGuard"]

# Paths that never take a slot: health checks and files that need no database.
_EXEMPT_PREFIXES = ("/healthz", "/readyz", "/static/", "/favicon", "/openapi.json", "/docs", "/redoc")


@dataclass(eq=False)
class _Waiter:
    caller: str
    future: asyncio.Future[None]
    since: float = field(default_factory=time.monotonic)


class Admission:
    """The counter and the queue behind :class:`AdmissionGuard`, also read by ``/readyz``.

    Lives on the event loop's thread only (ASGI middleware), so it needs no lock.
    """

    def __init__(self, limit: int, wait_s: float, max_queue: int) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.in_flight = 0
        self.refused = 0
        self._by_caller: dict[str, int] = defaultdict(int)
        self._waiting: list[_Waiter] = []

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def saturated(self) -> bool:
        """Every slot is taken: a new request would wait (or be refused)."""
        return self.in_flight >= self.limit

    def snapshot(self) -> dict[str, int | float]:
        return {"in_flight": self.in_flight, "limit": self.limit, "waiting": self.waiting, "refused": self.refused}

    async def acquire(self, caller: str) -> bool:
        """Take a slot for ``caller`` (waiting up to ``wait_s``); ``False`` when none came in time."""
        if self.in_flight < self.limit and not self._waiting:
            self._take(caller)
            return True
        if len(self._waiting) >= self.max_queue:
            self.refused += 1
            return False
        waiter = _Waiter(caller, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.wait_s)
        except TimeoutError:
            if waiter.future.done():  # granted just as the wait ran out: keep the slot
                return True
            self._waiting.remove(waiter)
            self.refused += 1
            return False
        except asyncio.CancelledError:  # the client went away while waiting
            if waiter.future.done():
                self.release(caller)
            else:
                self._waiting.remove(waiter)
            raise
        return True

    def release(self, caller: str) -> None:
        self.in_flight -= 1
        self._by_caller[caller] -= 1
        if self._by_caller[caller] <= 0:
            del self._by_caller[caller]
        self._grant()

    def _take(self, caller: str) -> None:
        self.in_flight += 1
        self._by_caller[caller] += 1

    def _grant(self) -> None:
        while self._waiting and self.in_flight < self.limit:
            # Fair order: the caller with the fewest requests in flight first; oldest first among equals.
            chosen = min(self._waiting, key=lambda w: (self._by_caller.get(w.caller, 0), w.since))
            self._waiting.remove(chosen)
            self._take(chosen.caller)
            chosen.future.set_result(None)


def _caller(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            # A digest, not the key: the queue never keeps a usable credential in memory longer than the request.
            return hashlib.sha256(value).hexdigest()[:16]
    client = scope.get("client")
    return f"anonymous:{client[0] if client else ''}"


class AdmissionGuard:
    """Pure ASGI middleware admitting at most ``admission.limit`` requests at once (see the module docstring)."""

    def __init__(self, app: Any, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path == "/" or path.startswith(_EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        caller = _caller(scope)
        if not await self.admission.acquire(caller):
            retry = max(1, math.ceil(self.admission.wait_s))
            response = JSONResponse(
                status_code=503,
                content={
                    "detail": f"the API is at its limit of {self.admission.limit} requests in flight; retry in "
                    f"{retry} s",
                    "field": None,
                },
                headers={"Retry-After": str(retry)},
            )
            await response(scope, receive, send)
            return
        held = True

        async def send_and_release_streams(message: dict[str, Any]) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if content_type.startswith(b"text/event-stream"):
                    held = False
                    self.admission.release(caller)
            await send(message)

        try:
            await self.app(scope, receive, send_and_release_streams)
        finally:
            if held:
                self.admission.release(caller)
