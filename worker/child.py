"""The child process that runs the user's code (see :mod:`worker.isolation`).

``python -m worker.child REQUEST_FD ANSWER_FD CONFIG_JSON``: loads the task once, then answers one JSON request per
line until ``{"op": "exit"}`` or the end of its input. Requests:

* ``resolve`` {config}: the experiment's :class:`~pruning.search.base.SearchProblem` (builds the model, traces it).
* ``job`` {problem, job}: runs :func:`pruning.jobs.execute_job` and returns the :class:`Result`.

Answers: ``{"ok": true, ...}`` or ``{"ok": false, "error", "traceback", "fatal"}``; ``fatal`` marks errors of the
task module itself (a missing function), which fail the whole experiment instead of one trial.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any


def die_with_parent(parent_pid: int, *, deathsig: bool = True, interval_s: float = 0.5) -> None:
    """End this process when ``parent_pid``, its parent, dies, even by SIGKILL: a process that outlives its parent
    is reparented to PID 1 and keeps running (a second worker after a restart, user code holding a GPU).

    On Linux, ``PR_SET_PDEATHSIG`` makes the kernel send SIGKILL when the parent *thread* that forked us exits;
    callers whose parent may fork from a short-lived thread pass ``deathsig=False``. Either way a daemon thread
    watches ``getppid()`` (for other systems, and for that thread case), and a parent that died before this call
    (``getppid()`` is no longer ``parent_pid``) ends us at once. Stdlib only: a bundled task process imports no
    prunehub package but this script."""
    if deathsig and sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still ends us
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        import time

        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)

    import threading

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _limit_memory(megabytes: int | None) -> None:
    if megabytes:
        import resource

        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _resolve(task: Any, config_data: dict[str, Any], device: str) -> dict[str, Any]:
    from pruning.jobs import resolve_problem
    from pruning.search.configs import parse_algorithm_config

    problem = resolve_problem(task, parse_algorithm_config(config_data), device=device)
    return {"problem": problem.model_dump(mode="json")}


def _job(task: Any, store: Any, device: str, request: dict[str, Any]) -> dict[str, Any]:
    from pruning.jobs import execute_job
    from pruning.search.base import Job, SearchProblem

    problem = SearchProblem.model_validate(request["problem"])
    job = Job.model_validate(request["job"])
    result = execute_job(task, problem, job, store, device=device)
    return {"result": result.model_dump(mode="json")}


def missing_module_hint(exc: BaseException, bundle_modules: list[str]) -> str | None:
    """For a :class:`ModuleNotFoundError` anywhere in ``exc``'s chain naming a module that is not the bundle's,
    the explanation to append to the error; else ``None``. It lives here, not in :mod:`worker.bundles`: a bundled
    task process cannot import the ``worker`` package."""
    seen: set[int] = set()
    current: BaseException | None = exc
    tops = {m.split(".")[0] for m in bundle_modules}
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and current.name:
            if current.name.split(".")[0] not in tops:
                return (
                    f"The task imports {current.name!r}, which is not installed on the worker; bundles cannot "
                    f"install packages (vendor it into the bundle, or ask an operator to install it on the workers)"
                )
            return None
        current = current.__cause__ or current.__context__
    return None


def _hinted(message: str, exc: BaseException, config: dict[str, Any]) -> str:
    """A bundled task's error, with the explanation of a missing third-party module appended."""
    if config.get("bundle") is None:
        return message
    hint = missing_module_hint(exc, config.get("bundle_modules") or [])
    return f"{message}. {hint}" if hint else message


def main(argv: list[str]) -> int:
    request_fd, answer_fd, config_json = int(argv[1]), int(argv[2]), argv[3]
    config = json.loads(config_json)
    if config.get("parent_pid") is not None:
        die_with_parent(int(config["parent_pid"]))  # a killed supervisor never leaves the user's code running
    if config.get("sys_path") is not None:
        # A bundled task (worker.bundles): started as a script in isolated mode without site, so this list is the
        # whole import path: the bundle first, prunehub's pruning library, the standard library, site-packages.
        sys.path[:] = config["sys_path"]
    _limit_memory(config.get("memory_limit_mb"))
    requests = os.fdopen(request_fd, "rb")
    answers = os.fdopen(answer_fd, "wb", buffering=0)

    def answer(data: dict[str, Any]) -> None:
        answers.write(json.dumps(data).encode() + b"\n")

    # Imported now, before the first request is read: a pre-warmed process (worker.isolation.prewarm) has them
    # ready when a run's first job arrives, instead of that job paying for the torch import.
    import torch  # noqa: F401

    import pruning.jobs  # noqa: F401
    import pruning.search.configs  # noqa: F401
    from pruning.artifacts import ArtifactStore
    from pruning.task import TaskError, load_task

    task: Any = None
    store = ArtifactStore(config["artifacts_dir"])
    for line in requests:
        request = json.loads(line)
        op = request.get("op")
        if op == "exit":
            break
        try:
            if task is None:
                # The allow-list is enforced here again: the API is not the only way a row reaches a worker.
                # A blank (pre-warmed) process gets its entrypoint and allow-list with each request.
                entrypoint = config.get("entrypoint") or request.get("entrypoint")
                allowed = config["allowed_prefixes"] if config.get("entrypoint") else request.get("allowed_prefixes")
                task = load_task(entrypoint, allowed or [])
            if op == "resolve":
                answer({"ok": True, **_resolve(task, request["config"], config.get("device", "cpu"))})
            elif op == "job":
                answer({"ok": True, **_job(task, store, config.get("device", "cpu"), request)})
            else:
                answer({"ok": False, "error": f"unknown request {op!r}", "fatal": True})
        except TaskError as exc:
            answer(
                {"ok": False, "error": _hinted(str(exc), exc, config), "traceback": traceback.format_exc(),
                 "fatal": True}
            )
        except Exception as exc:  # noqa: BLE001 - the user's code may raise anything; report it
            answer(
                {
                    "ok": False,
                    "error": _hinted(f"{type(exc).__name__}: {exc}", exc, config),
                    "traceback": traceback.format_exc(),
                    "fatal": op == "resolve",
                }
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
