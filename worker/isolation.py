"""Run the user's code in a supervised child process.

The Celery task (the supervisor) never runs the user's model, trainer or evaluator itself: a fresh interpreter
(``python -m worker.child``, started with ``subprocess`` — not ``fork``, so no CUDA state or database connection
is inherited, and not ``multiprocessing``, whose children a Celery pool process may not have) loads the task once
and executes jobs sent to it over a private pipe, one JSON document per line. The user's prints go to the worker's
log, never into the protocol.

The supervisor waits for each answer in short slices, and between slices checks whether the experiment was
cancelled or ran out of time; either way it kills the child, which frees its memory (and its GPU memory). A child
that segfaults, is killed for memory, or calls ``sys.exit`` is noticed by its exit status, reported as the job's
failure reason, and replaced by a fresh child for the next job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.bundles import BundleSource

__all__ = [
    "ChildDied",
    "ChildError",
    "JobCancelled",
    "JobProcess",
    "JobTimedOut",
    "describe_exit",
    "prewarm",
    "task_process",
]


class ChildDied(RuntimeError):
    """The child process ended while working; the message says how (signal or exit status)."""


class ChildError(RuntimeError):
    """The user's code raised in the child. ``fatal`` errors (a bad task module) concern the whole experiment."""

    def __init__(self, message: str, traceback: str | None, fatal: bool) -> None:
        super().__init__(message)
        self.traceback = traceback
        self.fatal = fatal


class JobCancelled(RuntimeError):
    """``should_stop`` asked to stop; the child was killed."""


class JobTimedOut(RuntimeError):
    """The job ran past its deadline; the child was killed."""


_SIGNALS = {
    signal.SIGSEGV: "crashed with a segmentation fault (SIGSEGV)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGKILL: "was killed (SIGKILL; often the out-of-memory killer)",
    signal.SIGBUS: "crashed with a bus error (SIGBUS)",
    signal.SIGFPE: "crashed with a floating-point exception (SIGFPE)",
    signal.SIGILL: "crashed with an illegal instruction (SIGILL)",
    signal.SIGTERM: "was terminated (SIGTERM)",
}


def describe_exit(returncode: int) -> str:
    """A readable reason for a child's exit status."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"the task process was killed by signal {-returncode}"
        return f"the task process {_SIGNALS.get(sig, f'was killed by {sig.name}')}"
    return f"the task process exited with status {returncode} (sys.exit or os._exit in user code)"


def _job_key(op: str, payload: dict[str, Any]) -> str | None:
    """What tells one job's request from another's: its key (``None`` for a request that is not a job)."""
    job = payload.get("job")
    return str(job.get("key")) if op == "job" and isinstance(job, dict) else None


class JobProcess:
    """A supervised child that loads the task ``entrypoint`` and answers requests.

    ``request(op, payload, should_stop, deadline)`` returns the child's answer or raises one of
    :class:`ChildError`, :class:`ChildDied`, :class:`JobCancelled`, :class:`JobTimedOut`. After a death, a
    cancel or a timeout the next request starts a new child.

    With ``bundle`` the child imports the entrypoint from that uploaded bundle instead of installed code, with a
    minimal environment and a ``sys.path`` without the service (:mod:`worker.bundles`); a bundle that cannot be
    used makes the request raise a fatal :class:`ChildError`.

    With ``entrypoint=None`` the child is started *blank* (a pre-warmed spare, :func:`prewarm`): it imports torch
    and the pruning library at once and learns its entrypoint from :meth:`bind` with the first request.
    """

    def __init__(
        self,
        entrypoint: str | None,
        allowed_prefixes: list[str],
        *,
        artifacts_dir: str,
        device: str = "cpu",
        memory_limit_mb: int | None = None,
        poll_interval: float = 0.25,
        bundle: BundleSource | None = None,
    ) -> None:
        self.bundle = bundle
        self.entrypoint = entrypoint
        self.allowed_prefixes = allowed_prefixes
        self.artifacts_dir = artifacts_dir
        self.device = device
        self.memory_limit_mb = memory_limit_mb
        self.poll_interval = poll_interval
        self._process: subprocess.Popen[bytes] | None = None
        self._to_child: Any = None
        self._from_child: Any = None
        self._buffer = b""
        self._started_blank = False
        self._ahead: str | None = None  # the key of the job sent ahead of its request (send_ahead)

    def bind(self, entrypoint: str, allowed_prefixes: list[str]) -> None:
        """Give a blank child its entrypoint; every request to the running child carries it from now on (the
        child loads the task on the first), and a replacement after a death is started with it."""
        self.entrypoint, self.allowed_prefixes = entrypoint, allowed_prefixes

    def start(self) -> None:
        """Start the child now if none is running, without waiting for it: it imports torch while we go on."""
        if self._process is None or self._process.poll() is not None:
            self._cleanup()
            self._start()

    def __enter__(self) -> JobProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def _start(self) -> None:
        config: dict[str, Any] = {
            "entrypoint": self.entrypoint,
            "allowed_prefixes": self.allowed_prefixes,
            "artifacts_dir": self.artifacts_dir,
            "device": self.device,
            "memory_limit_mb": self.memory_limit_mb,
            "parent_pid": os.getpid(),
        }
        self._started_blank = self.entrypoint is None
        command = [sys.executable, "-m", "worker.child"]
        env: dict[str, str] | None = None
        cwd: str | None = None
        if self.bundle is not None:
            from worker.bundles import BundleUnavailable

            try:
                launch = self.bundle.launch()
            except BundleUnavailable as exc:
                raise ChildError(str(exc), None, fatal=True) from exc
            command, env, cwd = launch.command, launch.env, launch.cwd
            # The child checks the entrypoint against the bundle it was given, as it checks the allow-list.
            config |= {"allowed_prefixes": launch.modules, "sys_path": launch.sys_path, **launch.child_config}
        request_read, request_write = os.pipe()
        answer_read, answer_write = os.pipe()
        self._process = subprocess.Popen(
            [*command, str(request_read), str(answer_write), json.dumps(config)],
            pass_fds=(request_read, answer_write),
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,  # a signal to the worker's process group does not hit the user's code twice
        )
        os.close(request_read)
        os.close(answer_write)
        self._to_child = os.fdopen(request_write, "wb", buffering=0)
        self._from_child = answer_read
        os.set_blocking(answer_read, False)
        self._buffer = b""

    def kill(self) -> None:
        """Kill the child now (and its process group), freeing its memory."""
        process = self._process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        self._cleanup()

    def close(self) -> None:
        """Ask the child to exit; kill it if it does not within a few seconds."""
        process = self._process
        if process is not None and process.poll() is None:
            try:
                self._to_child.write(b'{"op": "exit"}\n')
                process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _cleanup(self) -> None:
        if self._to_child is not None:
            try:
                self._to_child.close()
            except OSError:
                pass
        if self._from_child is not None:
            try:
                os.close(self._from_child)
            except OSError:
                pass
        self._process, self._to_child, self._from_child, self._buffer = None, None, None, b""
        self._ahead = None

    def request(
        self,
        op: str,
        payload: dict[str, Any],
        *,
        should_stop: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Send one request and wait for its answer, checking ``should_stop`` and ``deadline`` (monotonic). A job
        :meth:`send_ahead` sent already is not sent again: this waits for its answer."""
        key = _job_key(op, payload)
        if self._ahead is not None and (key != self._ahead or self.pid is None):
            self.kill()  # its answer would be read as this request's: a job sent ahead for nothing
        if self._ahead is None:
            self.start()
            self._write(op, payload)
        self._ahead = None
        assert self._process is not None
        last_check = 0.0
        while True:
            line = self._read_line(self.poll_interval)
            if line is not None:
                answer = json.loads(line)
                if answer.get("ok"):
                    return answer  # type: ignore[no-any-return]
                error = answer.get("error", "unknown error")
                raise ChildError(error, answer.get("traceback"), bool(answer.get("fatal", False)))
            returncode = self._process.poll()
            if returncode is not None:
                line = self._read_line(0)  # an answer written just before exiting still counts
                self._cleanup()
                if line is not None:
                    answer = json.loads(line)
                    if answer.get("ok"):
                        return answer  # type: ignore[no-any-return]
                raise ChildDied(describe_exit(returncode))
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.kill()
                raise JobTimedOut("the job ran past its time limit and was killed")
            if should_stop is not None and now - last_check >= 1.0:
                last_check = now
                if should_stop():
                    self.kill()
                    raise JobCancelled("cancelled while running; the task process was killed")

    def send_ahead(self, payload: dict[str, Any]) -> None:
        """Send a job's request (``payload`` of a ``"job"`` request) now and return at once: the child runs it while
        the caller still works (commits the transaction that claimed it); the :meth:`request` with the same job then
        only waits for the answer. A job that will not be requested after all is dropped (:func:`drop_ahead`): its
        answer is still to come. Sent again (a transaction that is retried), it is sent once."""
        key = _job_key("job", payload)
        if key == self._ahead:
            return
        if self._ahead is not None:
            self.kill()
        self.start()
        self._write("job", payload)
        self._ahead = key

    @property
    def has_ahead(self) -> bool:
        """Whether a job sent ahead (:meth:`send_ahead`) has not been requested yet."""
        return self._ahead is not None

    def _write(self, op: str, payload: dict[str, Any]) -> None:
        if self._started_blank:
            # Checked by the child against this allow-list, exactly as a configured entrypoint is.
            payload = {**payload, "entrypoint": self.entrypoint, "allowed_prefixes": self.allowed_prefixes}
        try:
            self._to_child.write(json.dumps({"op": op, **payload}).encode() + b"\n")
        except BrokenPipeError:
            pass  # it died already: reported by the request with its exit status

    def _read_line(self, timeout: float) -> bytes | None:
        import select

        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._from_child], [], [], timeout)
            if not ready:
                return None
            try:
                chunk = os.read(self._from_child, 1 << 20)
            except BlockingIOError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
            timeout = max(timeout, 0.05)  # the rest of a long line follows right away
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


# One task process per worker process, created in that process (never at import time). ``_idle`` is the one kept
# between experiments of the same entrypoint and settings, so a queue of small experiments does not pay an
# interpreter start and a torch import each. ``_spare`` is a blank pre-warmed one (:func:`prewarm`), started when
# the worker process starts and again whenever a task process is closed or killed, so the next run's first job
# finds torch imported. There is never both an idle and a spare one: a worker holds one task process's memory.
_idle: tuple[tuple[Any, ...], JobProcess] | None = None
_spare: tuple[tuple[Any, ...], JobProcess] | None = None
_warm_settings: tuple[str, str, int | None] | None = None


def prewarm(*, artifacts_dir: str, device: str = "cpu", memory_limit_mb: int | None = None) -> None:
    """Keep a blank task process ready in this worker process from now on: start one now (it imports torch and
    the pruning library before any job arrives) and replace it whenever a task process is closed, killed or
    crashes. Called once per worker process, after it started (a Celery pool process's init, not the prefork
    parent, which must never hold a task process or touch CUDA). It does not wait for the import."""
    global _warm_settings
    _warm_settings = (artifacts_dir, device, memory_limit_mb)
    _refill()


def _refill() -> None:
    """Start the blank spare when pre-warming is on and this process holds no task process."""
    global _spare
    if _warm_settings is None or _idle is not None or _spare is not None:
        return
    artifacts_dir, device, memory_limit_mb = _warm_settings
    spare = JobProcess(None, [], artifacts_dir=artifacts_dir, device=device, memory_limit_mb=memory_limit_mb)
    try:
        spare.start()
    except OSError:
        return  # no process could be started now: the next job starts its own, as without pre-warming
    _spare = (_warm_settings, spare)


def _process_key(
    entrypoint: str, allowed_prefixes: list[str], artifacts_dir: str, device: str, memory_limit_mb: int | None,
    bundle: BundleSource | None,
) -> tuple[Any, ...]:
    return entrypoint, tuple(allowed_prefixes), artifacts_dir, device, memory_limit_mb, bundle


def send_ahead(
    entrypoint: str,
    allowed_prefixes: list[str],
    payload: dict[str, Any],
    *,
    artifacts_dir: str,
    device: str = "cpu",
    memory_limit_mb: int | None = None,
    bundle: BundleSource | None = None,
) -> bool:
    """Send a job (``payload`` of a ``"job"`` request) to the parked task process that :func:`task_process` will hand
    out for these settings, so that it runs while the caller finishes its transaction (:meth:`JobProcess.send_ahead`);
    ``False`` when none is parked for them (the job is sent with its request, as always)."""
    key = _process_key(entrypoint, allowed_prefixes, artifacts_dir, device, memory_limit_mb, bundle)
    if _idle is None or _idle[0] != key or _idle[1].pid is None:
        return False
    _idle[1].send_ahead(payload)
    return True


def drop_ahead() -> None:
    """Drop the job :func:`send_ahead` sent, when it will not be requested (its transaction failed): the parked
    process running it is killed (its answer would be taken for the next request's) and the spare refilled."""
    global _idle
    if _idle is not None and _idle[1].has_ahead:
        _idle[1].kill()
        _idle = None
        _refill()


@contextmanager
def task_process(
    entrypoint: str,
    allowed_prefixes: list[str],
    *,
    artifacts_dir: str,
    device: str = "cpu",
    memory_limit_mb: int | None = None,
    reuse: bool = True,
    bundle: BundleSource | None = None,
) -> Iterator[JobProcess]:
    """A task process for ``entrypoint``: the parked one when it matches, else the pre-warmed spare when the
    settings match (not for a bundle, whose process starts from the bundle), else a new one. On a normal exit it
    is parked for the next caller (``reuse``); after an error it is closed (a cancel, timeout or crash killed it
    already, and a process that saw an unexpected error is not trusted again) and a new spare is started. The
    bundle is part of the match: a process that imported one bundle's code (for one experiment) never runs
    another's."""
    global _idle, _spare
    key = _process_key(entrypoint, allowed_prefixes, artifacts_dir, device, memory_limit_mb, bundle)
    child: JobProcess | None = None
    if _idle is not None:
        idle_key, idle_child = _idle
        _idle = None
        if idle_key == key and idle_child.pid is not None:
            child = idle_child
        else:
            idle_child.close()
    if child is None and _spare is not None:
        spare_settings, spare = _spare
        _spare = None
        if bundle is None and spare_settings == (artifacts_dir, device, memory_limit_mb) and spare.pid is not None:
            spare.bind(entrypoint, allowed_prefixes)
            child = spare
        else:
            spare.close()
    if child is None:
        child = JobProcess(
            entrypoint,
            allowed_prefixes,
            artifacts_dir=artifacts_dir,
            device=device,
            memory_limit_mb=memory_limit_mb,
            bundle=bundle,
        )
    try:
        yield child
    except BaseException:
        child.close()
        _refill()
        raise
    if reuse and child.pid is not None:
        _idle = (key, child)
    else:
        child.close()
        _refill()
