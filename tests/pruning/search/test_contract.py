"""The shared contract every strategy passes, on the pure-logic fake executor (fast)."""

from __future__ import annotations

from typing import Any

import pytest

from pruning.config import overall_sparsity
from pruning.search import ALGORITHMS, make_strategy
from pruning.search._common import resource_value
from tests.pruning.search.driver import best_distribution, drive
from tests.pruning.search.fakes import FakeExecutor, fake_problem, within_one_channel_of_uniform

CONFIG_LIST = [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]

# Curves as an earlier sensitivity experiment under a latency budget would have stored them (the fake's latency is
# proportional to its FLOPs): conv1 hurts most, fc1 least. Each point also carries its FLOPs and params ratios, so
# the same curves re-allocate for every budget of the budget contract.
_FAKE_CURVES = {
    "resource": "latency",
    "baseline": 1.0,
    "units": [
        {
            "name": name,
            "points": [
                {
                    "sparsity": s,
                    "score": 1.0 - 0.25 * hurt * s**2,
                    "ratio": 1.0 - flops * s,
                    "flops_ratio": 1.0 - flops * s,
                    "params_ratio": 1.0 - params * s,
                }
                for s in (0.25, 0.5, 0.75)
            ],
        }
        for name, hurt, flops, params in (
            ("conv1", 3.0, 0.2, 0.01),
            ("conv2", 1.5, 0.6, 0.09),
            ("conv3", 1.0, 0.3, 0.19),
            ("conv4", 0.6, 0.25, 0.38),
            ("fc1", 0.3, 0.01, 0.33),
        )
    ],
}

CONFIGS: dict[str, dict[str, Any]] = {
    "uniform": {"algorithm": "uniform", "finetune_epochs": 1},
    "annealing": {"algorithm": "annealing"},
    "annealing-batch": {"algorithm": "annealing", "batch_size": 3, "prior": "size"},
    "netadapt": {"algorithm": "netadapt", "target_resource_ratio": 0.5, "finetune_epochs": 1},
    "admm": {"algorithm": "admm", "num_iterations": 3, "retrain_epochs": 1},
    "autocompress": {"algorithm": "autocompress", "num_rounds": 3, "admm_iterations": 2, "cool_down_rate": 0.6},
    "optuna": {"algorithm": "optuna", "num_trials": 14, "parallelism": 2, "n_startup_trials": 4},
    "uniform-global": {"algorithm": "uniform", "ranking": "global"},
    "agp": {"algorithm": "agp", "begin_step": 1, "end_step": 5, "frequency": 2, "initial_sparsity": 0.1},
    "agp-global": {"algorithm": "agp", "end_step": 3, "ranking": "global"},
    "iterative": {"algorithm": "iterative", "rounds": 3, "retrain_epochs": 1},
    "iterative-global": {"algorithm": "iterative", "rounds": 2, "ranking": "global"},
    "lottery_ticket": {"algorithm": "lottery_ticket", "prune_iterations": 3, "epochs": 1},
    "lottery_ticket-rewind": {"algorithm": "lottery_ticket", "prune_iterations": 2, "epochs": 2, "rewind_epoch": 1},
    "sensitivity": {"algorithm": "sensitivity", "refine_candidates": 3},
    "sensitivity-reuse": {"algorithm": "sensitivity", "refine_candidates": 2, "curves": _FAKE_CURVES},
    "optuna-pareto": {
        "algorithm": "optuna",
        "objectives": ["score", "flops"],
        "num_trials": 12,
        "population_size": 4,
    },
    # The finalist round (pruning.search.finalists) after the distribution-choosing searches.
    "annealing-finalists": {"algorithm": "annealing", "candidate_eval": {"finalists": 2, "finalist_epochs": 1}},
    "optuna-finalists": {"algorithm": "optuna", "num_trials": 8, "n_startup_trials": 4,
                         "candidate_eval": {"finalists": 3}},
    "sensitivity-finalists": {"algorithm": "sensitivity", "refine_candidates": 2, "candidate_eval": {"finalists": 2}},
}
FINALIST_CONFIGS = {name for name, raw in CONFIGS.items() if raw.get("candidate_eval", {}).get("finalists")}


def config(name: str, **extra: Any) -> dict[str, Any]:
    return {**CONFIGS[name], "config_list": CONFIG_LIST, **extra}


def test_every_algorithm_is_covered() -> None:
    assert {c["algorithm"] for c in CONFIGS.values()} == set(ALGORITHMS)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["maximize", "minimize"])
def test_contract(name: str, mode: str) -> None:
    problem = fake_problem(target=0.5, optimize_mode=mode)
    run = drive(config(name), problem, FakeExecutor())
    state = run.state
    assert state.done
    assert state.best_key is not None, state.stop_reason
    best = run.results[state.best_key]
    assert best.status == "succeeded" and best.score == state.best_score
    # Every evaluated candidate carries the strategy's context.
    assert all(job.context for job in run.jobs)
    if name == "netadapt":
        budget = state.budget  # type: ignore[attr-defined]
        assert resource_value(best, problem.resource) <= budget
        # The best is never worse than any other feasible result.
        return
    distribution = best_distribution(state)
    assert distribution is not None
    assert abs(overall_sparsity(distribution, problem.pruning) - 0.5) <= 0.005
    for result in run.results.values():
        job = next(j for j in run.jobs if j.key == result.key)
        if result.score is None or job.kind not in ("evaluate", "finetune_and_evaluate"):
            continue
        if name in FINALIST_CONFIGS and job.context.get("phase") != "finalists":
            continue  # the best is the best finalist: candidates were scored before their fine-tune
        if abs(overall_sparsity(job.distribution, problem.pruning) - 0.5) <= 0.005 and name != "autocompress":
            # autocompress' earlier rounds are at lower targets; its best is the best round meeting the target.
            assert not (result.score > state.best_score if mode == "maximize" else result.score < state.best_score)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_same_history(name: str) -> None:
    first = drive(config(name), fake_problem(seed=7), FakeExecutor(), check_resume=False)
    second = drive(config(name), fake_problem(seed=7), FakeExecutor(), check_resume=False)
    assert first.jobs == second.jobs
    assert first.states == second.states


@pytest.mark.parametrize("name", ["annealing", "optuna", "autocompress"])
def test_other_seed_other_history(name: str) -> None:
    first = drive(config(name), fake_problem(seed=1), FakeExecutor(), check_resume=False)
    second = drive(config(name), fake_problem(seed=2), FakeExecutor(), check_resume=False)
    assert [j.distribution for j in first.jobs] != [j.distribution for j in second.jobs]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("limit", [1, 3, 7])
def test_max_trials_is_respected(name: str, limit: int) -> None:
    # Both the config's and the problem's limits count; the tighter one wins.
    run = drive(config(name, max_trials=limit), fake_problem(), FakeExecutor(), check_resume=False)
    assert len(run.jobs) <= limit
    run = drive(config(name), fake_problem(max_trials=limit), FakeExecutor(), check_resume=False)
    assert len(run.jobs) <= limit
    if not run.jobs or run.state.best_key is None:
        assert run.state.stop_reason


@pytest.mark.parametrize(
    "name",
    ["annealing", "admm", "autocompress", "optuna", "uniform", "agp", "iterative", "lottery_ticket", "sensitivity"],
)
def test_fine_grained(name: str) -> None:
    problem = fake_problem(structured=False)
    run = drive(config(name, base_algo="level"), problem, FakeExecutor())
    distribution = best_distribution(run.state)
    assert distribution is not None
    assert abs(overall_sparsity(distribution, problem.pruning) - 0.5) <= 0.005


@pytest.mark.parametrize("resource", ["params", "flops", "latency"])
def test_netadapt_meets_each_resource_budget(resource: str) -> None:
    problem = fake_problem(resource=resource)
    run = drive(config("netadapt", resource=resource), problem, FakeExecutor())
    state = run.state
    assert state.best_key is not None, state.stop_reason
    assert resource_value(run.results[state.best_key], resource) <= state.budget  # type: ignore[attr-defined]


def test_make_strategy_accepts_dicts_and_models() -> None:
    from pruning.search.configs import parse_algorithm_config

    for name in CONFIGS:
        raw = config(name)
        assert type(make_strategy(raw)) is type(make_strategy(parse_algorithm_config(raw)))


# Budgets: config-list entries only select layers; every strategy's candidates are projected onto the budget.
BUDGET_CONFIG_LIST = [{"op_types": ["Conv2d", "Linear"]}]
# Strategies whose every trial is a candidate at the final budget (the others step towards it: schedules, NetAdapt
# iterations, AutoCompress rounds at compounding intermediate budgets).
EVERY_TRIAL_AT_BUDGET = {"uniform", "annealing", "annealing-batch", "optuna", "optuna-pareto", "admm",
                         "annealing-finalists", "optuna-finalists"}


@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in ("uniform-global", "agp-global", "iterative-global")])
@pytest.mark.parametrize("budget", [{"flops": 0.3}, {"params": 0.4}, {"latency": 0.5}])
def test_budget_contract(name: str, budget: dict[str, float]) -> None:
    raw = {**CONFIGS[name], "config_list": BUDGET_CONFIG_LIST, "budget": budget}
    if name == "netadapt":
        raw.pop("target_resource_ratio")
    problem = fake_problem(budget=budget, optimize_mode="maximize")
    assert problem.budget is not None
    run = drive(raw, problem, FakeExecutor())
    state = run.state
    assert state.done and state.best_key is not None, state.stop_reason
    best = run.results[state.best_key]
    (ratio,) = budget.values()
    assert best.budget_ratio is not None and best.budget_ratio <= ratio + 0.01
    assert best.feasible
    for job in run.jobs:
        result = run.results[job.key]
        if job.budget_ratio is not None and result.status == "succeeded":
            # Projection makes every projected trial feasible for the budget it was projected onto.
            assert result.budget_ratio is not None and result.budget_ratio <= job.budget_ratio + 1e-9, job.key
        if name in EVERY_TRIAL_AT_BUDGET:
            assert job.budget_ratio == ratio or name == "netadapt", job.key
            assert result.feasible, job.key
    # The best distribution a strategy reports is what was evaluated (the projected one), not the raw proposal.
    distribution = best_distribution(state)
    assert distribution is not None
    assert FakeExecutor().ratio(problem, distribution) <= ratio + 0.01


def test_uniform_at_budget_is_the_single_uniform_sparsity_that_meets_it() -> None:
    problem = fake_problem(budget={"flops": 0.3})
    run = drive({**CONFIGS["uniform"], "config_list": BUDGET_CONFIG_LIST, "budget": {"flops": 0.3}}, problem,
                FakeExecutor())
    distribution = best_distribution(run.state)
    assert distribution is not None
    # One sparsity for every unit, each rounded to its channels, and where that leaves room one channel back.
    assert within_one_channel_of_uniform(distribution, problem.pruning)
    assert FakeExecutor().ratio(problem, distribution) <= 0.3
    # One step less pruning everywhere would break the budget: the baseline is the least pruning that meets it.
    lighter = {name: value - 0.02 for name, value in distribution.items()}
    assert FakeExecutor().ratio(problem, lighter) > 0.3


@pytest.mark.parametrize("name", ["annealing", "optuna"])
def test_budget_search_beats_or_matches_uniform_on_the_fake_landscape(name: str) -> None:
    budget = {"flops": 0.3}
    problem = fake_problem(budget=budget)
    uniform = drive({**CONFIGS["uniform"], "config_list": BUDGET_CONFIG_LIST, "budget": budget}, problem,
                    FakeExecutor(), check_resume=False)
    search = drive({**CONFIGS[name], "config_list": BUDGET_CONFIG_LIST, "budget": budget}, problem, FakeExecutor(),
                   check_resume=False)
    assert search.state.best_score is not None and uniform.state.best_score is not None
    # The uniform start is among annealing's candidates; the landscape's sensitive first layers reward a non-uniform
    # split, which a working search finds.
    assert search.state.best_score > uniform.state.best_score
