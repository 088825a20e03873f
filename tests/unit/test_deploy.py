"""What a reader of docker-compose.yml and the Dockerfiles relies on (parsed; no docker engine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from store.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _workers(compose: dict[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in compose["services"].items() if name.startswith("worker-gpu")}


def test_services_present(compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    assert {"postgres", "redis", "minio", "create-bucket", "migrate", "api", "reaper"} <= services
    assert _workers(compose)


def test_each_gpu_worker_reserves_one_gpu_and_runs_one_job(compose: dict[str, Any]) -> None:
    from cli.worker import worker_argv

    for name, service in _workers(compose).items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        assert devices[0]["driver"] == "nvidia"
        assert devices[0]["capabilities"] == ["gpu"]
        assert len(devices[0]["device_ids"]) == 1
        assert service["command"][:2] == ["amid", "worker"]
    argv = worker_argv("0", "amid-gpu", "INFO")
    assert "--concurrency=1" in argv
    assert "--prefetch-multiplier=1" in argv
    assert "--max-tasks-per-child=1" in argv


def test_health_checks_and_ordering(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert services["minio"]["healthcheck"]["test"]
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ("api", "reaper", *_workers(compose)):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert services["migrate"]["command"] == ["amid", "db", "upgrade"]


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    named = set(compose["volumes"])
    for service in ("postgres", "redis", "minio"):
        mounts = compose["services"][service]["volumes"]
        assert any(m.split(":")[0] in named for m in mounts), service


def test_every_amid_variable_exists_in_the_config(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    names = set(re.findall(r"\bAMID_[A-Z_]+\b", text))
    known = {f"AMID_{field.upper()}" for field in ServiceConfig.model_fields}
    assert names, "compose sets no AMID_ variables"
    assert names <= known, names - known


def test_api_image_installs_no_torch() -> None:
    dockerfile = (ROOT / "docker" / "api.Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in instructions if "torch" in line]
    installs = re.findall(r"pip install[^\n]*", dockerfile)
    assert installs and all("worker" not in line and "torch" not in line for line in installs)
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)


def test_worker_image_has_cuda_torch_and_the_worker_extra() -> None:
    dockerfile = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:", dockerfile, re.M)
    assert "torch==" in dockerfile
    assert ".[worker,s3]" in dockerfile
