"""Pattern mode of annealing and optuna: which N:M layers get the pattern, under a score target (in-process)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from pruning.nm import satisfies_pattern
from pruning.search.configs import parse_algorithm_config
from pruning.task import Task
from tests.pruning.models import ThreeLinear, model_factory

SEARCHES = [
    {"algorithm": "annealing", "cool_down_rate": 0.8, "stop_temperature": 30},
    {"algorithm": "optuna", "num_trials": 7, "n_startup_trials": 3},
]


def _task() -> Task:
    torch.manual_seed(0)
    state = ThreeLinear().state_dict()

    model = model_factory(ThreeLinear, state)

    inputs = [torch.randn(8, 16) for _ in range(2)]
    x_eval = torch.randn(32, 16)
    reference = model()(x_eval).detach()
    # The dense model scores exactly 0 and every pruned one below it.
    return Task(
        entrypoint="tests.pattern_search",
        model=model,
        evaluator=lambda net: float(-(net(x_eval) - reference).pow(2).mean().detach()),
        dummy_input=lambda: inputs[0],
        calibration_data=lambda: iter(inputs),
    )


def _run(tmp_path: Any, search: dict[str, Any], drop: float) -> tuple[Any, Any, Any, dict[str, Any]]:
    from pruning.artifacts import ArtifactStore
    from pruning.jobs import execute_job, resolve_problem
    from pruning.search import make_strategy, state_type

    task = _task()
    config = parse_algorithm_config(
        {
            **search,
            "base_algo": "wanda",
            "score_target_drop": drop,
            "config_list": [{"pattern": "2:4", "op_types": ["Linear"]}],
        }
    )
    problem = resolve_problem(task, config)
    strategy = make_strategy(config)
    state, jobs = strategy.ask(strategy.start(problem))
    assert [job.distribution for job in jobs] == [{"a": 0.0, "b": 0.0, "c": 0.0}]  # the dense reference first
    store = ArtifactStore(tmp_path)
    results: dict[str, Any] = {}
    while jobs:
        told = [execute_job(task, problem, job, store) for job in jobs]
        results.update({result.key: result for result in told})
        state = strategy.tell(state, told)
        # The runner persists the state after every tell; a reloaded state must continue the same way.
        state = state_type(config.algorithm).model_validate_json(state.model_dump_json())
        state, jobs = strategy.ask(state)
    assert state.done
    return task, problem, state, results


def _progress(state: Any) -> Any:
    # Annealing keeps the progress inside its chain; optuna keeps it directly.
    return getattr(state.pattern, "progress", state.pattern)


@pytest.mark.parametrize("search", SEARCHES, ids=["annealing", "optuna"])
def test_pattern_search_patterns_layers_within_the_score_target(tmp_path, search) -> None:  # type: ignore[no-untyped-def]
    from pruning.pruner import compute_masks

    # On this task patterning one layer costs 0.0012-0.0020 of the score and all three 0.0031, so with this
    # drop some sets meet the target and some do not.
    task, problem, state, results = _run(tmp_path, search, drop=0.0024)
    progress = _progress(state)
    assert progress.dense_score == 0.0 and progress.target == pytest.approx(-0.0024)
    assert state.best_key is not None and state.best_score >= progress.target
    best = state.best_distribution
    patterned = [name for name, value in best.items() if value > 0]
    assert patterned and all(best[name] == 0.5 for name in patterned)
    # Every feasible evaluated candidate removes no more weights than the best.
    weights = {unit.name: unit.weight_count for unit in problem.pruning.units}
    best_removed = sum(weights[n] // 2 for n in patterned)
    assert "infeasible" in {record.decision for record in progress.history}
    for record in progress.history:
        if record.decision == "infeasible":
            assert record.score < progress.target
        elif record.score is not None:
            assert record.context["removed_weights"] <= best_removed
    model = task.model()
    masks = compute_masks(model, problem.pruning, best, task=task)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight.detach() * mask
        if name in patterned:
            assert satisfies_pattern(weight, (2, 4)) and int((mask == 0).sum()) == weight.numel() // 2
        else:
            assert bool(mask.all())
    assert results[state.best_key].achieved == pytest.approx(best)


@pytest.mark.parametrize("search", SEARCHES, ids=["annealing", "optuna"])
def test_a_target_only_dense_meets_ends_dense(tmp_path, search) -> None:  # type: ignore[no-untyped-def]
    _, _, state, _ = _run(tmp_path, search, drop=0.0)
    assert state.best_distribution == {"a": 0.0, "b": 0.0, "c": 0.0} and state.best_score == 0.0
    decisions = [record.decision for record in _progress(state).history]
    assert decisions[0] == "feasible" and len(decisions) > 1 and set(decisions[1:]) == {"infeasible"}


def test_pattern_search_validation_names_the_field() -> None:
    entry = [{"pattern": "2:4", "op_types": ["Linear"]}]
    plain = {"sparsity": 0.5, "op_types": ["Linear"]}
    base = {"algorithm": "annealing", "base_algo": "wanda", "config_list": entry}
    cases = [
        ({}, r"score_target_drop: config_list\[0\] has a pattern"),
        ({"score_target_drop": -0.1}, "score_target_drop"),
        ({"score_target_drop": 0.1, "config_list": [plain]}, "score_target_drop: applies"),
        ({"score_target_drop": 0.1, "config_list": [*entry, plain]}, r"config_list\[1\]: a pattern search"),
        ({"score_target_drop": 0.1, "prior": "size"}, "prior: a pattern search"),
        ({"score_target_drop": 0.1, "budget": {"params": 0.5}}, r"config_list\[0\]\.pattern: .*budget"),
        ({"score_target_drop": 0.1, "base_algo": "l1"}, r"config_list\[0\]\.pattern: .*removes whole channels"),
        ({"algorithm": "optuna", "score_target_drop": 0.1, "objectives": ["score", "params"]}, "objectives: a pattern"),
        ({"algorithm": "admm", "score_target_drop": 0.1}, "score_target_drop"),
        ({"algorithm": "agp", "base_algo": "level"}, r"config_list\[0\]\.pattern: N:M entries are evaluated by"),
    ]
    for change, why in cases:
        with pytest.raises(ValidationError, match=why):
            parse_algorithm_config({**base, **change})
    for algorithm in ("annealing", "optuna"):
        parse_algorithm_config({**base, "algorithm": algorithm, "score_target_drop": 0.1})
