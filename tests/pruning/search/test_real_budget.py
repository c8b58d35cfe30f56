"""Budgets on a real task: the digits CNNs, projected with the shrink predictor and measured on the shrunk model."""

from __future__ import annotations

from typing import Any

import pytest

from pruning.jobs import resolve_problem
from pruning.search.configs import parse_algorithm_config
from tests.pruning.search.digits_task import make_task
from tests.pruning.search.driver import best_distribution, drive
from tests.pruning.search.fakes import within_one_channel_of_uniform

pytestmark = pytest.mark.slow

SELECT = [{"op_types": ["Conv2d"]}]


def _config(algorithm: str, budget: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {"algorithm": algorithm, "config_list": SELECT, "budget": budget, **extra}


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_uniform_at_a_flops_budget_meets_it_after_shrinking(kind: str, make_executor) -> None:  # type: ignore[no-untyped-def]
    task = make_task(kind)
    raw = _config("uniform", {"flops": 0.4})
    problem = resolve_problem(task, parse_algorithm_config(raw))
    assert problem.bn_recalibration  # the model has BatchNorm: on by default
    # Every unit starts at the one uniform sparsity that meets the budget.
    start = {u.name: u.initial_sparsity for u in problem.pruning.units}
    assert within_one_channel_of_uniform(start, problem.pruning)
    assert 0 < problem.pruning.target_sparsity < 0.95
    run = drive(raw, problem, make_executor(task))
    best = run.results[run.state.best_key]  # type: ignore[index]
    assert best.flops_ratio is not None and best.flops_ratio <= 0.4
    assert best.budget_ratio == best.flops_ratio and best.feasible
    assert best.evaluation["bn_recalibration"] and best.evaluation["calibration_batches"] == 16
    assert best_distribution(run.state) == best.extra["distribution"]


def test_annealing_candidates_all_meet_the_budget_and_the_best_is_no_worse_than_uniform(make_executor) -> None:  # type: ignore[no-untyped-def]
    task = make_task("residual")
    budget = {"flops": 0.35}
    raw = _config("annealing", budget, cool_down_rate=0.6, seed=1)
    problem = resolve_problem(task, parse_algorithm_config(raw))
    run = drive(raw, problem, make_executor(task), check_resume=False)
    results = list(run.results.values())
    assert len(results) >= 4
    assert all(r.status == "succeeded" and r.feasible and r.flops_ratio <= 0.35 for r in results)  # type: ignore[operator]
    # The chain starts at uniform-at-budget, so its best candidate can only match or beat it.
    start = run.results["annealing-0"]
    assert run.state.best_score is not None and run.state.best_score >= start.score  # type: ignore[operator]
    decisions = {r.decision for r in run.state.run.history}  # type: ignore[attr-defined]
    assert decisions <= {"accepted", "rejected"} and "accepted" in decisions


def test_params_budget_with_global_ranking_projects_the_threshold(make_executor) -> None:  # type: ignore[no-untyped-def]
    task = make_task("plain")
    raw = _config("uniform", {"params": 0.5}, ranking="global")
    problem = resolve_problem(task, parse_algorithm_config(raw))
    run = drive(raw, problem, make_executor(task))
    best = run.results[run.state.best_key]  # type: ignore[index]
    assert best.params_ratio is not None and best.params_ratio <= 0.5 and best.feasible
    # The split emerged from the weights: not every unit at the same sparsity.
    assert len({round(v, 6) for v in best.extra["distribution"].values()}) > 1


def test_latency_budget_is_measured_on_the_device_with_its_spread(make_executor) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import torch

    # A batch of 256 makes the convolutions, not Python overhead, the latency: pruning can then buy it down.
    task = dataclasses.replace(make_task("plain"), dummy_input=lambda: torch.zeros(256, 1, 8, 8))
    raw = _config("uniform", {"latency": 0.8})
    problem = resolve_problem(task, parse_algorithm_config(raw))
    assert problem.dense_latency_ms is not None and problem.dense_latency_ms > 0
    assert problem.dense_latency_spread_ms is not None and problem.dense_latency_spread_ms >= 0
    run = drive(raw, problem, make_executor(task), check_resume=False)
    best = run.results[run.state.best_key]  # type: ignore[index]
    # Timing is noisy on a shared machine: the ratio is recorded with its spread, the decision is the measurement's.
    assert best.latency_ms is not None
    assert best.budget_ratio == pytest.approx(best.latency_ms / problem.dense_latency_ms)
    assert best.extra["latency_spread_ms"] >= 0
    assert best.feasible == (best.budget_ratio <= 0.8 + 0.01)
