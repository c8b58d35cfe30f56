"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.services.dispatch import CeleryDispatcher, Dispatcher, make_broker_app
from server.services.errors import Conflict, Forbidden, InvalidInput, NotFound, ServiceError
from server.settings import Settings, get_settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether announced by Content-Length or streamed.

    ``routes`` gives single routes, keyed by (method, path), their own limit instead (the bundle upload: a zip of
    up to ``PRUNEHUB_MAX_BUNDLE_MB``); every other request keeps ``max_bytes``.
    """

    def __init__(self, app: Any, max_bytes: int, routes: Mapping[tuple[str, str], int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.routes = dict(routes or {})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.routes.get((scope.get("method", ""), scope.get("path", "").rstrip("/")), self.max_bytes)
        too_large = JSONResponse(
            status_code=413, content={"detail": f"request body over {max_bytes} bytes", "field": "body"}
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > max_bytes:
                        await too_large(scope, receive, send)
                        return
                except ValueError:
                    pass
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _BodyTooLarge
            return message  # type: ignore[no-any-return]

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(
    settings: Settings | None = None, *, dispatcher: Dispatcher | None = None, migrate: bool = True
) -> FastAPI:
    """Build the API. Migrations are applied at start (``migrate=False`` when the caller already did)."""
    from server.api.routes import bundles, dashboard, events, experiments, health
    from server.db.migrate import upgrade
    from server.db.session import make_engine, make_session_factory

    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            upgrade(settings.database_url)
        engine = make_engine(settings.database_url)
        app.state.settings = settings
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        if settings.bootstrap_local_key:
            from server.services.auth import ensure_local_key

            with app.state.session_factory() as session:
                if ensure_local_key(session, settings.local_key_file):
                    log.warning("created the local admin API key in %s", settings.local_key_file)
                session.commit()
        if dispatcher is not None:
            app.state.dispatcher = dispatcher
        else:
            app.state.dispatcher = CeleryDispatcher(make_broker_app(settings))
        yield
        engine.dispose()

    app = FastAPI(
        title="prunehub",
        version="0.1.0",
        description="Automated neural-network pruning search as a service: submit an experiment, a worker "
        "searches per-layer sparsity distributions of your model, poll for the best one.",
        lifespan=lifespan,
    )

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        status = 400
        if isinstance(exc, NotFound):
            status = 404
        elif isinstance(exc, Forbidden):
            status = 403
        elif isinstance(exc, Conflict):
            status = 409
        elif isinstance(exc, InvalidInput):
            status = 422
        return JSONResponse(status_code=status, content={"detail": exc.message, "field": exc.field})

    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        routes={("POST", "/bundles"): settings.max_bundle_bytes},
    )
    app.include_router(health.router)
    app.include_router(experiments.router)
    app.include_router(events.router)
    app.include_router(bundles.router)
    dashboard.mount(app)
    return app
