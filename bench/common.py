"""Helpers shared by the benchmark sections: the machine description, load sampling, interleaved timing, the
servers and workers a section starts (:class:`Processes`), and the command line of a section."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("PRUNEHUB_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

__all__ = [
    "search_in_process",
    "PG_ADMIN_URL",
    "ROOT",
    "Processes",
    "free_port",
    "interleaved",
    "loadavg",
    "machine",
    "main",
    "service_env",
    "spread",
]


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages (other engineers share this machine)."""
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    try:
        import torch

        torch_version, threads = torch.__version__, torch.get_num_threads()
    except ImportError:
        torch_version, threads = None, None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_threads": threads,
        "platform": platform.platform(),
        "commit": commit,
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation (0 for one value), min and max."""
    if not values:
        return {}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def interleaved(fns: list[Callable[[], float]], rounds: int) -> list[list[float]]:
    """Call every fn once per round, in rotating order, so drifting load from other processes hits all alike.

    Returns each fn's measurements (whatever it returns, e.g. a median latency) per round.
    """
    out: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = list(range(len(fns)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            out[i].append(fns[i]())
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(home: Path, **overrides: str) -> dict[str, str]:
    """The environment for a ``prunehub`` server or worker this benchmark starts: none of the caller's
    ``PRUNEHUB_*`` settings, the embedded defaults (SQLite + filesystem broker) under ``home``, then ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNEHUB_")}
    env.update(
        {
            "PRUNEHUB_HOME": str(home),
            "PRUNEHUB_DATABASE_URL": f"sqlite:///{home}/prunehub.db",
            "PRUNEHUB_BROKER_URL": "filesystem://",
            "PRUNEHUB_ARTIFACTS_DIR": str(home / "artifacts"),
            "PRUNEHUB_ALLOWED_ENTRYPOINTS": "examples.,bench.",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


class Processes:
    """Processes a benchmark started (each in its own session, logging into ``home``), stopped by their own ids."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.home / log, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            args, env=env, cwd=self.home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def cli(self, env: dict[str, str], log: str, *args: str) -> subprocess.Popen[bytes]:
        """``prunehub ARGS`` (``python -m server.cli``), e.g. ``serve --port N`` or ``worker``."""
        return self.spawn([sys.executable, "-m", "server.cli", *args], env, log)

    def serve(self, env: dict[str, str], port: int, ready: str = "/healthz", log: str = "api.log") -> str:
        """Start ``prunehub serve`` on ``port`` and wait until ``ready`` answers 200; returns the base URL."""
        url = f"http://127.0.0.1:{port}"
        self.wait_http(url + ready, self.cli(env, log, "serve", "--port", str(port)), log)
        return url

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by every live process of the sessions this object started: the
        processes themselves and all they spawned (Celery pools, task processes), read from ``/proc``."""
        sessions = {proc.pid for proc in self.procs}
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[3]) in sessions:  # fields after "(comm)": state ppid pgrp session ... utime stime
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def wait_idle(self, timeout: float = 90, window: float = 1.0, busy: float = 0.1) -> float:
        """Wait until these processes use less than ``busy`` of a core over two windows in a row (workers have
        started, and their task processes imported torch); return the seconds waited (``timeout`` at most)."""
        started = time.monotonic()
        quiet = 0
        last = self.cpu_seconds()
        while time.monotonic() - started < timeout and quiet < 2:
            time.sleep(window)
            now = self.cpu_seconds()
            quiet = quiet + 1 if now - last < busy * window else 0
            last = now
        return time.monotonic() - started

    def wait_http(self, url: str, proc: subprocess.Popen[bytes], log: str, timeout: float = 90) -> None:
        """Wait until ``url`` answers 200; fail with the log's tail if ``proc`` exits first."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url} exited: {(self.home / log).read_text()[-2000:]}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{url} did not answer in {timeout} s")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def main(run: Callable[[bool], dict[str, Any]], doc: str | None) -> None:
    """A section's command line: ``--quick`` and ``--json FILE`` (the raw figures); ``run`` prints as it goes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


def search_in_process(config: Any, task: Any, problem: Any, store: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A search run the way the in-process runner does it, without the service: ask, execute each job with the
    worker's own executor, tell, until the strategy asks for nothing. Returns the final state and the results and
    jobs by key."""
    from pruning.jobs import execute_job
    from pruning.search import make_strategy

    strategy = make_strategy(config)
    state = strategy.start(problem)
    results: dict[str, Any] = {}
    jobs: dict[str, Any] = {}
    while True:
        state, batch = strategy.ask(state)
        if not batch:
            break
        out = [execute_job(task, problem, job, store) for job in batch]
        results.update({r.key: r for r in out})
        jobs.update({j.key: j for j in batch})
        state = strategy.tell(state, out)
    return state, results, jobs
