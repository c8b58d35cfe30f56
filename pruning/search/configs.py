"""One pydantic config per search algorithm, discriminated by ``algorithm``.

The API validates request bodies with these (this module imports pydantic only, never torch), and the worker
builds its strategy from the stored, validated config. Unknown or out-of-range fields are errors naming the
field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any, Literal, NamedTuple, Self, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator, model_validator

from pruning.budget import Budget
from pruning.config import STRUCTURED_ALGOS, BaseAlgo, ConfigEntry, check_entry_sparsities

__all__ = [
    "ALGORITHMS",
    "EpochTerm",
    "GLOBAL_RANKING_ALGOS",
    "ADMMConfig",
    "AGPConfig",
    "AlgorithmConfig",
    "AnnealingConfig",
    "AutoCompressConfig",
    "CandidateEval",
    "IterativeConfig",
    "LotteryTicketConfig",
    "NetAdaptConfig",
    "OptunaConfig",
    "PATTERN_SEARCH_ALGOS",
    "Ranking",
    "SearchCommon",
    "SensitivityConfig",
    "SensitivityCurves",
    "SensitivityPoint",
    "UniformConfig",
    "UnitCurve",
    "parse_algorithm_config",
]

Ranking = Literal["layer", "global"]
# Base algorithms whose scores compare across layers, so one threshold over all selected layers means something:
# weight magnitudes (level), filter norms (l1, l2; each unit's scores divided by their mean, Torch-Pruning's
# default normaliser) and BatchNorm scales (slim, Network Slimming's rule).
GLOBAL_RANKING_ALGOS = frozenset({"level", "l1", "l2", "slim"})
# Searches with a pattern mode: which N:M units get the pattern, under a score target (pruning.search.pattern).
PATTERN_SEARCH_ALGOS = frozenset({"annealing", "optuna"})
# Strategies that only choose a distribution: their best candidates can be re-scored by a finalist round.
FINALIST_ALGOS = frozenset({"annealing", "optuna", "sensitivity"})
# Strategies that train while they search: under a budget, uniform-at-budget fine-tuned briefly may guard their best.
GUARD_ALGOS = frozenset({"netadapt", "admm", "autocompress", "agp", "iterative", "lottery_ticket"})
# Their finalist round by default under a physical budget (the product's promise: never worse than uniform-at-budget
# after the same short fine-tune).
DEFAULT_FINALISTS = 3


# Every boundary model of a config: unknown fields are errors, numbers are finite, and types are strict, so
# ``"seed": "1"`` or ``"seed": true`` is refused instead of silently becoming 1 (JSON numbers still fill float
# fields, and a JSON body's strings fill Literal fields).
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class EpochTerm(NamedTuple):
    """One term of a config's training-work estimate: ``formula`` (of its fields), the ``field`` it is
    charged to, and the trainer ``epochs`` it comes to."""

    formula: str
    field: str
    epochs: int


class CandidateEval(BaseModel):
    """How a candidate is scored: as it will finish, not as it looks the instant after pruning.

    Pruning shifts every activation statistic a BatchNorm layer saw in training, so a freshly pruned model scores
    near chance whatever its distribution; re-estimating the running statistics on a few batches (no weight
    update) makes a candidate's score predict its score after fine-tuning (EagleEye, Li et al., 2020).
    """

    model_config = _STRICT

    bn_recalibration: bool | None = Field(
        default=None,
        description="re-estimate BatchNorm running statistics before scoring; default: on when the model has BatchNorm",
    )
    calibration_batches: int = Field(default=16, ge=1, le=10_000, description="batches of the re-estimation")
    finetune_epochs: int | None = Field(
        default=None, ge=0, le=1000, description="fine-tuning epochs of each candidate (same as finetune_epochs)"
    )
    finalists: int | None = Field(
        default=None,
        ge=0,
        le=32,
        description="after the search, fine-tune its best this-many distinct candidates and uniform-at-budget "
        f"finalist_epochs each and hand out the best of them ({sorted(FINALIST_ALGOS)}; 0: off; default: "
        f"{DEFAULT_FINALISTS} with a budget, else 0)",
    )
    finalist_epochs: int = Field(default=1, ge=1, le=1000, description="fine-tuning epochs of each finalist")
    uniform_guard: bool | None = Field(
        default=None,
        description="after a strategy that trains while it searches: fine-tune uniform-at-budget finalist_epochs "
        f"and hand it out when it beats the search's best as handed out ({sorted(GUARD_ALGOS)}; default off)",
    )


class SearchCommon(BaseModel):
    """Fields every algorithm takes.

    ``budget`` (``{"flops": 0.25}``, or ``params``, or ``latency``) is a fraction of the dense model's measured
    value; with it, config-list entries only select layers (they may set ``max_sparsity``, never ``sparsity``)
    and every candidate is projected onto the budget before it is evaluated.
    """

    model_config = _STRICT

    config_list: list[ConfigEntry] = Field(min_length=1, max_length=256)
    base_algo: BaseAlgo = "l1"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    optimize_mode: Literal["maximize", "minimize"] = "maximize"
    resource: Literal["params", "flops", "latency"] = "params"
    max_trials: int | None = Field(default=None, ge=1, le=100_000)
    max_minutes: float | None = Field(default=None, gt=0, le=60 * 24 * 30)
    finetune_epochs: int = Field(default=0, ge=0, le=1000, description="fine-tuning epochs of each candidate")
    budget: Budget | None = Field(default=None, description="physical budget: one of flops, params or latency")
    candidate_eval: CandidateEval = Field(default_factory=CandidateEval)

    @model_validator(mode="before")
    @classmethod
    def _candidate_finetune(cls, data: Any) -> Any:
        # candidate_eval.finetune_epochs and finetune_epochs are one setting with two spellings.
        if isinstance(data, dict) and isinstance(data.get("candidate_eval"), dict):
            epochs = data["candidate_eval"].get("finetune_epochs")
            if epochs is not None:
                if "finetune_epochs" in data and data["finetune_epochs"] != epochs:
                    raise ValueError(
                        "candidate_eval.finetune_epochs and finetune_epochs disagree; give one of them"
                    )
                data = {**data, "finetune_epochs": epochs}
        return data

    @model_validator(mode="after")
    def _budget_rules(self) -> Self:
        check_entry_sparsities(self.config_list, budget=self.budget is not None)
        for i, entry in enumerate(self.config_list):
            if entry.pattern is None or entry.exclude:
                continue
            if self.base_algo in STRUCTURED_ALGOS:
                raise ValueError(
                    f"config_list[{i}].pattern: N:M keeps N of every M weights chosen by element scores; base_algo "
                    f"{self.base_algo!r} removes whole channels (use 'level' or 'wanda')"
                )
            # Searches move sparsities continuously; an N:M unit is only patterned or dense, so only the baseline
            # (which evaluates the config list as given) and the pattern mode of annealing/optuna (which choose
            # which units get the pattern, see pruning.search.pattern) take it.
            algorithm = getattr(self, "algorithm", None)
            if algorithm in PATTERN_SEARCH_ALGOS:
                continue
            if algorithm != "uniform" or getattr(self, "ranking", "layer") != "layer":
                raise ValueError(
                    f"config_list[{i}].pattern: N:M entries are evaluated by algorithm 'uniform' (ranking 'layer'), "
                    f"or searched by {sorted(PATTERN_SEARCH_ALGOS)} with score_target_drop"
                )
        self._finalists_apply()
        if self.budget is not None and self.budget.resource in ("flops", "latency"):
            if self.base_algo not in STRUCTURED_ALGOS:
                raise ValueError(
                    f"budget.{self.budget.resource}: fine-grained base_algo {self.base_algo!r} keeps every dense "
                    f"kernel, so FLOPs and latency do not fall; use a structured one ({sorted(STRUCTURED_ALGOS)}) "
                    "or a params budget"
                )
        return self

    @property
    def finalist_count(self) -> int:
        """How many of the search's candidates its finalist round fine-tunes besides uniform (0: no round).
        Unset, it is :data:`DEFAULT_FINALISTS` for a budgeted search that can have one, else 0."""
        given = self.candidate_eval.finalists
        if given is not None:
            return given
        if self.budget is None or self._finalists_refused() is not None:
            return 0
        if getattr(self, "curves", None) is not None:
            return 0  # re-allocating stored curves is asked to be quick: no training unless asked for
        return DEFAULT_FINALISTS

    def _finalists_refused(self) -> str | None:
        """Why this config cannot have a finalist round, or ``None`` when it can."""
        algorithm = getattr(self, "algorithm", None)
        if algorithm not in FINALIST_ALGOS:
            return (
                f"a finalist round re-scores the distributions a search chose ({sorted(FINALIST_ALGOS)}); "
                f"{algorithm!r} trains as it searches, its best is already fine-tuned"
            )
        if getattr(self, "score_target_drop", None) is not None:
            return "a pattern search (score_target_drop) has no finalist round"
        if list(getattr(self, "objectives", ["score"])) != ["score"]:
            return 'finalists are chosen on the score; objectives must be ["score"]'
        return None

    @property
    def uniform_guarded(self) -> bool:
        """Whether uniform-at-budget, fine-tuned ``finalist_epochs``, may replace this training strategy's best
        (:class:`pruning.search.finalists.FinalistSearch` with ``against_search``).

        Off unless asked for: it compares the models as handed out, and on our benchmark a search's trained best
        that scored below uniform-plus-an-epoch often finished above it after the user's own fine-tune (NetAdapt on
        the residual net: +7.2 pt over uniform unguarded, -2.2 pt guarded, in ``python -m bench.run_all --full
        --only budgets`` at commit 8d26772, where it was on by default). It is for users who deploy the handed-out
        model as it is."""
        if getattr(self, "algorithm", None) not in GUARD_ALGOS:
            return False
        return bool(self.candidate_eval.uniform_guard)

    def _finalists_apply(self) -> None:
        algorithm = getattr(self, "algorithm", None)
        if self.candidate_eval.uniform_guard is not None and algorithm not in GUARD_ALGOS:
            raise ValueError(
                f"candidate_eval.uniform_guard: applies to the strategies that train while they search "
                f"({sorted(GUARD_ALGOS)}); {algorithm!r} "
                + ("has uniform among its finalists" if algorithm in FINALIST_ALGOS else "is the baseline itself")
            )
        if self.candidate_eval.uniform_guard and self.budget is None:
            raise ValueError("candidate_eval.uniform_guard: uniform-at-budget needs a budget")
        if not self.candidate_eval.finalists:
            return
        refused = self._finalists_refused()
        if refused is not None:
            raise ValueError(f"candidate_eval.finalists: {refused}")

    def epoch_terms(self) -> list[EpochTerm]:
        """The trainer epochs this config's schedule asks for, term by term; their sum estimates the experiment's
        training work from above (a candidate count a search decides at run time is its cap, ``max_trials``).

        The API refuses a config whose sum is over ``PRUNEHUB_MAX_EPOCHS_CAP``, naming the largest term's field.
        """
        count_text, count = self._candidates()
        return [EpochTerm(f"{count_text} x finetune_epochs", "finetune_epochs", count * self.finetune_epochs)]

    def training_terms(self) -> list[EpochTerm]:
        """:meth:`epoch_terms` plus the round after the search (finalists, or the uniform guard)."""
        terms = self.epoch_terms()
        epochs = self.candidate_eval.finalist_epochs
        if self.finalist_count:
            terms.append(EpochTerm("(finalists + 1) x finalist_epochs", "candidate_eval.finalist_epochs",
                                   (self.finalist_count + 1) * epochs))
        elif self.uniform_guarded:
            terms.append(EpochTerm("uniform guard: finalist_epochs", "candidate_eval.finalist_epochs", epochs))
        return terms

    def _candidates(self) -> tuple[str, int]:
        """(what counts them, how many) candidates get the per-candidate fine-tune."""
        own_text, own = self._own_candidates()
        if self.max_trials is not None and self.max_trials < own:
            return "max_trials", self.max_trials
        return own_text, own

    def _own_candidates(self) -> tuple[str, int]:
        return "1 candidate", 1

    def trial_count_fields(self) -> dict[str, int]:
        """The fields that ask for a number of trials (capped by ``PRUNEHUB_MAX_TRIALS_CAP``)."""
        return {"max_trials": self.max_trials} if self.max_trials is not None else {}

    @property
    def effective_budget(self) -> Budget | None:
        """The physical budget the search runs under (NetAdapt also reads its older fields)."""
        return self.budget


class _GlobalRanking(BaseModel):
    """``ranking``: one threshold per layer (each unit at its own sparsity) or one across all selected layers."""

    model_config = _STRICT

    ranking: Ranking = Field(
        default="layer",
        description=(
            "'layer': every unit at its own sparsity; 'global': one threshold across all selected layers at the "
            "same overall sparsity, so the per-layer distribution emerges from the weights "
            f"(base_algo one of {sorted(GLOBAL_RANKING_ALGOS)})"
        ),
    )

    @field_validator("ranking")
    @classmethod
    def _ranking_applies(cls, value: str, info: ValidationInfo) -> str:
        base_algo = info.data.get("base_algo")
        if value == "global" and base_algo is not None and base_algo not in GLOBAL_RANKING_ALGOS:
            raise ValueError(
                f"ranking 'global' compares scores across layers and applies to base_algo "
                f"{sorted(GLOBAL_RANKING_ALGOS)}, not {base_algo!r}"
            )
        return value


class UniformConfig(_GlobalRanking, SearchCommon):
    """The baseline: every unit at its config-list sparsity, evaluated once (after ``finetune_epochs``).

    With ``ranking: "global"`` the overall sparsity is the config list's, but one threshold across all selected
    layers decides what goes (the cheap baseline every search should be compared against).
    """

    algorithm: Literal["uniform"]


class _AnnealingSchedule(BaseModel):
    """Simulated-annealing fields shared by ``annealing`` and ``autocompress`` (defaults are NNI's)."""

    model_config = _STRICT

    start_temperature: float = Field(default=100.0, gt=0, le=1e6)
    stop_temperature: float = Field(default=20.0, gt=0, le=1e6)
    cool_down_rate: float = Field(default=0.9, gt=0, lt=1)
    perturbation_magnitude: float = Field(
        default=0.35, gt=0, le=1, description="noise magnitude per unit at the start temperature"
    )
    prior: Literal["uniform", "size", "owl"] = Field(
        default="uniform",
        description="start distribution: uniform, bigger units pruned more ('size'), or outlier-weighted layer-wise "
        "sparsity ('owl': layers with more wanda-score outliers pruned less; fine-grained Linear layers)",
    )

    @model_validator(mode="after")
    def _owl_fine_grained(self) -> Self:
        base_algo = getattr(self, "base_algo", None)
        if self.prior == "owl" and base_algo in STRUCTURED_ALGOS:
            raise ValueError(
                f"prior: 'owl' allocates fine-grained layer sparsity; base_algo must be 'level' or 'wanda', not "
                f"{base_algo!r}"
            )
        return self

    @model_validator(mode="after")
    def _stop_below_start(self) -> Self:
        if self.stop_temperature >= self.start_temperature:
            raise ValueError("stop_temperature must be below start_temperature")
        return self

    def proposals(self) -> int:
        """Proposals of one annealing chain: the temperature cools by ``cool_down_rate`` on each, from
        ``start_temperature`` down to ``stop_temperature``."""
        ratio = self.stop_temperature / self.start_temperature
        return math.ceil(math.log(ratio) / math.log(self.cool_down_rate)) + 1


class _ADMMSchedule(BaseModel):
    """ADMM fields shared by ``admm`` and ``autocompress``."""

    model_config = _STRICT

    rho: float = Field(default=1e-3, gt=0, le=1e3, description="penalty weight of rho/2 ||W - Z + U||^2")
    layer_rho: dict[str, float] = Field(
        default_factory=dict,
        max_length=4096,
        description="per-layer rho overriding `rho` (layer name -> rho)",
    )
    rho_multiplier: float = Field(default=1.0, ge=1, le=10, description="rho grows by this factor per iteration")
    training_epochs: int = Field(default=1, ge=1, le=1000, description="trainer epochs per ADMM iteration")

    @model_validator(mode="after")
    def _positive_layer_rho(self) -> Self:
        for name, value in self.layer_rho.items():
            if not 0 < value <= 1e3:
                raise ValueError(f"layer_rho[{name!r}] must be in (0, 1000], got {value}")
        # Which layers exist is known only once the model is traced (on the worker: check_layer_rho), except when
        # every selecting entry names its layers: then a key outside those names can never match.
        entries = [entry for entry in getattr(self, "config_list", []) if not entry.exclude]
        if entries and all(entry.op_names for entry in entries):
            self.check_layer_rho({name for entry in entries for name in entry.op_names}, where="the config list")
        return self

    def check_layer_rho(self, layer_names: Iterable[str], *, where: str = "the model") -> None:
        """Raise ``ValueError`` naming the first ``layer_rho`` key that is not one of ``layer_names``.

        The strategies call it in ``start`` with the traced problem's layers, so a typo fails the experiment with
        this message instead of silently training every layer at ``rho``.
        """
        known = set(layer_names)
        for name in self.layer_rho:
            if name not in known:
                shown = sorted(known)
                listing = ", ".join(shown[:20]) + (f", ... ({len(shown)} in all)" if len(shown) > 20 else "")
                raise ValueError(f"layer_rho[{name!r}] names no prunable layer of {where} (its layers: {listing})")


class _ScoreTarget(BaseModel):
    """``score_target_drop``: the pattern mode of a search (config-list entries with ``pattern``).

    The search measures the dense model first; a candidate meets the target when its score is at most
    ``score_target_drop`` worse than that (in the score's own units). Among those it maximises the weights
    removed. Relative to the measured dense score, not absolute, so the dense model always meets it and the
    user need not know the task's dense score in advance.
    """

    model_config = _STRICT

    score_target_drop: float | None = Field(
        default=None,
        ge=0,
        le=1e12,
        description="pattern search: the largest acceptable score loss from the dense model's measured score; "
        "required with, and only with, config-list entries that have a pattern",
    )

    @model_validator(mode="after")
    def _pattern_mode(self) -> Self:
        entries: list[ConfigEntry] = list(getattr(self, "config_list", []))
        patterned = [i for i, entry in enumerate(entries) if entry.pattern is not None and not entry.exclude]
        if self.score_target_drop is None:
            if patterned:
                raise ValueError(
                    f"score_target_drop: config_list[{patterned[0]}] has a pattern, so this search chooses which "
                    "layers get it under a score target; give score_target_drop (the acceptable score loss from "
                    "the dense model, e.g. 0.01)"
                )
            return self
        if not patterned:
            raise ValueError(
                "score_target_drop: applies to a search over N:M patterns; no config-list entry has a pattern"
            )
        for i, entry in enumerate(entries):
            if not entry.exclude and entry.pattern is None:
                raise ValueError(
                    f"config_list[{i}]: a pattern search decides only pattern-or-dense per layer; every entry that "
                    "selects layers needs a pattern (or exclude: true)"
                )
        if getattr(self, "prior", "uniform") != "uniform":
            raise ValueError("prior: a pattern search starts from the dense model; prior must be 'uniform'")
        if list(getattr(self, "objectives", ["score"])) != ["score"]:
            raise ValueError(
                'objectives: a pattern search maximises the weights removed under the score target; '
                'objectives must be ["score"]'
            )
        return self


class AnnealingConfig(_ScoreTarget, _AnnealingSchedule, SearchCommon):
    """Simulated annealing over per-unit sparsities at the target (AutoCompress's search; NNI's SA, fixed).

    Acceptance uses the Metropolis rule on the score difference divided by the running standard deviation of
    the scores seen so far, at the relative temperature ``T / start_temperature``: any evaluator scale works.
    """

    algorithm: Literal["annealing"]
    batch_size: int = Field(default=1, ge=1, le=256, description="proposals evaluated independently per step")

    def _own_candidates(self) -> tuple[str, int]:
        return "annealing proposals", self.proposals()


class NetAdaptConfig(SearchCommon):
    """NetAdapt (Yang et al., 2018): shrink one unit per iteration by a measured resource reduction.

    ``finetune_epochs`` is the long-term fine-tune of the final model; candidates get
    ``short_term_finetune_epochs``. Structured base algorithms only (whole filters).
    """

    algorithm: Literal["netadapt"]
    target_resource_ratio: float = Field(default=0.5, gt=0, lt=1, description="budget as a fraction of R0")
    initial_reduction: float = Field(default=0.05, gt=0, lt=1, description="first ΔR as a fraction of R0")
    reduction_decay: float = Field(default=0.96, gt=0, le=1, description="ΔR_i = initial * R0 * decay**i")
    short_term_finetune_epochs: int = Field(default=1, ge=0, le=1000)
    max_halvings: int = Field(default=4, ge=0, le=30, description="retries with ΔR halved before failing")
    max_iterations: int = Field(default=200, ge=1, le=10_000)
    uniform_move: bool = Field(
        default=False,
        description="each iteration also offers one candidate that shrinks every unit by the same fraction of what "
        "it has left to the same ΔR, so the greedy choice can take the flat step when no single unit is better",
    )

    @model_validator(mode="before")
    @classmethod
    def _budget_aliases(cls, data: Any) -> Any:
        # `resource` + `target_resource_ratio` were NetAdapt's budget before every search had one; both spellings
        # keep working and always agree.
        if not isinstance(data, dict):
            return data
        budget = data.get("budget")
        if isinstance(budget, dict) and len(budget) == 1:
            ((resource, ratio),) = budget.items()
            for name, value in (("resource", resource), ("target_resource_ratio", ratio)):
                if name in data and data[name] != value:
                    raise ValueError(f"{name} ({data[name]!r}) disagrees with budget {budget}; give one of them")
            return {**data, "resource": resource, "target_resource_ratio": ratio}
        return data

    @property
    def effective_budget(self) -> Budget:
        """The budget NetAdapt shrinks to: ``budget``, or the old ``resource`` + ``target_resource_ratio``."""
        return self.budget or Budget.model_validate({self.resource: self.target_resource_ratio})

    @field_validator("base_algo")
    @classmethod
    def _structured_only(cls, value: str) -> str:
        if value not in STRUCTURED_ALGOS:
            raise ValueError(
                f"base_algo {value!r} is fine-grained; netadapt prunes whole filters and needs one of "
                f"{sorted(STRUCTURED_ALGOS)}"
            )
        return value

    def epoch_terms(self) -> list[EpochTerm]:
        # One short-term fine-tune per candidate per iteration (one per unit, and the uniform move): counted per
        # candidate (the units are the model's).
        return [
            EpochTerm(
                "max_iterations x short_term_finetune_epochs (per candidate)",
                "short_term_finetune_epochs",
                self.max_iterations * self.short_term_finetune_epochs,
            ),
            EpochTerm("finetune_epochs", "finetune_epochs", self.finetune_epochs),
        ]


class ADMMConfig(_ADMMSchedule, SearchCommon):
    """ADMM pruning (Zhang et al., 2018) of the config list's distribution, then masked retraining."""

    algorithm: Literal["admm"]
    num_iterations: int = Field(default=5, ge=1, le=1000, description="outer ADMM iterations (one job each)")
    retrain_epochs: int = Field(default=1, ge=0, le=1000, description="masked retraining after hard pruning")

    def epoch_terms(self) -> list[EpochTerm]:
        iterations = min(self.num_iterations, self.max_trials) if self.max_trials else self.num_iterations
        return [
            EpochTerm("num_iterations x training_epochs", "training_epochs", iterations * self.training_epochs),
            EpochTerm("retrain_epochs", "retrain_epochs", self.retrain_epochs),
            EpochTerm("finetune_epochs", "finetune_epochs", self.finetune_epochs),
        ]


class AutoCompressConfig(_AnnealingSchedule, _ADMMSchedule, SearchCommon):
    """AutoCompress (Liu et al., 2020): ``num_rounds`` of annealing search, ADMM, shrink, evaluate.

    Round k reaches the cumulative sparsity ``1 - (1 - S) ** (k / num_rounds)``, the per-round reduction being
    applied to what the previous round measurably left. ``finetune_epochs`` fine-tunes each search candidate.
    """

    algorithm: Literal["autocompress"]
    num_rounds: int = Field(default=3, ge=1, le=50)
    admm_iterations: int = Field(default=3, ge=1, le=1000, description="ADMM iterations per round")
    retrain_epochs: int = Field(default=0, ge=0, le=1000, description="masked retraining after each round")
    final_finetune_epochs: int = Field(default=1, ge=0, le=1000)
    batch_size: int = Field(
        default=1, ge=1, le=256, description="annealing proposals per step, evaluated independently (one GPU each)"
    )

    def epoch_terms(self) -> list[EpochTerm]:
        rounds = self.num_rounds
        proposals = rounds * self.proposals()
        if self.max_trials is not None:
            proposals = min(proposals, self.max_trials)
        return [
            EpochTerm(
                "num_rounds x admm_iterations x training_epochs",
                "training_epochs",
                rounds * self.admm_iterations * self.training_epochs,
            ),
            EpochTerm("num_rounds x retrain_epochs", "retrain_epochs", rounds * self.retrain_epochs),
            EpochTerm("annealing proposals x finetune_epochs", "finetune_epochs", proposals * self.finetune_epochs),
            EpochTerm("final_finetune_epochs", "final_finetune_epochs", self.final_finetune_epochs),
        ]


class OptunaConfig(_ScoreTarget, SearchCommon):
    """Optuna's ask/tell over per-unit sparsities, rescaled to the target.

    One objective (``["score"]``): TPE. Two (``["score", "flops"]``, ``params`` or ``latency``): NSGA-II,
    giving a Pareto front. ``num_trials`` is capped by ``max_trials``.
    """

    algorithm: Literal["optuna"]
    objectives: list[Literal["score", "params", "flops", "latency"]] = Field(
        default_factory=lambda: ["score"],  # type: ignore[arg-type]
        min_length=1,
        max_length=2,
    )
    num_trials: int = Field(default=30, ge=1, le=100_000)
    parallelism: int = Field(default=1, ge=1, le=256, description="trials asked at once")
    n_startup_trials: int = Field(default=8, ge=1, le=10_000, description="TPE's random start")
    population_size: int = Field(default=10, ge=2, le=10_000, description="NSGA-II population")
    prior: Literal["uniform", "owl"] = Field(
        default="uniform",
        description="trial 0: the uniform start, or outlier-weighted layer-wise sparsity ('owl': layers with more "
        "wanda-score outliers pruned less; fine-grained Linear layers)",
    )

    @model_validator(mode="after")
    def _owl_fine_grained(self) -> Self:
        if self.prior == "owl" and self.base_algo in STRUCTURED_ALGOS:
            raise ValueError(
                f"prior: 'owl' allocates fine-grained layer sparsity; base_algo must be 'level' or 'wanda', not "
                f"{self.base_algo!r}"
            )
        return self

    @model_validator(mode="after")
    def _score_first(self) -> Self:
        if self.objectives[0] != "score" or "score" in self.objectives[1:]:
            raise ValueError('objectives must be ["score"] or ["score", <params|flops|latency>]')
        return self

    def _own_candidates(self) -> tuple[str, int]:
        return "num_trials", self.num_trials

    def trial_count_fields(self) -> dict[str, int]:
        return {**super().trial_count_fields(), "num_trials": self.num_trials}


class AGPConfig(_GlobalRanking, SearchCommon):
    """Automated gradual pruning (Zhu & Gupta, 2017), TensorFlow model_pruning's parameters counted in epochs of
    the user's trainer (as NNI's AGP counts them).

    Pruning steps are the epochs ``begin_step + k * frequency`` up to ``end_step`` (and ``end_step`` itself); at
    step ``t`` the masks are updated with the base algorithm to
    ``s_t = s_f + (s_i - s_f) * (1 - (t - begin_step) / (end_step - begin_step)) ** exponent``, then training
    runs until the next step. ``target_sparsity`` is ``s_f`` (absent: each unit's config-list sparsity);
    ``finetune_epochs`` is the training after ``end_step`` (the final fine-tune). One trial per pruning step.
    """

    algorithm: Literal["agp"]
    initial_sparsity: float = Field(default=0.0, ge=0, lt=1, description="s_i, the sparsity at begin_step")
    target_sparsity: float | None = Field(
        default=None, ge=0, lt=1, description="s_f (overall); absent: the config list's sparsities"
    )
    begin_step: int = Field(default=0, ge=0, le=10_000, description="first pruning epoch (dense training before)")
    end_step: int = Field(default=4, ge=1, le=10_000, description="the epoch at which s_f is reached")
    frequency: int = Field(default=1, ge=1, le=10_000, description="epochs between mask updates")
    exponent: int = Field(default=3, ge=1, le=10, description="exponent of the cubic (by default) curve")
    finetune_epochs: int = Field(default=1, ge=0, le=1000, description="training after end_step (final fine-tune)")

    @field_validator("end_step")
    @classmethod
    def _end_after_begin(cls, value: int, info: ValidationInfo) -> int:
        begin = info.data.get("begin_step")
        if begin is not None and value <= begin:
            raise ValueError(f"end_step ({value}) must come after begin_step ({begin})")
        return value

    @field_validator("target_sparsity")
    @classmethod
    def _target_above_initial(cls, value: float | None, info: ValidationInfo) -> float | None:
        initial = info.data.get("initial_sparsity")
        if value is not None and initial is not None and value < initial:
            raise ValueError(f"target_sparsity ({value}) must not be below initial_sparsity ({initial})")
        return value

    def epoch_terms(self) -> list[EpochTerm]:
        return [
            EpochTerm("end_step", "end_step", self.end_step),
            EpochTerm("finetune_epochs", "finetune_epochs", self.finetune_epochs),
        ]


class IterativeConfig(_GlobalRanking, SearchCommon):
    """Iterative pruning and retraining (Han et al., 2015): ``rounds`` rounds, each pruning ``1 - (1 - s) **
    (1 / rounds)`` of the remaining weights by the base algorithm (``level`` is the paper's weight magnitude)
    and retraining ``retrain_epochs``; round ``r`` is at ``1 - (1 - s) ** (r / rounds)``, the last at the target.
    ``finetune_epochs`` adds training after the last round."""

    algorithm: Literal["iterative"]
    rounds: int = Field(default=3, ge=1, le=100, description="prune-and-retrain rounds (one trial each)")
    retrain_epochs: int = Field(default=1, ge=0, le=1000, description="trainer epochs after each pruning")

    def epoch_terms(self) -> list[EpochTerm]:
        return [
            EpochTerm("rounds x retrain_epochs", "retrain_epochs", self.rounds * self.retrain_epochs),
            EpochTerm("finetune_epochs", "finetune_epochs", self.finetune_epochs),
        ]


class LotteryTicketConfig(_GlobalRanking, SearchCommon):
    """Lottery tickets (Frankle & Carbin, 2019) as NNI's LotteryTicketPruner runs them.

    Round 0 trains the task's ``init_model()`` (the untrained, seeded network) densely for ``epochs``; each of
    the ``prune_iterations`` rounds after it prunes ``1 - (1 - P) ** (1 / prune_iterations)`` of the survivors
    by the base algorithm on the previous round's trained weights, rewinds the survivors to the initial weights
    (or, with ``rewind_epoch: k``, to the weights after ``k`` epochs of training from ``init_model()``) and
    trains ``epochs`` again. One trial per round: accuracy per round, as NNI's reproduction plots it.
    ``finetune_epochs`` adds training to the last round.
    """

    algorithm: Literal["lottery_ticket"]
    prune_iterations: int = Field(default=3, ge=1, le=100, description="pruning rounds after the dense round 0")
    epochs: int = Field(default=1, ge=1, le=1000, description="trainer epochs per round, from the rewound weights")
    rewind_epoch: int = Field(default=0, ge=0, le=1000, description="rewind to the weights after k epochs")

    def epoch_terms(self) -> list[EpochTerm]:
        return [
            EpochTerm("(prune_iterations + 1) x epochs", "epochs", (self.prune_iterations + 1) * self.epochs),
            EpochTerm("rewind_epoch", "rewind_epoch", self.rewind_epoch),
            EpochTerm("finetune_epochs", "finetune_epochs", self.finetune_epochs),
        ]


class SensitivityPoint(BaseModel):
    """One profiled point of a unit's curve: the unit alone pruned to ``sparsity`` (every other unit dense)."""

    model_config = _STRICT

    sparsity: float = Field(gt=0, le=1, description="the unit's sparsity (whole channels for structured units)")
    score: float = Field(allow_inf_nan=False, description="the evaluator's score of that model")
    ratio: float | None = Field(
        default=None, ge=0, le=100, allow_inf_nan=False,
        description="measured value of the curves' resource, shrunk / dense",
    )
    flops_ratio: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    params_ratio: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)


class UnitCurve(BaseModel):
    """A unit's sensitivity curve, its points in increasing sparsity."""

    model_config = _STRICT

    name: str = Field(min_length=1, max_length=1000)
    points: list[SensitivityPoint] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _increasing(self) -> Self:
        sparsities = [point.sparsity for point in self.points]
        if any(b <= a for a, b in zip(sparsities, sparsities[1:], strict=False)):
            raise ValueError(f"points of unit {self.name!r} must have strictly increasing sparsity, got {sparsities}")
        return self


class SensitivityCurves(BaseModel):
    """What a ``sensitivity`` experiment measured: the unpruned score and every unit's curve.

    ``resource`` is what each point's ``ratio`` measures (the budget's resource; ``flops`` for an experiment
    without a budget). Every point also carries its FLOPs and params ratios, so curves profiled under one budget
    re-allocate for a FLOPs or params budget of any size.
    """

    model_config = _STRICT

    resource: Literal["flops", "params", "latency"]
    baseline: float = Field(allow_inf_nan=False, description="score of the unpruned model")
    units: list[UnitCurve] = Field(min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _unique_units(self) -> Self:
        names = [unit.name for unit in self.units]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"units must be named once each; repeated: {repeated}")
        return self

    def covers(self, resource: str) -> bool:
        """Whether every point measures ``resource`` (its own ``ratio``, or the FLOPs/params ratio it carries)."""
        if resource == self.resource:
            return all(point.ratio is not None for unit in self.units for point in unit.points)
        if resource in ("flops", "params"):
            return all(getattr(point, f"{resource}_ratio") is not None for unit in self.units for point in unit.points)
        return False


class SensitivityConfig(SearchCommon):
    """Sensitivity analysis under a physical budget (NNI's sensitivity analysis, modelopt's FastNAS profile).

    Step 1 scores the unpruned model and every unit alone pruned to each of ``levels`` (independent jobs, one
    per GPU). Step 2 allocates one global threshold on score drop per unit of resource saved and evaluates the
    allocation plus ``refine_candidates`` variants of it, each projected onto the budget. With ``curves`` (from
    ``GET /experiments/{id}/sensitivity``) step 1 is skipped: the curves are re-allocated for this budget.
    """

    algorithm: Literal["sensitivity"]
    levels: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        min_length=1,
        max_length=16,
        description="sparsities each unit is profiled at, sorted, unique, each in (0, 1)",
    )
    refine_candidates: int = Field(
        default=3, ge=0, le=32, description="candidates evaluated besides the allocation (blends towards uniform)"
    )
    curves: SensitivityCurves | None = Field(
        default=None, description="curves of an earlier sensitivity experiment: re-allocate without profiling"
    )

    @field_validator("levels")
    @classmethod
    def _levels_in_range(cls, value: list[float]) -> list[float]:
        outside = [level for level in value if not 0.0 < level < 1.0]
        if outside:
            raise ValueError(f"levels must each lie in (0, 1); got {outside}")
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(f"levels must be sorted and unique; got {value}")
        return value

    @model_validator(mode="after")
    def _curves_measure_the_budget(self) -> Self:
        if self.curves is not None and self.budget is not None and not self.curves.covers(self.budget.resource):
            raise ValueError(
                f"budget.{self.budget.resource}: the curves measure {self.curves.resource} (and the FLOPs and params "
                f"ratios of each point) but not {self.budget.resource} on every point; profile again under this budget"
            )
        return self

    def _own_candidates(self) -> tuple[str, int]:
        return "(1 + refine_candidates)", 1 + self.refine_candidates


AlgorithmConfig = Annotated[
    Union[  # noqa: UP007
        UniformConfig,
        AnnealingConfig,
        NetAdaptConfig,
        ADMMConfig,
        AutoCompressConfig,
        OptunaConfig,
        AGPConfig,
        IterativeConfig,
        LotteryTicketConfig,
        SensitivityConfig,
    ],
    Field(discriminator="algorithm"),
]

ALGORITHMS: tuple[str, ...] = (
    "uniform",
    "annealing",
    "netadapt",
    "admm",
    "autocompress",
    "optuna",
    "agp",
    "iterative",
    "lottery_ticket",
    "sensitivity",
)

_ADAPTER: TypeAdapter[Any] = TypeAdapter(AlgorithmConfig)


def parse_algorithm_config(data: dict[str, Any]) -> SearchCommon:
    """Validate a stored or submitted config (``{"algorithm": ..., ...}``) into its algorithm's model."""
    return _ADAPTER.validate_python(data)  # type: ignore[no-any-return]
