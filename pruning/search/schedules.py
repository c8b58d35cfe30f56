"""Pruning schedules as experiments: ``agp``, ``iterative`` and ``lottery_ticket``.

The systems users come from do not search a distribution, they prune on a schedule while training. Each schedule
here is a strategy of the same ask/tell protocol with one job per pruning step or round, so a killed worker resumes
between rounds, and the same trials, history, best, Pareto front and model download as the searches:

* ``agp`` (Zhu & Gupta 2017; TensorFlow's model_pruning, NNI's AGP): at the pruning epochs
  ``begin_step + k * frequency`` (and ``end_step``) the masks are updated to
  ``s_t = s_f + (s_i - s_f) * (1 - (t - begin_step) / (end_step - begin_step)) ** exponent``
  (:func:`pruning.schedule.agp_sparsity`), then the user's trainer runs until the next pruning epoch; after
  ``end_step``, ``finetune_epochs`` of training are the final fine-tune. Job kind ``agp_step``.
* ``iterative`` (Han et al. 2015): round ``r`` of ``n`` prunes to ``1 - (1 - s) ** (r / n)`` (a fraction
  ``1 - (1 - s) ** (1 / n)`` of what remained) and retrains ``retrain_epochs``. Job kind ``iterative_round``.
* ``lottery_ticket`` (Frankle & Carbin 2019; NNI's LotteryTicketPruner): round 0 trains the task's
  ``init_model()`` densely; round ``r`` of ``n`` prunes to ``1 - (1 - P) ** (r / n)`` on the previous round's
  trained weights, rewinds the survivors to the initial weights (or those after ``rewind_epoch`` epochs) and
  trains ``epochs`` again. Job kind ``lottery_round``.

With ``ranking: "layer"`` every unit follows the formula with its own config-list sparsity (counts are the
library's: ``round(s * n)`` elements, blocks or channels). With ``ranking: "global"`` the formula gives the overall
sparsity and one threshold across all selected layers decides what goes
(:func:`pruning.pruner.global_distribution`), so the per-layer split emerges from the weights.

Pruning is monotonic: what an earlier step removed is ranked below every survivor, so each step removes exactly
its formula's count, a superset of the previous step's. A step's weights (checkpoint) and, for lottery tickets,
the rewind weights go to the artifact store; the state keeps their ids. The final step (the only one at the
target) is the best and saves its shrunk model for download itself (the runner's rebuild re-executes generic
kinds only). A schedule needs all of its jobs: with ``max_trials`` below that it stops at once, saying so.

Job kinds ``agp_step``, ``iterative_round`` and ``lottery_round`` are executed by :func:`execute`.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from pruning.config import initial_distribution, overall_sparsity, rescale
from pruning.schedule import agp_sparsity
from pruning.search._common import TrialRecord, budget_ratio, meets_goal, trial_budget
from pruning.search.base import Job, JobKind, Result, SearchProblem, SearchState, better
from pruning.search.configs import AGPConfig, IterativeConfig, LotteryTicketConfig
from pruning.search.finalists import FinalistsState

__all__ = [
    "AGPSearch",
    "AGPState",
    "IterativeSearch",
    "IterativeState",
    "LotteryTicketSearch",
    "LotteryTicketState",
    "ScheduleStep",
    "execute",
]


class ScheduleStep(BaseModel):
    """One pruning step of a schedule, as :func:`execute` runs it (computed from the config, never stored)."""

    index: int
    key: str
    distribution: dict[str, float]  # per unit (with global ranking: the nominal split of `sparsity`)
    sparsity: float  # the overall sparsity the step reaches
    train_epochs: int  # trainer epochs after pruning
    first_epoch: int = 0  # the epoch number the trainer sees first after pruning
    pretrain_epochs: int = 0  # dense epochs before the first pruning (AGP's begin_step, the rewind point)
    from_init: bool = False  # start from task.init_model() (lottery round 0)
    save_rewind: bool = False  # keep the weights before pruning as the rewind point (lottery round 0)
    rewind: bool = False  # reset the survivors to the rewind point (lottery rounds >= 1)
    final: bool = False
    context: dict[str, Any] = Field(default_factory=dict)


class _ScheduleState(SearchState):
    version: int = 1
    problem: SearchProblem
    ranking: Literal["layer", "global"] = "layer"
    final_distribution: dict[str, float]  # per unit at the end of the schedule
    target: float  # overall sparsity at the end of the schedule
    total_steps: int
    next_step: int = 0
    parent_artifact: str | None = None  # checkpoint of the previous step (None = the task's model())
    rewind_artifact: str | None = None  # lottery tickets: the weights survivors are reset to
    pending: list[Job] = Field(default_factory=list)
    history: list[TrialRecord] = Field(default_factory=list)
    best_distribution: dict[str, float] | None = None
    max_trials: int | None = None
    finalists: FinalistsState | None = None  # the uniform guard (pruning.search.finalists), under a budget


class AGPState(_ScheduleState):
    pass


class IterativeState(_ScheduleState):
    pass


class LotteryTicketState(_ScheduleState):
    pass


ConfigT = TypeVar("ConfigT", bound=AGPConfig | IterativeConfig | LotteryTicketConfig)


class _ScheduleSearch(Generic[ConfigT]):
    """Shared ask/tell of the schedules: run the steps in order, each from the previous step's weights."""

    kind: JobKind
    algorithm: str
    state_class: type[_ScheduleState]

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def total_steps(self) -> int:
        raise NotImplementedError

    def step(self, state: _ScheduleState, index: int) -> ScheduleStep:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ start
    def final_distribution(self, problem: SearchProblem) -> dict[str, float]:
        """Each unit's sparsity at the end of the schedule: the config list's."""
        return initial_distribution(problem.pruning)

    def start(self, problem: SearchProblem) -> _ScheduleState:
        final = self.final_distribution(problem)
        total = self.total_steps()
        state = self.state_class(
            problem=problem,
            ranking=self.config.ranking,
            final_distribution=final,
            target=overall_sparsity(final, problem.pruning),
            total_steps=total,
            max_trials=trial_budget(self.config.max_trials, problem.max_trials),
            progress=0.0,
            progress_total=float(total),
            phase=f"{self.algorithm}: 0/{total}",
        )
        if state.max_trials is not None and state.max_trials < total:
            reason = (
                f"max_trials ({state.max_trials}) is below the {total} jobs this {self.algorithm} schedule needs "
                "(one per pruning step); raise max_trials or shorten the schedule"
            )
            return state.model_copy(update={"done": True, "stop_reason": reason})
        return state

    def scaled(self, state: _ScheduleState, fraction_left: float) -> dict[str, float]:
        """Every unit at ``1 - (1 - s_u) ** fraction_left``: the compounding of iterative and lottery rounds."""
        return {name: 1.0 - (1.0 - s) ** fraction_left for name, s in state.final_distribution.items()}

    def make_step(
        self, state: _ScheduleState, index: int, distribution: dict[str, float], **fields: Any
    ) -> ScheduleStep:
        if state.ranking == "global":
            sparsity = float(fields.pop("global_sparsity"))
            # The job's nominal distribution at the step's overall sparsity; the executor ranks globally.
            distribution = (
                rescale(state.final_distribution, sparsity, state.problem.pruning) if state.target > 0 else distribution
            )
        else:
            fields.pop("global_sparsity", None)
            sparsity = overall_sparsity(distribution, state.problem.pruning)
        final = index == state.total_steps - 1
        context = {**fields.pop("context"), "sparsity": sparsity}
        if final:
            context["final"] = True
        return ScheduleStep(
            index=index, distribution=distribution, sparsity=sparsity, final=final, context=context, **fields
        )

    # -------------------------------------------------------------------------------------------------- ask
    def ask(self, state: _ScheduleState) -> tuple[_ScheduleState, list[Job]]:
        if state.done:
            return state, []
        if state.pending:
            return state, list(state.pending)
        if state.next_step >= state.total_steps:
            return state.model_copy(update={"done": True}), []
        step = self.step(state, state.next_step)
        job = Job(
            key=step.key,
            kind=self.kind,
            distribution=step.distribution,
            parent_artifact=state.parent_artifact,
            finetune_epochs=step.train_epochs,
            save_artifact=step.final,
            params={
                "algorithm": self.algorithm,
                "ranking": state.ranking,
                "target": step.sparsity,
                "first_epoch": step.first_epoch,
                "pretrain_epochs": step.pretrain_epochs,
                "from_init": step.from_init,
                "save_rewind": step.save_rewind,
                "rewind": state.rewind_artifact if step.rewind else None,
            },
            context=step.context,
            # Under a budget the final step is projected onto it; earlier steps follow the schedule towards it.
            budget_ratio=budget_ratio(state.problem) if step.final else None,
        )
        update = {"pending": [job], "trials_asked": state.trials_asked + 1}
        return state.model_copy(update=update), [job]

    # ------------------------------------------------------------------------------------------------- tell
    def tell(self, state: _ScheduleState, results: list[Result]) -> _ScheduleState:
        if not state.pending:
            return state
        job = state.pending[0]
        result = next((r for r in results if r.key == job.key), None)
        state = state.model_copy(update={"pending": []})
        final = bool(job.context.get("final"))
        if result is None or result.status != "succeeded" or result.score is None or not result.artifact:
            error = "no result" if result is None else (result.error or "no score or weights")
            record = _record(job, result, "failed")
            reason = f"{job.key} failed: {error}; the schedule cannot continue without that step's weights"
            return state.model_copy(update={"done": True, "stop_reason": reason, "history": [*state.history, record]})
        distribution = dict(result.extra.get("distribution") or job.distribution)
        update: dict[str, Any] = {
            "next_step": state.next_step + 1,
            "parent_artifact": result.artifact,
            "rewind_artifact": result.extra.get("rewind_artifact") or state.rewind_artifact,
            "progress": float(state.next_step + 1),
            "phase": f"{self.algorithm}: {state.next_step + 1}/{state.total_steps}",
        }
        # Only the final step reaches the target: it is the deliverable (and saved its model for download).
        feasible = state.problem.budget is None or meets_goal(result, job, state.problem)
        if final and feasible and better(result.score, state.best_score, state.problem.optimize_mode):
            update |= {"best_key": result.key, "best_score": result.score, "best_distribution": distribution}
        update["history"] = [*state.history, _record(job, result, "final" if final else "step")]
        if state.next_step + 1 >= state.total_steps:
            update |= {"done": True, "stop_reason": f"{self.algorithm} schedule complete ({state.total_steps} jobs)"}
        return state.model_copy(update=update)


def _record(job: Job, result: Result | None, decision: str) -> TrialRecord:
    return TrialRecord(
        key=job.key,
        score=None if result is None else result.score,
        overall_sparsity=None if result is None else result.overall_sparsity,
        decision=decision,
        context=job.context,
    )


class AGPSearch(_ScheduleSearch[AGPConfig]):
    """Automated gradual pruning: one ``agp_step`` job per pruning epoch (see the module docstring).

    Example::

        config = AGPConfig(algorithm="agp", config_list=[...], begin_step=0, end_step=4, frequency=1)
        search = AGPSearch(config)
        state = search.start(problem)
        state, jobs = search.ask(state)   # step 0: prune to initial_sparsity at epoch 0, train one epoch
    """

    kind: JobKind = "agp_step"
    algorithm = "agp"
    state_class = AGPState

    def epochs(self) -> list[int]:
        """The pruning epochs: ``begin_step + k * frequency`` up to ``end_step``, and ``end_step`` itself."""
        c = self.config
        grid = list(range(c.begin_step, c.end_step + 1, c.frequency))
        if grid[-1] != c.end_step:
            grid.append(c.end_step)
        return grid

    def total_steps(self) -> int:
        return len(self.epochs())

    def final_distribution(self, problem: SearchProblem) -> dict[str, float]:
        base = initial_distribution(problem.pruning)
        if self.config.target_sparsity is None:
            return base
        return rescale(base, self.config.target_sparsity, problem.pruning)

    def step(self, state: _ScheduleState, index: int) -> ScheduleStep:
        c = self.config
        grid = self.epochs()
        t = grid[index]

        def at(final: float) -> float:
            return agp_sparsity(
                t, min(c.initial_sparsity, final), final, c.begin_step, c.end_step, c.frequency, c.exponent
            )

        last = index == len(grid) - 1
        return self.make_step(
            state,
            index,
            {name: at(final) for name, final in state.final_distribution.items()},
            key=f"agp-step{index}",
            global_sparsity=at(state.target),
            train_epochs=c.finetune_epochs if last else grid[index + 1] - t,
            first_epoch=t,
            pretrain_epochs=c.begin_step if index == 0 else 0,
            context={"step": index, "epoch": t},
        )


class IterativeSearch(_ScheduleSearch[IterativeConfig]):
    """Iterative pruning and retraining (Han et al.): one ``iterative_round`` job per round."""

    kind: JobKind = "iterative_round"
    algorithm = "iterative"
    state_class = IterativeState

    def total_steps(self) -> int:
        return self.config.rounds

    def step(self, state: _ScheduleState, index: int) -> ScheduleStep:
        c = self.config
        r, last = index + 1, index == c.rounds - 1
        return self.make_step(
            state,
            index,
            dict(state.final_distribution) if last else self.scaled(state, r / c.rounds),
            key=f"iterative-round{r}",
            global_sparsity=state.target if last else 1.0 - (1.0 - state.target) ** (r / c.rounds),
            train_epochs=c.retrain_epochs + (c.finetune_epochs if last else 0),
            context={"round": r},
        )


class LotteryTicketSearch(_ScheduleSearch[LotteryTicketConfig]):
    """Lottery tickets: one ``lottery_round`` job for the dense round 0 and one per pruning round."""

    kind: JobKind = "lottery_round"
    algorithm = "lottery_ticket"
    state_class = LotteryTicketState

    def total_steps(self) -> int:
        return self.config.prune_iterations + 1

    def step(self, state: _ScheduleState, index: int) -> ScheduleStep:
        c = self.config
        n, last = c.prune_iterations, index == c.prune_iterations
        if index == 0:
            distribution = {name: 0.0 for name in state.final_distribution}
            overall = 0.0
        elif last:
            distribution, overall = dict(state.final_distribution), state.target
        else:
            distribution = self.scaled(state, index / n)
            overall = 1.0 - (1.0 - state.target) ** (index / n)
        return self.make_step(
            state,
            index,
            distribution,
            key=f"lottery-round{index}",
            global_sparsity=overall,
            train_epochs=c.epochs + (c.finetune_epochs if last else 0),
            first_epoch=c.rewind_epoch,
            pretrain_epochs=c.rewind_epoch if index == 0 else 0,
            from_init=index == 0,
            save_rewind=index == 0,
            rewind=index > 0,
            context={"round": index},
        )


# ------------------------------------------------------------------------------------------------ execute
def _train(task: Any, model: Any, first_epoch: int, epochs: int, needed_by: str) -> None:
    """``epochs`` epochs of the user's trainer numbered from ``first_epoch`` (a fresh optimizer: the masks may
    have changed); a task with only a ``fine_tuner`` gets that instead."""
    if epochs <= 0:
        return
    if task.trainer is None and task.fine_tuner is not None and needed_by != "lottery_ticket":
        task.fine_tune(model, epochs)
        return
    trainer = task.require("trainer", needed_by)
    optimizer = task.make_optimizer(model)
    criterion = task.make_criterion()
    for epoch in range(first_epoch, first_epoch + epochs):
        trainer(model, optimizer, criterion, epoch)


def _mismatch(pruning: Any, requested: dict[str, float], achieved: dict[str, float]) -> str | None:
    """A reason when a layer lost more or less than its step asked for, beyond one channel, element or block
    (two blocks where partial edge blocks make the element fraction differ from the block fraction)."""
    import math

    for layer in pruning.layers:
        unit = pruning.unit(layer.unit)
        if unit.channels is not None:
            count, allowed, what = unit.channels, 1.0, "channel"
        elif unit.block is not None:
            rows, cols = layer.weight_shape[0], layer.weight_shape[1]
            count = math.ceil(rows / unit.block[0]) * math.ceil(cols / unit.block[1])
            allowed, what = 2.0, "block"
        else:
            count, allowed, what = layer.weight_count, 1.0, "element"
        if abs(requested[layer.name] - achieved.get(layer.name, 0.0)) * count > allowed + 1e-6:
            return (
                f"layer {layer.name}: requested sparsity {requested[layer.name]:.4f} but achieved "
                f"{achieved.get(layer.name, 0.0):.4f} (more than {allowed:g} {what})"
            )
    return None


def execute(task: Any, problem: SearchProblem, job: Job, store: Any, device: str = "cpu") -> Result:
    """Run one schedule step (``agp_step``, ``iterative_round`` or ``lottery_round``) and return its result.

    Starts from ``job.parent_artifact`` (``None``: the task's ``model()``; ``params["from_init"]``: the task's
    ``init_model()``, a :class:`~pruning.task.TaskError` naming it when absent), trains
    ``params["pretrain_epochs"]`` densely (and keeps those weights as the rewind point when
    ``params["save_rewind"]``), computes the step's masks with the base algorithm (``job.distribution``, or one
    global ranking at ``params["target"]``), monotonic over the parent's; resets the weights to
    ``params["rewind"]`` (lottery tickets); applies the masks, trains ``job.finetune_epochs`` epochs numbered
    from ``params["first_epoch"]``, evaluates, and saves a checkpoint (``Result.artifact``, the next step's
    parent) and, with ``job.save_artifact``, the shrunk model (``extra["model_artifact"]``).
    ``extra["distribution"]`` is the per-unit distribution the masks realise; ``extra["rewind_artifact"]`` the
    rewind point when one was saved.
    """
    from pruning.config import layer_distribution
    from pruning.jobs import load_checkpoint, measure_model, save_checkpoint, save_pruned_model
    from pruning.masks import achieved_sparsity, apply_masks, strip
    from pruning.pruner import collected_importance, compute_masks, global_distribution

    pruning = problem.pruning
    params = job.params
    algorithm = str(params.get("algorithm", job.kind))
    previous: dict[str, Any]
    if params.get("from_init"):
        init_model = task.require("init_model", f"{algorithm} (rewinding to the untrained, seeded network)")
        model, previous = init_model(), {}
    else:
        model, previous = load_checkpoint(task, store, job.parent_artifact)
    model.to(device)
    previous = {name: mask.to(device) for name, mask in previous.items()}
    if previous and int(params.get("pretrain_epochs", 0)):
        raise ValueError("dense pre-training applies to the first step only (it has no parent masks)")
    _train(task, model, 0, int(params.get("pretrain_epochs", 0)), algorithm)
    extra: dict[str, Any] = {}
    if params.get("save_rewind"):
        extra["rewind_artifact"] = save_checkpoint(store, model, {})

    # Statistics once for both calls; what the parent removed ranks first, so each count matches its formula.
    importance = collected_importance(model, pruning, task)
    distribution = dict(job.distribution)
    if params.get("ranking") == "global":
        target = float(params["target"])
        distribution = global_distribution(model, pruning, target, importance=importance, previous=previous)
    masks = compute_masks(model, pruning, distribution, importance=importance, previous=previous)
    if params.get("rewind"):
        rewound, _ = load_checkpoint(task, store, str(params["rewind"]))
        model.load_state_dict(rewound.state_dict())  # every weight and buffer back to the rewind point
    apply_masks(model, masks, structured=pruning.structured)
    _train(task, model, int(params.get("first_epoch", 0)), job.finetune_epochs, algorithm)
    score = task.evaluate(model)
    strip(model)
    requested = layer_distribution(distribution, pruning)
    achieved = achieved_sparsity(masks, pruning)
    metrics, shrunk, recipe = measure_model(model, masks, problem, task.dummy_input(), device)
    result = Result(
        key=job.key,
        score=score,
        requested=requested,
        achieved=achieved,
        overall_sparsity=overall_sparsity(distribution, pruning),
        artifact=save_checkpoint(store, model, masks),
        extra={**extra, "distribution": distribution},
        **metrics,
    )
    mismatch = _mismatch(pruning, requested, achieved)
    if mismatch:
        return result.model_copy(update={"status": "failed", "error": mismatch})
    if job.save_artifact:
        model_id = save_pruned_model(
            store, shrunk, recipe, entrypoint=task.entrypoint, base_algo=pruning.base_algo, score=score
        )
        result = result.model_copy(update={"extra": {**result.extra, "model_artifact": model_id}})
    return result
