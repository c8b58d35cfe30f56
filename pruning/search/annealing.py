"""``annealing``: simulated annealing over per-unit sparsities at the target (AutoCompress's search).

Each step perturbs every unit's sparsity by uniform noise of magnitude
``perturbation_magnitude * T / start_temperature``, rescales the proposal to the target with the library's
bounded rescale, evaluates it (after ``finetune_epochs`` when asked) and accepts it by the Metropolis rule.
The temperature cools by ``cool_down_rate`` on every proposal; the search stops at ``stop_temperature`` or
when ``max_trials`` is spent.

Why the acceptance test is normalised: NNI compared raw score differences with the temperature, so with an
accuracy in [0, 1] it accepted nearly everything and with a loss in the thousands it never moved. Here the
difference is divided by the running standard deviation of the scores seen so far and compared at the
relative temperature ``T / start_temperature``: ``accept if d >= 0 or u < exp(d / (T / T0))`` with
``d = sign * (score - current) / std``. Multiplying or shifting every score leaves every decision unchanged.

The engine (:class:`AnnealingRun`) is shared with ``autocompress``, which anneals above a floor (the
sparsity its previous rounds reached) from a parent checkpoint.

With ``score_target_drop`` (config-list entries with an N:M ``pattern``) the chain is instead a set of patterned
units (:class:`PatternChain`, :func:`pattern_ask`, :func:`pattern_tell`; see :mod:`pruning.search.pattern`).
"""

from __future__ import annotations

import math
import random

from pydantic import BaseModel, Field

from pruning.config import PruningProblem, initial_distribution
from pruning.search._common import (
    RunningStats,
    TrialRecord,
    budget_ratio,
    direction,
    evaluated_distribution,
    meets_goal,
    rescale_above,
    trial_budget,
)
from pruning.search.base import Job, RandomState, Result, SearchProblem, SearchState, better
from pruning.search.configs import AnnealingConfig
from pruning.search.finalists import FinalistsState
from pruning.search.pattern import (
    PatternProgress,
    chosen_units,
    dense_distribution,
    pattern_distribution,
    pattern_units,
    removed_weights,
)

__all__ = [
    "AnnealingRun",
    "AnnealingSearch",
    "AnnealingState",
    "PatternChain",
    "anneal_ask",
    "anneal_start",
    "anneal_tell",
    "pattern_ask",
    "pattern_tell",
]


class AnnealingRun(BaseModel):
    """One annealing search: its chain, temperature, score statistics and the jobs awaiting results."""

    prefix: str  # job keys are f"{prefix}-{step}"
    target: float  # overall sparsity of every proposal (original-model terms)
    floor: dict[str, float]  # sparsity already reached per unit (autocompress rounds); zeros otherwise
    parent_artifact: str | None = None
    finetune_epochs: int = 0
    temperature: float
    step: int = 0  # proposals made so far (the initial point is step 0)
    current: dict[str, float]  # fractions of what the floor left (== sparsities when the floor is zero)
    current_score: float | None = None
    stats: RunningStats = Field(default_factory=RunningStats)
    pending: list[Job] = Field(default_factory=list)
    pending_fractions: list[dict[str, float]] = Field(default_factory=list)
    best_key: str | None = None
    best_score: float | None = None
    best_distribution: dict[str, float] | None = None
    history: list[TrialRecord] = Field(default_factory=list)
    finished: bool = False
    context: dict[str, object] = Field(default_factory=dict)  # extra context on every job (autocompress round)
    budget_ratio: float | None = None  # every proposal is projected onto this (see pruning.budget)


def _size_prior(problem: PruningProblem) -> dict[str, float]:
    # Sparsity grows with the unit's rank by weight count: the biggest unit is pruned most, the smallest
    # least (rank, not raw size, so one huge layer does not take everything); the rescale sets the level.
    order = sorted(problem.units, key=lambda unit: (unit.weight_count, unit.name))
    count = len(order)
    return {unit.name: (rank + 1) / count for rank, unit in enumerate(order)}


def anneal_start(
    config: AnnealingConfig | object,
    problem: PruningProblem,
    *,
    prefix: str,
    target: float,
    floor: dict[str, float] | None = None,
    parent_artifact: str | None = None,
    finetune_epochs: int = 0,
    context: dict[str, object] | None = None,
    budget_ratio: float | None = None,
) -> AnnealingRun:
    """A fresh chain starting at the uniform distribution (or the size prior) rescaled to ``target``."""
    floor = floor or {name: 0.0 for name in problem.unit_names()}
    if getattr(config, "prior", "uniform") == "size":
        start = _size_prior(problem)
    elif any(floor.values()):
        start = {name: 1.0 for name in problem.unit_names()}  # the same fraction of what is left everywhere
    else:
        start = initial_distribution(problem)
    fractions, _ = rescale_above(start, floor, target, problem)
    return AnnealingRun(
        prefix=prefix,
        target=target,
        floor=floor,
        parent_artifact=parent_artifact,
        finetune_epochs=finetune_epochs,
        temperature=float(config.start_temperature),  # type: ignore[attr-defined,union-attr]
        current=fractions,
        context=dict(context or {}),
        budget_ratio=budget_ratio,
    )


def _job(run: AnnealingRun, distribution: dict[str, float], temperature: float) -> Job:
    epochs = run.finetune_epochs
    return Job(
        key=f"{run.prefix}-{run.step}",
        kind="finetune_and_evaluate" if epochs else "evaluate",
        distribution=distribution,
        parent_artifact=run.parent_artifact,
        finetune_epochs=epochs,
        save_artifact=False,
        context={**run.context, "iteration": run.step, "temperature": temperature},
        budget_ratio=run.budget_ratio,
        floor=run.floor if run.budget_ratio is not None and any(run.floor.values()) else {},
    )


def anneal_ask(
    run: AnnealingRun, config: object, problem: PruningProblem, rng: random.Random, budget: int | None
) -> tuple[AnnealingRun, list[Job]]:
    """The next proposals (at most ``budget``; ``None`` = unbounded). Re-asking before a tell returns the
    same pending jobs, so a runner that crashed between ask and tell replays them harmlessly."""
    if run.pending:
        return run, list(run.pending)
    if run.finished:
        return run, []
    if budget is not None and budget <= 0:
        return run.model_copy(update={"finished": True}), []
    start_t = float(config.start_temperature)  # type: ignore[attr-defined]
    stop_t = float(config.stop_temperature)  # type: ignore[attr-defined]
    jobs: list[Job] = []
    fractions_list: list[dict[str, float]] = []
    update: dict[str, object] = {}
    if run.step == 0:
        # The starting point is evaluated first: the chain needs a current score.
        distribution = rescale_above(run.current, run.floor, run.target, problem)[1]
        jobs.append(_job(run, distribution, run.temperature))
        fractions_list.append(run.current)
        update["step"] = 1
    else:
        batch = int(getattr(config, "batch_size", 1))
        if budget is not None:
            batch = min(batch, budget)
        temperature = run.temperature
        step = run.step
        if temperature <= stop_t:
            return run.model_copy(update={"finished": True}), []
        for _ in range(batch):
            if temperature <= stop_t:
                break
            magnitude = float(config.perturbation_magnitude) * temperature / start_t  # type: ignore[attr-defined]
            proposal = {}
            for unit in problem.units:
                value = run.current[unit.name] + rng.uniform(-magnitude, magnitude)
                proposal[unit.name] = min(max(value, 0.0), 1.0)
            fractions, distribution = rescale_above(proposal, run.floor, run.target, problem)
            jobs.append(_job(run.model_copy(update={"step": step}), distribution, temperature))
            fractions_list.append(fractions)
            temperature *= float(config.cool_down_rate)  # type: ignore[attr-defined]
            step += 1
        update |= {"temperature": temperature, "step": step}
    update |= {"pending": jobs, "pending_fractions": fractions_list}
    return run.model_copy(update=update), jobs


def anneal_tell(
    run: AnnealingRun,
    results: list[Result],
    config: object,
    problem: SearchProblem,
    rng: random.Random,
) -> AnnealingRun:
    """Consider the batch's results in order with the normalised Metropolis rule."""
    start_t = float(config.start_temperature)  # type: ignore[attr-defined]
    sign = direction(problem.optimize_mode)
    by_key = {result.key: result for result in results}
    current, current_score, stats = run.current, run.current_score, run.stats
    best_key, best_score, best_distribution = run.best_key, run.best_score, run.best_distribution
    history = list(run.history)
    for job, fractions in zip(run.pending, run.pending_fractions, strict=True):
        result = by_key.get(job.key)
        # One uniform draw per proposal whatever happens, so the generator's path never depends on scores.
        draw = rng.random()
        ok = result is not None and result.status == "succeeded" and result.score is not None
        if not ok:
            history.append(TrialRecord(key=job.key, decision="failed", context=job.context))
            continue
        assert result is not None and result.score is not None
        score = float(result.score)
        stats = stats.add(score)
        evaluated = evaluated_distribution(result, job)
        if "distribution" in result.extra:
            # The chain moves to what was evaluated (the proposal projected onto the budget), not the raw proposal.
            fractions = {
                name: (value - run.floor.get(name, 0.0)) / max(1.0 - run.floor.get(name, 0.0), 1e-12)
                for name, value in evaluated.items()
            }
        probability: float | None = None
        if current_score is None:
            accepted = True
        else:
            std = stats.std
            delta = 0.0 if std == 0.0 else sign * (score - current_score) / std
            relative_t = float(job.context["temperature"]) / start_t
            improved = sign * (score - current_score) > 0.0
            # A worse-or-equal proposal is taken with the Metropolis probability (1 for a tie in normalised terms).
            probability = None if improved else min(1.0, math.exp(delta / relative_t))
            accepted = improved or draw < (probability or 0.0)
        if accepted:
            current, current_score = fractions, score
        if meets_goal(result, job, problem, run.budget_ratio) and better(score, best_score, problem.optimize_mode):
            best_key, best_score, best_distribution = job.key, score, evaluated
        history.append(
            TrialRecord(
                key=job.key,
                score=score,
                overall_sparsity=result.overall_sparsity,
                resource=result.budget_ratio,
                decision="accepted" if accepted else "rejected",
                acceptance_probability=probability,
                context=job.context,
            )
        )
    stop_t = float(config.stop_temperature)  # type: ignore[attr-defined]
    return run.model_copy(
        update={
            "current": current,
            "current_score": current_score,
            "stats": stats,
            "pending": [],
            "pending_fractions": [],
            "best_key": best_key,
            "best_score": best_score,
            "best_distribution": best_distribution,
            "history": history,
            "finished": run.finished or (run.step > 0 and run.temperature <= stop_t),
        }
    )


class PatternChain(BaseModel):
    """The annealing chain of a pattern search (``score_target_drop``): a set of patterned units."""

    progress: PatternProgress
    current: list[str] = Field(default_factory=list)  # patterned units of the chain's state (starts dense)
    current_removed: int = 0
    temperature: float
    step: int = 0
    pending: list[Job] = Field(default_factory=list)
    finished: bool = False


class AnnealingState(SearchState):
    version: int = 1
    problem: SearchProblem
    max_trials: int | None = None
    run: AnnealingRun
    best_distribution: dict[str, float] | None = None
    pattern: PatternChain | None = None  # set (and ``run`` unused) in a pattern search
    finalists: FinalistsState | None = None  # the finalist round (pruning.search.finalists), when asked


def _pattern_job(config: AnnealingConfig, key_step: int, distribution: dict[str, float], temperature: float) -> Job:
    epochs = config.finetune_epochs
    return Job(
        key=f"annealing-{key_step}",
        kind="finetune_and_evaluate" if epochs else "evaluate",
        distribution=distribution,
        finetune_epochs=epochs,
        context={"iteration": key_step, "temperature": temperature},
    )


def _flip(current: list[str], names: list[str], count: int, rng: random.Random) -> list[str]:
    flipped = set(current) ^ set(rng.sample(names, count))
    return sorted(flipped)


def pattern_ask(
    chain: PatternChain, config: AnnealingConfig, problem: SearchProblem, rng: random.Random, budget: int | None
) -> tuple[PatternChain, list[Job]]:
    """Step 0 evaluates the dense model (its score sets the target); later steps flip a few units of the chain's
    set each, more at high temperature (``perturbation_magnitude * T / T0`` of them, at least one), preferring
    sets not evaluated yet."""
    if chain.pending:
        return chain, list(chain.pending)
    if chain.finished:
        return chain, []
    names = [unit.name for unit in pattern_units(problem.pruning)]
    space = 2 ** len(names)
    progress = chain.progress
    if (
        (budget is not None and budget <= 0)
        or chain.temperature <= config.stop_temperature
        or progress.dense_failed
        or (chain.step > 0 and len(progress.evaluated) >= space)
    ):
        return chain.model_copy(update={"finished": True}), []
    if chain.step == 0:
        job = _pattern_job(config, 0, dense_distribution(problem.pruning), chain.temperature)
        return chain.model_copy(update={"step": 1, "pending": [job]}), [job]
    batch = config.batch_size if budget is None else min(config.batch_size, budget)
    temperature, step = chain.temperature, chain.step
    jobs: list[Job] = []
    seen = set(progress.evaluated)
    for _ in range(batch):
        if temperature <= config.stop_temperature:
            break
        share = config.perturbation_magnitude * temperature / config.start_temperature
        count = max(1, min(len(names), round(share * len(names))))
        proposal = _flip(chain.current, names, count, rng)
        # A set already evaluated teaches nothing: redraw, flipping one more unit every four tries, so a chain
        # whose near neighbours are all known reaches further instead of repeating one of them.
        for attempt in range(1, 16):
            if ",".join(proposal) not in seen:
                break
            proposal = _flip(chain.current, names, min(len(names), count + attempt // 4), rng)
        seen.add(",".join(proposal))
        jobs.append(_pattern_job(config, step, pattern_distribution(problem.pruning, proposal), temperature))
        temperature *= config.cool_down_rate
        step += 1
    return chain.model_copy(update={"temperature": temperature, "step": step, "pending": jobs}), jobs


def pattern_tell(
    chain: PatternChain, results: list[Result], config: AnnealingConfig, problem: SearchProblem, rng: random.Random
) -> PatternChain:
    """A candidate below the score target is rejected (decision ``"infeasible"``); a feasible one is taken when
    it removes at least as many weights as the chain's state, else with the Metropolis probability of the
    removed-weight difference (as a fraction of the patternable weights) at the relative temperature."""
    by_key = {result.key: result for result in results}
    total = max(1, removed_weights(problem.pruning, [unit.name for unit in pattern_units(problem.pruning)]))
    progress, current, current_removed = chain.progress, list(chain.current), chain.current_removed
    for job in chain.pending:
        draw = rng.random()  # one draw per proposal whatever happens, as in the continuous chain
        chosen = chosen_units(job.distribution)
        removed = removed_weights(problem.pruning, chosen)
        result = by_key.get(job.key)
        accepted: bool | None = None
        score = result.score if result is not None and result.status == "succeeded" else None
        # Only a feasible candidate takes part in the chain (the dense reference sets the target, so it has none).
        if score is not None and progress.target is not None and progress.feasible(float(score)):
            delta = (removed - current_removed) / total
            relative_t = float(job.context["temperature"]) / config.start_temperature
            accepted = delta >= 0 or draw < math.exp(delta / relative_t)
        progress, feasible = progress.record(job.key, job.distribution, result, removed, job.context, accepted)
        if feasible and accepted:
            current, current_removed = chosen, removed
    return chain.model_copy(
        update={"progress": progress, "current": current, "current_removed": current_removed, "pending": []}
    )


class AnnealingSearch:
    """Simulated annealing at the target sparsity; see the module docstring for the acceptance rule.

    Example::

        search = AnnealingSearch(AnnealingConfig(algorithm="annealing", config_list=[...]))
        state = search.start(problem)
        state, jobs = search.ask(state)   # first the starting distribution, then batch_size proposals a step
    """

    def __init__(self, config: AnnealingConfig) -> None:
        self.config = config

    def start(self, problem: SearchProblem) -> AnnealingState:
        if self.config.score_target_drop is not None:
            return self._start_pattern(problem)
        run = anneal_start(
            self.config,
            problem.pruning,
            prefix="annealing",
            target=problem.pruning.target_sparsity,
            finetune_epochs=self.config.finetune_epochs,
            budget_ratio=budget_ratio(problem),
        )
        return AnnealingState(
            rng=RandomState.seeded(problem.seed),
            run=run,
            max_trials=trial_budget(self.config.max_trials, problem.max_trials),
            problem=problem,
        )

    def ask(self, state: AnnealingState) -> tuple[AnnealingState, list[Job]]:
        if state.done:
            return state, []
        assert state.rng is not None
        rng = state.rng.restore()
        if state.pattern is not None:
            return self._ask_pattern(state, state.pattern, rng)
        budget = None if state.max_trials is None else state.max_trials - state.trials_asked
        if state.run.pending:
            budget = None
        problem = state.problem
        run, jobs = anneal_ask(state.run, self.config, problem.pruning, rng, budget)
        asked = 0 if state.run.pending else len(jobs)
        update: dict[str, object] = {
            "run": run,
            "rng": RandomState.capture(rng),
            "trials_asked": state.trials_asked + asked,
        }
        if not jobs:
            update |= {"done": True, "stop_reason": _stop_reason(state, self.config)}
        return state.model_copy(update=update), jobs

    def tell(self, state: AnnealingState, results: list[Result]) -> AnnealingState:
        assert state.rng is not None
        rng = state.rng.restore()
        if state.pattern is not None:
            return self._tell_pattern(state, state.pattern, results, rng)
        run = anneal_tell(state.run, results, self.config, state.problem, rng)
        config = self.config
        steps = 1 + math.ceil(
            math.log(config.stop_temperature / config.start_temperature) / math.log(config.cool_down_rate)
        )
        return _told(state, {"run": run}, len(run.history), steps, rng, run)


    def _start_pattern(self, problem: SearchProblem) -> AnnealingState:
        assert self.config.score_target_drop is not None
        temperature = float(self.config.start_temperature)
        progress = PatternProgress(drop=self.config.score_target_drop, optimize_mode=problem.optimize_mode)
        # ``run`` is the continuous chain's and unused here; a finished empty one keeps the state's schema.
        run = AnnealingRun(prefix="annealing", target=0.0, floor={}, temperature=temperature, current={}, finished=True)
        return AnnealingState(
            rng=RandomState.seeded(problem.seed),
            run=run,
            max_trials=trial_budget(self.config.max_trials, problem.max_trials),
            problem=problem,
            pattern=PatternChain(progress=progress, temperature=temperature),
        )

    def _ask_pattern(
        self, state: AnnealingState, chain: PatternChain, rng: random.Random
    ) -> tuple[AnnealingState, list[Job]]:
        budget = None if state.max_trials is None else state.max_trials - state.trials_asked
        replay = bool(chain.pending)
        chain, jobs = pattern_ask(chain, self.config, state.problem, rng, None if replay else budget)
        update: dict[str, object] = {
            "pattern": chain,
            "rng": RandomState.capture(rng),
            "trials_asked": state.trials_asked + (0 if replay else len(jobs)),
        }
        if not jobs:
            if chain.progress.dense_failed:
                reason = "the dense model's evaluation failed, so there is no score target"
            elif chain.step > 0 and len(chain.progress.evaluated) >= 2 ** len(pattern_units(state.problem.pruning)):
                reason = "every assignment of the pattern was evaluated"
            else:
                reason = _stop_reason(state, self.config)
            update |= {"done": True, "stop_reason": reason}
        return state.model_copy(update=update), jobs

    def _tell_pattern(
        self, state: AnnealingState, chain: PatternChain, results: list[Result], rng: random.Random
    ) -> AnnealingState:
        chain = pattern_tell(chain, results, self.config, state.problem, rng)
        return _told(state, {"pattern": chain}, len(chain.progress.history), self.config.proposals(), rng,
                     chain.progress)


def _told(
    state: AnnealingState,
    chain: dict[str, object],
    told: int,
    planned: int,
    rng: random.Random,
    best: AnnealingRun | PatternProgress,
) -> AnnealingState:
    """``state`` after a tell: the updated ``chain`` field, progress (``told`` of ``planned`` proposals, capped by
    ``max_trials``), the generator and the best so far as the chain keeps it."""
    total = planned if state.max_trials is None else min(planned, state.max_trials)
    return state.model_copy(
        update={
            **chain,
            "progress": float(told),
            "progress_total": float(total),
            "rng": RandomState.capture(rng),
            "best_key": best.best_key,
            "best_score": best.best_score,
            "best_distribution": best.best_distribution,
        }
    )


def _stop_reason(state: AnnealingState, config: AnnealingConfig) -> str:
    if state.max_trials is not None and state.trials_asked >= state.max_trials:
        return f"max_trials ({state.max_trials}) reached"
    return f"temperature reached stop_temperature ({config.stop_temperature})"
