"""Load: 200 submissions from 20 concurrent clients plus 50 pollers against the API (PostgreSQL + Redis) with one
worker. Every submission is stored exactly once and reaches a terminal state; the API answers every poll."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveService, _run_live

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUBMISSIONS = 200
SUBMITTERS = 20
POLLERS = 50
SPEC = {
    "entrypoint": "tests.tasks.noop",
    "algorithm": "uniform",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
    "base_algo": "l1",
}


@pytest.fixture
def live(services_env: dict[str, str], tmp_path: Path) -> Iterator[LiveService]:
    # One owner submits all 200: above the default queued-per-owner cap, which this test is not about.
    yield from _run_live(LiveService(tmp_path, {**services_env, "PRUNEHUB_MAX_QUEUED_PER_OWNER": "1000"}))


def test_many_submissions_and_pollers(live: LiveService) -> None:
    headers = {"Authorization": f"Bearer {live.api_key}"}
    limits = httpx.Limits(max_connections=POLLERS + SUBMITTERS)
    created: list[int] = []
    poll_failures: list[str] = []
    polls = 0
    stop = threading.Event()
    lock = threading.Lock()

    with httpx.Client(base_url=live.url, headers=headers, timeout=60, limits=limits) as client:

        def submit(index: int) -> int:
            # A client that retries after a lost answer sends the same Idempotency-Key: still one experiment.
            key = {"Idempotency-Key": f"load-{index}"}
            body = {**SPEC, "name": f"load {index}"}
            first = client.post("/experiments", json=body, headers=key)
            assert first.status_code == 201, first.text
            if index % 10 == 0:
                again = client.post("/experiments", json=body, headers=key)
                assert again.json()["id"] == first.json()["id"]
            return int(first.json()["id"])

        def poll() -> None:
            nonlocal polls
            while not stop.is_set():
                with lock:
                    target = created[-1] if created else None
                try:
                    path = f"/experiments/{target}" if target else "/experiments?limit=20"
                    response = client.get(path)
                    if response.status_code != 200:
                        poll_failures.append(f"{path}: {response.status_code}")
                except httpx.HTTPError as exc:
                    poll_failures.append(f"{type(exc).__name__}: {exc}")
                with lock:
                    polls += 1
                time.sleep(0.05)

        pollers = [threading.Thread(target=poll, daemon=True) for _ in range(POLLERS)]
        for thread in pollers:
            thread.start()
        started = time.monotonic()
        with ThreadPoolExecutor(SUBMITTERS) as pool:
            for experiment_id in pool.map(submit, range(SUBMISSIONS)):
                with lock:
                    created.append(experiment_id)
        submit_seconds = time.monotonic() - started

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            page = client.get("/experiments", params={"limit": 500}).json()["items"]
            if len(page) == SUBMISSIONS and all(e["status"] in ("succeeded", "failed", "cancelled") for e in page):
                break
            time.sleep(1)
        stop.set()
        for thread in pollers:
            thread.join(10)

        listed = client.get("/experiments", params={"limit": 500}).json()["items"]
    assert len(created) == len(set(created)) == SUBMISSIONS
    assert sorted(e["id"] for e in listed) == sorted(created)  # stored exactly once
    statuses = {e["status"] for e in listed}
    assert statuses == {"succeeded"}, (statuses, live.logs())
    assert poll_failures == []
    assert polls > POLLERS
    print(f"{SUBMISSIONS} submissions in {submit_seconds:.1f}s, {polls} polls answered")
