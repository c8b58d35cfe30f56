"""Typed SQLAlchemy 2.0 models: ``experiments``, ``trials``, the append-only ``events`` log, ``api_keys`` and
``bundles``."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from server.db.base import Base, JSONType

__all__ = ["ApiKey", "Bundle", "Event", "Experiment", "ExperimentStatus", "Trial", "TrialStatus", "as_utc", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime: SQLite gives stored (UTC) timestamps back naive."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class ExperimentStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (ExperimentStatus.succeeded, ExperimentStatus.failed, ExperimentStatus.cancelled)


class TrialStatus(enum.StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class ApiKey(Base):
    """An API key: only its SHA-256 is stored (keys are 256-bit random tokens, so a fast hash is enough)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    role: Mapped[str] = mapped_column(String(20), default="user")  # "user" | "admin"
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to tell keys apart in listings
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Bundle(Base):
    """An uploaded task bundle (a zip of the owner's code) as one owner sees it. The bytes live once in the
    artifact store under ``digest``; two owners who upload the same bytes each get their own row."""

    __tablename__ = "bundles"
    __table_args__ = (
        UniqueConstraint("owner", "digest"),
        Index("ix_bundles_owner_created", "owner", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(71))  # "sha256:" + 64 hex digits: the public id
    size: Mapped[int] = mapped_column(BigInteger)  # bytes of the zip
    files: Mapped[int] = mapped_column(Integer)
    unpacked_size: Mapped[int] = mapped_column(BigInteger)
    modules: Mapped[list[str]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Experiment(Base):
    __tablename__ = "experiments"
    __table_args__ = (
        Index("ix_experiments_status_created", "status", "created_at"),
        Index("ix_experiments_entrypoint", "entrypoint"),
        UniqueConstraint("owner", "idempotency_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), default="local", index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # SHA-256 of the request the key first came with (None: stored before hashes were kept).
    idempotency_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    entrypoint: Mapped[str] = mapped_column(String(300))
    # The owner's bundle the entrypoint is imported from (``sha256:<hex>``); None: code installed on the workers.
    bundle: Mapped[str | None] = mapped_column(String(71), nullable=True)
    algorithm: Mapped[str] = mapped_column(String(40))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # Size of the config's JSON text in bytes: what an owner's storage quota counts.
    config_bytes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    status: Mapped[str] = mapped_column(String(20), default=ExperimentStatus.queued.value)
    # progress: done/total in the strategy's own unit (trials, iterations, measured resource), with a phase label.
    progress_done: Mapped[float] = mapped_column(Float, default=0.0)
    progress_total: Mapped[float | None] = mapped_column(Float, nullable=True)
    phase: Mapped[str | None] = mapped_column(String(200), nullable=True)
    search_state: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    state_version: Mapped[int] = mapped_column(Integer, default=0)
    problem: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)  # distributed runner: asks done so far
    best_trial_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    best_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the last experiments.run message for it was sent (set in the commit before the send): the reaper sends
    # another only when none is in flight. None: never sent, or the send failed.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    trials: Mapped[list[Trial]] = relationship(back_populates="experiment", lazy="raise")


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("experiment_id", "job_key"),
        UniqueConstraint("experiment_id", "seq"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    job_key: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default=TrialStatus.pending.value)
    # Distributed runner: the ask that produced this job. Both runners: the lease of the worker running it.
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # its last message
    distribution: Mapped[dict[str, float]] = mapped_column(JSONType)  # requested, per unit
    requested: Mapped[dict[str, float] | None] = mapped_column(JSONType, nullable=True)  # per layer
    achieved: Mapped[dict[str, float] | None] = mapped_column(JSONType, nullable=True)  # per layer
    overall_sparsity: Mapped[float | None] = mapped_column(Float, nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    params: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    flops: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    params_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    flops_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # With a budget: the measured ratio of the budget's resource (shrunk / dense) and whether it meets the budget.
    budget_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    feasible: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # How the score was taken: BatchNorm recalibration (batches), candidate fine-tuning epochs.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    context: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    extra: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    artifact_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)

    experiment: Mapped[Experiment] = relationship(back_populates="trials", lazy="raise")


class Event(Base):
    """Append-only log of what happened to an experiment (status changes, trials, notes)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
