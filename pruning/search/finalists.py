"""Finalists: the search's best few candidates and uniform-at-budget, fine-tuned briefly, and the best of those wins.

A candidate's score right after pruning (even after BatchNorm recalibration) says how much of the dense function
survived, not how much the pruned net can learn back. At aggressive budgets the two part ways: a distribution
that keeps more of the function by starving one layer scores higher as a candidate and finishes lower after
fine-tuning than a flatter one. NetAdapt's short-term fine-tune and EagleEye's "adaptive BN, then pick" both answer
this by scoring what the user will get. Fine-tuning every candidate costs ``finetune_epochs`` per proposal; the
finalist round spends it only on the ``finalists`` best distinct candidates, plus the uniform distribution at the
same budget (the baseline the search must beat, so the search hands out uniform rather than lose to it when no
candidate of its own is better after the same short fine-tune).

:class:`FinalistSearch` wraps any distribution-choosing strategy (``annealing``, ``optuna``, ``sensitivity``): while
the inner search runs it records every feasible candidate's evaluated distribution and score; when the inner
search is done it asks one step of ``finetune_and_evaluate`` jobs (keys ``finalist-<i>``, each projected onto the
budget again, so every one is feasible) and its tell makes the best finalist the experiment's best. Its data lives
in :attr:`SearchState.finalists`, so the inner strategy's state class still reloads the whole state.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from pruning.config import rescale
from pruning.search._common import TrialRecord, budget_ratio, evaluated_distribution, meets_goal, trial_budget
from pruning.search.base import Job, Result, SearchProblem, SearchState, Strategy, better

__all__ = ["Candidate", "FinalistSearch", "FinalistsState", "UNIFORM_FINALIST", "choose_finalists", "reserve"]

# The finalist that is uniform-at-budget (its job key); the others are "finalist-<rank>".
UNIFORM_FINALIST = "finalist-uniform"


class Candidate(BaseModel):
    """A feasible candidate of the inner search: its job key, score and evaluated distribution."""

    key: str
    score: float
    distribution: dict[str, float]


class FinalistsState(BaseModel):
    """The finalist round's part of a search state."""

    count: int  # candidates of the search that become finalists (besides uniform)
    epochs: int  # fine-tuning epochs of each finalist
    phase: Literal["search", "finalists", "done"] = "search"
    asked: list[Job] = Field(default_factory=list)  # the inner search's jobs awaiting their tell
    leaders: list[Candidate] = Field(default_factory=list)  # the best ``count`` distinct candidates so far
    pending: list[Job] = Field(default_factory=list)  # the finalist jobs
    search_best_key: str | None = None  # the inner search's own best when the round began (the guard compares it)
    search_best_score: float | None = None
    # The uniform guard of a strategy that trains while it searches: its best is a trained model, so the round is
    # uniform alone, and uniform wins only by beating that best's score.
    against_search: bool = False
    max_trials: int | None = None  # the experiment's limit on trials, finalists included
    history: list[TrialRecord] = Field(default_factory=list)


def _signature(distribution: dict[str, float]) -> tuple[tuple[str, float], ...]:
    # Two candidates are the same finalist when their evaluated distributions agree to 3 decimals (whole channels
    # of the nets that matter differ by more than that).
    return tuple(sorted((name, round(value, 3)) for name, value in distribution.items()))


def _add_leader(leaders: list[Candidate], candidate: Candidate, count: int, mode: str) -> list[Candidate]:
    """``leaders`` with ``candidate`` in its place, best first, at most ``count`` distinct distributions."""
    signature = _signature(candidate.distribution)
    same = [c for c in leaders if _signature(c.distribution) == signature]
    if same and not better(candidate.score, same[0].score, mode):
        return leaders
    kept = [c for c in leaders if _signature(c.distribution) != signature] + [candidate]
    sign = 1.0 if mode == "maximize" else -1.0
    kept.sort(key=lambda c: (-sign * c.score, c.key))
    return kept[:count]


def choose_finalists(state: FinalistsState, problem: SearchProblem) -> list[Job]:
    """The finalist jobs: uniform-at-budget first, then the leaders (a leader that *is* the uniform distribution
    is not run twice)."""
    # Every unit at one sparsity (the problem's target; with a budget the executor's projection then scales that
    # shape onto it): exactly what ``uniform`` runs, whatever prior the search started from.
    pruning = problem.pruning
    uniform = rescale({unit.name: 1.0 for unit in pruning.units}, pruning.target_sparsity, pruning)
    jobs = [_finalist_job(UNIFORM_FINALIST, uniform, state.epochs, problem, {"finalist": "uniform"})]
    seen = {_signature(uniform)}
    for rank, leader in enumerate(state.leaders):
        signature = _signature(leader.distribution)
        if signature in seen:
            continue
        seen.add(signature)
        context = {"finalist": rank, "candidate": leader.key, "candidate_score": leader.score}
        jobs.append(
            _finalist_job(f"finalist-{rank}", leader.distribution, state.epochs, problem, context, projected=True)
        )
    return jobs


def _finalist_job(
    key: str,
    distribution: dict[str, float],
    epochs: int,
    problem: SearchProblem,
    context: dict[str, Any],
    projected: bool = False,
) -> Job:
    return Job(
        key=key,
        kind="finetune_and_evaluate",
        distribution=distribution,
        finetune_epochs=epochs,
        save_artifact=True,  # the winner's fine-tuned weights are the model the experiment hands out
        context={**context, "phase": "finalists"},
        budget_ratio=budget_ratio(problem),
        projected=projected,  # a leader runs its evaluated distribution as it was: already on the budget
    )


def reserve(max_trials: int, count: int) -> int:
    """The trials an inner search may ask under ``max_trials`` when ``count`` finalists and uniform follow it
    (at least one, so that there is something to choose from)."""
    return max(max_trials - (count + 1), 1)


class FinalistSearch:
    """``inner`` followed by the finalist round (see the module docstring). Same ask/tell contract."""

    def __init__(
        self,
        inner: Strategy[Any],
        count: int,
        epochs: int,
        max_trials: int | None = None,
        *,
        against_search: bool = False,
    ) -> None:
        self.inner = inner
        self.count = count
        self.epochs = epochs
        self.max_trials = max_trials  # the config's limit (the inner search's config is already reduced by the round)
        self.against_search = against_search

    def start(self, problem: SearchProblem) -> SearchState:
        # ``max_trials`` covers the finalists too: the inner search gets what the round leaves it (at least one).
        limit = trial_budget(self.max_trials, problem.max_trials)
        inner_problem = problem
        if limit is not None:
            inner_problem = problem.model_copy(update={"max_trials": reserve(limit, self.count)})
        state = self.inner.start(inner_problem)
        rounds = FinalistsState(count=self.count, epochs=self.epochs, max_trials=limit,
                                against_search=self.against_search)
        return state.model_copy(update={"finalists": rounds, "problem": problem})

    def ask(self, state: Any) -> tuple[Any, list[Job]]:
        rounds: FinalistsState = state.finalists
        if rounds.phase == "search":
            state, jobs = self.inner.ask(state)
            if jobs or not state.done:
                return state.model_copy(update={"finalists": rounds.model_copy(update={"asked": jobs})}), jobs
            if not rounds.leaders and not (rounds.against_search and state.best_key is not None):
                # nothing feasible to compare: the inner search's outcome stands
                return state.model_copy(update={"finalists": rounds.model_copy(update={"phase": "done"})}), []
            finalists = choose_finalists(rounds, state.problem)
            if rounds.max_trials is not None:
                finalists = finalists[: max(rounds.max_trials - state.trials_asked, 0)]
            if not finalists:
                return state.model_copy(update={"finalists": rounds.model_copy(update={"phase": "done"})}), []
            rounds = rounds.model_copy(
                update={
                    "phase": "finalists",
                    "asked": [],
                    "pending": finalists,
                    "search_best_key": state.best_key,
                    "search_best_score": state.best_score,
                }
            )
            update: dict[str, Any] = {
                "done": False,
                "finalists": rounds,
                "trials_asked": state.trials_asked + len(finalists),
            }
            if not rounds.against_search:
                # The round's jobs join the progress the search reported (these searches count trials; the training
                # strategies keep their own units and phase names, so the guard leaves both alone).
                update |= {
                    "progress_total": (state.progress_total or state.progress or 0.0) + len(finalists),
                    "phase": f"finalists: fine-tuning {len(finalists)} candidate(s) {self.epochs} epoch(s) each",
                }
            return state.model_copy(update=update), finalists
        if rounds.phase == "finalists":
            return state, list(rounds.pending)  # asked again before the tell (a resumed runner): the same jobs
        return state.model_copy(update={"done": True}), []

    def tell(self, state: Any, results: list[Result]) -> Any:
        rounds: FinalistsState = state.finalists
        problem: SearchProblem = state.problem
        if rounds.phase == "search":
            asked = rounds.asked
            state = self.inner.tell(state, results)
            leaders = rounds.leaders
            by_key = {result.key: result for result in results}
            for job in asked:
                result = by_key.get(job.key)
                if result is None or result.status != "succeeded" or result.score is None:
                    continue
                if not meets_goal(result, job, problem):
                    continue
                candidate = Candidate(
                    key=job.key, score=float(result.score), distribution=evaluated_distribution(result, job)
                )
                leaders = _add_leader(leaders, candidate, rounds.count, problem.optimize_mode)
            return state.model_copy(update={"finalists": rounds.model_copy(update={"asked": [], "leaders": leaders})})
        return self._tell_finalists(state, rounds, problem, results)

    def _tell_finalists(self, state: Any, rounds: FinalistsState, problem: SearchProblem, results: list[Result]) -> Any:
        by_key = {result.key: result for result in results}
        best_key, best_score, best_distribution = None, None, None
        history = list(rounds.history)
        for job in rounds.pending:
            result = by_key.get(job.key)
            if result is None or result.status != "succeeded" or result.score is None:
                history.append(TrialRecord(key=job.key, decision="failed", context=job.context))
                continue
            score = float(result.score)
            if meets_goal(result, job, problem) and better(score, best_score, problem.optimize_mode):
                best_key, best_score, best_distribution = job.key, score, evaluated_distribution(result, job)
            history.append(
                TrialRecord(key=job.key, score=score, resource=result.budget_ratio, decision="finalist",
                            context=job.context)
            )
        update: dict[str, Any] = {"done": True}
        if not rounds.against_search:
            update |= {"phase": None, "progress": state.progress_total}
        elif best_key is not None and rounds.search_best_key is not None and rounds.search_best_score is not None:
            if not better(best_score, rounds.search_best_score, problem.optimize_mode):  # type: ignore[arg-type]
                best_key = None  # the search's trained best stands
        if best_key is not None:
            history = [r.model_copy(update={"decision": "chosen"}) if r.key == best_key else r for r in history]
            update |= {"best_key": best_key, "best_score": best_score}
            if "best_distribution" in type(state).model_fields:
                update["best_distribution"] = best_distribution
        rounds = rounds.model_copy(update={"phase": "done", "pending": [], "history": history})
        return state.model_copy(update={**update, "finalists": rounds})
