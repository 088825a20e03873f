"""Engines, sessions and schema upgrades for the job store.

The session lifecycle lives at the edges (the API's request dependency, the worker's task
body): they open a `session_scope()`, call store functions, and the scope commits or rolls
back. Store functions themselves never commit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.errors import AmidError
from store.config import get_config

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Connections beyond the API's request concurrency: the readiness probe, a worker's heartbeat
# thread next to its main thread.
SPARE_CONNECTIONS = 4


class DatabaseUnavailable(AmidError):
    """The job store cannot be reached (rendered as 503, never as a 500)."""

    status_code = 503


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide where transactions begin (see `_on_begin`).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never wait for the writer. foreign_keys: SQLite ignores FKs by default.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # A deferred transaction that reads and then writes fails at once with "database is
        # locked" when another writer got in between (the busy timeout cannot help there).
        # Taking the write lock up front makes the API and the workers queue up instead.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine configured for the backend: SQLite for the embedded default, else Postgres."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine)
        return engine
    config = get_config()
    # pool_pre_ping: a connection dropped by a database restart is replaced, not handed out.
    # The pool holds one connection per request the API serves at once (AMID_API_CONCURRENCY;
    # connections open only when used), and a request that still finds it empty gives up
    # after AMID_API_QUEUE_SECONDS with a 503 instead of SQLAlchemy's default 30 s wait.
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=config.api_concurrency,
        max_overflow=SPARE_CONNECTIONS,
        pool_timeout=config.api_queue_seconds,
        connect_args=_connect_args(parsed),
    )


def _connect_args(url: sa.URL) -> dict[str, Any]:
    if url.get_backend_name() == "postgresql":
        # Fail fast when the database is down, so /readyz and requests answer 503 promptly.
        return {"connect_timeout": 5}
    return {}


_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def get_engine() -> Engine:
    """The process's engine for the configured database (created on first use)."""
    url = get_config().resolved_database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def get_sessionmaker() -> sessionmaker[Session]:
    engine = get_engine()
    key = engine.url.render_as_string(hide_password=False)
    with _lock:
        factory = _sessionmakers.get(key)
        if factory is None:
            # expire_on_commit=False: the edges map rows to responses after the commit.
            factory = _sessionmakers[key] = sessionmaker(engine, expire_on_commit=False)
        return factory


def get_read_sessionmaker() -> sessionmaker[Session]:
    """Sessions for requests that only read: on Postgres each statement runs in autocommit.

    A read that is one statement needs no transaction around it, and skipping BEGIN and the
    closing ROLLBACK halves a read request's round trips to the database. SQLite keeps the
    ordinary sessions (its connections are local; there is nothing to save).
    """
    engine = get_engine()
    if engine.dialect.name == "sqlite":
        return get_sessionmaker()
    key = "read:" + engine.url.render_as_string(hide_password=False)
    with _lock:
        factory = _sessionmakers.get(key)
        if factory is None:
            # The same pool as the writers': a read still holds at most one connection.
            autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
            factory = _sessionmakers[key] = sessionmaker(autocommit, expire_on_commit=False)
        return factory


def _forget_engines_in_child() -> None:
    # A forked process (a Celery pool process, a job process) inherits the parent's pooled
    # connections; using them from both sides corrupts the protocol state (Postgres answers
    # "prepared statement already exists"). The child drops its copies without closing them,
    # which would close the parent's, and opens its own on first use.
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()
    _sessionmakers.clear()
    _lock.release()


# The lock is held across the fork so that the child never inherits it taken by another thread.
os.register_at_fork(
    before=_lock.acquire, after_in_parent=_lock.release, after_in_child=_forget_engines_in_child
)


def reset_engine() -> None:
    """Dispose every cached engine (tests that change AMID_DATABASE_URL call this)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _sessionmakers.clear()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for one unit of work: committed on success, rolled back on any error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    script_location = resources.files("migrations")
    config = Config(str(Path(str(script_location)) / "alembic.ini"))
    config.set_main_option("script_location", str(script_location))
    # ConfigParser interpolation would read a '%' in a password as a reference.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Apply the migrations to `url` (default: the configured database)."""
    from alembic import command

    command.upgrade(_alembic_config(url or get_config().resolved_database_url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(_alembic_config(url or get_config().resolved_database_url), revision)


def current_revision(url: str) -> str | None:
    """The revision the database is at (None before the first upgrade)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
