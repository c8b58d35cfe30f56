"""NetAdapt's control flow: ΔR schedule, halving, a clear failure instead of an endless loop."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pruning.search.configs import parse_algorithm_config
from pruning.search.netadapt import UNIFORM_MOVE
from tests.pruning.search.driver import drive
from tests.pruning.search.fakes import FakeExecutor, fake_problem

CONFIG_LIST = [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]


def netadapt(**extra: object) -> dict[str, object]:
    return {"algorithm": "netadapt", "config_list": CONFIG_LIST, **extra}


def test_reduction_schedule_decays() -> None:
    run = drive(netadapt(uniform_move=True), fake_problem(), FakeExecutor())
    state = run.state
    deltas = {}
    for job in run.jobs:
        if job.kind == "netadapt_candidate":
            deltas[job.context["iteration"]] = job.context["delta_resource"]
    r0 = state.initial_resource  # type: ignore[attr-defined]
    last = max(deltas)
    for iteration, delta in deltas.items():
        scheduled = 0.05 * r0 * 0.96**iteration
        if iteration < last:
            assert delta == pytest.approx(scheduled)
        else:  # the step that crosses the budget asks only for what is left above it
            assert delta <= scheduled + 1e-9
    # One job per unit per iteration and the uniform move, all independent (same parent).
    first = [j for j in run.jobs if j.context.get("iteration") == 0 and j.kind == "netadapt_candidate"]
    units = [j.params["unit"] for j in first]
    assert units == [*fake_problem().pruning.unit_names(), UNIFORM_MOVE]
    assert len({j.parent_artifact for j in first}) == 1
    assert state.progress == pytest.approx(r0 - state.current_resource)  # type: ignore[attr-defined]


def test_halves_the_reduction_then_fails_with_a_reason() -> None:
    executor = FakeExecutor()

    def stubborn(problem, job):  # type: ignore[no-untyped-def]
        if job.kind == "netadapt_candidate" and job.context["iteration"] >= 2:
            return executor(problem, job).model_copy(update={"status": "failed", "error": "cannot reach"})
        return executor(problem, job)

    run = drive(netadapt(max_halvings=3), fake_problem(), stubborn)
    state = run.state
    assert state.done and state.best_key is None
    assert "halvings" in (state.stop_reason or "")
    halvings = sorted({j.context["halving"] for j in run.jobs if j.context.get("iteration") == 2})
    assert halvings == [0, 1, 2, 3]


def test_rejects_fine_grained_base_algorithms() -> None:
    with pytest.raises(ValidationError, match="base_algo"):
        parse_algorithm_config(netadapt(base_algo="level"))


@pytest.mark.parametrize(
    "field,value",
    [("target_resource_ratio", 1.0), ("initial_reduction", 0.0), ("reduction_decay", 1.5), ("max_halvings", -1)],
)
def test_bounds(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        parse_algorithm_config(netadapt(**{field: value}))


def test_the_step_that_crosses_the_budget_aims_at_the_budget() -> None:
    # Steps of 0.3 x R0 from R0 would go 0.7 -> 0.4, past a 0.5 budget: the second step must aim at 0.5 itself.
    run = drive(
        netadapt(target_resource_ratio=0.5, initial_reduction=0.3, reduction_decay=1.0), fake_problem(), FakeExecutor()
    )
    state = run.state
    assert state.done and state.best_key is not None
    r0, budget = state.initial_resource, state.budget  # type: ignore[attr-defined]
    targets = [job.params["target_resource"] for job in run.jobs if job.kind == "netadapt_candidate"]
    assert min(targets) == pytest.approx(budget) and budget == pytest.approx(0.5 * r0)
    # The handed-out model sits just under the budget, not a whole step below it.
    assert 0.45 * r0 < state.current_resource <= budget  # type: ignore[attr-defined]


def test_by_default_each_candidate_prunes_one_unit() -> None:
    run = drive(netadapt(), fake_problem(), FakeExecutor())
    units = {j.params["unit"] for j in run.jobs if j.kind == "netadapt_candidate"}
    assert units and UNIFORM_MOVE not in units and run.state.best_key is not None


def test_the_uniform_move_wins_when_it_scores_best() -> None:
    # An evaluator that rewards flat distributions: the flat step is chosen every iteration, so every unit moves
    # together and the handed-out distribution is flat up to the units' bounds.
    executor = FakeExecutor()

    def flat_is_best(problem, job):  # type: ignore[no-untyped-def]
        result = executor(problem, job)
        if job.kind != "netadapt_candidate" or result.status != "succeeded":
            return result
        spread = max(result.extra["distribution"].values()) - min(result.extra["distribution"].values())
        return result.model_copy(update={"score": 1.0 - spread})

    run = drive(
        netadapt(target_resource_ratio=0.5, initial_reduction=0.1, reduction_decay=1.0, uniform_move=True),
        fake_problem(),
        flat_is_best,
    )
    chosen = [r for r in run.state.history if r.decision == "chosen"]  # type: ignore[attr-defined]
    assert chosen and all(r.context["layer"] == UNIFORM_MOVE for r in chosen)
    distribution = run.state.current_distribution  # type: ignore[attr-defined]
    assert max(distribution.values()) - min(distribution.values()) < 0.1
    assert run.state.current_resource <= run.state.budget  # type: ignore[attr-defined]
