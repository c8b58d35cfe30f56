"""The FastAPI application factory."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from server.api.admission import Admission, AdmissionGuard
from server.api.deps import Reader
from server.api.guards import RequestGuard, validation_content
from server.files import secure_home
from server.services.auth import KeyCache
from server.services.dispatch import CeleryDispatcher, Dispatcher, make_broker_app
from server.services.errors import Conflict, Forbidden, InvalidInput, NotFound, ServiceError, TooManyRequests
from server.settings import Settings, get_settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# Connections and threads beyond the admitted requests: /readyz and /healthz (never admitted, so they answer when
# the API is full) and the short polls of event streams, which give their slot back once their headers are out.
POOL_RESERVE = 8


def _freeze_heap(engine: Engine) -> None:
    """Load what the first request would (the driver's modules, the dialect's first-connect state), then freeze."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError:
        log.warning("database unreachable at start; the heap is frozen without the driver's first connection")
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None,
    *,
    dispatcher: Dispatcher | None = None,
    migrate: bool = True,
    freeze_heap: bool = False,
) -> FastAPI:
    """Build the API. Migrations are applied at start (``migrate=False`` when the caller already did).

    ``freeze_heap`` (``prunehub serve``, a process that only serves): once started, every object then alive moves to
    the collector's permanent generation (:func:`gc.freeze`). Why: a full collection scanned the whole heap of
    FastAPI, pydantic and SQLAlchemy (about 150,000 objects, 40-60 ms of CPU) every few thousand requests with the
    GIL held, stalling every request in flight: the tail of ``GET /experiments/{id}``'s latency. Frozen, one takes
    under a millisecond. Not for a process that builds apps over and over (tests): what it froze is never freed."""
    from server.api.routes import bundles, dashboard, events, experiments, health
    from server.db.migrate import upgrade
    from server.db.session import make_engine, make_session_factory

    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        secure_home(settings.home)
        if migrate:
            upgrade(settings.database_url)
        engine = make_engine(settings.database_url, pool_size=settings.max_concurrent_requests + POOL_RESERVE)
        # Every sync route and dependency runs on anyio's threadpool (40 threads by default): at least one thread
        # per pooled connection, so a request holding a connection always gets a thread to finish on.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.max_concurrent_requests + POOL_RESERVE)
        app.state.settings = settings
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        app.state.reader = Reader(engine)
        app.state.key_cache = KeyCache(settings.auth_cache_s)
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
        if freeze_heap:
            _freeze_heap(engine)
        yield
        await app.state.reader.close()
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
        elif isinstance(exc, TooManyRequests):
            return JSONResponse(
                status_code=429,
                content={"detail": exc.message, "field": exc.field},
                headers={"Retry-After": str(exc.retry_after_s)},
            )
        return JSONResponse(status_code=status, content={"detail": exc.message, "field": exc.field})

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(_request: Request, _exc: PoolTimeout) -> JSONResponse:
        # Admission keeps requests below the pool's size; should the pool still run dry (a connection leak, a
        # database that stopped answering), the caller hears "busy, retry", never a 500.
        log.error("database pool exhausted")
        content = {"detail": "the database is busy; retry", "field": None}
        return JSONResponse(status_code=503, content=content, headers={"Retry-After": "1"})

    @app.exception_handler(DBAPIError)
    async def _database_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            # The database dropped the connection (a restart): SQLAlchemy has invalidated the pool, a retry
            # reconnects.
            log.warning("database connection lost (%s); the pool reconnects", type(exc.orig).__name__)
            detail = "the database connection was lost; retry"
        elif exc.statement is None:
            # No statement: opening a connection failed (the database is down, or out of connections). Busy.
            log.warning("cannot connect to the database (%s)", type(exc.orig).__name__)
            detail = "the database is unreachable; retry"
        else:
            raise exc  # a real bug: the server error middleware answers 500 and logs it
        return JSONResponse(status_code=503, content={"detail": detail, "field": None}, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=validation_content(exc.errors()))

    app.add_middleware(
        RequestGuard, max_bytes=settings.max_body_bytes, routes={("POST", "/bundles"): settings.max_bundle_bytes}
    )
    # Added last, so it runs first: a refused request costs no body read. One per app, read by /readyz.
    app.state.admission = Admission(
        settings.max_concurrent_requests, settings.admission_wait_s, settings.admission_queue
    )
    app.add_middleware(AdmissionGuard, admission=app.state.admission)
    app.include_router(health.router)
    app.include_router(experiments.router)
    app.include_router(events.router)
    app.include_router(bundles.router)
    dashboard.mount(app)
    return app
