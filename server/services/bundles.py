"""Bundle use cases: store an upload, list and read an owner's bundles, and resolve the bundle an experiment names.

The API streams an upload to a file first (its size limit applies while streaming); :func:`store_upload` then
checks the zip (:mod:`server.services.bundle_archive`, which never imports or runs the code), moves its bytes into
the artifact store under their hash and records the owner's row. Nothing from a bundle is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pruning.task import TaskError, check_entrypoint
from server.db.models import Bundle
from server.services.auth import Principal
from server.services.bundle_archive import BundleLimits, inspect_bundle, store_blob
from server.services.errors import Forbidden, InvalidInput, NotFound

__all__ = [
    "check_bundle_entrypoint",
    "check_enabled",
    "check_upload_allowed",
    "get_bundle",
    "list_bundles",
    "store_upload",
    "usable_bundle",
]

_OFF = "task bundles are turned off on this server (PRUNEHUB_BUNDLES=false); use an installed entrypoint"


def check_enabled(*, enabled: bool) -> None:
    """:class:`Forbidden` when bundles are turned off (``PRUNEHUB_BUNDLES=false``)."""
    if not enabled:
        raise Forbidden(_OFF, field="bundle")


def check_upload_allowed(principal: Principal, *, enabled: bool, admin_only: bool) -> None:
    """:class:`Forbidden` unless this caller may upload bundles (``PRUNEHUB_BUNDLES``,
    ``PRUNEHUB_BUNDLES_ADMIN_ONLY``)."""
    check_enabled(enabled=enabled)
    if admin_only and not principal.admin:
        raise Forbidden(
            "bundle uploads are reserved to admin keys on this server (PRUNEHUB_BUNDLES_ADMIN_ONLY=true)",
            field="bundle",
        )


def store_upload(
    session: Session,
    *,
    owner: str,
    upload: Path,
    digest: str,
    size: int,
    artifacts_dir: Path,
    limits: BundleLimits,
) -> tuple[Bundle, bool]:
    """Record the uploaded zip at ``upload`` (whose bytes hash to ``digest``) for ``owner``: ``(bundle, created)``.

    The same bytes from the same owner give the existing row (``created`` false). Otherwise the zip is checked
    (:class:`~server.services.bundle_archive.UnsafeBundle`, naming the entry, when refused), moved into the
    artifact store under ``digest`` and a row is added. ``upload`` is consumed either way. The caller commits.
    """
    try:
        existing = _find(session, owner, digest)
        if existing is not None:
            store_blob(artifacts_dir, digest, upload)  # keeps the stored copy; restores a lost one
            return existing, False
        manifest = inspect_bundle(upload, limits)
        store_blob(artifacts_dir, digest, upload)
    finally:
        upload.unlink(missing_ok=True)
    bundle = Bundle(
        owner=owner,
        digest=digest,
        size=size,
        files=manifest.files,
        unpacked_size=manifest.unpacked_size,
        modules=manifest.modules,
    )
    try:
        with session.begin_nested():  # a concurrent upload of the same bytes by the same owner may win the insert
            session.add(bundle)
    except IntegrityError:
        winner = _find(session, owner, digest)
        if winner is None:
            raise
        return winner, False
    return bundle, True


def _find(session: Session, owner: str, digest: str) -> Bundle | None:
    return session.scalar(select(Bundle).where(Bundle.owner == owner, Bundle.digest == digest))


def list_bundles(session: Session, *, owner: str | None, limit: int = 100) -> list[Bundle]:
    """The newest ``limit`` bundles of ``owner`` (every owner's for ``None``: an admin), newest first."""
    query = select(Bundle)
    if owner is not None:
        query = query.where(Bundle.owner == owner)
    return list(session.scalars(query.order_by(Bundle.created_at.desc(), Bundle.id.desc()).limit(limit)))


def get_bundle(session: Session, digest: str, owner: str | None) -> Bundle:
    """The bundle's metadata, or :class:`NotFound`, also when only another owner has it (existence is not
    revealed). For an admin (``owner`` None) the newest row with that id."""
    query = select(Bundle).where(Bundle.digest == digest)
    if owner is not None:
        query = query.where(Bundle.owner == owner)
    bundle = session.scalar(query.order_by(Bundle.id.desc()).limit(1))
    if bundle is None:
        raise NotFound(f"bundle {digest} not found", field="id")
    return bundle


def usable_bundle(session: Session, *, owner: str, digest: str, enabled: bool) -> Bundle:
    """The bundle an experiment of ``owner`` names: it must be the owner's own (an admin's key does not lend
    another owner's code). :class:`NotFound` naming the field ``bundle`` otherwise; :class:`Forbidden` when
    bundles are turned off."""
    check_enabled(enabled=enabled)
    bundle = _find(session, owner, digest)
    if bundle is None:
        raise NotFound(f"bundle {digest} not found (upload it first: POST /bundles)", field="bundle")
    return bundle


def check_bundle_entrypoint(entrypoint: str, modules: Sequence[str], digest: str) -> None:
    """:class:`InvalidInput` (field ``entrypoint``) unless ``entrypoint``'s module is one of the bundle's
    ``modules``. This replaces the allow-list for the owner's own code: the allow-list governs what is installed on
    the workers."""
    module = entrypoint.partition(":")[0]
    try:
        check_entrypoint(entrypoint, [module])  # the form only: 'pkg.module' or 'pkg.module:attr'
    except TaskError as exc:
        raise InvalidInput(str(exc), field="entrypoint") from exc
    if module not in modules:
        shown = ", ".join(list(modules)[:20]) + (", ..." if len(modules) > 20 else "")
        raise InvalidInput(
            f"entrypoint module {module!r} is not in bundle {digest} (its modules: {shown})", field="entrypoint"
        )
