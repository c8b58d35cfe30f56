"""API keys: created once, shown once, stored as SHA-256 hashes; each request maps its key to a principal.

Keys are 256-bit random tokens (``ph_`` + 43 URL-safe characters), so a plain SHA-256 is as strong as a slow
password hash here and costs nothing per request.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import ApiKey
from server.services.errors import InvalidInput

__all__ = ["Principal", "authenticate", "create_key", "ensure_local_key", "hash_key", "list_keys", "revoke_key"]

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


def authenticate(session: Session, token: str | None) -> Principal | None:
    """The principal of a live key, or ``None``."""
    if not token or not token.startswith(KEY_PREFIX) or len(token) > 200:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token), ApiKey.revoked_at.is_(None)))
    if key is None:
        return None
    return Principal(owner=key.owner, admin=key.role == "admin")


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, prefix: str) -> int:
    from server.db.models import utcnow

    keys = list(session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))))
    for key in keys:
        key.revoked_at = utcnow()
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
