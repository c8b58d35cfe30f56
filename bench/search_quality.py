"""Search quality: every strategy against ``uniform`` on the digits task at 50% and 70% filter sparsity.

Each search runs to completion through the same executor the worker uses; then its best result gets the same
fine-tuning as uniform's (``--final-epochs`` from its best checkpoint, or from the task's model with its best
distribution when the search kept no weights), and the fine-tuned model is evaluated. Printed side by side:
held-out accuracy, overall sparsity (achieved, weighted by weight count), FLOPs and params ratios of the shrunk
model, evaluator calls during the search, and wall time. NetAdapt budgets params, so it gets uniform's
measured params ratio as its target. The pruning schedules (``agp``, ``iterative``, ``lottery_ticket``) and
``uniform-global`` (uniform's overall sparsity, one threshold across layers) are rows of the same table.
Not a test: ``python -m bench.search_quality``.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from typing import Any

from bench.common import search_in_process
from pruning.artifacts import ArtifactStore
from pruning.config import overall_sparsity, resolve_config_list
from pruning.jobs import execute_job
from pruning.search.base import Job, Result, SearchProblem
from pruning.task import Task, load_task

STRATEGIES: dict[str, dict[str, Any]] = {
    "uniform": {"algorithm": "uniform"},
    # one threshold across all selected layers at uniform's overall sparsity: the cheap baseline beside it
    "uniform-global": {"algorithm": "uniform", "ranking": "global"},
    "annealing": {"algorithm": "annealing"},
    "netadapt": {"algorithm": "netadapt", "short_term_finetune_epochs": 1},
    "admm": {"algorithm": "admm", "num_iterations": 3, "rho": 0.05, "retrain_epochs": 1},
    "autocompress": {
        "algorithm": "autocompress",
        "num_rounds": 2,
        "cool_down_rate": 0.6,
        "admm_iterations": 2,
        "rho": 0.05,
        "final_finetune_epochs": 0,
    },
    "optuna": {"algorithm": "optuna", "num_trials": 20, "n_startup_trials": 8},
    # pruning schedules: one job per pruning step or round (lottery tickets train from examples.digits' init_model)
    "agp": {"algorithm": "agp", "end_step": 4, "frequency": 1, "finetune_epochs": 1},
    "iterative": {"algorithm": "iterative", "rounds": 3, "retrain_epochs": 1},
    "lottery_ticket": {"algorithm": "lottery_ticket", "prune_iterations": 3, "epochs": 6},
}


def counting(task: Task) -> tuple[Task, list[int]]:
    calls = [0]

    def evaluator(model: Any) -> float:
        calls[0] += 1
        return task.evaluator(model)

    return dataclasses.replace(task, evaluator=evaluator), calls


def executor(task: Task, problem: SearchProblem, store: ArtifactStore):  # type: ignore[no-untyped-def]
    def execute(job: Job) -> Result:
        return execute_job(task, problem, job, store, "cpu")

    return execute


def search(config: dict[str, Any], task: Task, problem: SearchProblem, store: ArtifactStore):  # type: ignore[no-untyped-def]
    return search_in_process(config, task, problem, store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--final-epochs", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    base_task = load_task("examples.digits")
    base_task.model()  # trains and caches the dense model once, outside the timings
    rows = []
    store = ArtifactStore(tempfile.mkdtemp(prefix="prunehub-bench-"))
    for sparsity in args.sparsity:
        config_list = [{"sparsity": sparsity, "op_types": ["Conv2d"]}]
        pruning = resolve_config_list(base_task.model(), config_list, "l1", base_task.dummy_input())
        problem = SearchProblem(pruning=pruning, seed=0)
        uniform_params_ratio: float | None = None
        for name, config in STRATEGIES.items():
            if args.only and name not in args.only and name != "uniform":
                continue
            config = {**config, "config_list": config_list, "base_algo": "l1"}
            if name == "netadapt":
                config["target_resource_ratio"] = uniform_params_ratio
            task, calls = counting(base_task)
            started = time.perf_counter()
            state, results, jobs = search(config, task, problem, store)
            wall = time.perf_counter() - started
            search_calls = calls[0]
            if state.best_key is None:
                rows.append((sparsity, name, None, None, None, None, search_calls, wall, state.stop_reason))
                continue
            best, best_job = results[state.best_key], jobs[state.best_key]
            distribution = getattr(state, "best_distribution", None) or best_job.distribution
            if best.extra.get("distribution"):
                distribution = best.extra["distribution"]
            final = executor(task, problem, store)(
                Job(
                    key=f"final-{name}-{sparsity}",
                    kind="finetune_and_evaluate",
                    distribution=distribution,
                    parent_artifact=best.artifact,
                    finetune_epochs=args.final_epochs,
                )
            )
            achieved = {u.name: final.achieved.get(u.members[0], 0.0) for u in pruning.units}
            if name == "uniform":
                uniform_params_ratio = final.params_ratio
            rows.append(
                (
                    sparsity,
                    name,
                    final.score,
                    overall_sparsity(achieved, pruning),
                    final.flops_ratio,
                    final.params_ratio,
                    search_calls,
                    wall,
                    state.stop_reason,
                )
            )
    header = (
        f"{'target':>6} {'algorithm':<15} {'accuracy':>8} {'sparsity':>8} {'FLOPs':>6} {'params':>6} "
        f"{'evals':>5} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for target, name, score, sparsity, flops, params, evals, wall, reason in rows:
        if score is None:
            print(f"{target:>6.2f} {name:<15} failed: {reason}")
            continue
        print(
            f"{target:>6.2f} {name:<15} {score:>8.4f} {sparsity:>8.4f} {flops:>6.3f} {params:>6.3f} "
            f"{evals:>5d} {wall:>7.1f}"
        )


if __name__ == "__main__":
    main()
