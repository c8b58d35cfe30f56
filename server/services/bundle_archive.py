"""Task bundles as zip archives: building one deterministically, checking one safely, unpacking one.

A bundle is a zip of the user's task package(s), addressed by the SHA-256 of its bytes (``sha256:<hex>``). Three
processes use this module, and none of them imports or runs anything from a bundle:

* the CLI and :class:`server.client.PrunehubClient` build one from a folder (:func:`make_bundle`);
* the API checks an upload and lists its modules (:func:`inspect_bundle`);
* a worker unpacks a verified one into its cache (:func:`extract_bundle`).

Checking and unpacking are one scan (:func:`_scan`), so the API refuses exactly what a worker would refuse:
absolute paths, ``..`` components, links and device files, duplicate names, too many entries, a declared or an
actual uncompressed total over the limit (zip bombs), encrypted entries, and anything that is not a readable zip.
Every refusal is an :class:`UnsafeBundle` naming the entry. Standard library only (the client imports it).
"""

from __future__ import annotations

import hashlib
import io
import keyword
import os
import re
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from server.services.errors import InvalidInput

__all__ = [
    "BUNDLE_ID_PATTERN",
    "BundleLimits",
    "BundleManifest",
    "UnsafeBundle",
    "blob_path",
    "bundle_id",
    "extract_bundle",
    "inspect_bundle",
    "make_bundle",
    "store_blob",
]

BUNDLE_ID_PATTERN = r"^sha256:[0-9a-f]{64}$"
_BUNDLE_ID = re.compile(BUNDLE_ID_PATTERN)
# Fixed for every entry the CLI writes, so the same files give the same bytes (zip's epoch is 1980).
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o100644  # a regular file, rw-r--r--
_SKIP_DIRS = frozenset({"__pycache__", ".git"})
# Top-level names a bundle may not define: the task process imports prunehub's own library under this name.
_RESERVED_TOP_LEVEL = frozenset({"pruning"})
_CHUNK = 1 << 20


class UnsafeBundle(InvalidInput):
    """The upload is not a zip, or an entry of it is refused; the message names the entry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="body")


@dataclass(frozen=True)
class BundleLimits:
    """``max_bytes``: the zip itself (``PRUNEHUB_MAX_BUNDLE_MB``); ``max_files``: entries
    (``PRUNEHUB_MAX_BUNDLE_FILES``). The uncompressed total may be at most four times ``max_bytes``."""

    max_bytes: int
    max_files: int

    @property
    def max_unpacked(self) -> int:
        return 4 * self.max_bytes


@dataclass(frozen=True)
class BundleManifest:
    """What a checked bundle holds: its importable modules (dotted names, sorted), file count, unpacked bytes."""

    modules: list[str]
    files: int
    unpacked_size: int


def bundle_id(data_or_digest: bytes | hashlib._Hash) -> str:
    """``sha256:<hex>`` of bytes (or of a running hash of them)."""
    digest = hashlib.sha256(data_or_digest) if isinstance(data_or_digest, bytes) else data_or_digest
    return f"sha256:{digest.hexdigest()}"


def blob_path(artifacts_dir: str | os.PathLike[str], bundle: str) -> Path:
    """Where the artifact store keeps a bundle's zip: ``<artifacts>/bundles/<hex[:2]>/<hex>.zip``."""
    if not _BUNDLE_ID.match(bundle):
        raise ValueError(f"not a bundle id: {bundle!r}")
    hex_digest = bundle.removeprefix("sha256:")
    return Path(artifacts_dir) / "bundles" / hex_digest[:2] / f"{hex_digest}.zip"


def store_blob(artifacts_dir: str | os.PathLike[str], bundle: str, source: Path) -> Path:
    """Move the uploaded file ``source`` into the store under ``bundle`` (atomically: a rename within the store's
    folder, so a worker never reads half a zip). Storing the same id twice keeps the first copy."""
    target = blob_path(artifacts_dir, bundle)
    if target.exists():
        source.unlink(missing_ok=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    source.unlink(missing_ok=True)
    return target


def _entry_parts(info: zipfile.ZipInfo) -> tuple[list[str], bool]:
    """The entry's path components and whether it is a folder; :class:`UnsafeBundle` for a refused entry."""
    name = info.filename
    shown = repr(name)
    if not name or "\\" in name or "\0" in name:
        raise UnsafeBundle(f"bundle entry {shown}: empty names, backslashes and NUL are refused")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeBundle(f"bundle entry {shown}: absolute paths are refused")
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise UnsafeBundle(f"bundle entry {shown}: symbolic links are refused")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeBundle(f"bundle entry {shown}: device files, pipes and sockets are refused")
    if info.flag_bits & 0x1:
        raise UnsafeBundle(f"bundle entry {shown}: encrypted entries are refused")
    is_dir = name.endswith("/") or kind == stat.S_IFDIR
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        raise UnsafeBundle(f"bundle entry {shown}: '..' components are refused")
    if any(part in ("", ".") for part in parts):
        raise UnsafeBundle(f"bundle entry {shown}: empty or '.' path components are refused")
    if is_dir and info.file_size:
        raise UnsafeBundle(f"bundle entry {shown}: a folder entry with content")
    return parts, is_dir


def _module_name(parts: list[str]) -> str | None:
    """The dotted module a ``.py`` entry defines, or ``None`` when it is not importable under its path."""
    if not parts[-1].endswith(".py"):
        return None
    names = parts[:-1] if parts[-1] == "__init__.py" else [*parts[:-1], parts[-1].removesuffix(".py")]
    if not names or not all(n.isidentifier() and not keyword.iskeyword(n) for n in names):
        return None
    return ".".join(names)


def _scan(archive: zipfile.ZipFile, limits: BundleLimits, dest: Path | None) -> BundleManifest:
    """Check every entry, decompress every file (counting the bytes actually produced, whatever the headers
    declare) and, with ``dest``, write them under it. The one implementation of the rules above."""
    infos = archive.infolist()
    if len(infos) > limits.max_files:
        raise UnsafeBundle(
            f"the bundle has {len(infos)} entries, more than {limits.max_files} (PRUNEHUB_MAX_BUNDLE_FILES); "
            f"the first entry over the limit is {infos[limits.max_files].filename!r}"
        )
    seen: set[str] = set()
    files: dict[str, tuple[zipfile.ZipInfo, list[str]]] = {}
    folders: set[str] = set()
    declared = 0
    for info in infos:
        parts, is_dir = _entry_parts(info)
        key = "/".join(parts)
        if key in seen:
            raise UnsafeBundle(f"bundle entry {info.filename!r}: duplicate name")
        seen.add(key)
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if is_dir:
            folders.add(key)
            continue
        declared += info.file_size
        if declared > limits.max_unpacked:
            raise UnsafeBundle(
                f"bundle entry {info.filename!r}: the entries declare more than {limits.max_unpacked} bytes "
                f"uncompressed (4 x PRUNEHUB_MAX_BUNDLE_MB)"
            )
        files[key] = (info, parts)
    clash = sorted(set(files) & folders)
    if clash:
        raise UnsafeBundle(f"bundle entry {clash[0]!r}: both a file and a folder")
    modules = sorted({m for _, parts in files.values() if (m := _module_name(parts)) is not None})
    if not modules:
        raise UnsafeBundle("the bundle holds no Python module (.py file); zip the folder that contains your package")
    reserved = sorted({m.split(".")[0] for m in modules} & _RESERVED_TOP_LEVEL)
    if reserved:
        raise UnsafeBundle(
            f"bundle entry {reserved[0]!r}: this top-level name is prunehub's own library in the task process"
        )
    if dest is not None:
        for folder in sorted(folders):
            dest.joinpath(*folder.split("/")).mkdir(mode=0o755, exist_ok=True)
    total = 0
    for key, (info, parts) in files.items():
        target = dest.joinpath(*parts) if dest is not None else None
        if dest is not None and target is not None and not target.resolve().is_relative_to(dest.resolve()):
            raise UnsafeBundle(f"bundle entry {key!r}: escapes the bundle folder")  # belt and braces
        produced = 0
        out = None
        try:
            if target is not None:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                out = os.fdopen(os.open(target, flags, 0o644), "wb")
            with archive.open(info) as source:
                while chunk := source.read(_CHUNK):
                    produced += len(chunk)
                    total += len(chunk)
                    if produced > info.file_size or total > limits.max_unpacked:
                        raise UnsafeBundle(
                            f"bundle entry {key!r}: decompresses to more than it declares or than the "
                            f"{limits.max_unpacked}-byte limit (a zip bomb)"
                        )
                    if out is not None:
                        out.write(chunk)
        except UnsafeBundle:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
            raise UnsafeBundle(f"bundle entry {key!r} cannot be read: {exc}") from exc
        finally:
            if out is not None:
                out.close()
    return BundleManifest(modules=modules, files=len(files), unpacked_size=total)


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        raise UnsafeBundle(f"the body is not a valid zip archive ({exc})") from exc


def inspect_bundle(path: Path, limits: BundleLimits) -> BundleManifest:
    """Check the zip at ``path`` without writing anything (the API, on upload). Raises :class:`UnsafeBundle`."""
    with _open(path) as archive:
        return _scan(archive, limits, None)


def extract_bundle(path: Path, dest: Path, limits: BundleLimits) -> BundleManifest:
    """Check the zip at ``path`` and unpack it into the existing empty folder ``dest`` (files 0644, folders 0755,
    whatever modes the archive claims). Raises :class:`UnsafeBundle`; ``dest`` is then partly written and the
    caller discards it."""
    with _open(path) as archive:
        return _scan(archive, limits, dest)


def make_bundle(directory: str | os.PathLike[str]) -> bytes:
    """Zip ``directory`` deterministically: the same files give the same bytes, hence the same bundle id.

    ``directory`` is either a folder that *contains* the task package(s) (it is what goes first on the task
    process's ``sys.path``), or a package itself (it has ``__init__.py``; it is then bundled under its own name).
    Names are sorted, timestamps and permissions fixed; ``__pycache__``, ``.git`` and ``*.pyc`` are skipped. A
    symbolic link is an error (a bundle holds plain files only). Compression is deflate at level 6: the bytes are
    the same wherever the same zlib runs.

    Example::

        data = make_bundle("src")          # src/acme_tasks/__init__.py, src/acme_tasks/resnet.py
        assert data == make_bundle("src")  # and bundle_id(data) is the id the API answers
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    prefix = root.resolve().name + "/" if (root / "__init__.py").is_file() else ""
    entries: list[tuple[str, Path]] = []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        for sub in subfolders:
            if (here / sub).is_symlink():
                raise ValueError(f"{here / sub} is a symbolic link; a bundle holds plain files only")
        subfolders[:] = sorted(s for s in subfolders if s not in _SKIP_DIRS)
        for name in names:
            path = here / name
            if name.endswith(".pyc"):
                continue
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link; a bundle holds plain files only")
            if not path.is_file():
                raise ValueError(f"{path} is not a regular file")
            entries.append((prefix + path.relative_to(root).as_posix(), path))
    if not entries:
        raise ValueError(f"{root} holds no files")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for arcname, path in sorted(entries):
            info = zipfile.ZipInfo(arcname, date_time=_FIXED_TIME)
            info.external_attr = _FILE_MODE << 16
            info.create_system = 3  # unix, so the mode bits mean what they say
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes(), compresslevel=6)
    return buffer.getvalue()
