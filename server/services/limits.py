"""Limits of a shared service: caps on what one experiment asks for, and quotas per owner.

* Caps (``PRUNEHUB_MAX_TRIALS_CAP``, ``PRUNEHUB_MAX_MINUTES_CAP``, ``PRUNEHUB_MAX_EPOCHS_CAP``,
  ``PRUNEHUB_MAX_CONFIG_KB``): a request over one is :class:`InvalidInput` (422) naming the field and the cap.
  An experiment without ``max_minutes`` gets ``PRUNEHUB_DEFAULT_MAX_MINUTES`` written into its stored config, so
  every runner enforces it as if the user had asked.
* Quotas (``PRUNEHUB_OWNER_QUOTA_MB`` over the owner's stored configs: 422; ``PRUNEHUB_MAX_QUEUED_PER_OWNER``
  queued experiments: :class:`TooManyRequests`, a 429 with ``Retry-After``).

Who calls it: :func:`server.services.experiments.create_experiment`, for every route that creates an experiment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pruning.search.configs import SearchCommon
from server.db.models import Experiment, ExperimentStatus
from server.services.errors import InvalidInput, TooManyRequests
from server.settings import Settings

__all__ = ["Limits", "apply_caps", "check_quotas"]


@dataclass(frozen=True)
class Limits:
    """The caps and quotas a submission is held to (from :class:`~server.settings.Settings`)."""

    max_trials_cap: int
    max_minutes_cap: float
    default_max_minutes: float
    max_epochs_cap: int
    max_config_bytes: int
    owner_quota_bytes: int
    max_queued_per_owner: int
    queued_retry_after_s: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_trials_cap=settings.max_trials_cap,
            max_minutes_cap=settings.max_minutes_cap,
            default_max_minutes=min(settings.default_max_minutes, settings.max_minutes_cap),
            max_epochs_cap=settings.max_epochs_cap,
            max_config_bytes=int(settings.max_config_kb * 1024),
            owner_quota_bytes=int(settings.owner_quota_mb * 1024 * 1024),
            max_queued_per_owner=settings.max_queued_per_owner,
            queued_retry_after_s=settings.queued_retry_after_s,
        )


def apply_caps(config: SearchCommon, config_json: dict[str, Any], limits: Limits) -> int:
    """Check ``config`` against the caps and fill the default ``max_minutes`` into ``config_json`` (its stored
    form); returns the stored config's size in bytes."""
    for field, value in config.trial_count_fields().items():
        if value > limits.max_trials_cap:
            raise InvalidInput(
                f"{field} is {value}, over this server's cap of {limits.max_trials_cap} (PRUNEHUB_MAX_TRIALS_CAP)",
                field=field,
            )
    if config.max_minutes is not None and config.max_minutes > limits.max_minutes_cap:
        raise InvalidInput(
            f"max_minutes is {config.max_minutes:g}, over this server's cap of {limits.max_minutes_cap:g} "
            "(PRUNEHUB_MAX_MINUTES_CAP)",
            field="max_minutes",
        )
    if config.max_minutes is None:
        config_json["max_minutes"] = limits.default_max_minutes
    terms = config.training_terms()
    total = sum(term.epochs for term in terms)
    if total > limits.max_epochs_cap:
        largest = max(terms, key=lambda term: term.epochs)
        shown = " + ".join(f"{term.formula} ({term.epochs:,})" for term in terms if term.epochs)
        raise InvalidInput(
            f"the schedule asks for about {total:,} trainer epochs ({shown}), over this server's cap of "
            f"{limits.max_epochs_cap:,} (PRUNEHUB_MAX_EPOCHS_CAP); the largest term is {largest.formula}",
            field=largest.field,
        )
    size = len(_stored_json(config_json).encode("utf-8"))
    if size > limits.max_config_bytes:
        raise InvalidInput(
            f"the config takes {size:,} bytes stored, over this server's cap of {limits.max_config_bytes:,} "
            "(PRUNEHUB_MAX_CONFIG_KB)",
            field="config",
        )
    return size


def check_quotas(session: Session, owner: str, config_bytes: int, limits: Limits) -> None:
    """Refuse a new experiment of ``owner`` beyond the queued limit (429) or the storage quota (422)."""
    queued = session.scalar(
        select(func.count())
        .select_from(Experiment)
        .where(Experiment.owner == owner, Experiment.status == ExperimentStatus.queued.value)
    )
    if (queued or 0) >= limits.max_queued_per_owner:
        raise TooManyRequests(
            f"owner {owner!r} has {queued} experiments queued, the most this server holds per owner "
            f"(PRUNEHUB_MAX_QUEUED_PER_OWNER={limits.max_queued_per_owner}); submit again once some have started",
            field="owner",
            retry_after_s=limits.queued_retry_after_s,
        )
    used = session.scalar(select(func.coalesce(func.sum(Experiment.config_bytes), 0)).where(Experiment.owner == owner))
    if (used or 0) + config_bytes > limits.owner_quota_bytes:
        raise InvalidInput(
            f"owner {owner!r} stores {used:,} bytes of configs; this one ({config_bytes:,} bytes) would exceed the "
            f"quota of {limits.owner_quota_bytes:,} bytes (PRUNEHUB_OWNER_QUOTA_MB)",
            field="config",
        )


def _stored_json(config_json: dict[str, Any]) -> str:
    import json

    return json.dumps(config_json, separators=(",", ":"))
