"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from server.api.deps import DispatcherDep, SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, session: SessionDep, dispatcher: DispatcherDep) -> JSONResponse:
    """The database and the broker are reachable and the API has a free request slot (503 naming what is not).

    ``requests`` is ``ok`` or ``saturated: IN_FLIGHT/LIMIT in flight, N waiting`` (``PRUNEHUB_MAX_CONCURRENT_REQUESTS``
    admitted at once; see ``server/api/admission.py``); ``admission`` has the raw figures."""
    checks: dict[str, str] = {}
    admission = request.app.state.admission
    snapshot = admission.snapshot()
    checks["requests"] = (
        f"saturated: {snapshot['in_flight']}/{snapshot['limit']} in flight, {snapshot['waiting']} waiting"
        if admission.saturated
        else "ok"
    )
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report, don't crash
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        dispatcher.ping()
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ok = all(value == "ok" for value in checks.values())
    status = "ok" if ok else "unavailable"
    headers = {} if ok else {"Retry-After": "1"}
    return JSONResponse(
        status_code=200 if ok else 503, content={"status": status, **checks, "admission": snapshot}, headers=headers
    )
