"""`amid files`, job names and tags, `amid jobs metrics`, checkpoint downloads and the client's
edges, against the real app (in-process) on Postgres."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from store import jobs
from store.artifacts import checkpoint_key, get_artifact_store
from store.db import session_scope
from tests.integration.api._client import run_amid as _amid

pytestmark = pytest.mark.integration


def test_files_upload_list_rm(
    wired: None, secret: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "response": "r"}\n')
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    # --api-key after the subcommand works as well as before it.
    code, out, err = _amid(capsys, "files", "upload", str(rows), "--api-key", secret)
    assert code == 0, err
    dataset_ref = out.strip()
    assert dataset_ref.startswith("file:") and len(dataset_ref) == 37
    code, out, err = _amid(capsys, "files", "--api-key", secret, "upload", str(model))
    assert code == 0, err
    model_ref = out.strip()

    code, out, _ = _amid(capsys, "files", "--api-key", secret, "list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [model_ref, dataset_ref]
    assert "dataset" in lines[1] and "rows.jsonl" in lines[1]
    assert str(hashlib.sha256(rows.read_bytes()).digest()) not in out  # sizes, not digests
    code, out, _ = _amid(capsys, "files", "--api-key", secret, "list", "--purpose", "model")
    assert out.split() and out.split()[0] == model_ref and dataset_ref not in out

    code, out, _ = _amid(capsys, "files", "--api-key", secret, "rm", dataset_ref)
    assert code == 0 and dataset_ref in out
    code, out, err = _amid(capsys, "files", "--api-key", secret, "rm", dataset_ref)
    assert code == 1 and "not found" in err


def test_names_tags_and_the_list_columns(
    wired: None, secret: str, run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ("jobs", "--api-key", secret)
    code, out, err = _amid(
        capsys, *key, "submit", str(run_file), "--name", "capitals-amid", "--tag", "sweep-1"
    )
    assert code == 0, err
    named = out.strip()
    code, out, _ = _amid(capsys, *key, "submit", str(run_file), "--name", "plurals-kd")
    other = out.strip()

    code, out, _ = _amid(capsys, *key, "list")
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "NAME", "PRESET", "STATUS", "PROGRESS", "ETA"]
    assert rows[1].split()[:5] == [named, "capitals-amid", "amid", "queued", "0/?"]

    code, out, _ = _amid(capsys, *key, "list", "--name", "CAPITALS")
    assert named in out and other not in out
    code, out, _ = _amid(capsys, *key, "list", "--tag", "sweep-1")
    assert named in out and other not in out
    code, out, _ = _amid(capsys, *key, "list", "--tag", "sweep")  # a tag matches whole
    assert named not in out


def test_metrics_prints_a_sparkline_per_series(
    wired: None, secret: str, run_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ("jobs", "--api-key", secret)
    job_id = _amid(capsys, *key, "submit", str(run_file))[1].strip()
    losses = [4.0, 3.0, 2.5, 2.0, 1.0]
    with session_scope() as session:
        jobs.add_metrics(session, job_id, [(i + 1, "train/loss", v) for i, v in enumerate(losses)])
        jobs.add_metrics(session, job_id, [(5, "eval/rouge_l", 0.25)])

    code, out, _ = _amid(capsys, *key, "metrics", job_id)
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert set(lines) == {"train/loss", "eval/rouge_l"}
    assert lines["train/loss"].startswith("█▆▅▃▁") and "1 (step 5, 5 points)" in lines["train/loss"]

    code, out, _ = _amid(capsys, *key, "metrics", job_id, "--name", "train/loss")
    assert out.splitlines()[1:] == [f"{i + 1}\t{v}" for i, v in enumerate(losses)]
    code, _, err = _amid(capsys, *key, "metrics", job_id, "--name", "train/nothing")
    assert code == 1 and "no metric points named train/nothing" in err


def test_download_a_checkpoint_prints_a_local_path(
    wired: None, secret: str, run_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ("jobs", "--api-key", secret)
    job_id = _amid(capsys, *key, "submit", str(run_file))[1].strip()
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"step": 2}')
    uploaded = get_artifact_store().upload_dir(checkpoint, checkpoint_key(job_id, 2))
    with session_scope() as session:
        jobs.add_checkpoint(
            session,
            job_id,
            step=2,
            uri=uploaded.uri,
            sha256=uploaded.sha256,
            metrics={},
            is_best=False,
        )

    out_dir = tmp_path / "downloads"
    code, out, err = _amid(
        capsys, *key, "download", job_id, "-o", str(out_dir), "--checkpoint", "2"
    )
    assert code == 0, err
    local = Path(out.strip())
    assert local.is_absolute() and local.parent == out_dir.resolve()
    assert json.loads((local / "config.json").read_text()) == {"step": 2}
    code, _, err = _amid(capsys, *key, "download", job_id, "-o", str(out_dir), "--checkpoint", "3")
    assert code == 1 and "no checkpoint at step 3" in err


def test_client_edges(
    wired: None, secret: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    infinite = tmp_path / "inf.yaml"
    infinite.write_text("teacher: gpt2\nstudent: distilgpt2\ndataset: d.jsonl\nalpha: .inf\n")
    code, _, err = _amid(capsys, "jobs", "--api-key", secret, "submit", str(infinite))
    assert code == 1 and err.startswith("error: alpha: must be a finite number"), err
    assert "Traceback" not in err

    code, _, err = _amid(capsys, "jobs", "list")  # no key at all
    assert code == 1 and "AMID_API_KEY" in err and "--api-key" in err

    typo = tmp_path / "typo.yaml"
    typo.write_text("teacher: gpt2\nstudent: distilgpt2\ndataset: d.jsonl\nlamda: 0.1\n")
    code, _, err = _amid(capsys, "jobs", "submit", str(typo), "--api-key", secret)
    assert code == 1 and "lamda" in err and "did you mean 'lambda'" in err, err
