"""Bundle zips: the deterministic builder, and every entry the checks refuse (the same scan on upload and unpack)."""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from server.services.bundle_archive import (
    BundleLimits,
    UnsafeBundle,
    bundle_id,
    extract_bundle,
    inspect_bundle,
    make_bundle,
)
from tests.bundle_tasks import write_task_package

LIMITS = BundleLimits(max_bytes=1 << 20, max_files=50)


def _zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def _info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    info.create_system = 3
    return info


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bundle.zip"
    path.write_bytes(data)
    return path


def test_the_same_folder_gives_the_same_bytes_whatever_the_timestamps_modes_and_caches(tmp_path: Path) -> None:
    first = make_bundle(write_task_package(tmp_path / "a"))
    second_root = write_task_package(tmp_path / "b")
    os.utime(second_root / "acme_tasks" / "tiny.py", (1_000_000_000, 1_000_000_000))
    (second_root / "acme_tasks" / "tiny.py").chmod(0o755)
    (second_root / ".git").mkdir()
    (second_root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (second_root / "acme_tasks" / "__pycache__" / "data.cpython-311.pyc").write_bytes(b"other bytecode")
    second = make_bundle(second_root)
    assert bundle_id(first) == bundle_id(second)
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        names = archive.namelist()
        assert names == sorted(names)
        assert not any("__pycache__" in n or n.endswith(".pyc") or ".git" in n for n in names)
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert {info.external_attr >> 16 for info in archive.infolist()} == {0o100644}
    changed = make_bundle(write_task_package(tmp_path / "c", marker="edited"))
    assert bundle_id(changed) != bundle_id(first)


def test_a_package_folder_is_bundled_under_its_own_name(tmp_path: Path) -> None:
    root = write_task_package(tmp_path / "src")
    from_parent = make_bundle(root)
    from_package = make_bundle(root / "acme_tasks")
    assert from_package == from_parent
    manifest = inspect_bundle(_write(tmp_path, from_package), LIMITS)
    assert manifest.modules == [
        "acme_tasks", "acme_tasks.data", "acme_tasks.needs_missing", "acme_tasks.probe", "acme_tasks.tiny"
    ]


def test_symlinks_in_the_folder_are_an_error(tmp_path: Path) -> None:
    root = write_task_package(tmp_path / "src")
    (root / "acme_tasks" / "link.py").symlink_to(root / "acme_tasks" / "tiny.py")
    with pytest.raises(ValueError, match="symbolic link"):
        make_bundle(root)


def test_a_good_bundle_unpacks_with_safe_modes(tmp_path: Path) -> None:
    data = make_bundle(write_task_package(tmp_path / "src"))
    dest = tmp_path / "out"
    dest.mkdir()
    manifest = extract_bundle(_write(tmp_path, data), dest, LIMITS)
    assert (dest / "acme_tasks" / "tiny.py").read_text().startswith('\n"""A tiny classifier')
    assert stat.S_IMODE((dest / "acme_tasks" / "tiny.py").stat().st_mode) == 0o644
    assert manifest.files == 5 and manifest.unpacked_size == sum(
        p.stat().st_size for p in dest.rglob("*") if p.is_file()
    )


UNSAFE = [
    ("absolute", [("/etc/evil.py", b"x")], "'/etc/evil.py': absolute paths"),
    ("drive", [("C:/evil.py", b"x")], "'C:/evil.py': absolute paths"),
    ("dotdot", [("pkg/../../evil.py", b"x")], "'pkg/../../evil.py': '..' components"),
    ("symlink", [(_info("pkg/link.py", stat.S_IFLNK | 0o777), b"/etc/passwd")], "'pkg/link.py': symbolic links"),
    ("device", [(_info("pkg/dev", stat.S_IFCHR | 0o600), b"")], "'pkg/dev': device files"),
    ("fifo", [(_info("pkg/pipe", stat.S_IFIFO | 0o600), b"")], "'pkg/pipe': device files"),
    ("duplicate", [("pkg/a.py", b"1"), ("pkg/a.py", b"2")], "'pkg/a.py': duplicate name"),
    ("file-and-folder", [("pkg", b"1"), ("pkg/a.py", b"2")], "'pkg': both a file and a folder"),
    ("backslash", [("pkg\\..\\evil.py", b"x")], "backslashes"),
    ("shadows-pruning", [("pruning/__init__.py", b"x")], "'pruning': this top-level name"),
]


@pytest.mark.parametrize(("case", "entries", "message"), UNSAFE, ids=[case for case, _, _ in UNSAFE])
def test_unsafe_entries_are_refused_naming_them(
    tmp_path: Path, case: str, entries: list[tuple[str | zipfile.ZipInfo, bytes]], message: str
) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        path = _write(tmp_path, _zip([("ok/__init__.py", b""), *entries]))
    with pytest.raises(UnsafeBundle, match=re.escape(message)):
        inspect_bundle(path, LIMITS)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UnsafeBundle):
        extract_bundle(path, dest, LIMITS)
    assert not (tmp_path / "etc").exists() and not (tmp_path / "evil.py").exists()


def test_a_bundle_without_python_modules_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeBundle, match="no Python module"):
        inspect_bundle(_write(tmp_path, _zip([("data.txt", b"x"), ("1-not-importable/m.py", b"")])), LIMITS)


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, _zip([(f"pkg/m{i}.py", b"") for i in range(LIMITS.max_files + 1)]))
    with pytest.raises(UnsafeBundle, match=f"more than {LIMITS.max_files}.*'pkg/m{LIMITS.max_files}.py'"):
        inspect_bundle(path, LIMITS)


def test_a_declared_zip_bomb_is_refused(tmp_path: Path) -> None:
    data = _zip([("pkg/__init__.py", b""), ("pkg/zeros.bin", bytes(LIMITS.max_unpacked + 1))])
    assert len(data) < LIMITS.max_bytes  # small on the wire
    with pytest.raises(UnsafeBundle, match="'pkg/zeros.bin': the entries declare more than"):
        inspect_bundle(_write(tmp_path, data), LIMITS)


def test_an_entry_that_lies_about_its_size_is_refused_when_decompressed(tmp_path: Path) -> None:
    data = bytearray(_zip([("pkg/__init__.py", b""), ("pkg/zeros.bin", bytes(3 * LIMITS.max_bytes))]))
    # Rewrite the central directory's uncompressed size of zeros.bin to 10 bytes: the headers now pass.
    name = b"pkg/zeros.bin"
    position = data.index(name, data.index(b"PK\x01\x02"))
    header = position - 46
    assert data[header : header + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, header + 24, 10)
    with pytest.raises(UnsafeBundle, match="'pkg/zeros.bin'"):
        inspect_bundle(_write(tmp_path, bytes(data)), LIMITS)


@pytest.mark.parametrize("body", [b"", b"not a zip", b"PK\x03\x04 truncated"])
def test_anything_but_a_zip_is_refused(tmp_path: Path, body: bytes) -> None:
    with pytest.raises(UnsafeBundle, match="not a valid zip"):
        inspect_bundle(_write(tmp_path, body), LIMITS)


def test_a_corrupt_entry_is_refused_naming_it(tmp_path: Path) -> None:
    data = bytearray(_zip([("pkg/__init__.py", b""), ("pkg/big.py", b"x = 1\n" * 2000)]))
    start = data.index(b"pkg/big.py") + len(b"pkg/big.py") + 5  # inside the deflated data
    data[start : start + 8] = b"\xff" * 8
    with pytest.raises(UnsafeBundle, match="'pkg/big.py' cannot be read"):
        inspect_bundle(_write(tmp_path, bytes(data)), LIMITS)
