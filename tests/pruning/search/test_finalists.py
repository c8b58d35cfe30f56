"""The finalist round (pruning.search.finalists) on the pure-logic fake executor: who becomes a finalist, what is
chosen, and how it counts against the experiment's limits."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pruning.search import parse_algorithm_config
from pruning.search.base import Job, Result, SearchProblem
from pruning.search.finalists import UNIFORM_FINALIST
from tests.pruning.search.driver import best_distribution, drive
from tests.pruning.search.fakes import FakeExecutor, fake_problem, within_one_channel_of_uniform

BUDGET = {"flops": 0.3}
CONFIG_LIST = [{"op_types": ["Conv2d", "Linear"]}]
SEARCHES = {
    "annealing": {"algorithm": "annealing", "cool_down_rate": 0.7},
    "optuna": {"algorithm": "optuna", "num_trials": 10, "n_startup_trials": 4},
    "sensitivity": {"algorithm": "sensitivity", "refine_candidates": 3},
}


def _config(name: str, finalists: int = 2, **extra: Any) -> dict[str, Any]:
    return {**SEARCHES[name], "config_list": CONFIG_LIST, "budget": BUDGET,
            "candidate_eval": {"finalists": finalists, "finalist_epochs": 1}, **extra}


class Favouring(FakeExecutor):
    """The fake landscape, except that after a fine-tune the finalist ``favoured`` (a job key) recovers best: what
    a candidate's score before fine-tuning cannot tell."""

    def __init__(self, favoured: str) -> None:
        super().__init__()
        self.favoured = favoured

    def __call__(self, problem: SearchProblem, job: Job) -> Result:
        result = super().__call__(problem, job)
        if job.key == self.favoured and result.score is not None:
            return result.model_copy(update={"score": result.score + 1.0})
        return result


def _finalists(run: Any) -> list[Job]:
    return [job for job in run.jobs if job.context.get("phase") == "finalists"]


@pytest.mark.parametrize("name", list(SEARCHES))
def test_uniform_and_the_best_distinct_candidates_are_fine_tuned_once_each(name: str) -> None:
    problem = fake_problem(budget=BUDGET)
    run = drive(_config(name, finalists=2), problem, FakeExecutor())
    finalists = _finalists(run)
    assert finalists[0].key == UNIFORM_FINALIST
    assert 2 <= len(finalists) <= 3  # uniform + up to 2 candidates (a candidate equal to uniform is not repeated)
    assert all(job.kind == "finetune_and_evaluate" and job.finetune_epochs == 1 for job in finalists)
    assert all(job.save_artifact and job.budget_ratio == BUDGET["flops"] for job in finalists)
    # The finalists are the search's best candidates by their (pre-fine-tune) score, best first.
    searched = {job.key: run.results[job.key] for job in run.jobs if job.context.get("phase") != "finalists"}
    ranked = sorted((r for r in searched.values() if r.feasible and r.score is not None),
                    key=lambda r: -float(r.score or 0.0))
    leaders = [job.context["candidate"] for job in finalists[1:]]
    assert leaders and leaders[0] == ranked[0].key
    # Every finalist is feasible and the chosen one is the best of them after its fine-tune.
    scores = {job.key: run.results[job.key].score for job in finalists}
    assert all(run.results[job.key].feasible for job in finalists)
    assert run.state.best_key == max(scores, key=lambda key: scores[key] or 0.0)
    # Progress ends complete, the round included.
    assert run.state.progress is not None and run.state.progress == run.state.progress_total


def test_a_budget_brings_the_round_by_default_and_zero_turns_it_off() -> None:
    problem = fake_problem(budget=BUDGET)
    raw = {**SEARCHES["annealing"], "config_list": CONFIG_LIST, "budget": BUDGET}
    assert parse_algorithm_config(raw).finalist_count == 3
    assert _finalists(drive(raw, problem, FakeExecutor(), check_resume=False))
    off = drive({**raw, "candidate_eval": {"finalists": 0}}, problem, FakeExecutor(), check_resume=False)
    assert not _finalists(off)
    # Without a budget (the config-list-sparsity mode, as NNI users know it) there is no round unless asked.
    plain = {**SEARCHES["annealing"], "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]}
    assert parse_algorithm_config(plain).finalist_count == 0
    # Strategies without a round are not given one by default, and say so when asked for one.
    assert parse_algorithm_config({"algorithm": "netadapt", "config_list": CONFIG_LIST,
                                   "budget": BUDGET}).finalist_count == 0


@pytest.mark.parametrize("name", list(SEARCHES))
def test_uniform_is_handed_out_when_it_recovers_best(name: str) -> None:
    problem = fake_problem(budget=BUDGET)
    plain = drive({k: v for k, v in _config(name).items() if k != "candidate_eval"}, problem, FakeExecutor(),
                  check_resume=False)
    plain_best = best_distribution(plain.state)
    assert plain_best is not None and len({round(v, 6) for v in plain_best.values()}) > 1  # the search's own pick
    run = drive(_config(name), problem, Favouring(UNIFORM_FINALIST), check_resume=False)
    assert run.state.best_key == UNIFORM_FINALIST
    distribution = best_distribution(run.state)
    assert distribution is not None and within_one_channel_of_uniform(distribution, problem.pruning)
    decisions = {r.key: r.decision for r in run.state.finalists.history}  # type: ignore[attr-defined]
    assert decisions[UNIFORM_FINALIST] == "chosen"
    assert sum(d == "chosen" for d in decisions.values()) == 1


def test_a_candidate_that_recovers_best_is_handed_out_with_its_distribution() -> None:
    problem = fake_problem(budget=BUDGET)
    run = drive(_config("annealing"), problem, Favouring("finalist-1"), check_resume=False)
    assert run.state.best_key == "finalist-1"
    chosen = next(job for job in run.jobs if job.key == "finalist-1")
    candidate = run.results[chosen.context["candidate"]]
    assert best_distribution(run.state) == pytest.approx(candidate.extra["distribution"])


def test_max_trials_covers_the_finalists() -> None:
    problem = fake_problem(budget=BUDGET)
    run = drive(_config("annealing", finalists=3, max_trials=8), problem, FakeExecutor(), check_resume=False)
    assert len(run.jobs) <= 8
    assert len(_finalists(run)) >= 2  # the round was reserved its trials, the search had the rest


def test_a_failed_round_keeps_the_search_best() -> None:
    class FailingFinalists(FakeExecutor):
        def __call__(self, problem: SearchProblem, job: Job) -> Result:
            if job.context.get("phase") == "finalists":
                return Result(key=job.key, status="failed", error="boom")
            return super().__call__(problem, job)

    problem = fake_problem(budget=BUDGET)
    run = drive(_config("annealing"), problem, FailingFinalists(), check_resume=False)
    assert run.state.best_key is not None and not run.state.best_key.startswith("finalist")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"algorithm": "netadapt"}, "candidate_eval.finalists"),
        ({"algorithm": "annealing", "score_target_drop": 0.01}, "pattern search"),
        ({"algorithm": "optuna", "objectives": ["score", "flops"]}, "objectives"),
    ],
)
def test_finalists_are_refused_where_they_do_not_apply(raw: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        parse_algorithm_config({**raw, "config_list": CONFIG_LIST, "budget": BUDGET,
                                "candidate_eval": {"finalists": 2}})


def test_the_training_estimate_counts_the_finalists() -> None:
    config = parse_algorithm_config(_config("annealing", finalists=3) | {"candidate_eval": {"finalists": 3,
                                                                                            "finalist_epochs": 2}})
    terms = {term.field: term.epochs for term in config.training_terms()}
    assert terms["candidate_eval.finalist_epochs"] == 8


# The uniform guard: strategies that train while they search hand out uniform-at-budget instead of their best only
# when uniform, fine-tuned briefly, scores better than that trained best.
TRAINING = {
    "netadapt": {"algorithm": "netadapt", "short_term_finetune_epochs": 1},
    "admm": {"algorithm": "admm", "num_iterations": 2, "retrain_epochs": 1},
    "agp": {"algorithm": "agp", "end_step": 3, "frequency": 1},
}


class Penalising(Favouring):
    def __call__(self, problem: SearchProblem, job: Job) -> Result:
        result = FakeExecutor.__call__(self, problem, job)
        if job.key == self.favoured and result.score is not None:
            return result.model_copy(update={"score": result.score - 1.0})
        return result


@pytest.mark.parametrize("name", list(TRAINING))
def test_the_uniform_guard_hands_out_uniform_only_when_it_beats_the_trained_best(name: str) -> None:
    problem = fake_problem(budget=BUDGET)
    unguarded = {**TRAINING[name], "config_list": CONFIG_LIST, "budget": BUDGET}
    assert not parse_algorithm_config(unguarded).uniform_guarded  # off unless asked for
    assert not _finalists(drive(unguarded, problem, FakeExecutor(), check_resume=False))
    raw = {**unguarded, "candidate_eval": {"uniform_guard": True}}
    won = drive(raw, problem, Favouring(UNIFORM_FINALIST))
    (guard,) = _finalists(won)
    assert guard.key == UNIFORM_FINALIST and guard.finetune_epochs == 1 and guard.budget_ratio == BUDGET["flops"]
    assert won.state.best_key == UNIFORM_FINALIST
    lost = drive(raw, problem, Penalising(UNIFORM_FINALIST), check_resume=False)
    searched_best = lost.state.finalists.search_best_key  # type: ignore[attr-defined]
    assert searched_best is not None and lost.state.best_key == searched_best


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"algorithm": "annealing", "budget": BUDGET, "candidate_eval": {"uniform_guard": True}}, "finalists"),
        ({"algorithm": "uniform", "budget": BUDGET, "candidate_eval": {"uniform_guard": True}}, "baseline"),
        ({"algorithm": "admm", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
          "candidate_eval": {"uniform_guard": True}}, "needs a budget"),
    ],
)
def test_the_uniform_guard_is_refused_where_it_does_not_apply(raw: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        parse_algorithm_config({"config_list": CONFIG_LIST, **raw})


def test_the_training_estimate_counts_the_uniform_guard() -> None:
    config = parse_algorithm_config({**TRAINING["admm"], "config_list": CONFIG_LIST, "budget": BUDGET,
                                     "candidate_eval": {"uniform_guard": True}})
    assert {term.field: term.epochs for term in config.training_terms()}["candidate_eval.finalist_epochs"] == 1
