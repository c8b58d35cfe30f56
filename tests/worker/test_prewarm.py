"""The pre-warmed task process (worker.isolation.prewarm): real child processes, no fakes. It exists and imports
torch before any job, serves the first job as the process it already was, still enforces the allow-list, and is
replaced by a fresh pre-warmed one after a task process is killed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pruning.search.configs import parse_algorithm_config
from worker import isolation
from worker.isolation import ChildError, prewarm, task_process

CONFIG = parse_algorithm_config(
    {"algorithm": "uniform", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "base_algo": "l1"}
).model_dump(mode="json")


@pytest.fixture
def warm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(isolation, "_idle", None)
    monkeypatch.setattr(isolation, "_spare", None)
    monkeypatch.setattr(isolation, "_warm_settings", None)
    artifacts = str(tmp_path / "artifacts")
    yield artifacts
    for held in (isolation._idle, isolation._spare):
        if held is not None:
            held[1].close()


def _spare_pid() -> int:
    assert isolation._spare is not None, "no pre-warmed task process"
    pid = isolation._spare[1].pid
    assert pid is not None
    return pid


def _wait_for_torch(pid: int, timeout_s: float = 60.0) -> None:
    # libtorch is mapped into the process once `import torch` ran: the import happened before any request.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"task process {pid} did not import torch within {timeout_s} s")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_prewarmed_process_imports_torch_before_a_job_and_serves_it(warm: str) -> None:
    prewarm(artifacts_dir=warm)
    pid = _spare_pid()
    _wait_for_torch(pid)
    with task_process("bench.tasks.noop", ["bench."], artifacts_dir=warm) as child:
        assert child.pid == pid  # the first job runs in the process that was already warm
        answer = child.request("resolve", {"config": CONFIG})
        assert answer["problem"]["pruning"]
    assert isolation._idle is not None and isolation._idle[1].pid == pid  # parked, no second process
    assert isolation._spare is None


def test_prewarmed_process_still_enforces_the_allow_list(warm: str) -> None:
    prewarm(artifacts_dir=warm)
    with pytest.raises(ChildError) as caught, task_process("os", ["bench."], artifacts_dir=warm) as child:
        child.request("resolve", {"config": CONFIG})
    assert caught.value.fatal
    assert "os" in str(caught.value)


def test_killed_task_process_is_replaced_by_a_prewarmed_one(warm: str) -> None:
    prewarm(artifacts_dir=warm)
    first = _spare_pid()
    with pytest.raises(RuntimeError), task_process("bench.tasks.noop", ["bench."], artifacts_dir=warm) as child:
        child.kill()  # as a cancel or timeout does
        raise RuntimeError("cancelled")
    replacement = _spare_pid()
    assert replacement != first
    assert isolation._idle is None
