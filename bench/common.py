"""Helpers shared by the benchmark sections: the machine description, load sampling, interleaved timing."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "interleaved", "loadavg", "machine", "spread"]


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


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
