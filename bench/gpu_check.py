"""GPU check: the real service on one CUDA device, end to end (``make gpu-check``, under 10 minutes).

Starts ``prunehub serve``, a coordinator (``prunehub worker --queues experiments``) and one evaluation worker
``prunehub worker --gpu 0 --queues evaluations`` on the distributed runner (PostgreSQL + Redis when reachable,
else SQLite + the filesystem broker; the report says which), then:

1. an annealing search on ``examples.digits``;
2. a NetAdapt search with ``resource: latency`` on a ResNet-18-shaped model (``bench.tasks.gpu_resnet18``);
3. a 2:4 pattern search (annealing, ``resource: latency``) on four 4096 x 4096 Linear layers
   (``bench.tasks.gpu_nm_linear``): on compute capability >= 8.0 its patterned trials must carry the
   semi-structured kernel's latency, timed with CUDA synchronisation after every pass (the task module counts
   synchronisations that follow a sparse-kernel call), and the report lists dense vs semi-structured latency;
   below 8.0 every patterned trial must say that no speed-up is measured and why;
4. a last run (``bench.tasks.gpu_hold``, whose evaluator takes 1 GiB of GPU memory and sleeps) cancelled mid-job.

It checks that the models ran on ``cuda`` (each evaluation logs its device), that latency was measured with CUDA
synchronisation (the task module counts ``torch.cuda.synchronize`` calls; NetAdapt's trials carry a latency),
that the GPU memory in use returned to its baseline after the cancel and the killed task process is gone from
``nvidia-smi --query-compute-apps``, and that no CUDA context exists in the prefork parent (compute apps list
only task processes, never the worker or its pool processes). The report goes to ``docs/gpu-check.md``.

Without a CUDA device it exits with status 2 at once, saying so, and leaves ``docs/gpu-check.md`` as it is.

    python -m bench.gpu_check [--report docs/gpu-check.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import PG_ADMIN_URL, ROOT, Processes, free_port, service_env

LOG_MARK = "prunehub-gpu-check "
MEMORY_TOLERANCE_MIB = 256  # the driver's own bookkeeping moves by a few MiB; a leaked 1 GiB tensor does not fit
NOT_RUN = """# GPU check

**Not run on a GPU yet.** `make gpu-check` (`python -m bench.gpu_check`) needs a CUDA device; the machines this
project was built on have none, and there it exits at once with "no CUDA device". On a machine with one, it runs
the real service with `prunehub worker --gpu 0` on the distributed runner (an annealing search on
`examples.digits`, a NetAdapt search with `resource: latency` on a ResNet-18-shaped model, a 2:4 pattern search timed
on the semi-structured kernel, and a last run cancelled mid-job) and replaces this page with its report.
"""
# The semi-structured timing runs 3 untimed passes, one synchronisation, then one synchronised pass per sample
# (pruning.projection.LATENCY_REPEAT): one timed trial's sparse passes alone give this many synchronisations.
NM_SYNCED_PASSES = 16


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


# ------------------------------------------------------------------------------------------------ pure parts


def parse_compute_apps(csv: str) -> dict[int, int]:
    """``{pid: used MiB}`` from ``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits``."""
    apps: dict[int, int] = {}
    for line in csv.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit():
            apps[int(parts[0])] = int(parts[1]) if parts[1].isdigit() else 0
    return apps


def parse_used_memory(csv: str) -> int:
    """The first GPU's used MiB from ``nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits``."""
    for line in csv.splitlines():
        if line.strip().isdigit():
            return int(line.strip())
    raise ValueError(f"no memory.used value in {csv!r}")


def read_log_records(text: str) -> list[dict[str, Any]]:
    """The records the GPU check's task modules printed (one JSON object after :data:`LOG_MARK` per line)."""
    records = []
    for line in text.splitlines():
        at = line.find(LOG_MARK)
        if at >= 0:
            try:
                records.append(json.loads(line[at + len(LOG_MARK):]))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return records


def device_check(records: list[dict[str, Any]]) -> Check:
    devices = sorted({str(r.get("device")) for r in records})
    ok = bool(records) and all(d.startswith("cuda") for d in devices)
    return Check("models ran on cuda", ok, f"{len(records)} evaluation(s) logged, devices: {', '.join(devices) or '-'}")


def sync_check(records: list[dict[str, Any]], latency_trials: int) -> Check:
    calls = max((int(r.get("synchronize_calls", 0)) for r in records if r.get("task") == "resnet18"), default=0)
    ok = latency_trials > 0 and calls > 0
    return Check("latency measured with CUDA synchronisation", ok,
                 f"{latency_trials} NetAdapt trial(s) with a latency; torch.cuda.synchronize called {calls} times "
                 "in the task process")


def memory_check(baseline_mib: int, held_mib: int | None, after_mib: int, killed_pid: int | None,
                 apps_after: dict[int, int]) -> Check:
    gone = killed_pid is not None and killed_pid not in apps_after
    ok = gone and after_mib <= baseline_mib + MEMORY_TOLERANCE_MIB
    return Check("GPU memory back to its baseline after the cancel", ok,
                 f"used {baseline_mib} MiB before the service, {held_mib if held_mib is not None else '?'} MiB while "
                 f"the job held its tensor, {after_mib} MiB after the cancel (tolerance {MEMORY_TOLERANCE_MIB} MiB); "
                 f"killed task process {killed_pid} {'gone from' if gone else 'still in'} the compute apps")


def parent_check(worker_pids: set[int], seen_apps: set[int], task_pids: set[int]) -> Check:
    in_parent = sorted(worker_pids & seen_apps)
    others = sorted(seen_apps - task_pids - worker_pids)
    ok = not in_parent and bool(seen_apps & task_pids)
    detail = (f"compute apps seen: {sorted(seen_apps)}; task processes: {sorted(task_pids)}; worker and pool "
              f"processes: {sorted(worker_pids)}; with a CUDA context: {in_parent or 'none'}")
    if others:
        detail += f"; other processes on the GPU: {others}"
    return Check("no CUDA context in the prefork parent", ok, detail)


def _nm(trial: dict[str, Any]) -> dict[str, Any] | None:
    return (trial.get("extra") or {}).get("nm")


def nm_check(trials: list[dict[str, Any]], records: list[dict[str, Any]], capability: tuple[int, int] | None) -> Check:
    """The 2:4 run: on compute capability >= 8.0 some patterned trial's latency is the semi-structured kernel's,
    and the kernel's timed passes were synchronised (the task's counters, see ``bench.tasks.gpu_nm_linear``); below
    8.0 every patterned trial says no speed-up is measured, naming the compute capability."""
    patterned = [t for t in trials if _nm(t) is not None]
    name = "2:4 latency on the semi-structured kernel"
    if not patterned:
        return Check(name, False, f"no patterned trial among {len(trials)}")
    cc = f"{capability[0]}.{capability[1]}" if capability else "?"
    if capability is None or capability < (8, 0):
        texts = [str(_nm(t).get("speedup", "")) for t in patterned]  # type: ignore[union-attr]
        ok = capability is not None and all(t.startswith("not measured") and "compute capability" in t for t in texts)
        return Check("2:4 trials say no speed-up is measured", ok,
                     f"compute capability {cc}; {len(patterned)} patterned trial(s); first says: {texts[0]}")
    timed = [t for t in patterned if (_nm(t).get("latency") or {}).get("sparse_ms") is not None]  # type: ignore[union-attr]
    failed = [(_nm(t).get("latency") or {}).get("error") or _nm(t).get("speedup") for t in patterned  # type: ignore[union-attr]
              if t not in timed]
    synced = [t for t in timed if _nm(t)["latency"].get("synchronised")  # type: ignore[index]
              and str(_nm(t)["latency"].get("device", "")).startswith("cuda")  # type: ignore[index]
              and t.get("latency_ms") == _nm(t)["latency"]["sparse_ms"]]  # type: ignore[index]
    passes = max((int(r.get("synchronised_sparse_passes", 0)) for r in records if r.get("task") == "nm_linear"),
                 default=0)
    kernel_calls = max((int(r.get("sparse_kernel_calls", 0)) for r in records if r.get("task") == "nm_linear"),
                       default=0)
    ok = bool(timed) and len(synced) == len(timed) and not failed and passes >= NM_SYNCED_PASSES
    detail = (f"compute capability {cc}; {len(timed)} of {len(patterned)} patterned trial(s) timed on the kernel, "
              f"{len(synced)} on cuda with synchronisation and the trial's latency the sparse one; the task process "
              f"saw {kernel_calls} sparse-kernel call(s) and {passes} synchronisation(s) right after one "
              f"(at least {NM_SYNCED_PASSES} needed)")
    if failed:
        detail += f"; not timed: {failed[0]}"
    return Check(name, ok, detail)


def nm_rows(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per patterned trial timed on the kernel: dense vs semi-structured latency at the same dtype."""
    rows = []
    for trial in trials:
        timing = (_nm(trial) or {}).get("latency") or {}
        if timing.get("sparse_ms") is None:
            continue
        rows.append({"trial": trial.get("job_key", "?"), "layers": len(timing.get("layers", [])),
                     "backend": timing.get("backend"), "dtype": timing.get("dtype"),
                     "model_dense_ms": timing.get("model_dense_ms"), "dense_ms": timing["dense_ms"],
                     "sparse_ms": timing["sparse_ms"], "speedup": timing.get("speedup")})
    return rows


def _ms(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _times(value: Any) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "-"


def render_report(checks: list[Check], context: dict[str, Any]) -> str:
    """``docs/gpu-check.md``: the verdict, each check with its evidence, and what ran where."""
    verdict = "passed" if checks and all(c.passed for c in checks) else "FAILED"
    lines = [
        "# GPU check",
        "",
        f"Made by `make gpu-check` (`python -m bench.gpu_check`) on {context.get('when', '?')}: **{verdict}**.",
        "",
        f"- GPU: {context.get('gpu', '?')}",
        f"- Services: {context.get('backend', '?')}, distributed runner, `prunehub worker --gpu 0 --queues "
        "evaluations` beside a coordinator",
        f"- Wall time: {context.get('wall_s', '?')} s",
        "",
        "| check | result | evidence |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in checks]
    runs = context.get("runs") or []
    if runs:
        lines += ["", "| run | status | trials | wall s |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['status']} | {r['trials']} | {r['wall_s']} |" for r in runs]
    nm = context.get("nm") or []
    if nm:
        lines += ["", "2:4 latency, dense vs semi-structured kernel on the same timing copy (median ms; the model as "
                  "given, in its own dtype on dense kernels, for reference):", "",
                  "| trial | 2:4 layers | backend | dtype | as given ms | dense ms | semi-structured ms | speed-up |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['trial']} | {r['layers']} | {r['backend']} | {r['dtype']} | {_ms(r['model_dense_ms'])} | "
                  f"{_ms(r['dense_ms'])} | {_ms(r['sparse_ms'])} | "
                  f"{_times(r['speedup'])} |" for r in nm]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- the run


def _cuda_devices() -> tuple[int, str]:
    """How many CUDA devices a fresh process sees, and why none when none (this process never touches CUDA)."""
    if shutil.which("nvidia-smi") is None:
        return 0, "nvidia-smi not found"
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return 0, probe.stderr.strip()[-300:]
    count = int(probe.stdout.strip() or 0)
    return count, "" if count else "torch.cuda.device_count() is 0 (a CPU build of torch, or no driver)"


def _capability() -> tuple[int, int] | None:
    """Device 0's compute capability, read in a fresh process (this one never touches CUDA)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(*torch.cuda.get_device_capability(0))"],
                           capture_output=True, text=True, timeout=120)
    parts = probe.stdout.split()
    return (int(parts[0]), int(parts[1])) if probe.returncode == 0 and len(parts) == 2 else None


def _smi(*query: str) -> str:
    return subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits", "-i", "0"],
                          capture_output=True, text=True, timeout=30, check=True).stdout


def _apps() -> dict[int, int]:
    return parse_compute_apps(_smi("--query-compute-apps=pid,used_memory"))


def _used() -> int:
    return parse_used_memory(_smi("--query-gpu=memory.used"))


def _backend() -> tuple[str, dict[str, str]]:
    pg_url = os.environ.get("PRUNEHUB_GPU_CHECK_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/prunehub_gpu")
    redis_url = os.environ.get("PRUNEHUB_GPU_CHECK_REDIS_URL", "redis://127.0.0.1:6379/7")
    try:
        import redis
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            name = make_url(pg_url).database
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=3)
        client.flushdb()
        return "PostgreSQL + Redis", {"PRUNEHUB_DATABASE_URL": pg_url, "PRUNEHUB_BROKER_URL": redis_url}
    except Exception as exc:  # noqa: BLE001 - not reachable: the embedded stores, said in the report
        return f"SQLite + filesystem broker (PostgreSQL/Redis not reachable: {type(exc).__name__})", {}


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _wait(client: Any, experiment_id: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/experiments/{experiment_id}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.5)
    raise TimeoutError(f"experiment {experiment_id} did not finish in {timeout:.0f} s")


def run_check(report: Path) -> int:
    import httpx

    count, why = _cuda_devices()
    if not count:
        print(f"no CUDA device: {why}. The GPU check needs one; {report} is left as it is.", file=sys.stderr)
        return 2
    started = time.monotonic()
    gpu = _smi("--query-gpu=name,memory.total").strip()
    capability = _capability()
    baseline = _used()
    backend, stores = _backend()
    home = Path(tempfile.mkdtemp(prefix="prunehub-gpu-check-"))
    env = service_env(home, PRUNEHUB_RUNNER="distributed", PRUNEHUB_ALLOWED_ENTRYPOINTS="examples.,bench.", **stores)
    procs = Processes(home)
    checks: list[Check] = []
    runs: list[dict[str, Any]] = []
    seen_apps: set[int] = set()
    try:
        url = procs.serve(env, free_port(), ready="/readyz")
        procs.cli(env, "coordinator.log", "worker", "--queues", "experiments", "--loglevel", "WARNING")
        gpu_worker = procs.cli(env, "gpu-worker.log", "worker", "--gpu", "0", "--queues", "evaluations",
                               "--concurrency", "1", "--loglevel", "WARNING")
        key = (home / "api-key").read_text().strip()
        client = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"})
        base = {"config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "base_algo": "l1", "seed": 0}
        specs = [
            {**base, "name": "gpu-check annealing digits", "entrypoint": "examples.digits", "algorithm": "annealing",
             "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}, {"exclude": True, "op_names": ["fc2"]}],
             "start_temperature": 100, "stop_temperature": 20, "cool_down_rate": 0.7, "max_trials": 8},
            {**base, "name": "gpu-check netadapt resnet18 latency", "entrypoint": "bench.tasks.gpu_resnet18",
             "algorithm": "netadapt", "resource": "latency", "target_resource_ratio": 0.8, "initial_reduction": 0.1,
             "short_term_finetune_epochs": 0, "max_trials": 12},
            {"name": "gpu-check 2:4 pattern latency", "entrypoint": "bench.tasks.gpu_nm_linear",
             "algorithm": "annealing", "base_algo": "level", "resource": "latency", "seed": 0,
             "config_list": [{"pattern": "2:4", "op_types": ["Linear"]}], "score_target_drop": 1e6,
             "start_temperature": 100, "stop_temperature": 30, "cool_down_rate": 0.7},
        ]
        latency_trials = 0
        nm_trials: list[dict[str, Any]] = []
        for spec in specs:
            t0 = time.monotonic()
            response = client.post("/experiments", json=spec)
            response.raise_for_status()
            experiment = response.json()
            body = _wait(client, experiment["id"], 240)
            seen_apps |= set(_apps())
            trials = client.get(f"/experiments/{experiment['id']}/trials", params={"limit": 1000}).json()["items"]
            if spec["algorithm"] == "netadapt":
                latency_trials = sum(1 for t in trials if t.get("latency_ms") is not None)
            if spec["entrypoint"] == "bench.tasks.gpu_nm_linear":
                nm_trials = trials
            runs.append({"name": spec["name"], "status": body["status"], "trials": len(trials),
                         "wall_s": round(time.monotonic() - t0, 1)})
            checks.append(Check(f"{spec['name']} succeeded", body["status"] == "succeeded",
                                f"status {body['status']}, {len(trials)} trial(s)" +
                                (f", error: {body.get('error')}" if body.get("error") else "")))
        # The last run: cancel while its job holds GPU memory.
        t0 = time.monotonic()
        hold_spec = {**base, "name": "gpu-check cancel", "entrypoint": "bench.tasks.gpu_hold",
                     "algorithm": "annealing", "max_trials": 4}
        hold = client.post("/experiments", json=hold_spec).json()
        killed_pid, held = None, None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and killed_pid is None:
            for record in read_log_records((home / "gpu-worker.log").read_text(errors="replace")):
                if record.get("task") == "hold":
                    killed_pid = int(record["pid"])
            time.sleep(0.5)
        if killed_pid is not None:
            time.sleep(2)  # the tensor is allocated before the line is printed; let the driver account it
            held = _used()
            seen_apps |= set(_apps())
        client.post(f"/experiments/{hold['id']}/cancel").raise_for_status()
        body = _wait(client, hold["id"], 120)
        runs.append({"name": "gpu-check cancel", "status": body["status"], "trials": "-",
                     "wall_s": round(time.monotonic() - t0, 1)})
        apps_after, after = _apps(), _used()
        for _ in range(30):  # the kill is immediate; the driver frees the context a moment later
            if killed_pid not in apps_after and after <= baseline + MEMORY_TOLERANCE_MIB:
                break
            time.sleep(1)
            apps_after, after = _apps(), _used()
        checks.append(Check("last run cancelled mid-job", body["status"] == "cancelled" and killed_pid is not None,
                            f"status {body['status']}; the job's task process was {killed_pid}"))
        records = read_log_records("\n".join(p.read_text(errors="replace") for p in home.glob("*.log")))
        worker_pids = {gpu_worker.pid} | _descendants(gpu_worker.pid)
        task_pids = {int(r["pid"]) for r in records}
        worker_pids -= task_pids
        checks = [device_check(records), sync_check(records, latency_trials),
                  nm_check(nm_trials, records, capability),
                  memory_check(baseline, held, after, killed_pid, apps_after),
                  parent_check(worker_pids, seen_apps, task_pids), *checks]
        client.close()
    finally:
        procs.stop()
        shutil.rmtree(home, ignore_errors=True)
    context = {"when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "gpu": gpu, "backend": backend,
               "wall_s": round(time.monotonic() - started, 1), "runs": runs, "nm": nm_rows(nm_trials)}
    if capability is not None:
        context["gpu"] = f"{gpu} (compute capability {capability[0]}.{capability[1]})"
    report.write_text(render_report(checks, context))
    for check in checks:
        print(f"{'pass' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    print(f"report: {report}")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "gpu-check.md")
    sys.exit(run_check(parser.parse_args().report))
