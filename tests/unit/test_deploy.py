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


def test_services_present(compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    assert {
        "postgres",
        "redis",
        "minio",
        "create-bucket",
        "migrate",
        "api",
        "reaper",
        "worker",
    } <= services


def test_one_worker_service_scales_to_one_worker_per_gpu(compose: dict[str, Any]) -> None:
    from cli.worker import worker_argv

    workers = [name for name in compose["services"] if "worker" in name]
    assert workers == ["worker"], "GPUs are added by scaling `worker`, not by copying it"
    worker = compose["services"]["worker"]
    assert worker["deploy"]["replicas"] == "${GPU_WORKERS:-1}"
    (devices,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    # Every replica sees every GPU and takes a free index under a lock in the shared volume.
    assert worker["command"] == ["amid", "worker", "--gpu", "auto"]
    assert "worker-cache:/data" in worker["volumes"]
    assert worker["environment"]["AMID_HOME"] == "/data"
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
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "amid", "worker", "--check"]
    assert services["reaper"]["healthcheck"]["test"] == ["CMD", "amid", "reaper", "--check"]
    for name in ("api", "reaper", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert services["migrate"]["command"] == ["amid", "db", "upgrade"]


def test_every_image_is_pinned_or_built_where_it_is_used(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        if image.startswith("amid-"):
            assert service["build"]["dockerfile"] == f"docker/{image[5:]}.Dockerfile", name
        else:
            tag = image.rpartition(":")[2]
            assert ":" in image and tag != "latest", f"{name}: {image} is not pinned"
    assert "build" in compose["services"]["reaper"]


def test_workers_get_the_operators_hf_token(compose: dict[str, Any]) -> None:
    environment = compose["services"]["worker"]["environment"]
    # A name without a value: compose passes the operator's HF_TOKEN through, or nothing.
    assert "HF_TOKEN" in environment
    assert environment["HF_TOKEN"] is None
    assert "HF_TOKEN" not in compose["services"]["api"]["environment"]


def test_metrics_profile_scrapes_the_api_with_an_admin_key_file(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["metrics"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"]}
    config_file = ROOT / mounts["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_file.read_text())
    (scrape,) = config["scrape_configs"]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["static_configs"] == [{"targets": ["api:8000"]}]
    credentials = scrape["authorization"]["credentials_file"]
    assert mounts[credentials].startswith("./secrets/")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    others = [s for n, s in compose["services"].items() if n != "prometheus"]
    assert not [s for s in others if "profiles" in s], "only Prometheus is optional"


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
    # The CUDA index by default; a build arg points pip elsewhere (a CPU wheel, a mirror).
    assert 'ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu124"' in dockerfile
    assert re.search(r"pip install \$TORCH_PIP_ARGS \"torch==\$\{TORCH_VERSION\}\"", dockerfile)


def test_compose_and_images_name_the_stand_ins_the_smoke_test_builds(
    compose: dict[str, Any],
) -> None:
    """scripts/compose_smoke.sh builds each base image under its exact name: a tag changed in
    one place and not the other would make it pull (and fail) instead."""
    script = (ROOT / "scripts" / "compose_smoke.sh").read_text()
    standins = set(re.findall(r"^\s+\[([^\]]+)\]=docker/standins/", script, re.M))
    dockerfiles = "".join(
        (ROOT / "docker" / f).read_text() for f in ("api.Dockerfile", "worker.Dockerfile")
    )
    bases = set(re.findall(r"^FROM (\S+)", dockerfiles, re.M))
    pulled = {compose["services"][name]["image"] for name in ("postgres", "redis")}
    assert standins == bases | pulled
