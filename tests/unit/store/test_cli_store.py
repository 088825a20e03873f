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


def test_keys_create_takes_a_share_and_a_running_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade"]) == 0
    capsys.readouterr()
    assert main(["keys", "create", "sweeps", "--share", "2", "--max-running", "3"]) == 0
    secret = capsys.readouterr().out.strip()
    with session_scope() as session:
        key = authenticate(session, secret)
        assert key is not None and (key.share, key.max_running) == (2, 3)
    assert main(["keys", "list"]) == 0
    assert "share 2  max 3 running" in capsys.readouterr().out

    assert main(["keys", "create", "bad", "--max-running", "0"]) == 2
    assert "--max-running: must be at least 1" in capsys.readouterr().err
    reset_engine()
