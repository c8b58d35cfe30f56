"""The pure projection onto a budget: one global scale, the least pruning that meets it, floors kept."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pruning.budget import Budget, BudgetUnreachable, project, scaled
from tests.pruning.search.fakes import FakeExecutor, fake_problem


def _ratio(problem):  # type: ignore[no-untyped-def]
    executor = FakeExecutor()
    return lambda distribution: executor.ratio(problem, distribution)


def test_budget_names_exactly_one_fraction() -> None:
    assert Budget(flops=0.25).resource == "flops"
    assert Budget(latency=0.5).ratio == 0.5
    for bad in ({}, {"flops": 0.2, "params": 0.3}, {"flops": 0.0}, {"params": 1.0}, {"energy": 0.5}):
        with pytest.raises(ValidationError):
            Budget.model_validate(bad)
    assert Budget(flops=0.25).met_by(0.259) and not Budget(flops=0.25).met_by(0.261)
    assert not Budget(flops=0.25).met_by(None)


@pytest.mark.parametrize("target", [0.2, 0.35, 0.6])
def test_projection_is_the_least_pruning_of_that_shape_that_meets_the_budget(target: float) -> None:
    problem = fake_problem(budget={"flops": target})
    ratio_of = _ratio(problem)
    shape = {"conv1": 0.1, "conv2": 0.4, "conv3": 0.6, "conv4": 0.8, "fc1": 0.5}
    projection = project(shape, problem.pruning, ratio_of, target)
    assert projection.ratio <= target
    assert ratio_of(projection.distribution) == projection.ratio
    # The proportions are the proposal's (up to clipping at max_sparsity).
    assert projection.distribution == scaled(shape, projection.scale, problem.pruning)
    # A little less pruning of the same shape breaks the budget: no budget is left on the table.
    lighter = scaled(shape, projection.scale * 0.97, problem.pruning)
    assert ratio_of(lighter) > target
    assert projection.predictions <= 25


def test_projection_keeps_the_floor_and_reads_zero_as_uniform() -> None:
    problem = fake_problem(budget={"params": 0.3})
    ratio_of = _ratio(problem)
    floor = {"conv1": 0.0, "conv2": 0.5, "conv3": 0.25, "conv4": 0.0, "fc1": 0.5}
    shape = {"conv1": 0.3, "conv2": 0.7, "conv3": 0.5, "conv4": 0.5, "fc1": 0.7}
    above = project(shape, problem.pruning, ratio_of, 0.3, floor=floor)
    assert all(above.distribution[name] >= value - 1e-12 for name, value in floor.items())
    assert above.ratio <= 0.3
    uniform = project({name: 0.0 for name in floor}, problem.pruning, ratio_of, 0.5)
    assert len({round(v, 9) for v in uniform.distribution.values()}) == 1


def test_an_unreachable_budget_says_what_the_shape_can_reach() -> None:
    problem = fake_problem(budget={"flops": 0.3})
    # Only the cheap classifier may be pruned: FLOPs cannot fall to 0.01 of the dense model.
    shape = {"conv1": 0.0, "conv2": 0.0, "conv3": 0.0, "conv4": 0.0, "fc1": 0.9}
    with pytest.raises(BudgetUnreachable, match="unreachable"):
        project(shape, problem.pruning, _ratio(problem), 0.01)


@pytest.mark.parametrize("target", [0.2, 0.35, 0.6])
def test_fill_spends_the_slack_one_channel_per_unit_at_most(target: float) -> None:
    problem = fake_problem(budget={"flops": target})
    ratio_of = _ratio(problem)
    units = problem.pruning.units
    plain = project({u.name: 1.0 for u in units}, problem.pruning, ratio_of, target)
    filled = project({u.name: 1.0 for u in units}, problem.pruning, ratio_of, target, fill=True)
    assert plain.ratio <= filled.ratio <= target
    counts = {u.name: (u.count(plain.distribution[u.name]), u.count(filled.distribution[u.name])) for u in units}
    assert all(before - 1 <= after <= before for before, after in counts.values())
    # No unit can give one more channel back: the budget has no whole channel of slack left in any of them.
    for unit in units:
        count = unit.count(filled.distribution[unit.name])
        if count > 0:
            lighter = filled.distribution | {unit.name: (count - 1) / unit.channels}
            assert ratio_of(lighter) > target or counts[unit.name][0] - count == 1


def test_fill_closes_a_coarse_networks_gap_to_the_budget() -> None:
    # Eight channels per unit: one global scale moves between counts in steps of an eighth, so the plain
    # projection lands a whole step under the budget; filling takes single channels back where they fit.
    problem = fake_problem(budget={"flops": 0.35})
    coarse = [u.model_copy(update={"channels": 8}) for u in problem.pruning.units]
    pruning = problem.pruning.model_copy(update={"units": coarse})
    problem = problem.model_copy(update={"pruning": pruning})
    ratio_of = _ratio(problem)
    shape = {u.name: 1.0 for u in coarse}
    plain = project(shape, pruning, ratio_of, 0.35)
    filled = project(shape, pruning, ratio_of, 0.35, fill=True)
    assert filled.ratio <= 0.35 and filled.ratio > plain.ratio
    kept = {u.count(filled.distribution[u.name]) for u in coarse}
    assert max(kept) - min(kept) <= 1  # still uniform within one channel


def test_fill_never_goes_below_the_floor() -> None:
    problem = fake_problem(budget={"flops": 0.3})
    ratio_of = _ratio(problem)
    floor = {"conv1": 0.25, "conv2": 0.5, "conv3": 0.25, "conv4": 0.0, "fc1": 0.5}
    above = project({n: 0.6 for n in floor}, problem.pruning, ratio_of, 0.3, floor=floor, fill=True)
    assert above.ratio <= 0.3
    for unit in problem.pruning.units:
        assert unit.count(above.distribution[unit.name]) >= unit.count(floor[unit.name])
