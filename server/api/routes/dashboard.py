"""The dashboard: a static single-page app served by the API itself at ``/`` (no separate server, no build step).

The page talks to the same REST API and event stream as every other client. Charting is Chart.js, vendored under
``static/vendor/`` so that offline clusters work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_DIR", "SecurityHeaders", "mount", "router"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["dashboard"], include_in_schema=False)

# The page loads only its own files: no inline script or style (app.js sets styles through the CSSOM, which a
# policy does not govern), no eval, no other origin, no framing. A user string that slipped into markup could
# therefore run nothing. Only the dashboard gets it: /docs is FastAPI's Swagger page, which loads from a CDN.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_EVERY_RESPONSE = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
_DASHBOARD = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """Pure ASGI middleware: ``X-Content-Type-Options: nosniff`` and ``X-Frame-Options: DENY`` on every response,
    and the dashboard's Content-Security-Policy on the page and its assets."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        extra = _EVERY_RESPONSE + (_DASHBOARD if path == "/" or path.startswith("/static/") else [])

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []), *((name, value) for name, value in extra if name not in present)
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    """The dashboard's single page; it routes by URL fragment (``#/experiments/3``, ``#/compare/1,2``)."""
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


def mount(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/static``, with the security headers."""
    app.add_middleware(SecurityHeaders)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
