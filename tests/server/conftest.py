"""Shared by the tests that watch a run live (event stream, CLI watcher, dashboard): a slowed-down annealing spec,
a live API + worker whose evaluator sleeps ``eval_delay`` seconds per trial, and the CLI as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, LiveService, _run_live

# Simulated annealing on the digits task with tests.tasks.slow_evaluator: slow enough to be observed while it runs.
SLOW_ANNEALING: dict[str, Any] = {
    "name": "annealing live",
    "entrypoint": "tests.tasks.slow_evaluator",
    "algorithm": "annealing",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}, {"exclude": True, "op_names": ["fc2"]}],
    "base_algo": "l1",
    "max_trials": 6,
    "seed": 0,
}

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (which never downloads a browser of its own)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (`make browser` installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def eval_delay() -> float:
    """Seconds the slow evaluator sleeps per trial; a test module overrides this fixture to change it."""
    return 0.4


@pytest.fixture
def live_slow(embedded_env: dict[str, str], tmp_path: Path, eval_delay: float) -> Iterator[LiveService]:
    """A live API + worker on the embedded defaults, with the slow evaluator's delay set."""
    yield from _run_live(LiveService(tmp_path, {**embedded_env, "PRUNEHUB_TEST_EVAL_DELAY": str(eval_delay)}))


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``prunehub ARGS`` in a subprocess (from the repository root), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
