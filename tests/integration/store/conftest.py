"""The store on the real Postgres: migrated once per session, each test rolled back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from store.db import make_engine, upgrade


@pytest.fixture(scope="session")
def engine(postgres_url: str) -> Iterator[sa.Engine]:
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: sa.Engine) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back after the test.

    SQLAlchemy's "join an external transaction" recipe: the store's own savepoints and any
    commit the code under test makes stay inside the outer transaction.
    """
    with engine.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            outer.rollback()
