"""Settings read from the environment (prefix ``PRUNEHUB_``), shared by the API, the worker and the CLI.

The embedded defaults need no server: a SQLite file and Celery's filesystem transport under ``./.prunehub/``.
Production points ``PRUNEHUB_DATABASE_URL`` at PostgreSQL and ``PRUNEHUB_BROKER_URL`` at Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRUNEHUB_", extra="ignore")

    home: Path = Field(default=Path(".prunehub"), description="folder of the embedded database, broker, artifacts")
    database_url: str = "sqlite:///./.prunehub/prunehub.db"
    broker_url: str = Field(default="filesystem://", description="Celery broker; filesystem:// = embedded")
    artifacts_dir: Path = Path(".prunehub/artifacts")
    allowed_entrypoints: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["examples."])
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = Field(default=None, description="the CLI's key (default: the local key file)")
    bootstrap_local_key: bool = Field(
        default=True, description="create an admin key for 'local' on first start when none exists (embedded)"
    )
    max_body_bytes: int = Field(default=1_000_000, gt=0, description="larger request bodies are refused (413)")
    # Admission control of the API (server/api/admission.py): requests in flight at once, how long an excess request
    # waits for a slot, and how many may wait; beyond either, a 503 with Retry-After. The API's database pool and
    # threadpool are sized from max_concurrent_requests, so an admitted request never waits on the pool.
    max_concurrent_requests: int = Field(
        default=32, ge=1, le=1000, description="API requests served at once; more wait for a slot, then get a 503"
    )
    admission_wait_s: float = Field(
        default=2.0, ge=0, le=60, description="how long a request over max_concurrent_requests waits for a slot"
    )
    admission_queue: int = Field(
        default=512, ge=0, description="requests that may wait for a slot; one more is a 503 at once"
    )
    auth_cache_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="how long an API process trusts a key it has checked: a revocation made in another process "
        "takes effect there within this time (in the same process, at once); 0 checks every request",
    )
    worker_heartbeat_s: float = Field(default=5.0, gt=0, description="how often a running worker renews its lease")
    lease_grace_s: float = Field(default=30.0, gt=0, description="a lease older than this is stale")
    chain_jobs_s: float = Field(
        default=1.0,
        ge=0,
        description="distributed runner: for how long (seconds from the start of its task) an evaluation worker "
        "goes on with one job of the step its last job advanced instead of sending it through the broker (the "
        "step's other jobs are sent at once); 0 sends every job through the broker",
    )
    db_retry_s: float = Field(default=300.0, ge=0, description="how long a worker waits out a database outage")
    db_idle_in_transaction_s: float = Field(
        default=30.0,
        ge=0,
        description="PostgreSQL ends a worker's transaction that has waited this long for the worker (its "
        "idle_in_transaction_session_timeout), and so releases its row locks: one whose connection the worker lost "
        "while the server's end stayed open would hold them for good, and the worker waits for them. Worker "
        "transactions take milliseconds, and one that holds the experiment's row longer than lease_grace_s lets "
        "its lease go stale anyway (the heartbeat waits for that row); 0 = never",
    )
    max_attempts: int = Field(default=3, ge=1, description="deliveries of one experiment before it fails")
    reaper_interval_s: float = Field(default=30.0, gt=0, description="how often a worker re-enqueues stale runs")
    message_lost_s: float = Field(
        default=3600.0,
        gt=0,
        description="a message sent this long ago that no worker has taken is presumed lost (a broker that lost "
        "its data) and sent again; a message in flight is never duplicated before",
    )
    # Limits of a shared service (each a 422 or 429 naming the field and the limit; see the README's "Limits").
    max_trials_cap: int = Field(
        default=10_000, ge=1, description="largest max_trials (and optuna num_trials) an experiment may ask for"
    )
    max_minutes_cap: float = Field(
        default=7 * 24 * 60, gt=0, description="largest max_minutes an experiment may ask for"
    )
    default_max_minutes: float = Field(
        default=24 * 60, gt=0, description="max_minutes of an experiment that gives none (stored in its config)"
    )
    max_epochs_cap: int = Field(
        default=10_000,
        ge=1,
        description="largest estimate of the trainer epochs an experiment's schedule asks for (e.g. admm: "
        "num_iterations x training_epochs + retrain_epochs + finetune_epochs)",
    )
    max_config_kb: float = Field(default=256, gt=0, description="largest stored config (its JSON text), in KiB")
    owner_quota_mb: float = Field(
        default=100, gt=0, description="stored configs per owner, in MiB, over all their experiments"
    )
    max_queued_per_owner: int = Field(
        default=100, ge=1, description="queued experiments per owner; beyond it a submission is a 429"
    )
    max_running_per_owner: int | None = Field(
        default=None,
        ge=1,
        description="running experiments per owner; more stay queued until one of theirs ends (none: no limit). "
        "Whatever the limit, a free worker starts the queued experiment of the owner with the fewest running",
    )
    queued_retry_after_s: int = Field(
        default=60, ge=1, description="the Retry-After of a 429 for too many queued experiments"
    )
    device: str = "cpu"
    runner: Literal["inprocess", "distributed"] = Field(
        default="inprocess",
        description="inprocess: one worker runs a whole search; distributed: each job is its own task on the "
        "evaluations queue (one worker per GPU)",
    )
    reuse_task_process: bool = Field(
        default=True, description="keep the task process between experiments of the same entrypoint"
    )
    job_timeout_s: float | None = Field(default=None, gt=0, description="kill a job's process after this long")
    job_memory_limit_mb: int | None = Field(default=None, gt=0, description="address-space limit of user code")
    bundles: bool = Field(
        default=True, description="accept task bundles (POST /bundles) and experiments that name one"
    )
    bundles_admin_only: bool = Field(default=False, description="only admin keys may upload bundles")
    max_bundle_mb: int = Field(default=64, gt=0, description="largest bundle upload (the zip), in MiB")
    max_bundle_files: int = Field(default=10_000, gt=0, description="most entries in one bundle")
    bundle_cache_dir: Path | None = Field(
        default=None, description="where workers unpack bundles, one folder per hash (default: HOME/bundle-cache)"
    )
    scratch_dir: Path | None = Field(
        default=None,
        description="parent of the per-experiment HOME of bundled code's task process (default: HOME/scratch)",
    )

    @field_validator("allowed_entrypoints", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        # "examples.,mypkg." from the environment; a JSON list is accepted too.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    @property
    def max_bundle_bytes(self) -> int:
        return self.max_bundle_mb * 1024 * 1024

    @property
    def bundle_cache(self) -> Path:
        return self.bundle_cache_dir or self.home / "bundle-cache"

    @property
    def scratch_root(self) -> Path:
        return self.scratch_dir or self.home / "scratch"

    @property
    def local_key_file(self) -> Path:
        return self.home / "api-key"

    def client_api_key(self) -> str | None:
        """The key the CLI sends: ``PRUNEHUB_API_KEY``, else the local key file of the embedded default."""
        if self.api_key:
            return self.api_key
        try:
            return self.local_key_file.read_text().strip() or None
        except OSError:
            return None


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once (tests call ``get_settings.cache_clear()`` after changing the env)."""
    return Settings()
