"""Sensitivity analysis: the profile step, the one-threshold allocation, refinement candidates, curve reuse."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pruning.budget import Budget
from pruning.config import PrunableLayer, PruningProblem, PruningUnit, overall_sparsity
from pruning.search import make_strategy
from pruning.search.base import Job, Result, SearchProblem
from pruning.search.configs import SensitivityCurves, parse_algorithm_config
from pruning.search.sensitivity import SensitivitySearch, allocate, blends
from tests.pruning.search.driver import drive
from tests.pruning.search.fakes import FakeExecutor, fake_problem

CONFIG_LIST = [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]
BUDGET_LIST = [{"op_types": ["Conv2d", "Linear"]}]


def two_units(budget: dict[str, float] | None = None, target: float = 0.5, mode: str = "maximize") -> SearchProblem:
    """Two fine-grained units of equal size (so equal sparsity saves equal weights)."""
    layers = [
        PrunableLayer(name=n, op_type="Linear", weight_shape=[10, 100], weight_count=1000, params=1000, flops=1000,
                      unit=n)
        for n in ("a", "b")
    ]
    units = [PruningUnit(name=n, members=[n], weight_count=1000, initial_sparsity=target) for n in ("a", "b")]
    pruning = PruningProblem(base_algo="level", structured=False, layers=layers, units=units, target_sparsity=target,
                             dense_params=2000, dense_flops=2000)
    return SearchProblem(pruning=pruning, optimize_mode=mode,  # type: ignore[arg-type]
                         budget=None if budget is None else Budget.model_validate(budget))


def curves(points: dict[str, list[tuple[float, float, float]]], baseline: float = 1.0) -> SensitivityCurves:
    """Curves from ``{unit: [(sparsity, score, flops ratio), ...]}``."""
    return SensitivityCurves.model_validate(
        {
            "resource": "flops",
            "baseline": baseline,
            "units": [
                {"name": name, "points": [
                    {"sparsity": s, "score": score, "ratio": ratio, "flops_ratio": ratio, "params_ratio": ratio}
                    for s, score, ratio in rows
                ]}
                for name, rows in points.items()
            ],
        }
    )


# Each unit saves half of the model's FLOPs when fully pruned; b's score drops three times as fast as a's.
LEVELS = (0.25, 0.5, 0.75)
ROBUST_AND_FRAGILE = curves(
    {
        "a": [(s, 1.0 - 0.2 * s**2, 1.0 - 0.5 * s) for s in LEVELS],
        "b": [(s, 1.0 - 0.6 * s**2, 1.0 - 0.5 * s) for s in LEVELS],
    }
)


def test_a_unit_that_hurts_more_gets_less_sparsity() -> None:
    allocation = allocate(ROBUST_AND_FRAGILE, two_units({"flops": 0.6}))
    assert allocation.distribution["a"] > allocation.distribution["b"] > 0.0
    # Mirrored curves mirror the allocation: only the sensitivity decides, not the unit's name or order.
    swapped = curves({"a": [(p.sparsity, p.score, p.ratio) for p in ROBUST_AND_FRAGILE.units[1].points],  # type: ignore[misc]
                      "b": [(p.sparsity, p.score, p.ratio) for p in ROBUST_AND_FRAGILE.units[0].points]})  # type: ignore[misc]
    mirrored = allocate(swapped, two_units({"flops": 0.6}))
    assert mirrored.distribution["a"] == pytest.approx(allocation.distribution["b"])
    assert mirrored.distribution["b"] == pytest.approx(allocation.distribution["a"])


@pytest.mark.parametrize("ratio", [0.9, 0.75, 0.6, 0.45])
def test_the_threshold_meets_the_needed_saving_at_the_least_estimated_drop(ratio: float) -> None:
    problem = two_units({"flops": ratio})
    allocation = allocate(ROBUST_AND_FRAGILE, problem)
    assert allocation.needed_saving == pytest.approx(1.0 - ratio)
    assert allocation.estimated_saving == pytest.approx(1.0 - ratio)
    assert allocation.threshold is not None and allocation.threshold > 0
    # The additive estimate of the allocation itself: each unit saves half its sparsity (linear FLOPs here).
    saved = sum(0.5 * s for s in allocation.distribution.values())
    assert saved == pytest.approx(1.0 - ratio)

    # No split of the same saving between the two (piecewise-linear) curves has a smaller estimated drop.
    def drop(unit: int, sparsity: float) -> float:
        xs = [0.0, *LEVELS]
        ys = [0.0] + [1.0 - p.score for p in ROBUST_AND_FRAGILE.units[unit].points]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
            if sparsity <= x1 + 1e-12:
                return y0 + (sparsity - x0) / (x1 - x0) * (y1 - y0)
        raise AssertionError(f"{sparsity} is beyond the curve")

    need = 2.0 * (1.0 - ratio)  # sparsity to share: s_a + s_b
    splits = [i / 1000 * need for i in range(1001)]
    best = min(drop(0, s) + drop(1, need - s) for s in splits if s <= 0.75 and need - s <= 0.75)
    assert allocation.estimated_drop <= best + 1e-9
    assert allocation.estimated_drop == pytest.approx(drop(0, allocation.distribution["a"])
                                                      + drop(1, allocation.distribution["b"]))


def test_without_a_budget_the_allocation_reaches_the_target_sparsity() -> None:
    problem = two_units(target=0.4)
    allocation = allocate(ROBUST_AND_FRAGILE, problem)
    assert allocation.resource == "weights"
    assert overall_sparsity(allocation.distribution, problem.pruning) == pytest.approx(0.4)
    assert allocation.distribution["a"] > allocation.distribution["b"]


def test_minimize_reads_a_rising_loss_as_the_drop() -> None:
    # The same curves as losses (lower is better): the unit whose loss rises faster is the fragile one.
    losses = curves({name: [(p.sparsity, 2.0 - p.score, p.ratio) for p in unit.points]  # type: ignore[misc]
                     for name, unit in zip("ab", ROBUST_AND_FRAGILE.units, strict=True)}, baseline=1.0)
    maximized = allocate(ROBUST_AND_FRAGILE, two_units({"flops": 0.6}))
    minimized = allocate(losses, two_units({"flops": 0.6}, mode="minimize"))
    assert minimized.distribution == pytest.approx(maximized.distribution)


def test_tied_units_share_the_threshold_step() -> None:
    same = curves({name: [(s, 1.0 - 0.3 * s**2, 1.0 - 0.5 * s) for s in LEVELS] for name in "ab"})
    allocation = allocate(same, two_units({"flops": 0.7}))
    assert allocation.distribution["a"] == pytest.approx(allocation.distribution["b"]) == pytest.approx(0.3)


def test_curves_end_at_the_top_level_and_a_need_beyond_takes_every_unit_there() -> None:
    # Profiled at 0.5 only: a barely moved at 0.5, but nothing says how it fares at 0.9, so it stops at 0.5.
    shallow = curves({"a": [(0.5, 0.99, 0.75)], "b": [(0.5, 0.7, 0.75)]})
    reachable = allocate(shallow, two_units({"flops": 0.6}))
    assert reachable.distribution == pytest.approx({"a": 0.5, "b": 0.3})
    beyond = allocate(shallow, two_units({"flops": 0.4}))
    assert beyond.threshold is None and beyond.estimated_saving == pytest.approx(0.5)
    assert beyond.distribution == pytest.approx({"a": 0.5, "b": 0.5})  # the shape; the projection scales it up


def test_a_level_that_did_not_save_anything_is_skipped_and_a_short_estimate_takes_everything() -> None:
    # b's second point saved less than its first (a noisy latency, say): it is never worth taking.
    noisy = curves({"a": [(0.25, 0.9, 0.9), (0.5, 0.8, 0.8)], "b": [(0.25, 0.95, 0.9), (0.5, 0.5, 0.95)]})
    allocation = allocate(noisy, two_units({"flops": 0.1}))
    assert allocation.threshold is None  # the curves cannot reach the need: all in, the projection decides
    assert allocation.estimated_saving < allocation.needed_saving
    assert allocation.distribution == pytest.approx({"a": 0.5, "b": 0.25})


def test_blends_put_the_allocation_first_and_uniform_second() -> None:
    assert blends(0) == [0.0]
    assert blends(1) == [0.0, 1.0]
    assert blends(3) == pytest.approx([0.0, 1.0, 1 / 3, 2 / 3])


def _ask_all(search: SensitivitySearch, problem: SearchProblem) -> tuple[Any, list[Job]]:
    state = search.start(problem)
    return search.ask(state)


def test_the_profile_asks_every_unit_at_every_level_at_once() -> None:
    problem = fake_problem(budget={"flops": 0.35})
    config = parse_algorithm_config({"algorithm": "sensitivity", "config_list": BUDGET_LIST, "budget": {"flops": 0.35},
                                     "levels": [0.25, 0.5], "finetune_epochs": 2})
    _, jobs = _ask_all(make_strategy(config), problem)  # type: ignore[arg-type]
    units = problem.pruning.unit_names()
    assert len(jobs) == 1 + 2 * len(units)
    assert all(job.budget_ratio is None and job.kind == "finetune_and_evaluate" and job.finetune_epochs == 2
               for job in jobs)
    assert set(jobs[0].distribution.values()) == {0.0}  # the baseline
    for job in jobs[1:]:
        pruned = {name for name, value in job.distribution.items() if value > 0}
        assert pruned == {job.context["unit"]}
        # Structured units: the profiled sparsity is a whole number of channels.
        unit = problem.pruning.unit(job.context["unit"])
        assert unit.channels and (job.distribution[unit.name] * unit.channels).is_integer()


def test_reused_curves_ask_no_profiling_job_and_every_candidate_is_projected() -> None:
    problem = fake_problem(budget={"flops": 0.3})
    profiled = drive({"algorithm": "sensitivity", "config_list": BUDGET_LIST, "budget": {"flops": 0.35}},
                     fake_problem(budget={"flops": 0.35}), FakeExecutor())
    stored = profiled.state.curves  # type: ignore[attr-defined]
    assert stored is not None and stored.resource == "flops"
    raw = {"algorithm": "sensitivity", "config_list": BUDGET_LIST, "budget": {"flops": 0.3},
           "curves": stored.model_dump(mode="json"), "refine_candidates": 2}
    executor = FakeExecutor()
    run = drive(raw, problem, executor)
    assert [job.context["stage"] for job in run.jobs] == ["candidate"] * 3
    assert all(job.budget_ratio == 0.3 for job in run.jobs)
    assert all(call.context["stage"] == "candidate" for call in executor.calls)
    state = run.state
    assert state.reused and state.curves == stored  # type: ignore[attr-defined]
    assert state.best_key is not None and run.results[state.best_key].feasible
    # The uniform candidate is among them, so the re-allocation never scores below uniform at this budget.
    uniform = drive({"algorithm": "uniform", "config_list": BUDGET_LIST, "budget": {"flops": 0.3}}, problem,
                    FakeExecutor())
    assert state.best_score is not None and uniform.state.best_score is not None
    assert state.best_score >= uniform.state.best_score


def test_decisions_and_progress_are_recorded() -> None:
    problem = fake_problem(budget={"params": 0.4})
    # The search's own decisions, without the finalist round a budget brings by default (test_finalists covers it).
    run = drive({"algorithm": "sensitivity", "config_list": BUDGET_LIST, "budget": {"params": 0.4},
                 "levels": [0.75], "refine_candidates": 1, "candidate_eval": {"finalists": 0}}, problem,
                FakeExecutor())
    state = run.state
    history = {record.key: record.decision for record in state.history}  # type: ignore[attr-defined]
    assert history["sensitivity-baseline"] == "baseline"
    profiled = [key for key in history if "profile" in key]
    assert profiled and all(history[key] == "profiled" for key in profiled)
    candidates = [key for key in history if "candidate" in key]
    assert len(candidates) == 2 and history[state.best_key] == "chosen"  # type: ignore[index]
    assert state.progress == state.progress_total == len(run.jobs)
    allocation = state.allocation  # type: ignore[attr-defined]
    assert allocation.resource == "params" and allocation.estimated_saving == pytest.approx(0.6)
    assert state.best_distribution == run.results[state.best_key].extra["distribution"]  # type: ignore[attr-defined,index]


def test_a_failed_level_is_left_out_and_a_failed_baseline_stops_the_search() -> None:
    problem = fake_problem()

    def failing(keys: set[str]):  # type: ignore[no-untyped-def]
        executor = FakeExecutor()

        def execute(p: SearchProblem, job: Job) -> Result:
            if job.key in keys:
                return Result(key=job.key, status="failed", error="out of memory")
            return executor(p, job)

        return execute

    config = {"algorithm": "sensitivity", "config_list": CONFIG_LIST}
    run = drive(config, problem, failing({"sensitivity-profile-0-1"}))
    conv1 = run.state.curves.units[0]  # type: ignore[attr-defined]
    assert [p.sparsity for p in conv1.points] == [0.25, 0.75]
    assert run.state.best_key is not None
    run = drive(config, problem, failing({"sensitivity-baseline"}))
    assert run.state.best_key is None and "baseline" in (run.state.stop_reason or "")
    assert all(job.context["stage"] != "candidate" for job in run.jobs)


def test_max_trials_below_the_profile_stops_with_the_reason() -> None:
    search = make_strategy({"algorithm": "sensitivity", "config_list": CONFIG_LIST, "max_trials": 16})
    state, jobs = search.ask(search.start(fake_problem()))
    assert jobs == [] and state.done
    assert "16 profiling jobs" in (state.stop_reason or "")
    # 16 profiling jobs + 1: the allocation alone is evaluated.
    run = drive({"algorithm": "sensitivity", "config_list": CONFIG_LIST, "max_trials": 17}, fake_problem(),
                FakeExecutor())
    assert len(run.jobs) == 17 and run.state.best_key == "sensitivity-candidate-0"


def test_identical_candidates_are_evaluated_once() -> None:
    # Equal units with equal curves: the allocation is uniform, so every blend is the same distribution.
    same = curves({name: [(s, 1.0 - 0.3 * s**2, 1.0 - 0.5 * s) for s in LEVELS] for name in "ab"})
    search = make_strategy({"algorithm": "sensitivity", "config_list": CONFIG_LIST, "refine_candidates": 4,
                            "curves": same.model_dump(mode="json")})
    _, jobs = search.ask(search.start(two_units(target=0.5)))
    assert len(jobs) == 1 and jobs[0].distribution == pytest.approx({"a": 0.5, "b": 0.5})


def test_curves_for_other_units_are_refused_at_start() -> None:
    search = make_strategy({"algorithm": "sensitivity", "config_list": CONFIG_LIST,
                            "curves": ROBUST_AND_FRAGILE.model_dump(mode="json")})
    with pytest.raises(ValueError, match=r"unknown \['a', 'b'\].*missing \['conv1'"):
        search.start(fake_problem())


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("levels", [0.0, 0.5], "levels"),
        ("levels", [0.5, 1.0], "levels"),
        ("levels", [0.5, 0.25], "sorted and unique"),
        ("levels", [0.5, 0.5], "sorted and unique"),
        ("levels", [], "levels"),
        ("refine_candidates", 33, "refine_candidates"),
        ("refine_candidates", -1, "refine_candidates"),
        ("curves", {"resource": "flops", "baseline": 1.0, "units": []}, "units"),
        (
            "curves",
            {"resource": "flops", "baseline": 1.0,
             "units": [{"name": "a", "points": [{"sparsity": 0.5, "score": 1}, {"sparsity": 0.25, "score": 1}]}]},
            "increasing sparsity",
        ),
        ("curves", {"resource": "flops", "baseline": 1.0, "units": [{"name": "a"}, {"name": "a"}]}, "repeated"),
    ],
)
def test_invalid_config_names_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        parse_algorithm_config({"algorithm": "sensitivity", "config_list": CONFIG_LIST, field: value})


def test_curves_must_measure_the_budget() -> None:
    flops_only = ROBUST_AND_FRAGILE.model_dump(mode="json")
    for unit in flops_only["units"]:
        for point in unit["points"]:
            point["params_ratio"] = None
    with pytest.raises(ValidationError, match="budget.params"):
        parse_algorithm_config({"algorithm": "sensitivity", "config_list": BUDGET_LIST, "budget": {"params": 0.5},
                                "curves": flops_only})
    with pytest.raises(ValidationError, match="budget.latency"):
        parse_algorithm_config({"algorithm": "sensitivity", "config_list": BUDGET_LIST, "budget": {"latency": 0.5},
                                "curves": flops_only})
    # A FLOPs budget reads each point's own ratio.
    parse_algorithm_config({"algorithm": "sensitivity", "config_list": BUDGET_LIST, "budget": {"flops": 0.5},
                            "curves": flops_only})
