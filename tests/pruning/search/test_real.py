"""The contract and the per-strategy properties on a real task: small CNNs trained on scikit-learn's digits."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pruning.config import overall_sparsity
from pruning.search._common import SPARSITY_TOLERANCE, resource_value, rounding_slack
from tests.pruning.search.conftest import real_problem
from tests.pruning.search.digits_task import make_task
from tests.pruning.search.driver import best_distribution, drive

pytestmark = pytest.mark.slow

CONFIG_LIST = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]

# Small budgets: a couple of seconds each on two CPU cores.
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "uniform": {"algorithm": "uniform", "finetune_epochs": 1},
    "annealing": {"algorithm": "annealing", "cool_down_rate": 0.5, "batch_size": 2},
    "netadapt": {
        "algorithm": "netadapt",
        "target_resource_ratio": 0.7,
        "initial_reduction": 0.1,
        "short_term_finetune_epochs": 1,
    },
    "admm": {"algorithm": "admm", "num_iterations": 2, "rho": 0.05, "retrain_epochs": 1},
    "autocompress": {
        "algorithm": "autocompress",
        "num_rounds": 2,
        "cool_down_rate": 0.4,
        "admm_iterations": 1,
        "rho": 0.05,
        "final_finetune_epochs": 1,
    },
    "optuna": {"algorithm": "optuna", "num_trials": 6, "n_startup_trials": 3, "parallelism": 2},
}


def config(name: str, **extra: Any) -> dict[str, Any]:
    return {**REAL_CONFIGS[name], "config_list": CONFIG_LIST, **extra}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_contract_on_real_task(name: str, make_executor) -> None:  # type: ignore[no-untyped-def]
    task = make_task("plain")
    problem = real_problem(task, seed=3)
    run = drive(config(name), problem, make_executor(task))
    state = run.state
    assert state.best_key is not None, state.stop_reason
    best = run.results[state.best_key]
    assert best.status == "succeeded" and best.score == state.best_score and math.isfinite(best.score)
    if name == "netadapt":
        assert resource_value(best, "params") <= state.budget  # type: ignore[attr-defined]
        return
    distribution = best_distribution(state)
    assert distribution is not None
    assert abs(overall_sparsity(distribution, problem.pruning) - 0.5) <= SPARSITY_TOLERANCE
    # What the shrunk model lost, per layer, matches the request to within whole-channel rounding.
    achieved_units = {u.name: best.achieved[u.members[0]] for u in problem.pruning.units}
    slack = rounding_slack(problem.pruning)
    assert abs(overall_sparsity(achieved_units, problem.pruning) - 0.5) <= SPARSITY_TOLERANCE + slack


def test_annealing_decisions_do_not_depend_on_the_score_scale(make_executor) -> None:  # type: ignore[no-untyped-def]
    decisions = []
    for scale in (1.0, 1000.0):
        task = make_task("plain", scale=scale)
        problem = real_problem(task, seed=5)
        run = drive(
            config("annealing", batch_size=1, cool_down_rate=0.7), problem, make_executor(task), check_resume=False
        )
        decisions.append([record.decision for record in run.state.run.history])  # type: ignore[attr-defined]
    assert decisions[0] == decisions[1]


def test_netadapt_measures_reductions_on_a_residual_net(make_executor) -> None:  # type: ignore[no-untyped-def]
    from pruning.jobs import load_checkpoint, measure_model

    task = make_task("residual")
    problem = real_problem(task, seed=1)
    execute = make_executor(task)
    run = drive(
        config("netadapt", target_resource_ratio=0.6, initial_reduction=0.15), problem, execute, check_resume=False
    )
    state = run.state
    assert state.best_key is not None, state.stop_reason
    # The coupled group (stem conv1/bn1 and the block's conv3/bn3, tied by the residual add) is one unit.
    coupled = next(u for u in problem.pruning.units if "conv3" in u.members)
    assert "conv1" in coupled.members
    chosen = [r for r in state.history if r.decision == "chosen"]  # type: ignore[attr-defined]
    assert chosen
    previous = state.initial_resource  # type: ignore[attr-defined]
    for record in chosen:
        # Each iteration's chosen candidate reduced the *measured* params by at least its ΔR.
        assert record.resource is not None
        assert record.resource <= previous - record.context["delta_resource"] + 1e-9
        previous = record.resource
    assert state.current_resource <= state.budget  # type: ignore[attr-defined]
    # Re-measuring the chosen checkpoint's shrunk model gives the recorded resource.
    best = run.results[state.current_key]  # type: ignore[attr-defined]
    model, masks = load_checkpoint(task, execute.store, best.artifact)  # type: ignore[attr-defined]
    metrics, _, _ = measure_model(model, masks, problem, task.dummy_input(), "cpu")
    assert metrics["params"] == best.params
    # Members of one unit lose exactly the same channels.
    assert best.achieved["conv1"] == best.achieved["conv3"]


def test_admm_residual_decreases_and_never_nans(make_executor) -> None:  # type: ignore[no-untyped-def]
    import torch

    task = make_task("plain")
    problem = real_problem(task)
    execute = make_executor(task)
    run = drive(config("admm", num_iterations=4, rho=0.5, rho_multiplier=1.5), problem, execute, check_resume=False)
    state = run.state
    residuals = state.residuals  # type: ignore[attr-defined]
    assert len(residuals) == 4 and all(math.isfinite(r) for r in residuals)
    assert residuals[-1] < residuals[0]
    assert state.best_key is not None and math.isfinite(state.best_score)
    for key in (state.w_artifact, state.z_artifact, state.u_artifact):  # type: ignore[attr-defined]
        tensors, _ = execute.store.get(key)  # type: ignore[attr-defined]
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_admm_first_iteration_is_penalised(make_executor) -> None:  # type: ignore[no-untyped-def]
    # With Z a copy of proj(W) (not an alias of W), a strong rho pulls the pruned weights towards zero from the
    # first iteration: the residual after one iteration is smaller than without the penalty.
    residual = {}
    for rho in (1e-6, 2.0):
        task = make_task("plain")
        run = drive(
            config("admm", num_iterations=1, rho=rho, retrain_epochs=0),
            real_problem(task),
            make_executor(task),
            check_resume=False,
        )
        residual[rho] = run.state.residuals[0]  # type: ignore[attr-defined]
    assert residual[2.0] < 0.8 * residual[1e-6]


def test_autocompress_rounds_compound_to_the_target(make_executor) -> None:  # type: ignore[no-untyped-def]
    task = make_task("plain")
    problem = real_problem(task, seed=2)
    run = drive(
        config("autocompress", num_rounds=3, final_finetune_epochs=0), problem, make_executor(task), check_resume=False
    )
    state = run.state
    rounds = state.rounds  # type: ignore[attr-defined]
    assert len(rounds) == 3
    slack = rounding_slack(problem.pruning)
    per_round = 1 - (1 - 0.5) ** (1 / 3)
    measured_before = 0.0
    for record in rounds:
        expected = 1 - (1 - measured_before) * (1 - per_round) if record.round < 2 else 0.5
        assert record.target == pytest.approx(expected)
        assert record.achieved_sparsity >= record.target - SPARSITY_TOLERANCE - slack
        assert record.search, "every round keeps its search history"
        measured_before = record.achieved_sparsity
    assert rounds[-1].achieved_sparsity >= 0.5 - SPARSITY_TOLERANCE - slack
    # Rounds only ever add pruning.
    for earlier, later in zip(rounds, rounds[1:], strict=False):
        assert all(later.achieved[u] >= earlier.achieved[u] for u in earlier.achieved)
    assert state.best_key in {r.key for r in rounds if r.achieved_sparsity >= 0.5 - SPARSITY_TOLERANCE - slack}
