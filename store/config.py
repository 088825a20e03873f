"""Service configuration: one settings class, every variable prefixed `AMID_`.

Read once per process through `get_config()`; tests set the environment first and call
`get_config.cache_clear()`. With nothing set, the embedded default runs on one machine with no
servers: SQLite for the store, kombu's filesystem transport for Celery, and a local artifact
directory, all under `AMID_HOME`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AMID_", extra="ignore")

    home: Path = Field(
        Path(".amid"),
        description="Directory of the embedded default's database, queue and artifacts.",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store (default: SQLite under AMID_HOME)."
    )
    broker_url: str | None = Field(
        None, description="Celery broker URL (default: a filesystem queue under AMID_HOME)."
    )
    artifacts_uri: str | None = Field(
        None, description="fsspec URL where artifacts go (default: file:// under AMID_HOME)."
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO) for s3:// artifacts."
    )
    queue: str = Field("amid-gpu", description="Celery queue the GPU workers consume.")
    url: str = Field(
        "http://127.0.0.1:8000", description="API URL the `amid jobs` client talks to."
    )
    api_key: str | None = Field(None, description="API key the `amid jobs` client sends.")

    # -- what users may point at ---------------------------------------------------------------
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Local directories teacher/student paths must lie under (empty: none allowed).",
    )
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Local directories dataset paths must lie under (empty: none allowed).",
    )
    allow_hub: bool = Field(True, description="Allow hub ids for models and datasets.")
    allow_trust_remote_code: bool = Field(
        False, description="Let jobs set trust_remote_code (runs code from model repos)."
    )

    # -- limits and reliability ------------------------------------------------------------------
    max_steps_limit: int = Field(
        1_000_000, ge=1, description="Largest max_steps a job may ask for."
    )
    max_length_limit: int = Field(8192, ge=1, description="Largest max_length a job may ask for.")
    max_queued_per_key: int = Field(
        20, ge=1, description="Jobs one API key may have queued at once."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted.")
    max_upload_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Largest file accepted by POST /v1/files."
    )
    max_attempts: int = Field(3, ge=1, description="Runs of a job before a lost worker fails it.")
    heartbeat_seconds: float = Field(
        1.0,
        gt=0,
        description=(
            "How often a running worker heartbeats and reads the cancel flag, and every worker "
            "reports to the pool."
        ),
    )
    stale_after_seconds: float = Field(
        30.0,
        gt=0,
        description=(
            "A running job whose heartbeat is older than this is re-queued; a worker silent this "
            "long shows as offline."
        ),
    )
    redispatch_after_seconds: float = Field(
        60.0,
        gt=0,
        description=(
            "A queued job whose message went this long without a claim is sent again (one "
            "message per job: only if a worker took it, or the broker's queue is empty)."
        ),
    )
    reaper_interval_seconds: float = Field(10.0, gt=0, description="How often the reaper runs.")
    cancel_grace_seconds: float = Field(
        2.0,
        gt=0,
        description=(
            "A cancelled job still running this long after the worker saw the cancel has its "
            "process terminated, then killed."
        ),
    )
    stall_after_seconds: float = Field(
        1800.0,
        gt=0,
        description=(
            "A running job that reports no progress for this long fails as Stalled and its "
            "process is ended, whatever its heartbeat says."
        ),
    )

    # -- webhooks ----------------------------------------------------------------------------
    webhook_max_attempts: int = Field(
        8, ge=1, le=50, description="Attempts at a webhook delivery before it is given up."
    )
    webhook_backoff_seconds: float = Field(
        30.0,
        gt=0,
        description=(
            "Wait before a failed webhook delivery's first retry; each later retry waits twice as "
            "long as the one before (at most 6 hours)."
        ),
    )
    webhook_timeout_seconds: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Timeout of each network step of a webhook attempt (connect, send, answer).",
    )

    wandb_project: str | None = Field(
        None,
        description=(
            "W&B project every job's metrics go to, one run per job (unset: none). Needs `pip "
            "install wandb` on the workers; WANDB_API_KEY and W&B's other variables are its own."
        ),
    )

    # -- the API under load ----------------------------------------------------------------------
    api_concurrency: int = Field(
        32,
        ge=1,
        description=(
            "Requests one API process serves at once; its database pool and thread pool are sized "
            "to it."
        ),
    )
    api_queue_seconds: float = Field(
        2.0,
        gt=0,
        description="How long a request beyond AMID_API_CONCURRENCY waits before a 503.",
    )
    api_max_waiting: int = Field(
        256,
        ge=0,
        description="Requests allowed to wait for a slot; past this a request gets 503 at once.",
    )

    @field_validator("model_roots", "data_roots", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        # Environment variables hold a path list the usual way: separated by ':'.
        if isinstance(value, str):
            return [part for part in value.split(":") if part]
        return value

    @model_validator(mode="after")
    def _stale_exceeds_heartbeat(self) -> ServiceConfig:
        if self.stale_after_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError(
                "AMID_STALE_AFTER_SECONDS must exceed twice AMID_HEARTBEAT_SECONDS, or live jobs "
                "would be reaped"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'amid.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_artifacts_uri(self) -> str:
        if self.artifacts_uri:
            return self.artifacts_uri.rstrip("/")
        return (self.home / "artifacts").resolve().as_uri()

    @property
    def broker_directory(self) -> Path:
        """Where the serverless filesystem transport keeps its messages."""
        return (self.home / "broker").resolve()


@lru_cache(maxsize=1)
def get_config() -> ServiceConfig:
    return ServiceConfig()
