"""Task bundles: upload a zip of your code, list your bundles, read one's metadata.

The upload route reads the body as a stream into a file in the artifact store's folder (hashing as it goes), so a
bundle is never held in memory; its own size limit (``PRUNEHUB_MAX_BUNDLE_MB``) is enforced by
:class:`server.api.main.BodySizeLimit` while the bytes arrive. Nothing in the zip is imported or run here.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from server.api.deps import PrincipalDep, SessionDep, SettingsDep
from server.api.schemas import BundlePublic, BundlesPublic, ErrorPublic, ValidationErrorPublic
from server.services import bundles as service
from server.services.bundle_archive import BUNDLE_ID_PATTERN, BundleLimits, bundle_id

router = APIRouter(prefix="/bundles", tags=["bundles"])

BundleId = Annotated[str, PathParam(pattern=BUNDLE_ID_PATTERN, description="sha256:<hex>")]
ZIP_TYPES = ("application/zip", "application/x-zip-compressed")

# Any route may answer 503 + Retry-After when the server is saturated (admission) or the database is busy.
_BUSY: dict[str, Any] = {"model": ErrorPublic, "headers": {"Retry-After": {"schema": {"type": "integer"}}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic},
    403: {"model": ErrorPublic},
    404: {"model": ErrorPublic},
    422: {"model": ValidationErrorPublic},
    503: _BUSY,
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=BundlePublic,
    responses={
        200: {"model": BundlePublic, "description": "the same bytes were uploaded before: that bundle"},
        413: {"model": ErrorPublic},
        415: {"model": ErrorPublic},
        422: {"model": ValidationErrorPublic},
        **_ERRORS,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_bundle(
    request: Request, response: Response, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> BundlePublic:
    """Upload a zip of your task package(s) (``Content-Type: application/zip``); answers its id, the
    SHA-256 of the bytes, and the modules an experiment's ``entrypoint`` may name. The same bytes again answer
    ``200`` with the same bundle. Refused (422, naming the entry): not a zip, absolute paths, ``..``, links,
    device files, duplicate names, too many entries, an uncompressed total over 4 x the size limit.

    Example: ``curl -H "Authorization: Bearer $KEY" -H "Content-Type: application/zip" --data-binary @code.zip
    http://127.0.0.1:8000/bundles``, then submit ``{"bundle": "sha256:...", "entrypoint": "acme_tasks.resnet",
    ...}``; ``prunehub submit spec.json --code DIR`` does both.
    """
    service.check_upload_allowed(principal, enabled=settings.bundles, admin_only=settings.bundles_admin_only)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ZIP_TYPES:
        raise HTTPException(status_code=415, detail="send the bundle as Content-Type: application/zip")
    incoming = Path(settings.artifacts_dir) / "bundles" / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=incoming, prefix="upload-", suffix=".zip")
    upload = Path(name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            # Small synchronous writes between awaits: a chunk is at most what the server read off the socket.
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        limits = BundleLimits(max_bytes=settings.max_bundle_bytes, max_files=settings.max_bundle_files)

        def store() -> tuple[Any, bool]:
            result = service.store_upload(
                session,
                owner=principal.owner,
                upload=upload,
                digest=bundle_id(digest),
                size=size,
                artifacts_dir=Path(settings.artifacts_dir),
                limits=limits,
            )
            session.commit()
            return result

        bundle, created = await run_in_threadpool(store)
    finally:
        upload.unlink(missing_ok=True)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return BundlePublic.model_validate(bundle)


@router.get("", response_model=BundlesPublic, responses=_ERRORS)
def list_bundles(
    session: SessionDep, settings: SettingsDep, principal: PrincipalDep, limit: int = Query(100, ge=1, le=1000)
) -> BundlesPublic:
    """Your newest ``limit`` bundles, newest first (an admin key: every owner's)."""
    service.check_enabled(enabled=settings.bundles)
    rows = service.list_bundles(session, owner=principal.scope, limit=limit)
    return BundlesPublic(items=[BundlePublic.model_validate(row) for row in rows])


@router.get("/{bundle_id}", response_model=BundlePublic, responses=_ERRORS)
def get_bundle(
    bundle_id: BundleId, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> BundlePublic:
    """One bundle's metadata; 404 when it is not yours (as when it does not exist)."""
    service.check_enabled(enabled=settings.bundles)
    return BundlePublic.model_validate(service.get_bundle(session, bundle_id, principal.scope))
