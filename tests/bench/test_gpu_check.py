"""The GPU check's pure parts: reading nvidia-smi and the task processes' log lines, judging, writing the report;
and that without CUDA it stops at once with a clear message (this machine has none)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import (
    Check,
    device_check,
    memory_check,
    nm_check,
    nm_rows,
    parent_check,
    parse_compute_apps,
    parse_used_memory,
    read_log_records,
    render_report,
    sync_check,
)

ROOT = Path(__file__).resolve().parents[2]


def test_parses_nvidia_smi_csv() -> None:
    assert parse_compute_apps("4242, 1034\n  77, 500\n") == {4242: 1034, 77: 500}
    assert parse_compute_apps("") == {}
    assert parse_compute_apps("No running processes found\n") == {}
    assert parse_used_memory("  812\n") == 812
    with pytest.raises(ValueError):
        parse_used_memory("[N/A]\n")


def test_reads_log_records_and_skips_cut_lines() -> None:
    log = ('[2026-01-01: WARNING/ForkPoolWorker-1] prunehub-gpu-check {"task": "resnet18", "device": "cuda:0", '
           '"pid": 11, "synchronize_calls": 40}\nnoise\nprunehub-gpu-check {"task": "hold", "dev\n')
    assert read_log_records(log) == [{"task": "resnet18", "device": "cuda:0", "pid": 11, "synchronize_calls": 40}]


def test_checks_fail_on_the_evidence_they_are_for() -> None:
    cuda = [{"task": "resnet18", "device": "cuda:0", "pid": 11, "synchronize_calls": 3}]
    assert device_check(cuda).passed
    assert not device_check([*cuda, {"device": "cpu", "pid": 12}]).passed
    assert not device_check([]).passed
    assert sync_check(cuda, latency_trials=5).passed
    assert not sync_check([{**cuda[0], "synchronize_calls": 0}], latency_trials=5).passed
    assert not sync_check(cuda, latency_trials=0).passed
    assert memory_check(500, 1600, 520, killed_pid=11, apps_after={}).passed
    assert not memory_check(500, 1600, 1540, killed_pid=11, apps_after={}).passed  # the 1 GiB is still held
    assert not memory_check(500, 1600, 500, killed_pid=11, apps_after={11: 1024}).passed
    assert parent_check({1, 2}, seen_apps={11}, task_pids={11}).passed
    assert not parent_check({1, 2}, seen_apps={2, 11}, task_pids={11}).passed  # a pool process holds a context
    assert not parent_check({1, 2}, seen_apps=set(), task_pids={11}).passed  # nothing ran on the GPU at all


def _nm_trial(key: str, sparse_ms: float | None, **timing: object) -> dict[str, object]:
    latency = {"device": "cuda:0", "dtype": "float16", "backend": "cusparselt", "layers": ["fc1", "fc2"],
               "synchronised": True, "model_dense_ms": 9.0, "dense_ms": 4.0, "sparse_ms": sparse_ms,
               "speedup": 4.0 / sparse_ms if sparse_ms else None, **timing}
    return {"job_key": key, "latency_ms": sparse_ms if sparse_ms is not None else 9.0,
            "extra": {"nm": {"layers": {}, "speedup": "measured ..." if sparse_ms else "not measured: ...",
                             "latency": latency}}}


def test_nm_check_needs_the_kernel_timed_and_synchronised_on_cc8() -> None:
    dense = {"job_key": "annealing-0", "latency_ms": 9.0, "extra": {}}
    timed = [dense, _nm_trial("annealing-1", 2.5), _nm_trial("annealing-2", 2.0)]
    synced = [{"task": "nm_linear", "synchronised_sparse_passes": 16, "sparse_kernel_calls": 300}]
    assert nm_check(timed, synced, (9, 0)).passed
    assert not nm_check(timed, [{**synced[0], "synchronised_sparse_passes": 3}], (9, 0)).passed
    assert not nm_check(timed, [], (9, 0)).passed  # no evidence from the task process
    assert not nm_check([dense], synced, (9, 0)).passed  # no patterned trial at all
    failed = _nm_trial("annealing-3", None, error="converting to the semi-structured layout: RuntimeError: x")
    check = nm_check([*timed, failed], synced, (8, 0))
    assert not check.passed and "converting to the semi-structured layout" in check.detail
    on_cpu = _nm_trial("annealing-1", 2.5, device="cpu")
    assert not nm_check([on_cpu], synced, (8, 0)).passed
    unsynced = _nm_trial("annealing-1", 2.5, synchronised=False)
    assert not nm_check([unsynced], synced, (8, 0)).passed
    dense_latency = {**_nm_trial("annealing-1", 2.5), "latency_ms": 9.0}  # the trial kept the dense latency
    assert not nm_check([dense_latency], synced, (8, 0)).passed


def test_nm_check_below_cc8_needs_the_why() -> None:
    said = {"job_key": "annealing-1", "extra": {"nm": {"speedup": "not measured: FLOPs and latency are of the dense "
            "kernels; the semi-structured kernel is not timed (compute capability 7.5 < 8.0 has no ...)"}}}
    assert nm_check([said], [], (7, 5)).passed
    vague = {"job_key": "annealing-1", "extra": {"nm": {"speedup": "not measured"}}}
    assert not nm_check([said, vague], [], (7, 5)).passed
    assert not nm_check([said], [], None).passed  # the capability could not be read


def test_report_lists_dense_vs_semi_structured_latency() -> None:
    rows = nm_rows([{"job_key": "annealing-0", "extra": {}}, _nm_trial("annealing-1", 2.5),
                    _nm_trial("annealing-2", None)])
    assert [r["trial"] for r in rows] == ["annealing-1"]
    text = render_report([Check("x", True, "y")], {"nm": rows})
    assert "| annealing-1 | 2 | cusparselt | float16 | 9.000 | 4.000 | 2.500 | 1.60x |" in text
    assert "semi-structured" not in render_report([Check("x", True, "y")], {})


def test_report_states_the_verdict_and_each_check() -> None:
    checks = [Check("models ran on cuda", True, "2 evaluation(s)"), Check("no CUDA context", False, "pid 2")]
    text = render_report(checks, {"when": "now", "gpu": "H200", "backend": "PostgreSQL + Redis", "wall_s": 1,
                                  "runs": [{"name": "a", "status": "succeeded", "trials": 3, "wall_s": 1.0}]})
    assert "**FAILED**" in text
    assert "| models ran on cuda | pass | 2 evaluation(s) |" in text
    assert "| no CUDA context | FAIL | pid 2 |" in text
    assert "**passed**" in render_report(checks[:1], {})


def test_without_cuda_it_exits_at_once_and_leaves_the_report(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    report = tmp_path / "gpu-check.md"
    report.write_text("untouched\n")
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--report", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr
    assert report.read_text() == "untouched\n"
