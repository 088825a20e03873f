"""The job store's tables (SQLAlchemy 2 typed ORM).

Postgres is the source of truth for every job; the broker message only names a job id. The
schema is changed only through the Alembic migrations in `migrations/`, which are generated
against this metadata (its naming convention gives every constraint a stable name, so
migrations can drop and alter them on Postgres and SQLite alike).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# Longest webhook URL a job or a key may name (browsers and proxies agree on about this much).
WEBHOOK_URL_MAX_LENGTH = 2048


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    Postgres keeps the zone (timestamptz); SQLite keeps naive text, so values read back are
    marked UTC here rather than leaking naive datetimes into comparisons and the API.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# JSONB on Postgres (compact, comparable); plain JSON text elsewhere.
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        sa.UniqueConstraint("owner", "idempotency_key"),
        # Keyset pagination: newest first by (created_at, id), globally, per owner, per status.
        sa.Index("ix_jobs_created_at_id", "created_at", "id"),
        sa.Index("ix_jobs_owner_created_at_id", "owner", "created_at", "id"),
        sa.Index("ix_jobs_status_created_at_id", "status", "created_at", "id"),
        # The claim's turn order reads each waiting owner's latest start (store.scheduling).
        sa.Index("ix_jobs_owner_started_at", "owner", "started_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16))
    settings: Mapped[dict[str, Any]] = mapped_column(JSONType)
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int]
    lease_owner: Mapped[str | None] = mapped_column(sa.String(255))
    heartbeat_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    progress_step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int | None]
    eta_seconds: Mapped[float | None]
    latest_metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    error_code: Mapped[str | None] = mapped_column(sa.String(128))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    final_uri: Mapped[str | None] = mapped_column(sa.Text)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255))
    # Where the job's end is POSTed (unset: the submitting key's default, if it has one).
    webhook_url: Mapped[str | None] = mapped_column(sa.String(WEBHOOK_URL_MAX_LENGTH))
    # What people call the job: a free name and labels, both filters of the listing.
    name: Mapped[str | None] = mapped_column(sa.String(255))
    tags: Mapped[list[str]] = mapped_column(JSONType, default=list, server_default=sa.text("'[]'"))
    # Orders the jobs of one owner only (higher first): never a way past other owners' turns.
    priority: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    # A sweep that succeeded: its students, best first (index, knobs, score, rank, final URI).
    sweep_summary: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    enqueued_at: Mapped[datetime | None]
    # When a wake-up message counted against this job was last used up without starting it (a
    # message is any job's wake-up: see store.scheduling). A message sent after that
    # (enqueued_at later) is still outstanding, and the reaper sends no second one.
    received_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r}, attempt={self.attempt})"


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (sa.Index("ix_job_events_job_id_id", "job_id", "id"),)

    # The autoincrement id doubles as the `after` cursor of the events feed.
    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(sa.String(16))
    type: Mapped[str] = mapped_column(sa.String(64))
    message: Mapped[str] = mapped_column(sa.Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    job: Mapped[Job] = relationship(back_populates="events")


class JobMetric(Base):
    __tablename__ = "job_metrics"
    __table_args__ = (sa.Index("ix_job_metrics_job_id_name_step", "job_id", "name", "step"),)

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    name: Mapped[str] = mapped_column(sa.String(128))
    # Null where the reported value was not finite (NaN loss): SQLite cannot hold NaN.
    value: Mapped[float | None] = mapped_column(sa.Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    __tablename__ = "job_checkpoints"
    __table_args__ = (sa.UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    uri: Mapped[str] = mapped_column(sa.Text)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    is_best: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UploadedFile(Base):
    """A dataset or a model a key uploaded, named in jobs as `file:<id>`."""

    __tablename__ = "files"
    __table_args__ = (sa.Index("ix_files_owner_created_at_id", "owner", "created_at", "id"),)

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(sa.String(64))
    purpose: Mapped[str] = mapped_column(sa.String(16))  # dataset | model
    filename: Mapped[str] = mapped_column(sa.String(255))
    size: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    uri: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (sa.UniqueConstraint("key_hash"),)

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(sa.String(255))
    # sha256 hex of the secret: the secret itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(sa.String(64))
    is_admin: Mapped[bool] = mapped_column(default=False)
    # The key's weight in the pool's turns (2: two jobs started per turn where others start one).
    share: Mapped[int] = mapped_column(default=1, server_default=sa.text("1"))
    # Jobs of this key running at once; None: no limit.
    max_running: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    # Where this key's jobs report their end unless a job names its own URL.
    webhook_url: Mapped[str | None] = mapped_column(sa.String(WEBHOOK_URL_MAX_LENGTH))
    # Signs this key's webhook deliveries (HMAC-SHA256). Stored as is, unlike the key's own
    # secret: the service must compute with it, and it grants no access to the API.
    webhook_secret: Mapped[str] = mapped_column(sa.String(64))


class WebhookDelivery(Base):
    """One webhook POST owed for a job's end, written in the transaction that ends the job and
    worked off by the reaper's sender until delivered or given up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        sa.Index("ix_webhook_deliveries_job_id", "job_id"),
    )

    # Also the delivery id the receiver sees (body `id`, header amid-delivery): its dedupe key.
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(sa.String(WEBHOOK_URL_MAX_LENGTH))
    event: Mapped[str] = mapped_column(sa.String(32))
    # The body, fixed when the job ended: every attempt sends the same content.
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(sa.String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(default=0)
    # When the sender next tries (null once delivered or given up).
    next_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A worker in the pool, as it last reported itself (its main process heartbeats this row)."""

    __tablename__ = "workers"

    # `host:pid:gpuN` of the worker's main process (its job processes lease jobs under their own
    # pids); a restarted container whose process gets the same pid takes its row back.
    id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    host: Mapped[str] = mapped_column(sa.String(255))
    gpu_name: Mapped[str] = mapped_column(sa.String(255))  # "cpu" when no GPU is visible
    gpu_memory_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    # What the worker last wrote: idle, busy, draining, drained or offline (stopped). A worker
    # whose last_seen_at is older than the stale threshold is shown offline whatever this says.
    state: Mapped[str] = mapped_column(sa.String(16))
    drain_requested: Mapped[bool] = mapped_column(default=False)
    current_job_id: Mapped[str | None] = mapped_column(
        sa.ForeignKey("jobs.id", ondelete="SET NULL")
    )
    version: Mapped[str] = mapped_column(sa.String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
