"""The API image has no torch: importing the app must not need it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

PROBE = textwrap.dedent(
    """
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"{name} is not installed in this image")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the probe failed to block torch")

    import api.main
    app = api.main.create_app()
    app.openapi()
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in {"torch", "transformers"})
    print("loaded:", loaded)
    raise SystemExit(1 if loaded else 0)
    """
)


def test_api_imports_with_torch_unimportable() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded: []" in result.stdout
