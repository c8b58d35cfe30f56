"""Simulated annealing: normalised acceptance, cooling, perturbation, priors (pure logic, fake executor)."""

from __future__ import annotations

import math

import pytest

from pruning.search.annealing import AnnealingSearch
from pruning.search.configs import AnnealingConfig
from tests.pruning.search.driver import drive
from tests.pruning.search.fakes import FakeExecutor, fake_problem

CONFIG_LIST = [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]


def annealing(**extra: object) -> dict[str, object]:
    return {"algorithm": "annealing", "config_list": CONFIG_LIST, **extra}


def decisions(run) -> list[str]:  # type: ignore[no-untyped-def]
    return [record.decision for record in run.state.run.history]


@pytest.mark.parametrize("mode", ["maximize", "minimize"])
def test_acceptance_does_not_depend_on_the_score_scale(mode: str) -> None:
    # Accuracy in [0, 1], in %, and a loss in the thousands with an offset: the same accept/reject sequence.
    runs = [
        drive(
            annealing(),
            fake_problem(seed=4, optimize_mode=mode),
            FakeExecutor(scale=scale, offset=offset),
            check_resume=False,
        )
        for scale, offset in ((1.0, 0.0), (100.0, 0.0), (1000.0, 5000.0))
    ]
    assert decisions(runs[0]) == decisions(runs[1]) == decisions(runs[2])
    assert "accepted" in decisions(runs[0])[1:] and "rejected" in decisions(runs[0])


def test_cools_on_every_proposal_and_stops_at_the_stop_temperature() -> None:
    run = drive(annealing(), fake_problem(), FakeExecutor())
    temperatures = [job.context["temperature"] for job in run.jobs]
    # NNI's defaults: 100 -> 20 at 0.9 per proposal: the start point plus 16 proposals.
    steps = math.ceil(math.log(20 / 100) / math.log(0.9))
    assert len(run.jobs) == 1 + steps
    assert temperatures[1:] == pytest.approx([100 * 0.9**i for i in range(steps)])
    assert run.state.stop_reason and "stop_temperature" in run.state.stop_reason


def test_batch_proposals_are_considered_in_order() -> None:
    run = drive(annealing(batch_size=4), fake_problem(), FakeExecutor())
    history = run.state.run.history  # type: ignore[attr-defined]
    assert [r.key for r in history] == [j.key for j in run.jobs]
    assert len(run.jobs) == 17  # the same number of proposals, evaluated four at a time


def test_perturbation_shrinks_with_the_temperature() -> None:
    config = AnnealingConfig(algorithm="annealing", config_list=CONFIG_LIST, stop_temperature=1.0, cool_down_rate=0.7)
    search = AnnealingSearch(config)
    problem = fake_problem()
    state = search.start(problem)
    executor = FakeExecutor()
    moves = []
    while True:
        state, jobs = search.ask(state)
        if not jobs:
            break
        start = state.run.current  # type: ignore[attr-defined]
        moves.extend(max(abs(job.distribution[k] - start[k]) for k in start) for job in jobs)
        state = search.tell(state, [executor(problem, job) for job in jobs])
    assert max(moves[-3:]) < max(moves[1:4])


def test_size_prior_prunes_bigger_units_more() -> None:
    state = AnnealingSearch(AnnealingConfig(algorithm="annealing", config_list=CONFIG_LIST, prior="size")).start(
        fake_problem()
    )
    units = sorted(state.problem.pruning.units, key=lambda u: u.weight_count)
    values = [state.run.current[u.name] for u in units]
    assert values == sorted(values) and values[0] < values[-1]


def test_failed_evaluations_are_rejected_without_breaking_the_chain() -> None:
    executor = FakeExecutor()

    def flaky(problem, job):  # type: ignore[no-untyped-def]
        result = executor(problem, job)
        if job.key.endswith(("-2", "-5")):
            return result.model_copy(update={"status": "failed", "score": None, "error": "boom"})
        return result

    run = drive(annealing(), fake_problem(), flaky)
    assert decisions(run)[2] == "failed" and decisions(run)[5] == "failed"
    assert run.state.best_key is not None
