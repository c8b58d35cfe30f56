"""Which N:M layers get the pattern, under a score target: the pattern mode of ``annealing`` and ``optuna``.

An N:M unit takes exactly two sparsities, 0 (dense) and ``1 - N/M`` (patterned), so the continuous searches'
rescale-to-a-target makes no sense for it. With ``score_target_drop`` the searches instead choose a subset of
the patterned units: the first job evaluates the dense model (every unit at 0), its score minus the allowed drop
(plus, for ``optimize_mode: "minimize"``) is the target, and the objective is the number of weights the
patterned units remove, subject to score >= target. A candidate below the target is recorded with the decision
``"infeasible"`` and is never the best; the dense model always meets its own target, so a search always ends
with a best (the dense model when nothing else meets it).

The target is relative to the measured dense score rather than absolute because only the relative form
guarantees a feasible candidate, and the user rarely knows the dense score of a task before the experiment
has measured it.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, Field

from pruning.config import PruningProblem, PruningUnit
from pruning.search._common import TrialRecord
from pruning.search.base import Result

__all__ = [
    "PatternProgress",
    "chosen_units",
    "dense_distribution",
    "pattern_distribution",
    "pattern_units",
    "removed_weights",
]


def pattern_units(problem: PruningProblem) -> list[PruningUnit]:
    """The units the search decides on (every selected unit of a pattern search has a pattern)."""
    return [unit for unit in problem.units if unit.pattern is not None]


def pattern_distribution(problem: PruningProblem, chosen: Iterable[str]) -> dict[str, float]:
    """Every unit at 0 except the ``chosen`` ones, at their pattern's ``1 - N/M``."""
    picked = set(chosen)
    return {
        unit.name: float(unit.pattern_sparsity or 0.0) if unit.name in picked else 0.0 for unit in problem.units
    }


def dense_distribution(problem: PruningProblem) -> dict[str, float]:
    """The dense reference: every unit at 0."""
    return pattern_distribution(problem, ())


def chosen_units(distribution: dict[str, float]) -> list[str]:
    """The patterned units of a distribution, sorted (the canonical form of a candidate)."""
    return sorted(name for name, value in distribution.items() if value > 0.0)


def removed_weights(problem: PruningProblem, chosen: Iterable[str]) -> int:
    """Weights the ``chosen`` units remove when patterned: the objective both searches maximise."""
    picked = set(chosen)
    return sum(
        round(unit.weight_count * float(unit.pattern_sparsity or 0.0))
        for unit in problem.units
        if unit.name in picked
    )


class PatternProgress(BaseModel):
    """What a pattern search has learnt: the dense score and target, every candidate's outcome, the best."""

    drop: float
    optimize_mode: str = "maximize"
    dense_score: float | None = None
    target: float | None = None  # dense_score - drop (maximize) or + drop (minimize)
    dense_failed: bool = False
    evaluated: dict[str, float | None] = Field(default_factory=dict)  # ",".join(chosen) -> score (None: failed)
    history: list[TrialRecord] = Field(default_factory=list)
    best_key: str | None = None
    best_score: float | None = None
    best_removed: int | None = None
    best_distribution: dict[str, float] | None = None

    def feasible(self, score: float) -> bool:
        """Whether ``score`` meets the target (the dense score minus the allowed drop)."""
        if self.target is None:
            return False
        return score >= self.target if self.optimize_mode == "maximize" else score <= self.target

    def record(
        self, key: str, distribution: dict[str, float], result: Result | None, removed: int,
        context: dict[str, object], accepted: bool | None = None,
    ) -> tuple[PatternProgress, bool]:
        """Fold one result in; returns the new progress and whether the candidate met the target.

        The dense candidate (nothing patterned) sets the target when it is the first to succeed. ``accepted`` is
        annealing's Metropolis decision for a feasible candidate (``None``: no chain, the decision is
        ``"feasible"``)."""
        chosen = chosen_units(distribution)
        ok = result is not None and result.status == "succeeded" and result.score is not None
        measured = float(result.score) if result is not None and ok and result.score is not None else None
        update: dict[str, object] = {"evaluated": {**self.evaluated, ",".join(chosen): measured}}
        if not ok:
            if not chosen and self.target is None:
                update["dense_failed"] = True
            record = TrialRecord(key=key, decision="failed", context=dict(context))
            return self.model_copy(update={**update, "history": [*self.history, record]}), False
        assert result is not None and result.score is not None
        score = float(result.score)
        progress = self
        if not chosen and self.target is None:
            sign = 1.0 if self.optimize_mode == "maximize" else -1.0
            progress = self.model_copy(update={"dense_score": score, "target": score - sign * self.drop})
        feasible = progress.feasible(score)
        if not feasible:
            decision = "infeasible"
        elif accepted is None:
            decision = "feasible"
        else:
            decision = "accepted" if accepted else "rejected"
        record = TrialRecord(
            key=key, score=score, overall_sparsity=result.overall_sparsity, decision=decision,
            context={**context, "patterned": chosen, "removed_weights": removed, "score_target": progress.target},
        )
        update["history"] = [*self.history, record]
        if feasible and progress._beats(removed, score):
            update |= {
                "best_key": key, "best_score": score, "best_removed": removed, "best_distribution": dict(distribution)
            }
        return progress.model_copy(update=update), feasible

    def _beats(self, removed: int, score: float) -> bool:
        # More weights removed wins; among equals, the better score.
        if self.best_removed is None or removed > self.best_removed:
            return True
        if removed < self.best_removed or self.best_score is None:
            return False
        return score > self.best_score if self.optimize_mode == "maximize" else score < self.best_score
