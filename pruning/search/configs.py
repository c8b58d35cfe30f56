"""One pydantic config per search algorithm, discriminated by ``algorithm``.

The API validates request bodies with these (this module imports pydantic only, never torch), and the worker
builds its strategy from the stored, validated config. Unknown or out-of-range fields are errors naming the
field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from pruning.config import STRUCTURED_ALGOS, BaseAlgo, ConfigEntry

__all__ = [
    "ALGORITHMS",
    "ADMMConfig",
    "AlgorithmConfig",
    "AnnealingConfig",
    "AutoCompressConfig",
    "NetAdaptConfig",
    "OptunaConfig",
    "SearchCommon",
    "UniformConfig",
    "parse_algorithm_config",
]


class SearchCommon(BaseModel):
    """Fields every algorithm takes."""

    model_config = ConfigDict(extra="forbid")

    config_list: list[ConfigEntry] = Field(min_length=1, max_length=256)
    base_algo: BaseAlgo = "l1"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    optimize_mode: Literal["maximize", "minimize"] = "maximize"
    resource: Literal["params", "flops", "latency"] = "params"
    max_trials: int | None = Field(default=None, ge=1, le=100_000)
    max_minutes: float | None = Field(default=None, gt=0, le=60 * 24 * 30)
    finetune_epochs: int = Field(default=0, ge=0, le=1000, description="fine-tuning epochs of each candidate")


class UniformConfig(SearchCommon):
    """The baseline: every unit at its config-list sparsity, evaluated once (after ``finetune_epochs``)."""

    algorithm: Literal["uniform"]


class _AnnealingSchedule(BaseModel):
    """Simulated-annealing fields shared by ``annealing`` and ``autocompress`` (defaults are NNI's)."""

    start_temperature: float = Field(default=100.0, gt=0, le=1e6)
    stop_temperature: float = Field(default=20.0, gt=0, le=1e6)
    cool_down_rate: float = Field(default=0.9, gt=0, lt=1)
    perturbation_magnitude: float = Field(
        default=0.35, gt=0, le=1, description="noise magnitude per unit at the start temperature"
    )
    prior: Literal["uniform", "size"] = Field(
        default="uniform", description="start distribution: uniform, or bigger units pruned more ('size')"
    )

    @model_validator(mode="after")
    def _stop_below_start(self) -> Self:
        if self.stop_temperature >= self.start_temperature:
            raise ValueError("stop_temperature must be below start_temperature")
        return self


class _ADMMSchedule(BaseModel):
    """ADMM fields shared by ``admm`` and ``autocompress``."""

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
        return self


class AnnealingConfig(_AnnealingSchedule, SearchCommon):
    """Simulated annealing over per-unit sparsities at the target (AutoCompress's search; NNI's SA, fixed).

    Acceptance uses the Metropolis rule on the score difference divided by the running standard deviation of
    the scores seen so far, at the relative temperature ``T / start_temperature``: any evaluator scale works.
    """

    algorithm: Literal["annealing"]
    batch_size: int = Field(default=1, ge=1, le=256, description="proposals evaluated independently per step")


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

    @field_validator("base_algo")
    @classmethod
    def _structured_only(cls, value: str) -> str:
        if value not in STRUCTURED_ALGOS:
            raise ValueError(
                f"base_algo {value!r} is fine-grained; netadapt prunes whole filters and needs one of "
                f"{sorted(STRUCTURED_ALGOS)}"
            )
        return value


class ADMMConfig(_ADMMSchedule, SearchCommon):
    """ADMM pruning (Zhang et al., 2018) of the config list's distribution, then masked retraining."""

    algorithm: Literal["admm"]
    num_iterations: int = Field(default=5, ge=1, le=1000, description="outer ADMM iterations (one job each)")
    retrain_epochs: int = Field(default=1, ge=0, le=1000, description="masked retraining after hard pruning")


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


class OptunaConfig(SearchCommon):
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

    @model_validator(mode="after")
    def _score_first(self) -> Self:
        if self.objectives[0] != "score" or "score" in self.objectives[1:]:
            raise ValueError('objectives must be ["score"] or ["score", <params|flops|latency>]')
        return self


AlgorithmConfig = Annotated[
    Union[  # noqa: UP007
        UniformConfig, AnnealingConfig, NetAdaptConfig, ADMMConfig, AutoCompressConfig, OptunaConfig
    ],
    Field(discriminator="algorithm"),
]

ALGORITHMS: tuple[str, ...] = ("uniform", "annealing", "netadapt", "admm", "autocompress", "optuna")

_ADAPTER: TypeAdapter[Any] = TypeAdapter(AlgorithmConfig)


def parse_algorithm_config(data: dict[str, Any]) -> SearchCommon:
    """Validate a stored or submitted config (``{"algorithm": ..., ...}``) into its algorithm's model."""
    return _ADAPTER.validate_python(data)  # type: ignore[no-any-return]
