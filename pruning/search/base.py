"""The search protocol: every strategy is an ask/tell state machine over per-unit sparsity distributions.

Who calls what, and when (``worker/runner.py`` is the caller)::

    strategy = make_strategy(config)                  # holds its pydantic config only
    state = strategy.start(problem)                   # once, when the experiment starts
    while True:
        state, jobs = strategy.ask(state)             # independent jobs; [] with state.done -> finished
        if not jobs and state.done:
            break
        results = [execute_job(task, problem.pruning, job, store) for job in jobs]
        state = strategy.tell(state, results)         # the runner persists state.model_dump_json() here

A strategy keeps nothing in memory between calls: its state is a pydantic value with a schema ``version`` and its
seeded random generator inside (:class:`RandomState`), so a fresh strategy continuing from a reloaded state
proposes exactly what the original would have. A :class:`Job` is self-contained (what to do, the distribution,
the parent checkpoint artifact, the training budget); a :class:`Result` carries what the job measured.
"""

from __future__ import annotations

import base64
import random
import struct
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pruning.budget import Budget
from pruning.config import PruningProblem

__all__ = [
    "Job",
    "JobKind",
    "RandomState",
    "Result",
    "SearchProblem",
    "SearchState",
    "Strategy",
    "better",
]

JobKind = Literal[
    "evaluate",
    "finetune_and_evaluate",
    "admm_train",
    "shrink",
    "train",
    "netadapt_candidate",
    "agp_step",
    "iterative_round",
    "lottery_round",
]


class Job(BaseModel):
    """One self-contained unit of work. ``key`` is unique within an experiment and deterministic, so a replayed
    job is recognised (trials are unique on ``(experiment, job key)``)."""

    model_config = ConfigDict(frozen=True)

    key: str
    kind: JobKind = "evaluate"
    distribution: dict[str, float] = Field(default_factory=dict)  # unit name -> sparsity (original model)
    parent_artifact: str | None = None  # weights to start from; None = the task's model()
    finetune_epochs: int = 0
    save_artifact: bool = False  # keep the resulting weights (a parent for later jobs, or the downloadable model)
    params: dict[str, Any] = Field(default_factory=dict)  # kind-specific parameters (ADMM's rho, Z, U ids, ...)
    context: dict[str, Any] = Field(default_factory=dict)  # the strategy's context, stored on the trial
    # With a budget: project ``distribution`` onto this fraction of the dense value of the budget's resource
    # before running (a global scale of its shape above ``floor``); None runs the distribution as given.
    budget_ratio: float | None = None
    floor: dict[str, float] = Field(default_factory=dict)  # per-unit sparsity the projection never goes below
    # The distribution is already an earlier trial's projection onto ``budget_ratio`` (a finalist re-running a
    # candidate): run it exactly. Projecting again would spend rounding slack a second time.
    projected: bool = False


class Result(BaseModel):
    """What a job measured. Ratios are of the physically shrunk model (structured) against the dense one;
    for fine-grained base algorithms ``params`` counts non-zero parameters."""

    key: str
    status: Literal["succeeded", "failed"] = "succeeded"
    score: float | None = None
    requested: dict[str, float] = Field(default_factory=dict)  # per layer
    achieved: dict[str, float] = Field(default_factory=dict)  # per layer
    overall_sparsity: float | None = None
    params: int | None = None
    flops: int | None = None
    params_ratio: float | None = None
    flops_ratio: float | None = None
    latency_ms: float | None = None
    artifact: str | None = None
    error: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)  # kind-specific measurements (ADMM residual, Z/U ids)
    duration_s: float = 0.0
    # With a budget: the shrunk model's measured value of the budget's resource over the dense one, and whether
    # that meets the budget. ``evaluation`` says how the score was taken (BatchNorm recalibration, fine-tuning).
    budget_ratio: float | None = None
    feasible: bool | None = None
    evaluation: dict[str, Any] = Field(default_factory=dict)


class SearchProblem(BaseModel):
    """What a strategy searches: the resolved pruning problem plus the experiment's objective and budget."""

    pruning: PruningProblem
    optimize_mode: Literal["maximize", "minimize"] = "maximize"
    resource: Literal["params", "flops", "latency"] = "params"
    seed: int = 0
    max_trials: int | None = None
    budget: Budget | None = None  # physical budget; candidates are projected onto it (see pruning.budget)
    dense_latency_ms: float | None = None  # measured at resolution for latency budgets (median)
    dense_latency_spread_ms: float | None = None
    bn_recalibration: bool = False  # re-estimate BatchNorm statistics before scoring a candidate
    calibration_batches: int = 16


class RandomState(BaseModel):
    """A seeded random generator whose whole state is JSON (``random.Random`` Mersenne Twister).

    Its 625 words are stored packed (``packed``: base64 of little-endian uint32s), one string of 3.3 kB: as a list
    of numbers (``internal``, how earlier versions stored it, still read) they were 7 kB of the state an advance
    serialises and writes at every step, encoded number by number."""

    internal: list[int] | None = None
    packed: str | None = None
    gauss_next: float | None = None

    @model_validator(mode="after")
    def _one_form(self) -> RandomState:
        if (self.internal is None) == (self.packed is None):
            raise ValueError("a random state has exactly one of internal and packed")
        return self

    @classmethod
    def seeded(cls, seed: int) -> RandomState:
        return cls.capture(random.Random(seed))

    @classmethod
    def capture(cls, rng: random.Random) -> RandomState:
        version, internal, gauss_next = rng.getstate()
        assert version == 3
        words = struct.pack(f"<{len(internal)}I", *internal)
        return cls(packed=base64.b64encode(words).decode("ascii"), gauss_next=gauss_next)

    def restore(self) -> random.Random:
        if self.packed is not None:
            words = base64.b64decode(self.packed)
            internal = struct.unpack(f"<{len(words) // 4}I", words)
        else:
            assert self.internal is not None
            internal = tuple(self.internal)
        rng = random.Random()
        rng.setstate((3, tuple(internal), self.gauss_next))
        return rng


class SearchState(BaseModel):
    """Fields every strategy's state has. Subclasses add their own and bump ``version`` when they change."""

    version: int = 1
    done: bool = False
    trials_asked: int = 0
    best_key: str | None = None  # the job key of the best feasible result so far
    best_score: float | None = None
    stop_reason: str | None = None  # why the search ended early (budget, unreachable target, ...)
    rng: RandomState | None = None
    # Progress as the strategy measures it (trials, iterations, or NetAdapt's measured resource) and a phase label.
    progress: float | None = None
    progress_total: float | None = None
    phase: str | None = None


StateT = TypeVar("StateT", bound=SearchState)


class Strategy(Protocol, Generic[StateT]):
    """A search strategy: holds its config, passes its state in and out."""

    def start(self, problem: SearchProblem) -> StateT:
        """The initial state for ``problem`` (seeded from ``problem.seed``)."""
        ...

    def ask(self, state: StateT) -> tuple[StateT, list[Job]]:
        """The next batch of independent jobs; ``[]`` with ``state.done`` means finished."""
        ...

    def tell(self, state: StateT, results: list[Result]) -> StateT:
        """Fold the batch's results (same order as the jobs) into the state."""
        ...


def better(a: float, b: float | None, mode: str) -> bool:
    """Whether score ``a`` beats ``b`` under ``optimize_mode`` (``None`` is beaten by anything)."""
    if b is None:
        return True
    return a > b if mode == "maximize" else a < b
