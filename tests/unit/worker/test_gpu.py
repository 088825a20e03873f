"""The worker's GPU as the pool shows it: torch's answer, asked in a child process."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from worker import gpu


def test_without_the_nvidia_driver_the_worker_is_cpu_and_torch_is_not_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "NVIDIA_CONTROL_DEVICE", tmp_path / "nvidiactl")

    def probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("no probe without a driver")

    monkeypatch.setattr(subprocess, "run", probe)
    assert gpu.describe_gpu() == gpu.GpuInfo("cpu", None)


def test_the_child_process_answers_what_torch_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    driver = tmp_path / "nvidiactl"
    driver.touch()
    monkeypatch.setattr(gpu, "NVIDIA_CONTROL_DEVICE", driver)
    expected = (
        gpu.GpuInfo(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory)
        if torch.cuda.is_available()
        else gpu.GpuInfo("cpu", None)
    )
    assert gpu.describe_gpu() == expected


def test_a_failed_probe_reports_cpu_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    driver = tmp_path / "nvidiactl"
    driver.touch()
    monkeypatch.setattr(gpu, "NVIDIA_CONTROL_DEVICE", driver)
    monkeypatch.setattr(gpu.sys, "executable", "/bin/false")
    with caplog.at_level(logging.WARNING, logger="worker.gpu"):
        assert gpu.describe_gpu() == gpu.GpuInfo("cpu", None)
    assert "could not ask torch" in caplog.text
