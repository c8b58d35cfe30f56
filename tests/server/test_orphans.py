"""No orphaned processes (issue 15, finding 7): each stop path of the real CLI processes ends every descendant
within 10 s. A job that sleeps far longer than the test (``tests.tasks.counting_evaluator``) keeps a task process
running, so a survivor would be seen. Descendants are read from ``/proc`` before the kill: afterwards an orphan's
parent is PID 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)"),
]

SPEC = {
    "name": "a job longer than the test",
    "entrypoint": "tests.tasks.counting_evaluator",
    "algorithm": "uniform",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
    "base_algo": "l1",
}


def _parents() -> dict[int, int]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command may hold spaces and parentheses: the fields after the last ")" are fixed.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                found[int(entry.name)] = int(fields[1])
    return found


def descendants(pid: int) -> set[int]:
    parents, found, frontier = _parents(), set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def alive(pids: set[int]) -> set[int]:
    return pids & set(_parents())


def _task_process_running(root: int) -> set[int]:
    """The descendants of ``root`` once one of them is a task process running the user's code."""
    pids = descendants(root)
    return pids if any("worker.child" in _cmdline(pid) for pid in pids) else set()


def _assert_all_end(pids: set[int], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(pids)
    assert not left, {pid: _cmdline(pid) for pid in left}


@pytest.fixture
def env(embedded_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**embedded_env, "PRUNEHUB_TEST_EVAL_DELAY": "600", "PRUNEHUB_TEST_COUNT_FILE": str(tmp_path / "n.txt")}


@pytest.fixture
def spawned() -> Iterator[list[set[int]]]:
    """Pid sets to SIGKILL after the test, whatever it found (so a failure leaves nothing behind either)."""
    sets: list[set[int]] = []
    yield sets
    for pids in sets:
        for pid in alive(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start(args: list[str], env: dict[str, str], home: Path) -> subprocess.Popen[bytes]:
    log = open(home / "cli.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "server.cli", *args], env=env, cwd=home, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _serve_and_submit(env: dict[str, str], home: Path, spawned: list[set[int]]) -> tuple[subprocess.Popen[bytes],
                                                                                         set[int]]:
    port = free_port()
    serve = _start(["serve", "--with-worker", "--port", str(port)], env, home)
    spawned.append({serve.pid})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            assert serve.poll() is None, (home / "cli.log").read_text()[-3000:]
            return False

    wait_until(up, "the API")
    key = (home / "api-key").read_text().strip()
    response = httpx.post(f"{url}/experiments", json=SPEC, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 201, response.text
    wait_until(lambda: _evaluating(env), "the user's evaluator to run")  # mid-job, not idle between requests
    pids = _task_process_running(serve.pid)
    spawned.append(pids)
    return serve, pids


def _evaluating(env: dict[str, str]) -> bool:
    count = Path(env["PRUNEHUB_TEST_COUNT_FILE"])
    return count.exists() and bool(count.read_text().strip())


def test_sigkill_of_serve_ends_its_worker_and_task_process(
    env: dict[str, str], tmp_path: Path, spawned: list[set[int]]
) -> None:
    serve, pids = _serve_and_submit(env, tmp_path, spawned)
    assert len(pids) >= 3, pids  # the worker, its pool process, the task process
    serve.kill()
    serve.wait()
    _assert_all_end(pids)


def test_sigkill_of_a_pool_process_ends_its_task_process(
    env: dict[str, str], tmp_path: Path, spawned: list[set[int]]
) -> None:
    serve, pids = _serve_and_submit(env, tmp_path, spawned)
    parents = _parents()
    task = next(pid for pid in pids if "worker.child" in _cmdline(pid))
    pool = parents[task]
    os.kill(pool, signal.SIGKILL)
    _assert_all_end({pool, task})
    serve.terminate()
    serve.wait(15)


def test_sigint_to_the_demo_pid_stops_everything(
    env: dict[str, str], tmp_path: Path, spawned: list[set[int]]
) -> None:
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps(SPEC))
    port = free_port()
    demo = _start(["demo", "--port", str(port), "--spec", str(spec)], env, tmp_path)
    spawned.append({demo.pid})
    wait_until(lambda: _evaluating(env), "the user's evaluator to run")
    pids = _task_process_running(demo.pid)
    spawned.append(pids)
    os.kill(demo.pid, signal.SIGINT)  # its own pid, not the process group
    demo.wait(10)
    _assert_all_end(pids, within=1.0)  # the 10 s are spent already
