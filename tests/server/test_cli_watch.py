"""The client commands of the CLI against a live server: ``submit --wait`` and ``watch`` follow the event stream
(rich progress bar, then the best distribution as a table), and ``list``, ``trials``, ``cancel``, ``download``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import ROOT, LiveService, wait_terminal
from tests.server.conftest import SLOW_ANNEALING, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ANNEALING = {**SLOW_ANNEALING, "name": "cli annealing", "max_trials": 5}


def test_watch_submit_wait_and_client_commands(live_slow: LiveService, tmp_path: Path) -> None:
    env = {**live_slow.env, "PRUNEHUB_API_URL": live_slow.url, "COLUMNS": "120"}
    cli = partial(run_cli, env)

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(ANNEALING))

    # submit --wait: the rich watcher, then the best distribution as a table.
    submitted = cli("submit", str(spec_file), "--wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    out = submitted.stdout
    finished_id = int(out.split()[1])
    assert "succeeded" in out
    assert "trial    1 succeeded" in out and "trial    5 succeeded" in out
    assert "best distribution" in out and "requested" in out and "achieved" in out
    for layer in ("conv1", "conv2", "conv3", "fc1"):
        assert layer in out

    with live_slow.http() as http:
        # watch on a running experiment: follows it live to the end.
        running = http.post("/experiments", json={**ANNEALING, "name": "watched", "max_trials": 6}).json()
        watched = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "watch", str(running["id"])],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(0.5)
        assert http.get(f"/experiments/{running['id']}").json()["status"] in ("queued", "running")
        stdout, stderr = watched.communicate(timeout=120)
        assert watched.returncode == 0, stdout + stderr
        trials = http.get(f"/experiments/{running['id']}/trials").json()["items"]
        for trial in trials:
            assert f"trial {trial['seq']:>4} succeeded  score={trial['score']:.4f}" in stdout
        best = http.get(f"/experiments/{running['id']}/best").json()
        assert f"best trial {best['trial_id']}: score={best['score']:.4f}" in stdout
        assert "best distribution" in stdout and "succeeded" in stdout

        # cancel a running experiment; watch then reports it cancelled and exits non-zero.
        doomed = http.post("/experiments", json={**ANNEALING, "name": "doomed", "max_trials": 50}).json()
        deadline = time.monotonic() + 60
        while http.get(f"/experiments/{doomed['id']}").json()["status"] != "running":
            assert time.monotonic() < deadline, live_slow.logs()
            time.sleep(0.2)
        cancelled = cli("cancel", str(doomed["id"]))
        assert cancelled.returncode == 0, cancelled.stderr
        assert "cancelling" in cancelled.stdout
        watch_cancelled = cli("watch", str(doomed["id"]))
        assert watch_cancelled.returncode == 1
        assert "cancelled" in watch_cancelled.stdout
        assert wait_terminal(http, doomed["id"])["status"] == "cancelled"

    listed = cli("list")
    assert listed.returncode == 0
    for experiment_id in (finished_id, running["id"], doomed["id"]):
        assert str(experiment_id) in listed.stdout
    assert "cancelled" in listed.stdout and "annealing" in listed.stdout
    trials_out = cli("trials", str(finished_id))
    assert trials_out.returncode == 0 and len(trials_out.stdout.strip().splitlines()) == 1 + 5
    assert "temperature" in trials_out.stdout
    # download: the best pruned model of a finished experiment (uniform stores one).
    with live_slow.http() as http:
        uniform = http.post("/experiments", json={**ANNEALING, "algorithm": "uniform", "max_trials": None}).json()
        assert wait_terminal(http, uniform["id"])["status"] == "succeeded"
    downloaded = cli("download", str(uniform["id"]), str(tmp_path / "model"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert (tmp_path / "model" / "model.safetensors").stat().st_size > 0
    missing = cli("watch", "424242")
    assert missing.returncode == 2 and "404" in missing.stderr
