"""The migrations on a fresh Postgres database: up to the models' schema, down to nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from store.db import current_revision, downgrade, make_engine, upgrade
from store.models import Base

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh_url(postgres_url: str) -> Iterator[str]:
    # Its own database: the session's shared one stays migrated for every other test.
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"amid_migrations_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield admin.url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_upgrade_then_downgrade_on_fresh_postgres(fresh_url: str) -> None:
    assert current_revision(fresh_url) is None
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("jobs")}
            assert {"ix_jobs_created_at_id", "ix_jobs_owner_created_at_id"} <= indexes
    finally:
        engine.dispose()
    upgrade(fresh_url)  # a second upgrade is a no-op, not an error
    downgrade(fresh_url)
    assert current_revision(fresh_url) is None
    engine = make_engine(fresh_url)
    try:
        with engine.connect() as conn:
            assert sa.inspect(conn).get_table_names() == ["alembic_version"]
    finally:
        engine.dispose()
