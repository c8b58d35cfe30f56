"""Task bundles on a worker: fetch from the artifact store, verify, unpack once per hash, and start the task
process that imports the owner's code.

A bundled experiment's task process differs from an installed entrypoint's in three ways (an installed
entrypoint's process starts exactly as before, ``python -m worker.child`` with the worker's environment):

* **Code.** The bundle is unpacked once into ``<cache>/<hex>/code`` (into a temporary folder first, renamed into
  place, so a worker never imports half a bundle and two workers racing to unpack one keep one copy). That folder
  comes first on the child's ``sys.path``.
* **Imports.** The child runs ``python -I -S -B worker/child.py``: isolated mode ignores ``PYTHON*`` variables and
  puts neither the current folder nor the script's folder on ``sys.path``; ``-S`` skips ``site``, so no ``.pth``
  file runs (an editable install's ``.pth`` would map ``server``/``worker`` back to the checkout); ``-B`` writes no
  ``.pyc`` into the shared cache. The child then sets ``sys.path`` to exactly :attr:`ChildLaunch.sys_path`: the
  bundle, then (for a source checkout) a folder holding only a link to prunehub's ``pruning`` package, then the
  worker's own ``sys.path`` without the service checkout, the working folder and ``''`` (the standard library and
  site-packages, so installed torch and friends import). Why a link to ``pruning`` and not the checkout: the
  child's protocol needs the pure library, and the checkout also holds ``server/`` (settings, database code),
  ``.prunehub/`` and its key file in the embedded default. Where prunehub is installed into site-packages (the
  Docker image), ``pruning`` comes from there like torch does, and no link is made.
* **Environment.** Only :data:`PASSED_ENV` (device selection, ``PATH``, locale, the dynamic linker path that CUDA
  libraries may need, thread counts) plus ``HOME``, ``TMPDIR`` and ``PRUNEHUB_HOME`` set to a per-experiment
  scratch folder: no database or broker URL, no API key, no other ``PRUNEHUB_*`` setting. Code that caches under
  ``PRUNEHUB_HOME`` (as ``examples.digits`` does) caches in its scratch folder. The working folder is that
  scratch folder too.

This is hygiene, not a sandbox: the code runs as the worker's OS user (see the README's security model).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import site
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.services.bundle_archive import BundleLimits, UnsafeBundle, blob_path, extract_bundle
from server.settings import Settings

__all__ = ["PASSED_ENV", "BundleSource", "BundleUnavailable", "ChildLaunch"]

# The only variables of the worker's environment a bundled task process sees (plus LC_*).
PASSED_ENV = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "LD_LIBRARY_PATH",  # where a CUDA host keeps libcuda when ldconfig does not know it
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
_MANIFEST = "manifest.json"
_CHILD_SCRIPT = Path(__file__).resolve().with_name("child.py")


class BundleUnavailable(RuntimeError):
    """The bundle cannot be used on this worker: missing from the store, bytes that do not match the id, or a zip
    the checks refuse. The message says which; it fails the experiment."""


@dataclass(frozen=True)
class ChildLaunch:
    """How to start a bundled task process: the command before the child's arguments, its environment, working
    folder, the exact ``sys.path`` it sets, and the bundle's modules (the child's allow-list)."""

    command: list[str]
    env: dict[str, str]
    cwd: str
    sys_path: list[str]
    modules: list[str]
    child_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BundleSource:
    """The bundle an experiment imports its entrypoint from. Hashable: it is part of the key under which
    :func:`worker.isolation.task_process` parks a task process, so a process is reused only by the same bundle
    *and* the same experiment (module state and the scratch ``HOME`` are never shared across experiments)."""

    digest: str
    experiment_id: int
    artifacts_dir: Path
    cache_dir: Path
    scratch_root: Path
    limits: BundleLimits

    @classmethod
    def of(cls, digest: str, experiment_id: int, settings: Settings) -> BundleSource:
        return cls(
            digest=digest,
            experiment_id=experiment_id,
            artifacts_dir=Path(settings.artifacts_dir).resolve(),
            cache_dir=settings.bundle_cache.resolve(),
            scratch_root=settings.scratch_root.resolve(),
            limits=BundleLimits(max_bytes=settings.max_bundle_bytes, max_files=settings.max_bundle_files),
        )

    def unpack(self) -> tuple[Path, list[str]]:
        """The bundle's code folder and modules, unpacked now unless an earlier run did. Raises
        :class:`BundleUnavailable`."""
        hex_digest = self.digest.removeprefix("sha256:")
        target = self.cache_dir / hex_digest
        cached = _read_manifest(target)
        if cached is not None:
            return target / "code", cached
        source = blob_path(self.artifacts_dir, self.digest)
        if not source.is_file():
            raise BundleUnavailable(
                f"bundle {self.digest} is not in the artifact store at {self.artifacts_dir}: every worker must "
                f"share the API's PRUNEHUB_ARTIFACTS_DIR"
            )
        actual = _sha256_file(source)
        if actual != hex_digest:
            raise BundleUnavailable(f"bundle {self.digest}: the stored bytes hash to sha256:{actual}; refusing it")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=f".tmp-{hex_digest[:12]}-"))
        try:
            (staging / "code").mkdir()
            try:
                manifest = extract_bundle(source, staging / "code", self.limits)
            except UnsafeBundle as exc:
                raise BundleUnavailable(f"bundle {self.digest} is refused: {exc.message}") from exc
            (staging / _MANIFEST).write_text(json.dumps({"digest": self.digest, "modules": manifest.modules}))
            os.chmod(staging, 0o755)  # mkdtemp made it 0700
            try:
                os.rename(staging, target)
            except OSError:
                # Another task process unpacked the same bundle first: use its copy (identical by construction).
                if _read_manifest(target) is None:
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        cached = _read_manifest(target)
        assert cached is not None
        return target / "code", cached

    def launch(self) -> ChildLaunch:
        """Unpack (once) and describe the task process. Raises :class:`BundleUnavailable`."""
        code, modules = self.unpack()
        scratch = self.scratch_root / f"experiment-{self.experiment_id}"
        (scratch / "tmp").mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k in PASSED_ENV or k.startswith("LC_")}
        env.update(HOME=str(scratch), TMPDIR=str(scratch / "tmp"), PRUNEHUB_HOME=str(scratch))
        return ChildLaunch(
            command=[sys.executable, "-I", "-S", "-B", str(_CHILD_SCRIPT)],
            env=env,
            cwd=str(scratch),
            sys_path=[str(code), *_library_path(self.cache_dir), *_base_sys_path()],
            modules=modules,
            child_config={"bundle": self.digest, "bundle_modules": modules},
        )


def _read_manifest(target: Path) -> list[str] | None:
    try:
        data = json.loads((target / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    modules = data.get("modules")
    return modules if isinstance(modules, list) else None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _service_root() -> Path:
    """The folder holding this worker's ``worker`` package: the checkout, or site-packages when installed."""
    return Path(__file__).resolve().parent.parent


def _installed() -> bool:
    """Whether prunehub runs from site-packages (an installed package) rather than from a source checkout."""
    packages = {Path(p).resolve() for p in site.getsitepackages()}
    return _service_root() in packages


def _library_path(cache_dir: Path) -> list[str]:
    """For a source checkout: a folder holding only a link named ``pruning`` to the checkout's library (made once,
    atomically); for an installed prunehub: nothing (site-packages provides it)."""
    if _installed():
        return []
    spec = importlib.util.find_spec("pruning")  # finds the package without importing it (no torch here)
    if spec is None or spec.origin is None:
        raise BundleUnavailable("prunehub's pruning library is not importable on this worker")
    package = Path(spec.origin).resolve().parent
    folder = cache_dir / f"library-{hashlib.sha256(str(package).encode()).hexdigest()[:16]}"
    if not (folder / "pruning").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-library-"))
        try:
            os.symlink(package, staging / "pruning", target_is_directory=True)
            os.chmod(staging, 0o755)
            try:
                os.rename(staging, folder)
            except OSError:
                if not (folder / "pruning").exists():
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return [str(folder)]


def _base_sys_path() -> list[str]:
    """This worker's ``sys.path`` less what must not reach user code: ``''``, the working folder and, for a
    checkout, the checkout itself (where ``server``, ``worker`` and ``.prunehub`` live)."""
    excluded = {Path.cwd().resolve()}
    if not _installed():
        excluded.add(_service_root())
    kept: list[str] = []
    for entry in sys.path:
        # Markers that are not paths (an editable install's path-hook entry) mean nothing without their hook.
        if not entry or not os.path.exists(entry):
            continue
        resolved = Path(entry).resolve()
        if resolved in excluded or str(resolved) in kept:
            continue
        kept.append(str(resolved))
    return kept
