"""Keys made before webhooks existed get a signing secret of their own when the store upgrades."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from store.db import make_engine, upgrade

BEFORE_WEBHOOKS = "5d3c1a9e7b21"


def test_existing_keys_get_distinct_signing_secrets(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url, BEFORE_WEBHOOKS)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for key_id in ("a" * 32, "b" * 32):
                conn.execute(
                    sa.text(
                        "INSERT INTO api_keys (id, name, key_hash, is_admin, created_at) "
                        "VALUES (:id, 'old', :hash, false, '2026-01-01 00:00:00')"
                    ),
                    {"id": key_id, "hash": key_id * 2},
                )
        upgrade(url)
        with engine.connect() as conn:
            secrets = conn.execute(sa.text("SELECT webhook_secret FROM api_keys")).scalars().all()
    finally:
        engine.dispose()
    assert len(secrets) == 2 and len(set(secrets)) == 2
    assert all(secret.startswith("whsec_") and len(secret) > 40 for secret in secrets)
