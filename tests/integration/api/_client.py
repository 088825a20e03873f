"""Running the `amid` command in-process, as a test sees it: exit code, stdout, stderr."""

from __future__ import annotations

import pytest

from cli.main import main


def run_amid(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
