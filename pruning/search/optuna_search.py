"""``optuna``: Optuna's ask/tell over per-unit sparsities, every proposal rescaled to the target.

One objective (``objectives: ["score"]``): TPE. Two (``["score", "flops"]``, ``params`` or ``latency``):
``NSGAIISampler``, whose completed trials form a Pareto front of score against the resource
(``state.pareto_keys``). Each trial also carries a constraint (Optuna 5's per-trial constraints, not the
deprecated ``constraints_func``): the target sparsity minus the achieved one, so a trial that fell short of
the target is infeasible to the sampler as well as to us.

Our own trial history in the state is the only source of truth: every ask rebuilds an in-memory study
from it (``study.add_trial(optuna.trial.create_trial(...))``) with a sampler seeded from the state's
generator, so a fresh strategy continuing from a reloaded state asks exactly the same next proposal.
``parallelism`` trials are asked at once (TPE's constant liar keeps them apart). Trial 0 is always the
uniform start (every unit at its config entry's sparsity, as ``uniform`` evaluates it), so the best candidate
score is never below the baseline's.

With ``score_target_drop`` (config-list entries with an N:M ``pattern``) trial 0 is the dense model and every
later trial a categorical choice per unit (0 or ``1 - N/M``), maximising the weights removed with the score
target as the constraint (see :mod:`pruning.search.pattern`).
"""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import BaseModel, Field

from pruning.budget import BUDGET_TOLERANCE
from pruning.config import overall_sparsity, rescale
from pruning.search._common import (
    SPARSITY_TOLERANCE,
    achieved_units,
    budget_ratio,
    direction,
    evaluated_distribution,
    measured_ratio,
    resource_value,
    rounding_slack,
    trial_budget,
)
from pruning.search.base import Job, RandomState, Result, SearchProblem, SearchState, better
from pruning.search.configs import OptunaConfig
from pruning.search.finalists import FinalistsState
from pruning.search.pattern import PatternProgress, chosen_units, dense_distribution, pattern_units, removed_weights

__all__ = ["OptunaSearch", "OptunaState", "OptunaTrial"]


class OptunaTrial(BaseModel):
    """One trial as Optuna saw it: the raw suggestion (``params``) and what came back."""

    number: int
    key: str
    params: dict[str, float]
    distribution: dict[str, float]
    state: Literal["running", "complete", "fail"] = "running"
    values: list[float] | None = None
    constraint: float | None = None  # <= 0 is feasible


class OptunaState(SearchState):
    version: int = 1
    problem: SearchProblem
    total_trials: int
    trials: list[OptunaTrial] = Field(default_factory=list)
    pending: list[Job] = Field(default_factory=list)
    pareto_keys: list[str] = Field(default_factory=list)
    best_distribution: dict[str, float] | None = None
    pattern: PatternProgress | None = None  # set in a pattern search (``score_target_drop``)
    finalists: FinalistsState | None = None  # the finalist round (pruning.search.finalists), when asked


class OptunaSearch:
    """Optuna TPE (one objective) or NSGA-II (two) over per-unit sparsities; see the module docstring.

    Example::

        config = OptunaConfig(algorithm="optuna", config_list=[...], objectives=["score", "flops"])
        search = OptunaSearch(config)
        state = search.start(problem)
        state, jobs = search.ask(state)   # `parallelism` evaluate jobs at a time
    """

    def __init__(self, config: OptunaConfig) -> None:
        self.config = config

    def start(self, problem: SearchProblem) -> OptunaState:
        limit = trial_budget(self.config.max_trials, problem.max_trials)
        total = self.config.num_trials if limit is None else min(self.config.num_trials, limit)
        drop = self.config.score_target_drop
        return OptunaState(
            problem=problem,
            total_trials=total,
            rng=RandomState.seeded(problem.seed),
            progress=0.0,
            progress_total=float(total),
            pattern=None if drop is None else PatternProgress(drop=drop, optimize_mode=problem.optimize_mode),
        )

    def _study(self, state: OptunaState, seed: int) -> tuple[Any, dict[str, Any]]:
        import optuna
        from optuna.distributions import FloatDistribution
        from optuna.trial import TrialState, create_trial

        # Optuna logs every trial at INFO; the runner records trials itself.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler: Any
        if len(self.config.objectives) == 1:
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.config.n_startup_trials)
        else:
            sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=self.config.population_size)
        score_direction = "maximize" if state.problem.optimize_mode == "maximize" else "minimize"
        directions: list[Any] = [score_direction] + ["minimize"] * (len(self.config.objectives) - 1)
        study = optuna.create_study(directions=directions, sampler=sampler)
        spaces: dict[str, Any] = {
            unit.name: FloatDistribution(0.0, unit.max_sparsity) for unit in state.problem.pruning.units
        }
        for trial in state.trials:
            if trial.state == "running":
                continue
            study.add_trial(
                create_trial(
                    state=TrialState.COMPLETE if trial.state == "complete" else TrialState.FAIL,
                    params=trial.params,
                    distributions=spaces,
                    values=trial.values if trial.state == "complete" else None,
                    constraints=None if trial.constraint is None else {"sparsity": trial.constraint},
                )
            )
        return study, spaces

    def ask(self, state: OptunaState) -> tuple[OptunaState, list[Job]]:
        if state.done:
            return state, []
        if state.pending:
            return state, list(state.pending)
        if state.pattern is not None:
            return self._ask_pattern(state, state.pattern)
        count = min(self.config.parallelism, state.total_trials - state.trials_asked)
        if count <= 0:
            return state.model_copy(update={"done": True, "stop_reason": f"{state.total_trials} trials done"}), []
        assert state.rng is not None
        rng = state.rng.restore()
        study, spaces = self._study(state, rng.randrange(2**31))
        pruning = state.problem.pruning
        target = pruning.target_sparsity
        trials: list[OptunaTrial] = []
        jobs: list[Job] = []
        for _ in range(count):
            number = len(state.trials) + len(trials)
            if number == 0:
                # Trial 0 is the start distribution: the uniform start (what ``uniform`` evaluates at the same
                # budget), so the best candidate score is never below uniform's and TPE's model begins from the
                # baseline; or, with ``prior: "owl"``, the OWL allocation that resolving set as initial sparsities.
                params = {u.name: min(u.initial_sparsity, u.max_sparsity) for u in pruning.units}
            else:
                asked = study.ask(spaces)
                params = {name: float(asked.params[name]) for name in pruning.unit_names()}
            trial, job = self._trial(number, params, rescale(params, target, pruning), budget_ratio(state.problem))
            trials.append(trial)
            jobs.append(job)
        return self._asked(state, trials, jobs, rng)

    def _trial(
        self, number: int, params: dict[str, float], distribution: dict[str, float], ratio: float | None = None
    ) -> tuple[OptunaTrial, Job]:
        """Trial ``number``'s record and its job (projected onto ``ratio`` when the experiment has a budget)."""
        key = f"optuna-{number}"
        job = Job(
            key=key,
            kind="finetune_and_evaluate" if self.config.finetune_epochs else "evaluate",
            distribution=distribution,
            finetune_epochs=self.config.finetune_epochs,
            context={"iteration": number, "trial": number},
            budget_ratio=ratio,
        )
        return OptunaTrial(number=number, key=key, params=params, distribution=distribution), job

    @staticmethod
    def _asked(
        state: OptunaState, trials: list[OptunaTrial], jobs: list[Job], rng: random.Random
    ) -> tuple[OptunaState, list[Job]]:
        update = {
            "trials": [*state.trials, *trials],
            "pending": jobs,
            "trials_asked": state.trials_asked + len(jobs),
            "rng": RandomState.capture(rng),
        }
        return state.model_copy(update=update), jobs

    def tell(self, state: OptunaState, results: list[Result]) -> OptunaState:
        if state.pattern is not None:
            return self._tell_pattern(state, state.pattern, results)
        by_key = {r.key: r for r in results}
        pruning = state.problem.pruning
        trials = list(state.trials)
        best_key, best_score, best_distribution = state.best_key, state.best_score, state.best_distribution
        # Feasible unless the achieved sparsity fell short by more than per-unit rounding can explain.
        floor = pruning.target_sparsity - SPARSITY_TOLERANCE - rounding_slack(pruning)
        for index, trial in enumerate(trials):
            if trial.state != "running":
                continue
            result = by_key.get(trial.key)
            values = self._values(state, result)
            if result is None or values is None:
                trials[index] = trial.model_copy(update={"state": "fail"})
                continue
            budget = state.problem.budget
            if budget is not None:
                # Under a budget the constraint is physical: the measured ratio over the budget (projection keeps
                # it at or below 0, so a violation means the shrunk model measured heavier than predicted).
                ratio = measured_ratio(result, state.problem)
                constraint = 1.0 if ratio is None else ratio - budget.ratio - BUDGET_TOLERANCE
                evaluated = evaluated_distribution(result, Job(key=trial.key, distribution=trial.distribution))
            else:
                achieved = overall_sparsity(achieved_units(result, pruning, trial.distribution), pruning)
                constraint = floor - achieved
                evaluated = dict(trial.distribution)
            trials[index] = trial.model_copy(update={"state": "complete", "values": values, "constraint": constraint})
            if constraint <= 0 and better(values[0], best_score, state.problem.optimize_mode):
                best_key, best_score, best_distribution = trial.key, values[0], evaluated
        return state.model_copy(
            update={
                "trials": trials,
                "pending": [],
                "best_key": best_key,
                "best_score": best_score,
                "best_distribution": best_distribution,
                "progress": float(sum(1 for t in trials if t.state != "running")),
                "pareto_keys": _pareto(trials, state.problem.optimize_mode, len(self.config.objectives)),
            }
        )

    def _pattern_study(self, state: OptunaState, seed: int) -> tuple[Any, dict[str, Any]]:
        """The pattern mode's study: one categorical per N:M unit (0 = dense or ``1 - N/M``), maximising the
        weights removed, with the score target as the per-trial constraint (``target - score``, signed so that
        <= 0 is feasible)."""
        import optuna
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.config.n_startup_trials)
        study = optuna.create_study(directions=["maximize"], sampler=sampler)
        spaces: dict[str, Any] = {
            unit.name: CategoricalDistribution((0.0, float(unit.pattern_sparsity or 0.0)))
            for unit in pattern_units(state.problem.pruning)
        }
        for trial in state.trials:
            if trial.state == "running":
                continue
            complete = trial.state == "complete"
            study.add_trial(
                create_trial(
                    state=TrialState.COMPLETE if complete else TrialState.FAIL,
                    params={name: trial.params[name] for name in spaces},
                    distributions=spaces,
                    values=trial.values if complete else None,
                    constraints=None if trial.constraint is None else {"score": trial.constraint},
                )
            )
        return study, spaces

    def _ask_pattern(self, state: OptunaState, progress: PatternProgress) -> tuple[OptunaState, list[Job]]:
        pruning = state.problem.pruning
        names = [unit.name for unit in pattern_units(pruning)]
        left = state.total_trials - state.trials_asked
        # Trial 0 (the dense model) is asked alone: its score is the target every later trial is judged by.
        count = min(1 if not state.trials else self.config.parallelism, left)
        if progress.dense_failed:
            reason = "the dense model's evaluation failed, so there is no score target"
            return state.model_copy(update={"done": True, "stop_reason": reason}), []
        if state.trials and len(progress.evaluated) >= 2 ** len(names):
            reason = "every assignment of the pattern was evaluated"
            return state.model_copy(update={"done": True, "stop_reason": reason}), []
        if count <= 0:
            return state.model_copy(update={"done": True, "stop_reason": f"{state.total_trials} trials done"}), []
        assert state.rng is not None
        rng = state.rng.restore()
        study, spaces = self._pattern_study(state, rng.randrange(2**31))
        seen = set(progress.evaluated)
        trials: list[OptunaTrial] = []
        jobs: list[Job] = []
        for _ in range(count):
            number = len(state.trials) + len(trials)
            if number == 0:
                distribution = dense_distribution(pruning)
            else:
                # TPE re-suggests sets it has seen; a few more asks usually find a new one.
                for _ in range(8):
                    asked = study.ask(spaces)
                    distribution = {**dense_distribution(pruning), **{n: float(asked.params[n]) for n in names}}
                    if ",".join(chosen_units(distribution)) not in seen:
                        break
            seen.add(",".join(chosen_units(distribution)))
            trial, job = self._trial(number, dict(distribution), distribution)
            trials.append(trial)
            jobs.append(job)
        return self._asked(state, trials, jobs, rng)

    def _tell_pattern(self, state: OptunaState, progress: PatternProgress, results: list[Result]) -> OptunaState:
        by_key = {r.key: r for r in results}
        pruning = state.problem.pruning
        sign = direction(state.problem.optimize_mode)
        trials = list(state.trials)
        for index, trial in enumerate(trials):
            if trial.state != "running":
                continue
            result = by_key.get(trial.key)
            removed = removed_weights(pruning, chosen_units(trial.distribution))
            progress, _ = progress.record(trial.key, trial.distribution, result, removed, {"trial": trial.number})
            if result is None or result.status != "succeeded" or result.score is None or progress.target is None:
                trials[index] = trial.model_copy(update={"state": "fail"})
                continue
            constraint = sign * (progress.target - float(result.score))
            trials[index] = trial.model_copy(
                update={"state": "complete", "values": [float(removed)], "constraint": constraint}
            )
        return state.model_copy(
            update={
                "trials": trials,
                "pending": [],
                "pattern": progress,
                "best_key": progress.best_key,
                "best_score": progress.best_score,
                "best_distribution": progress.best_distribution,
                "progress": float(sum(1 for t in trials if t.state != "running")),
            }
        )

    def _values(self, state: OptunaState, result: Result | None) -> list[float] | None:
        if result is None or result.status != "succeeded" or result.score is None:
            return None
        values = [float(result.score)]
        for objective in self.config.objectives[1:]:
            measured = resource_value(result, objective)
            if measured is None:
                return None
            values.append(measured)
        return values


def _pareto(trials: list[OptunaTrial], mode: str, objectives: int) -> list[str]:
    """Keys of the feasible completed trials that no other feasible trial dominates (better score, lower
    resources)."""
    sign = direction(mode)
    points = [
        (t.key, [sign * t.values[0]] + [-v for v in t.values[1:objectives]])
        for t in trials
        if t.state == "complete" and t.values is not None and (t.constraint is None or t.constraint <= 0)
    ]
    front = []
    for key, p in points:
        dominated = any(
            all(a >= b for a, b in zip(q, p, strict=True)) and any(a > b for a, b in zip(q, p, strict=True))
            for _, q in points
        )
        if not dominated:
            front.append(key)
    return front
