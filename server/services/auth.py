"""API keys: created once, shown once, stored as SHA-256 hashes; each request maps its key to a principal.

Keys are 256-bit random tokens (``ph_`` + 43 URL-safe characters), so a plain SHA-256 is as strong as a slow
password hash here and costs nothing per request.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from server.db.models import ApiKey
from server.services.errors import InvalidInput

__all__ = [
    "KeyCache",
    "Principal",
    "authenticate",
    "create_key",
    "ensure_local_key",
    "hash_key",
    "list_keys",
    "revoke_key",
]

KEY_PREFIX = "ph_"
ROLES = ("user", "admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling: an owner name, and whether it may see every owner's experiments."""

    owner: str
    admin: bool = False

    @property
    def scope(self) -> str | None:
        """The owner filter for queries: ``None`` (everything) for an admin."""
        return None if self.admin else self.owner


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(session: Session, owner: str, role: str = "user") -> str:
    """Store a new key for ``owner`` and return its plain text (the only time it exists anywhere)."""
    owner = owner.strip()
    if not owner or len(owner) > 128:
        raise InvalidInput("owner must be 1 to 128 characters", field="owner")
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {ROLES}", field="role")
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(owner=owner, role=role, key_hash=hash_key(token), prefix=token[:10]))
    session.flush()
    return token


class KeyCache:
    """Keys this process has found live, trusted for ``ttl_s`` seconds without asking the database again.

    One per API process (``app.state``), shared by its threads. Why: the key lookup was a query on every request,
    a third of the cost of a ``GET /experiments/{id}``. The price is bounded: a key revoked by another process (the
    CLI's ``prunehub keys revoke``) is refused here within ``ttl_s``; one revoked through :func:`revoke_key` with
    this cache is refused at once. Only live keys are cached: an unknown or revoked key is looked up every time.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Principal, str, float]] = {}  # key hash -> (principal, prefix, expiry)
        self._lock = threading.Lock()
        # Bumped by every forget: a lookup that began before a revocation in this process must not cache its answer.
        self.generation = 0

    def get_token(self, token: str) -> Principal | None:
        """The cached principal of a plain ``token`` (no database access, so callable on an event loop)."""
        if not token.startswith(KEY_PREFIX) or len(token) > 200:
            return None
        return self.get(hash_key(token))

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if entry[2] <= time.monotonic():
            with self._lock:
                self._entries.pop(key_hash, None)
            return None
        return entry[0]

    def put(self, key_hash: str, principal: Principal, prefix: str, generation: int | None = None) -> None:
        """Trust ``principal`` for ``ttl_s``; ``generation`` (:attr:`generation` when the database was asked): a
        revocation since then (on another thread) leaves it uncached, so a revocation here is never undone."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # a flood of distinct live keys: start over rather than grow
            self._entries[key_hash] = (principal, prefix, time.monotonic() + self.ttl_s)

    def forget_prefix(self, prefix: str) -> None:
        """Drop every cached key shown as ``prefix`` (what :func:`revoke_key` revokes)."""
        with self._lock:
            self.generation += 1
            for key_hash in [h for h, (_, p, _) in self._entries.items() if p == prefix]:
                del self._entries[key_hash]


def authenticate(session: Session, token: str | None, cache: KeyCache | None = None) -> Principal | None:
    """The principal of a live key, or ``None``. With ``cache``, a key found live within its ttl is not looked up
    again (see :class:`KeyCache`)."""
    if not token or not token.startswith(KEY_PREFIX) or len(token) > 200:
        return None
    key_hash = hash_key(token)
    generation = None
    if cache is not None:
        cached = cache.get(key_hash)
        if cached is not None:
            return cached
        generation = cache.generation
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
    if key is None:
        return None
    principal = Principal(owner=key.owner, admin=key.role == "admin")
    if cache is not None:
        cache.put(key_hash, principal, key.prefix, generation)
    return principal


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, prefix: str, cache: KeyCache | None = None) -> int:
    """Revoke the live keys shown as ``prefix``; returns how many (the caller commits). ``cache`` (this process's)
    forgets them at once and again at the commit; other processes' caches within their ttl."""
    from server.db.models import utcnow

    keys = list(session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))))
    for key in keys:
        key.revoked_at = utcnow()
    session.flush()
    if cache is not None:
        cache.forget_prefix(prefix)
        # Again once committed: until then another session still reads the key as live, and may have cached it.
        event.listen(session, "after_commit", lambda _session: cache.forget_prefix(prefix), once=True)
    return len(keys)


def ensure_local_key(session: Session, path: Path) -> str | None:
    """The embedded default's first start: with no key in the database, create an admin key for the local user
    and write it to ``path`` (mode 0600), where the CLI finds it. Returns the new key, or ``None``."""
    if session.scalar(select(func.count()).select_from(ApiKey)):
        return None
    token = create_key(session, owner="local", role="admin")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token
