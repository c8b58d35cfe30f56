"""``autocompress``: AutoCompress (Liu et al., AAAI 2020) — rounds of annealing search, ADMM, prune, evaluate.

With overall target ``S`` and ``N = num_rounds``, each round removes ``r = 1 - (1 - S) ** (1 / N)`` of what
the previous round *measurably* left: round k's cumulative target is ``1 - (1 - P) * (1 - r)`` where ``P`` is the
overall sparsity achieved by round k-1 (read from its result's per-layer achieved sparsity), so the rounds
compound to ``S``; the last round aims at ``S`` itself, closing any gap rounding left. A round:

1. anneals (the ``annealing`` engine, same acceptance rule) over distributions at the round's target that
   never drop below what earlier rounds pruned, starting from the previous round's checkpoint;
2. enforces the best distribution with ``admm_iterations`` ADMM iterations (``admm_train`` jobs);
3. hard-prunes to it, retrains ``retrain_epochs`` with the masks (0: none) and evaluates the physically
   shrunk model (structured base algorithms), saving the round's checkpoint.

After the last round, the best-scoring round that meets the overall target is fine-tuned for
``final_finetune_epochs``. ``state.rounds`` keeps every round's full search history.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from pruning.budget import BUDGET_TOLERANCE
from pruning.config import overall_sparsity
from pruning.search._common import (
    TrialRecord,
    achieved_units,
    evaluated_distribution,
    measured_ratio,
    rescale_above,
    rounding_tolerance,
    trial_budget,
)
from pruning.search.admm import admm_artifacts, admm_job
from pruning.search.annealing import AnnealingRun, anneal_ask, anneal_start, anneal_tell
from pruning.search.base import Job, RandomState, Result, SearchProblem, SearchState, better
from pruning.search.configs import AutoCompressConfig
from pruning.search.finalists import FinalistsState

__all__ = ["AutoCompressSearch", "AutoCompressState", "RoundRecord"]


class RoundRecord(BaseModel):
    """One finished round: its target, the search that chose its distribution, and what it achieved."""

    round: int
    target: float
    distribution: dict[str, float]
    search: list[TrialRecord]
    residuals: list[float] = Field(default_factory=list)
    key: str | None = None
    score: float | None = None
    achieved_sparsity: float | None = None
    achieved: dict[str, float] = Field(default_factory=dict)  # unit -> achieved sparsity
    artifact: str | None = None
    meets_target: bool = False
    budget_ratio: float | None = None  # with a budget: the round's measured ratio of the budget's resource


class AutoCompressState(SearchState):
    version: int = 1
    problem: SearchProblem
    max_trials: int | None = None
    phase: Literal["search", "admm", "prune", "final", "finished"] = "search"
    round: int = 0
    floor: dict[str, float]  # per-unit sparsity achieved by the previous rounds
    floor_sparsity: float = 0.0  # its overall value (measured)
    floor_artifact: str | None = None  # the previous round's checkpoint
    round_target: float = 0.0
    round_budget_ratio: float | None = None  # with a budget: budget ** ((round + 1) / num_rounds)
    run: AnnealingRun | None = None
    distribution: dict[str, float] = Field(default_factory=dict)  # the round's chosen distribution
    admm_iteration: int = 0
    w_artifact: str | None = None
    z_artifact: str | None = None
    u_artifact: str | None = None
    residuals: list[float] = Field(default_factory=list)
    rounds: list[RoundRecord] = Field(default_factory=list)
    final_round: int | None = None
    pending: list[Job] = Field(default_factory=list)
    best_distribution: dict[str, float] | None = None
    finalists: FinalistsState | None = None  # the uniform guard (pruning.search.finalists), under a budget


class AutoCompressSearch:
    """AutoCompress; see the module docstring.

    Example::

        config = AutoCompressConfig(algorithm="autocompress", config_list=[...], num_rounds=3)
        state = AutoCompressSearch(config).start(problem)
        # then ask/tell: annealing evaluations, admm_train jobs, the round's prune; a final fine-tune
    """

    def __init__(self, config: AutoCompressConfig) -> None:
        self.config = config

    # Jobs each round needs after its search, and the final fine-tune.
    def _round_tail(self) -> int:
        return self.config.admm_iterations + 1

    def _final_jobs(self) -> int:
        return 1 if self.config.final_finetune_epochs > 0 else 0

    def _target(self, state: AutoCompressState, round_index: int) -> float:
        final = state.problem.pruning.target_sparsity
        if round_index >= self.config.num_rounds - 1:
            return final
        per_round = 1.0 - (1.0 - final) ** (1.0 / self.config.num_rounds)
        return 1.0 - (1.0 - state.floor_sparsity) * (1.0 - per_round)

    def _round_ratio(self, state: AutoCompressState, round_index: int) -> float | None:
        # Under a budget the rounds compound physically as they do in sparsity: round k keeps
        # budget ** ((k + 1) / num_rounds) of the dense value, the last one exactly the budget.
        budget = state.problem.budget
        if budget is None:
            return None
        return float(budget.ratio ** ((round_index + 1) / self.config.num_rounds))

    def start(self, problem: SearchProblem) -> AutoCompressState:
        pruning = problem.pruning
        self.config.check_layer_rho(layer.name for layer in pruning.layers)
        state = AutoCompressState(
            problem=problem,
            max_trials=trial_budget(self.config.max_trials, problem.max_trials),
            rng=RandomState.seeded(problem.seed),
            floor={name: 0.0 for name in pruning.unit_names()},
            progress=0.0,
            progress_total=float(self.config.num_rounds),
        )
        needed = self.config.num_rounds * (self._round_tail() + 1) + self._final_jobs()
        if state.max_trials is not None and state.max_trials < needed:
            reason = (
                f"max_trials ({state.max_trials}) is below the {needed} jobs {self.config.num_rounds} rounds "
                f"need (one search evaluation, {self.config.admm_iterations} ADMM iterations and one prune "
                "per round)"
            )
            return state.model_copy(update={"done": True, "phase": "finished", "stop_reason": reason})
        return self._begin_round(state, 0)

    def _begin_round(self, state: AutoCompressState, round_index: int) -> AutoCompressState:
        pruning = state.problem.pruning
        target = self._target(state, round_index)
        run = anneal_start(
            self.config,
            pruning,
            prefix=f"autocompress-r{round_index}-sa",
            target=target,
            floor=state.floor,
            parent_artifact=state.floor_artifact,
            finetune_epochs=self.config.finetune_epochs,
            context={"round": round_index},
            budget_ratio=self._round_ratio(state, round_index),
        )
        return state.model_copy(
            update={
                "phase": "search",
                "round": round_index,
                "round_target": target,
                "round_budget_ratio": self._round_ratio(state, round_index),
                "run": run,
                "residuals": [],
            }
        )

    def _search_budget(self, state: AutoCompressState) -> int | None:
        if state.max_trials is None:
            return None
        later_rounds = self.config.num_rounds - state.round - 1
        reserve = self._round_tail() + later_rounds * (self._round_tail() + 1) + self._final_jobs()
        return state.max_trials - state.trials_asked - reserve

    # ------------------------------------------------------------------------------------------------- ask
    def ask(self, state: AutoCompressState) -> tuple[AutoCompressState, list[Job]]:
        if state.done:
            return state, []
        if state.pending:
            return state, list(state.pending)
        if state.phase == "search":
            assert state.run is not None and state.rng is not None
            rng = state.rng.restore()
            run, jobs = anneal_ask(state.run, self.config, state.problem.pruning, rng, self._search_budget(state))
            state = state.model_copy(update={"run": run, "rng": RandomState.capture(rng)})
            if jobs:
                return self._asked(state, jobs)
            state = self._finish_search(state)
        if state.phase == "admm":
            job = admm_job(
                self.config,
                key=f"autocompress-r{state.round}-admm-{state.admm_iteration}",
                distribution=state.distribution,
                iteration=state.admm_iteration,
                w=state.w_artifact,
                z=state.z_artifact,
                u=state.u_artifact,
                context={"round": state.round},
                budget_ratio=state.round_budget_ratio,
                floor=state.floor,
            )
            return self._asked(state, [job])
        if state.phase == "prune":
            epochs = self.config.retrain_epochs
            job = Job(
                key=f"autocompress-r{state.round}-prune",
                kind="finetune_and_evaluate" if epochs else "evaluate",
                distribution=state.distribution,
                parent_artifact=state.w_artifact,
                finetune_epochs=epochs,
                save_artifact=True,
                context={"round": state.round, "target": state.round_target},
                budget_ratio=state.round_budget_ratio,
                floor=state.floor if state.round_budget_ratio is not None else {},
            )
            return self._asked(state, [job])
        if state.phase == "final":
            assert state.final_round is not None
            chosen = state.rounds[state.final_round]
            job = Job(
                key="autocompress-final",
                kind="finetune_and_evaluate",
                distribution=chosen.distribution,
                parent_artifact=chosen.artifact,
                finetune_epochs=self.config.final_finetune_epochs,
                save_artifact=True,
                context={"round": chosen.round, "final": True},
            )
            return self._asked(state, [job])
        return state.model_copy(update={"done": True}), []

    def _asked(self, state: AutoCompressState, jobs: list[Job]) -> tuple[AutoCompressState, list[Job]]:
        return state.model_copy(update={"pending": jobs, "trials_asked": state.trials_asked + len(jobs)}), jobs

    def _finish_search(self, state: AutoCompressState) -> AutoCompressState:
        """The round's search is over: ADMM enforces its best distribution (its start if nothing evaluated)."""
        run = state.run
        assert run is not None
        distribution = run.best_distribution
        if distribution is None:
            distribution = rescale_above(run.current, run.floor, run.target, state.problem.pruning)[1]
        return state.model_copy(
            update={
                "phase": "admm",
                "distribution": distribution,
                "admm_iteration": 0,
                "w_artifact": state.floor_artifact,
                "z_artifact": None,
                "u_artifact": None,
            }
        )

    # ------------------------------------------------------------------------------------------------ tell
    def tell(self, state: AutoCompressState, results: list[Result]) -> AutoCompressState:
        pending = state.pending
        state = state.model_copy(update={"pending": []})
        by_key = {r.key: r for r in results}
        if state.phase == "search":
            assert state.run is not None and state.rng is not None
            rng = state.rng.restore()
            run = anneal_tell(state.run, results, self.config, state.problem, rng)
            return state.model_copy(update={"run": run, "rng": RandomState.capture(rng)})
        result = by_key.get(pending[0].key)
        ok = result is not None and result.status == "succeeded"
        error = "no result" if result is None else result.error
        if state.phase == "admm":
            if not ok or result is None or result.artifact is None:
                return self._fail(state, f"round {state.round}: ADMM iteration {state.admm_iteration} failed: {error}")
            iteration = state.admm_iteration + 1
            return state.model_copy(
                update={
                    "admm_iteration": iteration,
                    **admm_artifacts(result),
                    "residuals": [*state.residuals, float(result.extra.get("primal_residual", float("nan")))],
                    "phase": "admm" if iteration < self.config.admm_iterations else "prune",
                }
            )
        if state.phase == "prune":
            return self._tell_prune(state, pending[0], result)
        return self._tell_final(state, result)

    def _fail(self, state: AutoCompressState, reason: str) -> AutoCompressState:
        return state.model_copy(update={"done": True, "phase": "finished", "stop_reason": reason})

    def _tell_prune(self, state: AutoCompressState, job: Job, result: Result | None) -> AutoCompressState:
        pruning = state.problem.pruning
        assert state.run is not None
        if result is None or result.status != "succeeded" or result.score is None or result.artifact is None:
            error = "no result" if result is None else result.error
            return self._fail(state, f"round {state.round}: pruning to the searched distribution failed: {error}")
        evaluated = evaluated_distribution(result, job)
        achieved = achieved_units(result, pruning, evaluated)
        measured = overall_sparsity(achieved, pruning)
        ratio = measured_ratio(result, state.problem)
        if state.round_budget_ratio is not None:
            meets = ratio is not None and ratio <= state.round_budget_ratio + BUDGET_TOLERANCE
        else:
            meets = measured >= state.round_target - rounding_tolerance(pruning)
        record = RoundRecord(
            round=state.round,
            target=state.round_target,
            distribution=evaluated,
            budget_ratio=ratio,
            search=list(state.run.history),
            residuals=list(state.residuals),
            key=result.key,
            score=result.score,
            achieved_sparsity=measured,
            achieved=achieved,
            artifact=result.artifact,
            meets_target=meets,
        )
        # The floor never decreases, even if a measurement rounds a unit below what an earlier round reached.
        floor = {name: max(state.floor.get(name, 0.0), value) for name, value in achieved.items()}
        state = state.model_copy(
            update={
                "rounds": [*state.rounds, record],
                "progress": float(len(state.rounds) + 1),
                "floor": floor,
                "floor_sparsity": overall_sparsity(floor, pruning),
                "floor_artifact": result.artifact,
            }
        )
        if state.round + 1 < self.config.num_rounds:
            return self._begin_round(state, state.round + 1)
        return self._choose_final(state)

    def _choose_final(self, state: AutoCompressState) -> AutoCompressState:
        target = state.problem.pruning.target_sparsity
        mode = state.problem.optimize_mode
        tolerance = rounding_tolerance(state.problem.pruning)
        chosen: RoundRecord | None = None
        budget = state.problem.budget
        for record in state.rounds:
            if budget is not None:
                meets = budget.met_by(record.budget_ratio)
            else:
                meets = record.achieved_sparsity is not None and record.achieved_sparsity >= target - tolerance
            if meets and record.score is not None and (chosen is None or better(record.score, chosen.score, mode)):
                chosen = record
        if chosen is None:
            goal = f"the overall target sparsity {target:.4f}"
            if budget is not None:
                goal = f"the budget {budget.resource}={budget.ratio}"
            return self._fail(state, f"no round reached {goal}")
        update: dict[str, Any] = {
            "best_key": chosen.key,
            "best_score": chosen.score,
            "best_distribution": chosen.distribution,
            "final_round": chosen.round,
        }
        if self.config.final_finetune_epochs > 0:
            update["phase"] = "final"
        else:
            update |= {
                "phase": "finished",
                "done": True,
                "stop_reason": f"{self.config.num_rounds} rounds done",
            }
        return state.model_copy(update=update)

    def _tell_final(self, state: AutoCompressState, result: Result | None) -> AutoCompressState:
        update: dict[str, Any] = {"phase": "finished", "done": True}
        if result is not None and result.status == "succeeded" and result.score is not None:
            # The fine-tuned model of the chosen round is the deliverable.
            update |= {"best_key": result.key, "best_score": result.score}
            update["stop_reason"] = f"{self.config.num_rounds} rounds and the final fine-tune done"
        else:
            error = "no result" if result is None else result.error
            update["stop_reason"] = f"final fine-tune failed ({error}); best is the chosen round"
        return state.model_copy(update=update)
