"""Search quality: every prunehub strategy and ``uniform`` against NNI 2.10.1, on the physical plane.

Tasks: ``examples.digits`` (a plain CNN) and ``bench.tasks.residual_digits`` (a residual network with BatchNorm,
identity and projection skips; coupled channel groups). For each task, base algorithm (l1, fpgm) and filter
sparsity (50%, 70%), every strategy of ``bench/search_quality.py`` runs through the same executor the worker
uses; its best distribution is then fine-tuned the same number of epochs (``final_epochs``) and evaluated.
NNI's ``SimulatedAnnealingPruner`` and ``NetAdaptPruner`` run on the same model, evaluator, config list and
budget in NNI's own virtual environment (``bench/nni_reference.py``); their masks are fine-tuned here the same way
and the model is shrunk with prunehub's ``shrink`` (a channel goes only when every coupled layer masked it, which
is all a physical model can lose), so everyone is compared by the params and FLOPs of the shrunk model.

Which weights the final fine-tuning starts from: strategies whose training is the method (netadapt, admm,
autocompress; NNI's NetAdapt) start from their own best checkpoint; the others (uniform, annealing, optuna; NNI's
SA) from the task's pretrained model with the best distribution's masks. Stochastic strategies (annealing, optuna,
autocompress, NNI's SA) run several seeds; the others are deterministic given the task's seeded trainer and run once.

    python -m bench.quality [--quick]      # prints a table; bench/run_all.py writes docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import search_quality
from bench.common import ROOT, loadavg, spread
from pruning.artifacts import ArtifactStore
from pruning.config import overall_sparsity, resolve_config_list
from pruning.search import parse_algorithm_config
from pruning.search.base import Job, SearchProblem
from pruning.task import Task, load_task

NNI_PYTHON = Path(os.environ.get("PRUNEHUB_BENCH_NNI_PYTHON", ROOT / ".venv" / "nni" / "bin" / "python"))
# Strategies with randomness of their own run several seeds; the others are deterministic given the task.
STOCHASTIC = {"annealing", "optuna", "autocompress"}
# Strategies whose best result is trained weights: the final fine-tuning continues from them.
KEEP_WEIGHTS = {"netadapt", "admm", "autocompress"}

# Budgets: search_quality's configs, with candidate fine-tuning per task (the residual net scores at chance when
# pruned without any fine-tuning, for every pruner: its candidates get one epoch, NNI's too).
CANDIDATE_EPOCHS = {"examples.digits": 0, "bench.tasks.residual_digits": 1}
# NetAdapt's step (prunehub's initial_reduction with no decay; NNI's sparsity_per_iteration): 0.05 is both defaults;
# the residual net, where every candidate costs a training epoch, takes bigger steps to fit the run in minutes.
NETADAPT_STEP = {"examples.digits": 0.05, "bench.tasks.residual_digits": 0.15}


@dataclasses.dataclass(frozen=True)
class Plan:
    tasks: tuple[str, ...]
    bases: dict[str, tuple[str, ...]]  # task -> base algorithms
    sparsities: tuple[float, ...]
    strategies: tuple[str, ...]
    seeds: int
    nni: tuple[str, ...]  # "sa", "netadapt"
    nni_seeds: int
    final_epochs: int
    optuna_trials: int
    skip: tuple[tuple[str, str, float], ...] = ()  # (task, base, target) left out to keep the run in budget
    nni_timeout_s: float = 150.0  # an NNI run past this is recorded as not finished


FULL = Plan(
    tasks=("examples.digits", "bench.tasks.residual_digits"),
    bases={"examples.digits": ("l1", "fpgm"), "bench.tasks.residual_digits": ("l1", "fpgm")},
    sparsities=(0.5, 0.7),
    strategies=tuple(search_quality.STRATEGIES),
    seeds=3,
    nni=("sa", "netadapt"),
    nni_seeds=2,
    final_epochs=2,
    optuna_trials=20,
    nni_timeout_s=150.0,
)
QUICK = Plan(
    tasks=("examples.digits",),
    bases={"examples.digits": ("l1",)},
    sparsities=(0.5,),
    strategies=("uniform", "annealing", "admm", "optuna"),
    seeds=1,
    nni=("sa",),
    nni_seeds=1,
    final_epochs=2,
    optuna_trials=10,
)


def _config(name: str, plan: Plan, task_name: str, base: str, sparsity: float, seed: int) -> dict[str, Any]:
    config = dict(search_quality.STRATEGIES[name])
    config.update(
        config_list=[{"sparsity": sparsity, "op_types": ["Conv2d"]}],
        base_algo=base,
        seed=seed,
    )
    if name in ("annealing", "optuna", "autocompress", "uniform"):
        config["finetune_epochs"] = CANDIDATE_EPOCHS[task_name]
    if name == "optuna":
        config["num_trials"] = plan.optuna_trials
    if name == "netadapt":
        config["initial_reduction"] = NETADAPT_STEP[task_name]
        config["reduction_decay"] = 1.0
    return config


def run_prunehub(
    name: str, config: dict[str, Any], task: Task, problem: SearchProblem, store: ArtifactStore, final_epochs: int
) -> dict[str, Any]:
    counted, calls = search_quality.counting(task)
    started = time.perf_counter()
    state, results, jobs = search_quality.search(config, counted, problem, store)
    wall = time.perf_counter() - started
    row: dict[str, Any] = {"evals": calls[0], "wall_s": wall, "stop_reason": getattr(state, "stop_reason", None)}
    if state.best_key is None:
        return {**row, "status": "failed", "error": f"no best result ({row['stop_reason']})"}
    best, best_job = results[state.best_key], jobs[state.best_key]
    distribution = getattr(state, "best_distribution", None) or best_job.distribution
    if best.extra.get("distribution"):
        distribution = best.extra["distribution"]
    parent = best.artifact if name in KEEP_WEIGHTS else None
    final = search_quality.executor(task, problem, store)(
        Job(
            key=f"final-{name}",
            kind="finetune_and_evaluate",
            distribution=distribution,
            parent_artifact=parent,
            finetune_epochs=final_epochs,
        )
    )
    pruning = problem.pruning
    if final.status != "succeeded":
        return {**row, "status": "failed", "error": final.error}
    achieved = {u.name: final.achieved.get(u.members[0], 0.0) for u in pruning.units}
    return {
        **row,
        "status": "succeeded",
        "search_score": best.score,
        "score": final.score,
        "sparsity": overall_sparsity(achieved, pruning),
        "flops_ratio": final.flops_ratio,
        "params_ratio": final.params_ratio,
        "conv_removed": _conv_removed_ratio(task, pruning, final.achieved),
        "conv_masked": _conv_removed_ratio(task, pruning, final.requested),
    }


def _conv_removed_ratio(task: Task, pruning: Any, achieved_per_layer: dict[str, float]) -> float:
    """Fraction of the selected conv layers' weights whose output channel is gone."""
    total = removed = 0.0
    for layer in pruning.layers:
        if layer.op_type != "Conv2d":
            continue
        total += layer.weight_count
        removed += achieved_per_layer.get(layer.name, 0.0) * layer.weight_count
    return removed / total if total else 0.0


def run_nni(
    algo: str,
    task_name: str,
    base: str,
    sparsity: float,
    seed: int,
    final_epochs: int,
    home: str,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """One NNI run in its own interpreter, then fine-tuned, shrunk and counted here."""
    import torch
    from safetensors.torch import load_file

    from pruning.masks import apply_masks, strip
    from pruning.metrics import count_params_flops
    from pruning.shrink import shrink

    out = tempfile.mkdtemp(prefix=f"nni-{algo}-")
    record = _nni_reference(
        [
            "--task",
            task_name,
            "--algo",
            algo,
            "--base",
            base,
            "--sparsity",
            str(sparsity),
            "--seed",
            str(seed),
            "--out",
            out,
            "--candidate-epochs",
            str(CANDIDATE_EPOCHS.get(task_name, 0)),
            "--step",
            str(NETADAPT_STEP.get(task_name, 0.05)),
        ],
        home,
        timeout_s,
    )
    if record.get("status") != "succeeded":
        return record
    task = load_task(task_name)
    model = task.model()
    state = load_file(os.path.join(out, "weights.safetensors"))
    masks_raw = load_file(os.path.join(out, "masks.safetensors"))
    model.load_state_dict(state, strict=False)
    modules = dict(model.named_modules())
    # NNI's structured masks, per output channel (a channel is masked when its whole filter is)
    masks: dict[str, torch.Tensor] = {}
    for name, mask in masks_raw.items():
        if name not in modules or mask.dim() != 4:
            continue
        keep = mask.reshape(mask.shape[0], -1).amax(dim=1) > 0
        masks[name] = keep.view(-1, 1, 1, 1).expand_as(modules[name].weight).to(torch.float32).contiguous()
    dense_params, dense_flops = count_params_flops(task.model(), task.dummy_input())
    dense_convs = {n: m for n, m in task.model().named_modules() if isinstance(m, torch.nn.Conv2d) and n in masks}
    apply_masks(model, masks, structured=True)
    if final_epochs:
        task.fine_tune(model, final_epochs)
    score = task.evaluate(model)
    strip(model)
    shrink(model, masks, task.dummy_input())
    params, flops = count_params_flops(model, task.dummy_input())
    shrunk_modules = dict(model.named_modules())
    # output channels physically gone, weighted like prunehub's achieved sparsity (by the layer's weight count)
    total = sum(m.weight.numel() for m in dense_convs.values())
    gone = sum(m.weight.numel() * (1 - shrunk_modules[n].out_channels / m.out_channels) for n, m in dense_convs.items())
    record.update(
        score=score,
        flops_ratio=flops / dense_flops,
        params_ratio=params / dense_params,
        conv_removed=gone / total if total else 0.0,
        conv_masked=record.get("masked_conv_fraction"),
        search_score=record.get("nni_score"),
    )
    return record


def _combo(plan: Plan, task_name: str, base: str, sparsity: float, home: str) -> list[dict[str, Any]]:
    """Every method on one (task, base algorithm, target): runs in a worker process with one torch thread."""
    import torch

    torch.set_num_threads(1)
    os.environ["PRUNEHUB_HOME"] = home
    store = ArtifactStore(tempfile.mkdtemp(prefix="prunehub-bench-quality-"))
    task = load_task(task_name)
    dense_score = task.evaluate(task.model())
    config_list = [{"sparsity": sparsity, "op_types": ["Conv2d"]}]
    pruning = resolve_config_list(task.model(), config_list, base, task.dummy_input())
    uniform_params: float | None = None
    runs: list[dict[str, Any]] = []
    common = {"task": task_name, "base": base, "target": sparsity, "dense_score": dense_score}
    for name in plan.strategies:
        for seed in range(plan.seeds if name in STOCHASTIC else 1):
            problem = SearchProblem(pruning=pruning, seed=seed)
            config = _config(name, plan, task_name, base, sparsity, seed)
            if name == "netadapt":
                config["target_resource_ratio"] = uniform_params or 1 - sparsity
            try:
                parse_algorithm_config(config)
            except ValueError as exc:  # the strategy does not apply to this base algorithm: not a failure
                reason = next((ln.strip() for ln in str(exc).splitlines() if "Value error" in ln), str(exc)[-300:])
                runs.append(
                    {
                        **common,
                        "method": name,
                        "seed": seed,
                        "source": "prunehub",
                        "status": "n/a",
                        "error": reason.removeprefix("Value error, ").split(" [type=")[0],
                    }
                )
                _print_row(runs[-1])
                break
            t_row = time.perf_counter()
            try:
                row = run_prunehub(name, config, task, problem, store, plan.final_epochs)
            except Exception as exc:  # a strategy that crashes is a result too
                row = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            row["total_s"] = time.perf_counter() - t_row
            if name == "uniform" and row.get("status") == "succeeded":
                uniform_params = row["params_ratio"]
            runs.append({**common, "method": name, "seed": seed, "source": "prunehub", **row})
            _print_row(runs[-1])
    for algo in plan.nni:
        for seed in range(1 if algo == "netadapt" else plan.nni_seeds):
            t_row = time.perf_counter()
            try:
                row = run_nni(algo, task_name, base, sparsity, seed, plan.final_epochs, home, plan.nni_timeout_s)
            except Exception as exc:
                row = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            row["total_s"] = time.perf_counter() - t_row
            runs.append({**common, "method": f"nni-{algo}", "seed": seed, "source": "nni", **row})
            _print_row(runs[-1])
    shutil.rmtree(store.root, ignore_errors=True)
    return runs


def run(quick: bool = False, home: str | None = None, plan: Plan | None = None, jobs: int = 2) -> dict[str, Any]:
    """All combinations of the plan, `jobs` at a time (one process and one torch thread each: these models are too
    small for intra-op threads to help, and two processes use the machine's two cores)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    plan = plan or (QUICK if quick else FULL)
    home = home or os.environ.get("PRUNEHUB_HOME") or str(ROOT / ".prunehub")
    os.environ["PRUNEHUB_HOME"] = home
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # NNI's subprocesses too
    started = time.perf_counter()
    loads = [loadavg()]
    for task_name in plan.tasks:
        load_task(task_name).model()  # trains and caches each dense model once, before the workers start
    combos = [
        (t, b, s) for t in plan.tasks for b in plan.bases[t] for s in plan.sparsities if (t, b, s) not in plan.skip
    ]
    # most expensive first (the residual net, the higher target) so two workers finish together
    combos.sort(key=lambda c: (c[0] != "bench.tasks.residual_digits", -c[2]))
    runs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(combos))), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_combo, plan, t, b, s, home) for t, b, s in combos]
        for (t, b, s), future in zip(combos, futures, strict=True):
            try:
                runs += future.result()
            except Exception as exc:  # a crashed worker is recorded, never hidden
                runs.append(
                    {
                        "task": t,
                        "base": b,
                        "target": s,
                        "method": "(all)",
                        "seed": 0,
                        "source": "prunehub",
                        "status": "failed",
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
            loads.append(loadavg())
    order = {(t, b, s): i for i, (t, b, s) in enumerate(sorted(combos, key=lambda c: (plan.tasks.index(c[0]), c)))}
    runs.sort(key=lambda r: order.get((r["task"], r["base"], r["target"]), 0))
    admm = {"status": "skipped"}  # NNI's ADMM once, to record what its weights look like
    if not quick:
        try:
            admm = run_nni_admm(home)
        except Exception as exc:
            admm = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    return {
        "plan": dataclasses.asdict(plan),
        "parallel_jobs": jobs,
        "runs": runs,
        "summary": summarize(runs),
        "nni_admm": admm,
        "loadavg": loads,
        "wall_s": time.perf_counter() - started,
    }


def _nni_reference(args: list[str], home: str, timeout_s: float) -> dict[str, Any]:
    """``bench/nni_reference.py ARGS`` in NNI's interpreter: its JSON record, or a failed one saying why."""
    if not NNI_PYTHON.exists():
        return {"status": "failed", "error": f"{NNI_PYTHON} does not exist (make bench creates it)"}
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PRUNEHUB_HOME": home, "PYTHONPATH": str(ROOT)}
    command = [str(NNI_PYTHON), str(ROOT / "bench" / "nni_reference.py"), *args]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {
            "status": "failed",
            "error": f"did not finish within the {timeout_s:.0f} s budget given to one NNI run (killed)",
            "wall_s": time.perf_counter() - started,
        }
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {
            "status": "failed",
            "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}",
            "wall_s": time.perf_counter() - started,
        }
    record: dict[str, Any] = json.loads(lines[-1])
    return record


def run_nni_admm(home: str) -> dict[str, Any]:
    """NNI's ADMM once (digits, l1, 50%), to record what its weights look like."""
    out = tempfile.mkdtemp(prefix="nni-admm-")
    return _nni_reference(
        ["--task", "examples.digits", "--algo", "admm", "--sparsity", "0.5", "--out", out], home, timeout_s=600
    )


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (task, base, target, method)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["base"], r["target"], r["method"]), []).append(r)
    out = []
    for (task, base, target, method), rows in groups.items():
        na = [r for r in rows if r.get("status") == "n/a"]
        rows = [r for r in rows if r.get("status") != "n/a"]
        ok = [r for r in rows if r.get("status") == "succeeded"]
        entry: dict[str, Any] = {
            "task": task,
            "base": base,
            "target": target,
            "method": method,
            "runs": len(rows),
            "failed": len(rows) - len(ok),
            "errors": sorted({str(r.get("error"))[:300] for r in rows if r not in ok}),
            "not_applicable": na[0]["error"] if na else None,
        }
        for field in ("score", "flops_ratio", "params_ratio", "conv_masked", "conv_removed", "evals", "wall_s"):
            values = [float(r[field]) for r in ok if r.get(field) is not None]
            entry[field] = spread(values)
        out.append(entry)
    return out


def _print_row(r: dict[str, Any]) -> None:
    if r.get("status") == "n/a":
        print(f"{r['task']:<28} {r['base']:<4} {r['target']:.1f} {r['method']:<13} n/a: {r['error']}", flush=True)
        return
    if r.get("status") != "succeeded":
        print(
            f"{r['task']:<28} {r['base']:<4} {r['target']:.1f} {r['method']:<13} s{r['seed']} FAILED: "
            f"{str(r.get('error'))[:200]}",
            flush=True,
        )
        return
    print(
        f"{r['task']:<28} {r['base']:<4} {r['target']:.1f} {r['method']:<13} s{r['seed']} "
        f"acc {r['score']:.4f} FLOPs {r['flops_ratio']:.3f} params {r['params_ratio']:.3f} "
        f"conv-removed {r['conv_removed']:.3f} evals {r.get('evals')} wall {r.get('wall_s', 0):.1f}s "
        f"total {r.get('total_s', 0):.1f}s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the raw figures here")
    parser.add_argument("--task", nargs="*", default=None, help="restrict to these tasks")
    parser.add_argument("--base", nargs="*", default=None, help="restrict to these base algorithms")
    parser.add_argument("--sparsity", type=float, nargs="*", default=None, help="restrict to these targets")
    parser.add_argument("--only", nargs="*", default=None, help="restrict to these methods (nni-sa, nni-netadapt too)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    tasks = tuple(args.task or plan.tasks)
    plan = dataclasses.replace(
        plan,
        tasks=tasks,
        bases={t: tuple(args.base or plan.bases.get(t, ("l1",))) for t in tasks},
        sparsities=tuple(args.sparsity or plan.sparsities),
        strategies=tuple(m for m in plan.strategies if not args.only or m in args.only),
        nni=tuple(a for a in plan.nni if not args.only or f"nni-{a}" in args.only),
    )
    result = run(quick=args.quick, plan=plan)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(f"(ran in {result['wall_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
