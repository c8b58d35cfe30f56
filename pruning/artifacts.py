"""Content-addressed artifact store for tensors (weights, ADMM's Z and U) shared by every worker.

An artifact is a safetensors file of named tensors plus a JSON document of metadata, stored under
``<root>/<id[:2]>/<id>.safetensors`` and ``<id>.json``. The id is the SHA-256 of the tensor file's bytes and the
metadata, so writing the same content twice gives the same id and a replayed job is harmless. Files are written
to a temporary name and renamed, so a reader on another process never sees half a file. No pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ArtifactNotFound", "ArtifactStore"]


class ArtifactNotFound(KeyError):
    """No artifact with that id is in the store."""


class ArtifactStore:
    """Stores and loads named tensors by content id under ``root`` (``PRUNEHUB_ARTIFACTS_DIR``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _paths(self, artifact_id: str) -> tuple[Path, Path]:
        if not artifact_id or any(c not in "0123456789abcdef" for c in artifact_id):
            raise ArtifactNotFound(artifact_id)
        folder = self.root / artifact_id[:2]
        return folder / f"{artifact_id}.safetensors", folder / f"{artifact_id}.json"

    def put(self, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
        """Store ``tensors`` (name → torch.Tensor) with JSON-able ``meta``; return the content id."""
        from safetensors.torch import save

        payload = save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
        meta_bytes = json.dumps(meta or {}, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(payload)
        digest.update(b"\0")
        digest.update(meta_bytes)
        artifact_id = digest.hexdigest()
        data_path, meta_path = self._paths(artifact_id)
        if data_path.exists() and meta_path.exists():
            return artifact_id
        data_path.parent.mkdir(parents=True, exist_ok=True)
        # Metadata first, data last: ``exists`` readers key on the data file.
        _atomic_write(meta_path, meta_bytes)
        _atomic_write(data_path, payload)
        return artifact_id

    def get(self, artifact_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load an artifact: ``(tensors, meta)``. Raises :class:`ArtifactNotFound`."""
        from safetensors.torch import load

        data_path, meta_path = self._paths(artifact_id)
        try:
            payload = data_path.read_bytes()
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError as exc:
            raise ArtifactNotFound(artifact_id) from exc
        return load(payload), meta

    def exists(self, artifact_id: str) -> bool:
        try:
            return self._paths(artifact_id)[0].exists()
        except ArtifactNotFound:
            return False

    def files(self, artifact_id: str) -> tuple[Path, Path]:
        """Paths of the tensor file and the metadata file (for downloads)."""
        data_path, meta_path = self._paths(artifact_id)
        if not data_path.exists():
            raise ArtifactNotFound(artifact_id)
        return data_path, meta_path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
