"""Request and response bodies of the API, named by role (``ExperimentCreate``, ``ExperimentPublic``, ...)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from pruning.budget import Budget
from pruning.search.configs import AlgorithmConfig
from server.db.models import as_utc
from server.services.bundle_archive import BUNDLE_ID_PATTERN

__all__ = [
    "BestPublic",
    "BundlePublic",
    "BundlesPublic",
    "ErrorPublic",
    "ValidationErrorPublic",
    "ValidationIssue",
    "ExperimentCreate",
    "ExperimentPublic",
    "ExperimentSummary",
    "ExperimentsPublic",
    "ParetoPublic",
    "Progress",
    "ReallocateCreate",
    "SensitivityPublic",
    "TrialPublic",
    "TrialsPublic",
]

_NAME = (str, Field(min_length=1, max_length=200, description="a name for people"))
_ENTRYPOINT = (
    str,
    Field(
        min_length=1,
        max_length=300,
        description="the task module: 'package.module' or 'package.module:attr'",
        examples=["examples.digits"],
    ),
)


_BUNDLE: Any = (
    str | None,
    Field(
        None,
        pattern=BUNDLE_ID_PATTERN,
        description="one of your bundles (POST /bundles); the entrypoint is then a module inside it",
        examples=["sha256:" + "0" * 64],
    ),
)


def _create_model_for(config_cls: type[BaseModel]) -> type[BaseModel]:
    algorithm = config_cls.model_fields["algorithm"].annotation
    tag = get_args(algorithm)[0]
    name = "".join(part.capitalize() for part in str(tag).split("_")) + "ExperimentCreate"
    return create_model(  # type: ignore[call-overload,no-any-return]
        name, __base__=config_cls, name=_NAME, entrypoint=_ENTRYPOINT, bundle=_BUNDLE
    )


_CONFIG_CLASSES = get_args(get_args(AlgorithmConfig)[0])
if not _CONFIG_CLASSES:  # a union of one is collapsed by typing
    _CONFIG_CLASSES = (get_args(AlgorithmConfig)[0],)
_CREATE_MODELS = tuple(_create_model_for(cls) for cls in _CONFIG_CLASSES)

# The body of POST /experiments: name + entrypoint + one algorithm's config, discriminated by "algorithm".
ExperimentCreate = Annotated[Union[_CREATE_MODELS], Field(discriminator="algorithm")]  # type: ignore[valid-type]  # noqa: UP007


def split_create(body: BaseModel) -> tuple[str, str, str | None, dict[str, Any]]:
    """(name, entrypoint, bundle, algorithm config dict) of a validated create body."""
    data = body.model_dump(mode="json", exclude_none=False)
    return data.pop("name"), data.pop("entrypoint"), data.pop("bundle"), data


class ErrorPublic(BaseModel):
    detail: str
    field: str | None = None


class ValidationIssue(BaseModel):
    """One problem of a request that failed validation: where (``["body", "seed"]``), what, and its kind."""

    type: str
    loc: list[str | int]
    msg: str
    input: Any = None


class ValidationErrorPublic(BaseModel):
    """A 422: request validation gives FastAPI's list of issues, a use case's own check one message; ``field``
    names the first offending field either way."""

    detail: str | list[ValidationIssue]
    field: str | None = None


class Progress(BaseModel):
    done: float
    total: float | None
    phase: str | None


class BestSummary(BaseModel):
    trial_id: int
    score: float | None
    overall_sparsity: float | None
    distribution: dict[str, float]


class ExperimentSummary(BaseModel):
    """An experiment as ``GET /experiments`` lists it: everything but its config and traceback, which can be
    large (a config list naming thousands of layers) and are on ``GET /experiments/{id}``."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    owner: str
    entrypoint: str
    bundle: str | None = Field(None, description="the bundle the entrypoint is imported from, if any")
    algorithm: str
    status: str
    progress: Progress
    best_score: float | None
    best: BestSummary | None = None
    trials_count: int = 0
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None = None


class ExperimentPublic(ExperimentSummary):
    """One experiment in full: the summary plus its stored config (with the server's defaults filled in, e.g.
    ``max_minutes``) and the traceback of a failure."""

    config: dict[str, Any]
    traceback: str | None = None


class ExperimentsPublic(BaseModel):
    items: list[ExperimentSummary]
    next_cursor: str | None


class TrialPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    seq: int
    step: int | None = Field(None, description="distributed runner: the search step that asked for this job")
    job_key: str
    kind: str
    status: str
    distribution: dict[str, float]
    requested: dict[str, float] | None
    achieved: dict[str, float] | None
    overall_sparsity: float | None
    score: float | None
    params: int | None
    flops: int | None
    params_ratio: float | None
    flops_ratio: float | None
    latency_ms: float | None
    budget_ratio: float | None = Field(None, description="measured ratio of the budget's resource, shrunk / dense")
    feasible: bool | None = Field(None, description="whether the measured ratio meets the experiment's budget")
    evaluation: dict[str, Any] | None = Field(None, description="how the score was taken (BatchNorm recalibration)")
    context: dict[str, Any]
    extra: dict[str, Any]
    error: str | None
    artifact_id: str | None
    created_at: datetime
    finished_at: datetime | None
    duration_s: float | None


class TrialsPublic(BaseModel):
    items: list[TrialPublic]
    total: int
    next_cursor: str | None


class BestPublic(BaseModel):
    experiment_id: int
    trial_id: int
    score: float | None
    overall_sparsity: float | None
    distribution: dict[str, float] = Field(description="requested sparsity per unit (coupled group or layer)")
    requested: dict[str, float] | None = Field(description="requested sparsity per layer")
    achieved: dict[str, float] | None = Field(description="achieved sparsity per layer")
    params_before: int | None
    params_after: int | None
    flops_before: int | None
    flops_after: int | None
    params_ratio: float | None
    flops_ratio: float | None
    latency_ms: float | None = None
    budget: dict[str, float] | None = Field(None, description="the experiment's budget, if it has one")
    budget_ratio: float | None = Field(None, description="measured ratio of the budget's resource, shrunk / dense")
    feasible: bool | None = None
    evaluation: dict[str, Any] | None = None
    context: dict[str, Any]
    model_available: bool


class ParetoPoint(BaseModel):
    trial_id: int
    score: float | None
    flops: int | None
    params: int | None
    flops_ratio: float | None
    params_ratio: float | None
    overall_sparsity: float | None


class ParetoPublic(BaseModel):
    experiment_id: int
    flops: list[ParetoPoint]
    params: list[ParetoPoint]


class SensitivityPointPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sparsity: float = Field(description="the unit's sparsity, every other unit dense")
    score: float
    ratio: float | None = Field(description="measured value of `resource`, shrunk / dense")
    flops_ratio: float | None = None
    params_ratio: float | None = None


class SensitivityUnitPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    points: list[SensitivityPointPublic]
    allocated: float | None = Field(description="the sparsity the allocation gave the unit")


class SensitivityAllocationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    distribution: dict[str, float]
    threshold: float | None = Field(description="marginal score drop per unit of resource saved at the cut")
    needed_saving: float = Field(description="fraction of the dense resource the budget removes")
    estimated_saving: float = Field(description="what the curves, added over units, predict the allocation saves")
    estimated_drop: float
    resource: str = Field(description="flops, params or latency; 'weights' without a budget")


class SensitivityPublic(BaseModel):
    """A sensitivity experiment's curves (score vs sparsity of each unit alone), its baseline and allocation."""

    model_config = ConfigDict(from_attributes=True)

    experiment_id: int
    status: str
    resource: str = Field(description="what each point's `ratio` measures")
    baseline_score: float = Field(description="score of the unpruned model")
    optimize_mode: str
    budget: dict[str, float] | None
    reused: bool = Field(description="the curves came from an earlier experiment (no profiling)")
    units: list[SensitivityUnitPublic]
    allocation: SensitivityAllocationPublic | None


class ReallocateCreate(BaseModel):
    """The body of ``POST /experiments/{id}/reallocate``: the new budget, and optionally a name."""

    model_config = ConfigDict(extra="forbid")

    budget: Budget
    name: str | None = Field(None, min_length=1, max_length=200, description="default: the source's, annotated")


class BundlePublic(BaseModel):
    """A task bundle's metadata (``POST /bundles``, ``GET /bundles/{id}``)."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(validation_alias="digest", description="sha256:<hex of the zip's bytes>")
    owner: str
    size: int = Field(description="bytes of the zip")
    files: int
    unpacked_size: int = Field(description="bytes of its files, uncompressed")
    modules: list[str] = Field(description="importable modules (dotted names): what an entrypoint may name")
    created_at: datetime

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)  # SQLite gives stored UTC timestamps back naive


class BundlesPublic(BaseModel):
    items: list[BundlePublic]
