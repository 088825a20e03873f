"""The migrations build the models' schema on SQLite (the embedded default) and undo it."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from store.db import current_revision, downgrade, make_engine, upgrade
from store.models import Base


def test_upgrade_matches_models_and_downgrade_empties(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    assert current_revision(url) is not None
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert set(Base.metadata.tables) <= set(sa.inspect(conn).get_table_names())
            # Nothing in the models that the migrations did not create (and vice versa).
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()
    downgrade(url)
    assert current_revision(url) is None
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert not set(Base.metadata.tables) & set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    upgrade(url)  # and it comes back after a downgrade
    assert current_revision(url) is not None


def test_upgrade_defaults_to_the_configured_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from store.config import get_config

    monkeypatch.setenv("AMID_HOME", str(tmp_path / "home"))
    get_config.cache_clear()
    upgrade()
    assert (tmp_path / "home" / "amid.db").exists()
    assert current_revision(get_config().resolved_database_url) is not None
