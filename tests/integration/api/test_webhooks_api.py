"""Webhook settings through the API and the CLI: a job's `webhook_url` is checked (422 naming the
field) and shown; a key reads its signing secret; `amid keys create --webhook-url` and
`amid jobs submit --webhook-url`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from cli.main import main
from store.models import ApiKey, Job
from tests.integration.api._client import run_amid

pytestmark = pytest.mark.integration

Headers = dict[str, str]
MakeKey = Callable[..., Headers]
BODY: dict[str, Any] = {"teacher": "gpt2", "student": "distilgpt2", "dataset": "data/train.jsonl"}


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/hook", "must be an http:// or https:// URL"),
        ("file:///etc/passwd", "must be an http:// or https:// URL"),
        ("example.com/hook", "must be an http:// or https:// URL"),
        ("http://", "must name a host"),
        ("https:///path-only", "must name a host"),
        ("http://example.com:99999/hook", "is not a valid URL"),
        ("http://exa mple.com/hook", "must not contain spaces or control characters"),
        ("https://example.com/" + "a" * 2048, "at most 2048 characters"),
        ("https://example.com/\ud800", "unable to parse raw data as a unicode string"),
    ],
)
def test_a_bad_webhook_url_is_a_422_naming_the_field(
    client: TestClient, make_key: MakeKey, url: str, reason: str
) -> None:
    # JSON with ASCII escapes, as a client would send a lone surrogate ("\ud800").
    response = client.post(
        "/v1/jobs",
        content=json.dumps({**BODY, "webhook_url": url}),
        headers={**make_key(), "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == "webhook_url"
    assert reason in error["detail"]
    assert error["detail"].startswith("webhook_url: ")


def test_a_job_keeps_its_webhook_url_apart_from_its_settings(
    client: TestClient, make_key: MakeKey, db: Session, roots: Any
) -> None:
    url = "https://hooks.example.com/amid?team=nlp"
    response = client.post("/v1/jobs", json={**BODY, "webhook_url": url}, headers=make_key())
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["webhook_url"] == url
    assert "webhook_url" not in job["settings"]
    assert db.get_one(Job, job["id"]).webhook_url == url
    without = client.post("/v1/jobs", json=BODY, headers=make_key()).json()
    assert without["webhook_url"] is None


def test_a_key_reads_its_own_signing_secret(
    client: TestClient, make_key: MakeKey, db: Session
) -> None:
    headers, other = make_key(), make_key()
    mine = client.get("/v1/webhook-secret", headers=headers)
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["secret"].startswith("whsec_")
    assert body["signature_header"] == "amid-signature"
    assert body["default_webhook_url"] is None
    assert db.query(ApiKey).filter(ApiKey.webhook_secret == body["secret"]).count() == 1
    assert client.get("/v1/webhook-secret", headers=other).json()["secret"] != body["secret"]
    refused = client.get("/v1/webhook-secret")
    assert refused.status_code == 401 and refused.json()["error"] == "Unauthorized"


def test_keys_create_takes_a_checked_default_webhook_url(
    app_env: None, client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "bad", "--webhook-url", "ftp://example.com/x"]) == 2
    assert "--webhook-url: must be an http:// or https:// URL" in capsys.readouterr().err
    # Bytes that are no UTF-8 reach argv as lone surrogates: refused, not stored.
    assert main(["keys", "create", "bad", "--webhook-url", "https://example.com/\udcff"]) == 2
    assert "--webhook-url: must be valid Unicode text" in capsys.readouterr().err

    url = "https://ci.example.com/hooks/amid"
    assert main(["keys", "create", "ci", "--webhook-url", url]) == 0
    printed = capsys.readouterr()
    secret = printed.out.strip()
    shown = client.get("/v1/webhook-secret", headers={"Authorization": f"Bearer {secret}"}).json()
    assert shown["default_webhook_url"] == url
    # The signing secret was printed once, with the key.
    assert f"webhook signing secret: {shown['secret']}" in printed.err

    assert main(["keys", "list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if f"webhook {url}" in line]
    assert len(listed) == 1 and listed[0].endswith(f"ci  webhook {url}")


def test_jobs_submit_sends_the_webhook_url(
    wired: None, secret: str, run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ("jobs", "--api-key", secret)
    url = "https://hooks.example.com/amid"
    code, out, _ = run_amid(capsys, *key, "submit", str(run_file), "--webhook-url", url)
    assert code == 0
    code, shown, _ = run_amid(capsys, *key, "get", out.strip())
    assert code == 0 and json.loads(shown)["webhook_url"] == url

    code, out, err = run_amid(capsys, *key, "submit", str(run_file), "--webhook-url", "ftp://x")
    assert code == 1 and out == ""
    assert err.startswith("error: webhook_url: must be an http:// or https:// URL")
