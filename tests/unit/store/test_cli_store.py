"""`amid db upgrade` and `amid keys ...` on the embedded SQLite database."""

from __future__ import annotations

import pytest

from cli.main import main
from store.db import reset_engine, session_scope
from store.keys import authenticate


@pytest.fixture(autouse=True)
def _fresh_engine() -> None:
    reset_engine()


def test_db_upgrade_then_keys_create_prints_a_working_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["db", "upgrade"]) == 0
    assert "revision" in capsys.readouterr().out
    assert main(["keys", "create", "alice", "--admin"]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert "admin key" in err and secret not in err
    with session_scope() as session:
        key = authenticate(session, secret)
        assert key is not None and key.is_admin and key.name == "alice"
        key_id = key.id

    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and secret not in listed
    assert main(["keys", "revoke", key_id]) == 0
    assert main(["keys", "revoke", key_id]) == 1
    with session_scope() as session:
        assert authenticate(session, secret) is None
    reset_engine()
