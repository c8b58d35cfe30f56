"""The dashboard: a static single-page app served by the API itself at ``/`` (no separate server, no build step).

The page talks to the same REST API and event stream as every other client. Charting is Chart.js, vendored under
``static/vendor/`` so that offline clusters work.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "mount", "router"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    """The dashboard's single page; it routes by URL fragment (``#/experiments/3``, ``#/compare/1,2``)."""
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


def mount(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/static``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
