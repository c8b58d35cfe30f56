"""Search quality at a physical budget: every strategy against ``uniform`` at the same measured FLOPs budget.

Settings (task × budget): the digits CNN (``examples.digits``), the residual net (``bench.tasks.residual_digits``)
and the depthwise-separable net (``bench.tasks.depthwise_digits``), each at ``{"flops": 0.25}`` and
``{"flops": 0.5}`` (accuracy, maximised), the residual and depthwise nets also at ``{"flops": 0.1}``; plus one
minimised score: ``bench.tasks.depthwise_digits:loss_task``
(1000 × held-out cross-entropy, ``optimize_mode: "minimize"``) at ``{"flops": 0.35}``. Every config list only
selects layers (convolutions and hidden Linear layers, never the classifier); the budget decides how much goes.

Each run goes through the worker's own code (``pruning.jobs.resolve_problem`` → strategy ``start``/``ask`` →
``pruning.jobs.execute_job`` → ``tell``), candidates scored after BatchNorm recalibration (16 batches). Its best
result is then fine-tuned the same way for every strategy (``FINAL_EPOCHS`` epochs with the task's own
fine-tuner) and evaluated as trained; the FLOPs and params ratios are those of that handed-out, physically shrunk
model. Which weights the final fine-tuning starts from: strategies whose training is the method (netadapt, admm,
autocompress and the schedules agp, iterative, lottery_ticket) continue from their best checkpoint; the others
(uniform, annealing, optuna, sensitivity) start from the task's pretrained model with the best distribution's
masks. Strategies with a random generator of their own (their ``start`` state carries one: annealing, optuna,
autocompress) run ``seeds`` seeds; the others are deterministic given the tasks' seeded trainers and run once.

Two studies beside the table:

- *rank correlation*: ``CORRELATION_SAMPLES`` random distributions projected onto one budget, each scored right
  after pruning with and without BatchNorm recalibration and after one epoch of fine-tuning; Spearman's rho of
  each candidate score against the fine-tuned one (does the candidate score predict the final one?);
- *annealing trace*: per trial of each annealing run, the score, whether it was accepted, and the Metropolis
  probability a worse-or-equal proposal had (from the state's history records).

    python -m bench.budgets [--quick] [--json FILE]    # prints rows as they finish
    python -m bench.run_all --only budgets             # the section, merged into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, loadavg, search_in_process, spread

FINAL_EPOCHS = 2
CALIBRATION_BATCHES = 16
CORRELATION_SAMPLES = 14

# Layers the budget may take from (the classifier stays whole).
CLASSIFIER = {
    "examples.digits": "fc2",
    "bench.tasks.residual_digits": "fc",
    "bench.tasks.depthwise_digits": "fc",
    "bench.tasks.depthwise_digits:loss_task": "fc",
    "bench.tasks.shifted_digits": "fc",
    "bench.tasks.shifted_digits:loss_task": "fc",
    "bench.tasks.narrow_shifted_digits": "fc",
    "bench.tasks.narrow_shifted_digits:loss_task": "fc",
}
TITLES = {
    "examples.digits": "digits CNN",
    "bench.tasks.residual_digits": "residual net",
    "bench.tasks.depthwise_digits": "depthwise net",
    "bench.tasks.depthwise_digits:loss_task": "depthwise net, 1000 × loss",
    "bench.tasks.shifted_digits": "shifted digits",
    "bench.tasks.shifted_digits:loss_task": "shifted digits, 1000 × loss",
    "bench.tasks.narrow_shifted_digits": "narrow net, shifted digits",
    "bench.tasks.narrow_shifted_digits:loss_task": "narrow net, shifted digits, 1000 × loss",
}

# Each strategy's parameters: small enough for the section to run in about 20 minutes on two cores.
STRATEGIES: dict[str, dict[str, Any]] = {
    "uniform": {},
    # Candidates fine-tuned 1 epoch each: at FLOPs x0.25 a recalibrated score barely ranks candidates by how they
    # finish (the rank study below), a one-epoch fine-tune does (docs/benchmarks.md, section 1).
    "annealing": {"cool_down_rate": 0.8, "finetune_epochs": 1},
    "netadapt": {"short_term_finetune_epochs": 1, "initial_reduction": 0.1, "reduction_decay": 1.0},
    # The same with its uniform move among each iteration's candidates (pruning.search.netadapt).
    "netadapt_uniform": {
        "short_term_finetune_epochs": 1,
        "initial_reduction": 0.1,
        "reduction_decay": 1.0,
        "uniform_move": True,
    },
    "admm": {"num_iterations": 3, "rho": 0.05, "retrain_epochs": 1},
    "autocompress": {
        "num_rounds": 2,
        "cool_down_rate": 0.7,
        "admm_iterations": 2,
        "rho": 0.05,
        "final_finetune_epochs": 0,
    },
    "optuna": {"num_trials": 16, "n_startup_trials": 6, "finetune_epochs": 1},
    "agp": {"end_step": 4, "frequency": 1, "finetune_epochs": 1},
    "iterative": {"rounds": 3, "retrain_epochs": 1},
    # Each round trains as long as the task's dense model was trained (the lottery-ticket protocol: every ticket
    # is trained to completion from the rewound weights): ``epochs`` is set per task, see algorithm_config.
    "lottery_ticket": {"prune_iterations": 3},
    "sensitivity": {},  # run only when pruning.search has it
    # The equal-training control: uniform-at-budget fine-tuned as long as one finalist is (see FINALISTS), so a
    # search's gain over it is what its distribution gives, not the epoch of training its finalist round adds.
    "uniform_trained": {"finetune_epochs": FINAL_EPOCHS},
}
# Rows that run another algorithm under their own name.
ALGORITHM_OF = {"uniform_trained": "uniform", "netadapt_uniform": "netadapt"}
# The baselines: never counted as a search that wins.
CONTROLS = {"uniform", "uniform_trained"}
# The distribution-choosing searches end with a finalist round (pruning.search.finalists): their 3 best distinct
# candidates and uniform-at-budget, each fine-tuned as long as the final fine-tune (FINAL_EPOCHS), and the best of
# those is handed out. Why as long as the final fine-tune: chosen after a 1-epoch round, annealing and sensitivity
# handed out candidates on the narrow net's loss setting that ended 25 above uniform_trained after the final 2
# epochs (the budgets run of commit 17fad61): a shorter round ranks the candidates by how fast they recover, not by
# where they end.
FINALISTS = {"finalists": 3, "finalist_epochs": FINAL_EPOCHS}
FINALIST_STRATEGIES = {"annealing", "optuna", "sensitivity"}
# Strategies whose training is the method: the final fine-tuning continues from their best checkpoint.
# The finalist strategies hand out their winning finalist's fine-tuned weights, and the control its trained model.
KEEP_WEIGHTS = {
    "netadapt",
    "netadapt_uniform",
    "admm",
    "autocompress",
    "agp",
    "iterative",
    "lottery_ticket",
    "uniform_trained",
}
KEEP_WEIGHTS |= FINALIST_STRATEGIES


@dataclasses.dataclass(frozen=True)
class Setting:
    task: str
    budget: float
    optimize_mode: str = "maximize"

    @property
    def label(self) -> str:
        return f"{TITLES.get(self.task, self.task)}, FLOPs {self.budget:g}"


@dataclasses.dataclass(frozen=True)
class Plan:
    settings: tuple[Setting, ...]
    strategies: tuple[str, ...]
    seeds: int
    correlation: Setting | None
    correlation_samples: int
    final_epochs: int = FINAL_EPOCHS


FULL = Plan(
    settings=(
        Setting("examples.digits", 0.25),
        Setting("examples.digits", 0.5),
        Setting("bench.tasks.residual_digits", 0.25),
        Setting("bench.tasks.residual_digits", 0.5),
        Setting("bench.tasks.depthwise_digits", 0.25),
        Setting("bench.tasks.depthwise_digits", 0.5),
        Setting("bench.tasks.depthwise_digits:loss_task", 0.35, "minimize"),
        # Where uniform still loses accuracy after the final fine-tune (x0.25 nearly recovers the dense score on
        # the residual net and the digits CNN, so a better distribution has little left to win there).
        Setting("bench.tasks.residual_digits", 0.1),
        Setting("bench.tasks.depthwise_digits", 0.1),
        Setting("bench.tasks.shifted_digits", 0.25),
        Setting("bench.tasks.shifted_digits:loss_task", 0.35, "minimize"),
        # Half the residual net's width on the same data: the pruned net is short of channels at x0.25.
        Setting("bench.tasks.narrow_shifted_digits", 0.25),
        Setting("bench.tasks.narrow_shifted_digits:loss_task", 0.35, "minimize"),
    ),
    strategies=tuple(STRATEGIES),
    seeds=3,
    correlation=Setting("bench.tasks.residual_digits", 0.25),
    correlation_samples=CORRELATION_SAMPLES,
)
QUICK = Plan(
    settings=(Setting("examples.digits", 0.5),),
    strategies=("uniform", "uniform_trained", "annealing", "netadapt", "optuna"),
    seeds=1,
    correlation=Setting("examples.digits", 0.5),
    correlation_samples=6,
)


def available(strategies: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """The plan's strategies that ``pruning.search`` knows, and a note for each one it does not."""
    from pruning.search import ALGORITHMS

    known = tuple(s for s in strategies if ALGORITHM_OF.get(s, s) in ALGORITHMS)
    notes = [f"{s}: not in pruning.search.ALGORITHMS when this ran, skipped" for s in strategies if s not in known]
    return known, notes


def algorithm_config(name: str, setting: Setting, seed: int) -> dict[str, Any]:
    """The experiment config of strategy ``name`` in ``setting`` (what a user would submit)."""
    return {
        "algorithm": ALGORITHM_OF.get(name, name),
        "config_list": [{"op_types": ["Conv2d", "Linear"]}, {"exclude": True, "op_names": [CLASSIFIER[setting.task]]}],
        "base_algo": "l1",
        "budget": {"flops": setting.budget},
        "optimize_mode": setting.optimize_mode,
        "seed": seed,
        "candidate_eval": {
            "bn_recalibration": True,
            "calibration_batches": CALIBRATION_BATCHES,
            **(FINALISTS if name in FINALIST_STRATEGIES else {}),
        },
        **STRATEGIES[name],
        **({"epochs": dense_epochs(setting.task)} if ALGORITHM_OF.get(name, name) == "lottery_ticket" else {}),
    }


def dense_epochs(entrypoint: str) -> int:
    """How many epochs the task's pretrained model was trained (its module's ``EPOCHS``)."""
    import importlib

    return int(importlib.import_module(entrypoint.split(":")[0]).EPOCHS)


def is_stochastic(name: str, setting: Setting) -> bool:
    """Whether the strategy's state carries its own random generator (then seeds change what it proposes)."""
    from pruning.jobs import resolve_problem
    from pruning.search import make_strategy, parse_algorithm_config

    config = parse_algorithm_config(algorithm_config(name, setting, 0))
    return make_strategy(config).start(resolve_problem(_task(setting.task), config)).rng is not None


# ------------------------------------------------------------------------------------------------ one run
_TASKS: dict[str, Any] = {}


def _task(entrypoint: str) -> Any:
    from pruning.task import load_task

    if entrypoint not in _TASKS:
        _TASKS[entrypoint] = load_task(entrypoint)
    return _TASKS[entrypoint]


def _counting(task: Any) -> tuple[Any, dict[str, int]]:
    """``task`` with its evaluator calls and training epochs counted (BatchNorm recalibration runs the trainer with
    an optimizer that never steps: those passes train nothing and are not counted)."""
    from pruning.calibration import _CountingOptimizer

    counts = {"evals": 0, "epochs": 0}

    def evaluator(model: Any) -> float:
        counts["evals"] += 1
        return float(task.evaluator(model))

    def trainer(model: Any, optimizer: Any, criterion: Any, epoch: int, callback: Any = None) -> None:
        if not isinstance(optimizer, _CountingOptimizer):
            counts["epochs"] += 1
        task.trainer(model, optimizer, criterion, epoch, callback=callback)

    def fine_tuner(model: Any, epochs: int = 1) -> None:
        counts["epochs"] += epochs
        task.fine_tuner(model, epochs=epochs)

    replaced: dict[str, Any] = {"evaluator": evaluator, "trainer": trainer if task.trainer else None}
    if task.fine_tuner is not None:
        replaced["fine_tuner"] = fine_tuner
    return dataclasses.replace(task, **replaced), counts


def _trace(state: Any) -> list[dict[str, Any]]:
    """Annealing's per-trial record: score, decision and the probability a worse-or-equal proposal had."""
    run = getattr(state, "run", None)
    history = getattr(run, "history", None) or []
    return [
        {
            "trial": i,
            "iteration": record.context.get("iteration"),
            "temperature": record.context.get("temperature"),
            "score": record.score,
            "budget_ratio": record.resource,
            "decision": record.decision,
            "acceptance_probability": record.acceptance_probability,
        }
        for i, record in enumerate(history)
    ]


def run_one(setting: Setting, name: str, seed: int, final_epochs: int) -> dict[str, Any]:
    """One strategy, one seed, one setting: the search, then the common final fine-tuning and evaluation."""
    from pruning.artifacts import ArtifactStore
    from pruning.jobs import execute_job, resolve_problem
    from pruning.search import parse_algorithm_config
    from pruning.search.base import Job

    row: dict[str, Any] = {
        "task": setting.task,
        "budget": setting.budget,
        "optimize_mode": setting.optimize_mode,
        "method": name,
        "seed": seed,
    }
    store = ArtifactStore(tempfile.mkdtemp(prefix="prunehub-bench-budgets-"))
    started = time.perf_counter()
    try:
        config = parse_algorithm_config(algorithm_config(name, setting, seed))
        task, counts = _counting(_task(setting.task))
        problem = resolve_problem(task, config)
        row["uniform_sparsity"] = problem.pruning.target_sparsity
        t0 = time.perf_counter()
        state, results, jobs = search_in_process(config, task, problem, store)
        row |= {
            "wall_s": time.perf_counter() - t0,
            "evals": counts["evals"],
            "train_epochs": counts["epochs"],
            "trials": len(results),
        }
        row["stop_reason"] = state.stop_reason
        if name == "annealing":
            row["trace"] = _trace(state)
        if state.best_key is None:
            return {**row, "status": "failed", "error": f"no best result ({state.stop_reason})"}
        best, best_job = results[state.best_key], jobs[state.best_key]
        distribution = getattr(state, "best_distribution", None) or best_job.distribution
        if best.extra.get("distribution"):
            distribution = best.extra["distribution"]
        parent = best.artifact if name in KEEP_WEIGHTS else None
        # The final model is scored as trained: recalibration is how candidates are scored, not the handed-out model.
        final_problem = problem.model_copy(update={"bn_recalibration": False})
        final = execute_job(
            task,
            final_problem,
            Job(
                key=f"final-{name}",
                kind="finetune_and_evaluate",
                distribution=distribution,
                parent_artifact=parent,
                finetune_epochs=final_epochs,
            ),
            store,
        )
        if final.status != "succeeded":
            return {**row, "status": "failed", "error": f"final fine-tuning: {final.error}"}
        if name in FINALIST_STRATEGIES:
            # What the distribution alone gives: the same fine-tuning from the pretrained weights with its masks.
            alone = execute_job(
                task,
                final_problem,
                Job(key=f"final-{name}-masks", kind="finetune_and_evaluate", distribution=distribution,
                    finetune_epochs=final_epochs),
                store,
            )
            row["score_from_pretrained"] = alone.score if alone.status == "succeeded" else None
        if getattr(state, "finalists", None) is not None:
            row["finalist"] = state.best_key  # the finalist chosen, or the guarded search's own best
        row |= {
            "status": "succeeded",
            "search_score": best.score,
            "search_flops_ratio": best.flops_ratio,
            "search_feasible": best.feasible,
            "score": final.score,
            "flops_ratio": final.flops_ratio,
            "params_ratio": final.params_ratio,
            "params": final.params,
            "flops": final.flops,
            "feasible": final.feasible,
            "overall_sparsity": final.overall_sparsity,
            "distribution": {k: round(v, 4) for k, v in distribution.items()},
            "from_checkpoint": parent is not None,
        }
        return row
    except Exception as exc:  # a strategy that crashes is a result too
        return {**row, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        row["total_s"] = time.perf_counter() - started
        shutil.rmtree(store.root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ rank study
def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); ``None`` when either side is constant."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else None


def run_correlation(setting: Setting, samples: int, seed: int = 0) -> dict[str, Any]:
    """Random shapes projected onto ``setting``'s budget, each scored three ways (see the module docstring)."""
    from pruning.artifacts import ArtifactStore
    from pruning.jobs import execute_job, resolve_problem
    from pruning.search import parse_algorithm_config
    from pruning.search.base import Job

    started = time.perf_counter()
    task = _task(setting.task)
    config = parse_algorithm_config(algorithm_config("uniform", setting, seed))
    problem = resolve_problem(task, config)
    with_bn = problem.model_copy(update={"bn_recalibration": True})
    without_bn = problem.model_copy(update={"bn_recalibration": False})
    store = ArtifactStore(tempfile.mkdtemp(prefix="prunehub-bench-rank-"))
    rng = random.Random(seed)
    points: list[dict[str, Any]] = []
    try:
        for i in range(samples):
            shape = {u.name: rng.uniform(0.1, 1.0) for u in problem.pruning.units}
            first = execute_job(
                task, with_bn, Job(key=f"rank-{i}-bn", distribution=shape, budget_ratio=setting.budget), store
            )
            if first.status != "succeeded":
                points.append({"sample": i, "status": "failed", "error": first.error})
                continue
            distribution = first.extra.get("distribution") or shape
            raw = execute_job(task, without_bn, Job(key=f"rank-{i}-raw", distribution=distribution), store)
            tuned = execute_job(
                task,
                without_bn,
                Job(key=f"rank-{i}-ft", kind="finetune_and_evaluate", distribution=distribution, finetune_epochs=1),
                store,
            )
            points.append(
                {
                    "sample": i,
                    "status": "succeeded" if raw.status == tuned.status == "succeeded" else "failed",
                    "recalibrated": first.score,
                    "raw": raw.score,
                    "finetuned": tuned.score,
                    "flops_ratio": first.flops_ratio,
                    "distribution": {k: round(v, 4) for k, v in distribution.items()},
                }
            )
    finally:
        shutil.rmtree(store.root, ignore_errors=True)
    ok = [p for p in points if p["status"] == "succeeded"]
    final = [p["finetuned"] for p in ok]
    return {
        "task": setting.task,
        "budget": setting.budget,
        "samples": samples,
        "points": points,
        "spearman_recalibrated": spearman([p["recalibrated"] for p in ok], final) if len(ok) > 2 else None,
        "spearman_raw": spearman([p["raw"] for p in ok], final) if len(ok) > 2 else None,
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------ the section
def _work(kind: str, args: tuple[Any, ...], home: str) -> dict[str, Any]:
    """One unit of work in a pool process (one torch thread: these models are too small for more to help)."""
    import torch

    torch.set_num_threads(1)
    os.environ["PRUNEHUB_HOME"] = home
    if kind == "correlation":
        return run_correlation(*args)
    return run_one(*args)


# Rough cost of one run relative to annealing's, to start the longest first (two workers then finish together).
_COST = {"lottery_ticket": 15, "netadapt": 5, "autocompress": 4, "admm": 3, "agp": 3, "iterative": 3, "optuna": 2}


def run(quick: bool = False, plan: Plan | None = None, jobs: int = 2, home: str | None = None) -> dict[str, Any]:
    """Every (setting, strategy, seed) of the plan and the two studies, ``jobs`` processes at a time."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    plan = plan or (QUICK if quick else FULL)
    home = home or os.environ.get("PRUNEHUB_HOME") or str(ROOT / ".prunehub")
    os.environ["PRUNEHUB_HOME"] = home
    started = time.perf_counter()
    loads = [loadavg()]
    strategies, notes = available(plan.strategies)
    from examples.digits import _data

    dense: dict[str, float] = {}
    for setting in plan.settings:
        task = _task(setting.task)
        dense[setting.task] = task.evaluate(task.model())  # trains and caches each dense model before the pool
    if "lottery_ticket" in strategies:
        modules = dict.fromkeys(s.task.split(":")[0] for s in plan.settings)
        rounds = ", ".join(f"`{t}` {dense_epochs(t)}" for t in modules)
        notes.append(f"lottery_ticket: each round trains as many epochs as the task's dense model did ({rounds})")
    stochastic = {name for name in strategies if plan.settings and is_stochastic(name, plan.settings[0])}
    seeds = {(s, name): plan.seeds if name in stochastic else 1 for s in plan.settings for name in strategies}
    work: list[tuple[str, tuple[Any, ...]]] = [
        ("run", (s, name, seed, plan.final_epochs))
        for s in plan.settings
        for name in strategies
        for seed in range(seeds[(s, name)])
    ]
    work.sort(key=lambda w: -_COST.get(w[1][1], 1) * (2 if "residual" in w[1][0].task else 1))
    if plan.correlation is not None:
        work.insert(0, ("correlation", (plan.correlation, plan.correlation_samples)))
    runs: list[dict[str, Any]] = []
    correlation: dict[str, Any] = {"status": "skipped"}
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=get_context("spawn")) as pool:
        futures = [(kind, args, pool.submit(_work, kind, args, home)) for kind, args in work]
        for kind, args, future in futures:
            try:
                result = future.result()
            except Exception as exc:  # a crashed pool process is recorded, never hidden
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                if kind == "run":
                    setting, name, seed, _ = args
                    result |= {"task": setting.task, "budget": setting.budget, "method": name, "seed": seed}
                    result["optimize_mode"] = setting.optimize_mode
            if kind == "correlation":
                correlation = {"status": result.get("status", "succeeded"), **result}
                print(
                    f"rank correlation ({result.get('task')}, FLOPs {result.get('budget')}): Spearman "
                    f"recalibrated {result.get('spearman_recalibrated')}, raw {result.get('spearman_raw')}",
                    flush=True,
                )
            else:
                runs.append(result)
                _print_row(result)
            loads.append(loadavg())
    order = {(s.task, s.budget): i for i, s in enumerate(plan.settings)}
    runs.sort(key=lambda r: (order.get((r["task"], r["budget"]), 0), strategies.index(r["method"]), r["seed"]))
    summary = summarize(runs)
    return {
        "plan": dataclasses.asdict(plan),
        "strategy_configs": {name: STRATEGIES[name] for name in strategies},
        "finalist_config": dict(FINALISTS),
        "keep_weights": sorted(KEEP_WEIGHTS & set(strategies)),
        "stochastic": sorted(stochastic),  # strategies run with plan.seeds seeds; the others once
        "notes": notes,
        "dense_score": dense,
        "held_out_samples": len(_data()[3]),  # every task's evaluator uses examples.digits' held-out split
        "parallel_jobs": jobs,
        "runs": runs,
        "summary": summary,
        "comparison": compare(summary),
        "correlation": correlation,
        "loadavg": loads,
        "wall_s": time.perf_counter() - started,
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (task, budget, method)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["budget"], r["method"]), []).append(r)
    out = []
    for (task, budget, method), rows in groups.items():
        ok = [r for r in rows if r.get("status") == "succeeded"]
        entry: dict[str, Any] = {
            "task": task,
            "budget": budget,
            "method": method,
            "optimize_mode": rows[0].get("optimize_mode", "maximize"),
            "runs": len(rows),
            "failed": len(rows) - len(ok),
            "errors": sorted({str(r.get("error"))[:300] for r in rows if r not in ok}),
            "feasible": all(r.get("feasible") for r in ok) if ok else None,
            "from_checkpoint": any(r.get("from_checkpoint") for r in ok),
        }
        fields = ("score", "score_from_pretrained", "search_score", "flops_ratio", "params_ratio", "evals",
                  "train_epochs", "wall_s")
        for field in fields:
            entry[field] = spread([float(r[field]) for r in ok if r.get(field) is not None])
        out.append(entry)
    return out


def compare(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: every method's final score minus uniform's, signed so that positive is better, and the
    setting's winner (the best feasible mean). ``clear``: whether the difference exceeds the spread over seeds
    (the larger of the two standard deviations); ``None`` when both sides ran once (deterministic strategies:
    no spread to compare with)."""
    out = []
    for task, budget in dict.fromkeys((s["task"], s["budget"]) for s in summary):
        group = [s for s in summary if (s["task"], s["budget"]) == (task, budget) and s["score"]]
        base = next((s for s in group if s["method"] == "uniform"), None)
        if base is None:
            continue
        trained = next((s for s in group if s["method"] == "uniform_trained"), None)
        sign = 1.0 if base["optimize_mode"] == "maximize" else -1.0
        rows = []
        for s in group:
            delta = sign * (s["score"]["mean"] - base["score"]["mean"])
            alone = s.get("score_from_pretrained") or {}
            noise = max(s["score"]["std"], base["score"]["std"])
            seeded = max(s["score"]["n"], base["score"]["n"]) > 1
            rows.append(
                {
                    "method": s["method"],
                    "gain": delta,
                    "relative_gain": delta / abs(base["score"]["mean"]) if base["score"]["mean"] else None,
                    "clear": abs(delta) > noise if seeded else None,
                    "runs": s["score"]["n"],
                    "feasible": s["feasible"],
                    "flops_ratio": s["flops_ratio"]["mean"],
                    # Against the equal-training control, and what the distribution alone gives (masks on the
                    # pretrained weights, the same final fine-tuning) against uniform.
                    "gain_vs_trained": sign * (s["score"]["mean"] - trained["score"]["mean"]) if trained else None,
                    "gain_from_pretrained": sign * (alone["mean"] - base["score"]["mean"]) if alone else None,
                }
            )
        eligible = [r for r in rows if r["method"] not in CONTROLS and r["feasible"]]
        winner = max(eligible, key=lambda r: r["gain"]) if eligible else None
        out.append(
            {
                "task": task,
                "budget": budget,
                "optimize_mode": base["optimize_mode"],
                "uniform_score": base["score"]["mean"],
                "rows": rows,
                "winner": winner,
            }
        )
    return out


def _print_row(r: dict[str, Any]) -> None:
    title = TITLES.get(r.get("task", ""), r.get("task"))[:26]
    head = f"{title:<26} {r.get('budget', 0):.2f} {r.get('method'):<14} s{r.get('seed')}"
    if r.get("status") != "succeeded":
        print(f"{head} FAILED: {str(r.get('error'))[:240]}", flush=True)
        return
    print(
        f"{head} final {r['score']:.4f} (candidate {r['search_score']:.4f}) FLOPs {r['flops_ratio']:.3f} "
        f"params {r['params_ratio']:.3f} feasible {r['feasible']} evals {r['evals']} epochs {r['train_epochs']} "
        f"search {r['wall_s']:.1f}s "
        f"total {r['total_s']:.1f}s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the raw figures here")
    parser.add_argument("--task", nargs="*", default=None, help="restrict to these tasks")
    parser.add_argument("--budget", type=float, nargs="*", default=None, help="restrict to these FLOPs budgets")
    parser.add_argument("--only", nargs="*", default=None, help="restrict to these strategies (uniform always runs)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--no-studies", action="store_true", help="skip the rank-correlation study")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    settings = tuple(
        s
        for s in plan.settings
        if (not args.task or s.task in args.task) and (not args.budget or s.budget in args.budget)
    )
    plan = dataclasses.replace(
        plan,
        settings=settings,
        strategies=tuple(m for m in plan.strategies if not args.only or m in args.only or m == "uniform"),
        seeds=args.seeds or plan.seeds,
        correlation=None if args.no_studies else plan.correlation,
    )
    result = run(quick=args.quick, plan=plan, jobs=args.jobs)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(f"(ran in {result['wall_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
