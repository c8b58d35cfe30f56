"""``prunehub demo``: uniform and annealing at the same FLOPs budget on the digits example, printed side by side,
with the API's and the worker's output in ``$PRUNEHUB_HOME/demo.log`` instead of the terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from server.cli import demo_rows
from tests.conftest import ROOT, free_port


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("│").split("│")]


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_uniform_and_annealing_at_one_budget_side_by_side(embedded_env: dict[str, str]) -> None:
    home = Path(embedded_env["PRUNEHUB_HOME"])
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "demo", "--port", str(port)],
        env={**embedded_env, "COLUMNS": "200"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "prunehub is running at" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(300), "".join(lines) + (home / "demo.log").read_text(errors="replace")[-3000:]
        os.kill(demo.pid, signal.SIGINT)
        assert demo.wait(60) == 0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    reader.join(10)
    out = "".join(lines)

    # Quiet start: no Celery banner or superuser warning on the terminal; the worker's output is in the log.
    assert "celery@" not in out and "superuser" not in out.lower() and "[tasks]" not in out
    log = (home / "demo.log").read_text(errors="replace")
    assert "celery" in log.lower()

    # Both experiments, then one table with a column each.
    assert "submitted experiment 1: uniform on examples.digits (budget: flops 0.35 of the dense model)" in out
    assert "submitted experiment 2: annealing on examples.digits (budget: flops 0.35 of the dense model)" in out
    header = next(line for line in lines if "uniform (experiment 1)" in line)
    assert "annealing (experiment 2)" in header
    rows = {_cells(line)[0]: _cells(line)[1:] for line in lines if line.count("│") >= 3}
    assert rows["status"] == ["succeeded", "succeeded"]
    scores = [float(cell) for cell in rows["score after 2 fine-tuning epochs"]]
    assert all(0.5 < score <= 1.0 for score in scores)
    flops = rows["FLOPs / dense (shrunk)"]
    assert all(cell.endswith("(budget 0.35)") for cell in flops)
    assert all(float(cell.split()[0]) <= 0.35 + 0.01 for cell in flops)  # measured on the shrunk model
    assert all(" of " in cell for cell in rows["params"])
    assert int(rows["trials"][0]) == 1 and int(rows["trials"][1]) > 1
    for unit in ("conv1", "conv2", "conv3", "fc1"):
        assert f"sparsity {unit}" in rows
    assert "stopping API and worker" in out


def test_demo_rows_show_an_unfinished_experiment_by_its_status() -> None:
    spec = {"algorithm": "uniform", "finetune_epochs": 2}
    best = {
        "score": 0.95,
        "flops_ratio": 0.349,
        "budget": {"flops": 0.35},
        "params_after": 1000,
        "params_before": 4000,
        "params_ratio": 0.25,
        "distribution": {"conv1": 0.5},
    }
    rows = demo_rows(
        [
            (spec, {"id": 1, "status": "succeeded", "trials_count": 1}, best),
            ({**spec, "algorithm": "annealing"}, {"id": 2, "status": "failed", "trials_count": 3}, None),
        ]
    )
    table = {row[0]: row[1:] for row in rows}
    assert rows[0] == ["", "uniform (experiment 1)", "annealing (experiment 2)"]
    assert table["score after 2 fine-tuning epochs"] == ["0.9500", "failed"]
    assert table["FLOPs / dense (shrunk)"] == ["0.349 (budget 0.35)", "failed"]
    assert table["params"] == ["1,000 of 4,000 (0.250)", "failed"]
    assert table["sparsity conv1"] == ["0.500", "failed"]
