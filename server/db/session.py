"""Engine and session factories. Nothing is created at import time: Celery forks, and an engine inherited across
a fork shares sockets between processes. Each process builds its own engine from the settings."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from server.files import secure_sqlite

__all__ = ["make_engine", "make_session_factory"]


def make_engine(
    url: str, *, pool_size: int | None = None, idle_in_transaction_s: float | None = None, pre_ping: bool = True
) -> Engine:
    """An engine for ``url``. SQLite gets WAL, a busy timeout and foreign keys (its only special case).

    ``idle_in_transaction_s`` (PostgreSQL; the workers): the server ends a session whose transaction has waited
    that long for its client, so that its locks do not outlive a connection the client lost while the server's end
    stayed open (a half-open connection: a proxy or NAT that lost one side; no keepalive notices it while the
    middle box answers). Seen in the database-outage test: the cut ended the worker's side of a connection right
    after its ``SELECT ... FOR UPDATE`` of the experiment, the backend lived on idle in transaction, and the
    worker's retry, its heartbeat and its reaper each waited for that row lock for good.

    ``pool_size`` (the API: its admission limit plus a reserve) gives a fixed pool of that many connections, for
    SQLite too (whose default pool, 5 + 10, is smaller than the admitted requests), that fails fast: the caller
    admits no more concurrent users than connections, so a wait on the pool means something is wrong, and a 10 s
    timeout surfaces it as a 503 (see ``server.api.main``) instead of a 30 s stall. Without it (workers, the CLI):
    10 connections plus 20 overflow.

    ``pre_ping`` (without ``pool_size``): test each connection with a round trip when it is checked out of the pool.
    The workers turn it off: they check a connection out for every transaction (three or four per job), and each of
    their transactions already retries on a connection error (``worker.runner.transact``), where the dead
    connection's error makes SQLAlchemy invalidate the pool, so the retry connects afresh. The CLI keeps it."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            secure_sqlite(Path(parsed.database))  # every owner's experiments and key hashes: 0600
        in_memory = not parsed.database or parsed.database == ":memory:"  # one shared connection, no pool to size
        sized = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": 10}
        if pool_size is None or in_memory:
            sized = {}
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **sized)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL syncs at checkpoints, not at every commit: a commit survives a crash of any
            # process (only a power cut can lose the last few), and a trial's three commits stop costing an
            # fsync each (the embedded runner's largest per-trial cost, measured with py-spy).
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    connect_args: dict[str, str] = {}
    if idle_in_transaction_s and parsed.get_backend_name() == "postgresql":
        # Sent at connect (libpq's options, after any the URL gives), so every pooled connection has it.
        given = parsed.query.get("options") or ()
        timeout = f"-c idle_in_transaction_session_timeout={max(1, round(idle_in_transaction_s * 1000))}"
        connect_args["options"] = " ".join([*([given] if isinstance(given, str) else given), timeout])
    if pool_size is not None:
        # No pre-ping: it was a round trip on every checkout, i.e. on every request. A connection the database
        # dropped fails its request once, SQLAlchemy then invalidates the whole pool, and the API answers that
        # request 503 + Retry-After (server.api.main), so the client's retry gets a fresh connection.
        return create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=10, pool_recycle=1800,
                             connect_args=connect_args)
    return create_engine(url, pool_pre_ping=pre_ping, pool_size=10, max_overflow=20, connect_args=connect_args)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
