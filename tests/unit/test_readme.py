"""The README is what users read first: its settings example and its configuration table must
say what the code does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from core.settings import DistillSettings
from store.config import ServiceConfig

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _default_text(name: str) -> str:
    field = ServiceConfig.model_fields[name]
    if field.default_factory is not None:
        return "(empty)"
    if field.default is None:
        return "(unset)"
    return str(field.default)


def test_settings_example_is_valid_settings() -> None:
    block = re.search(r"### The settings file.*?```yaml\n(.*?)```", README, re.S)
    assert block, "the README has no settings example"
    example: dict[str, Any] = yaml.safe_load(block.group(1))
    settings = DistillSettings.model_validate(example)
    assert settings.alpha == example["alpha"] and settings.lam == example["lambda"]


def test_configuration_table_matches_the_code() -> None:
    rows = re.findall(r"^\| `(AMID_[A-Z0-9_]+)` \| `([^`]*)` \| (.+?) \|$", README, re.M)
    table = {name: (default, meaning) for name, default, meaning in rows}
    expected = {f"AMID_{name.upper()}": name for name in ServiceConfig.model_fields}
    assert set(table) == set(expected), "README configuration table vs ServiceConfig fields"
    for variable, field in expected.items():
        default, meaning = table[variable]
        assert default == _default_text(field), variable
        assert meaning == ServiceConfig.model_fields[field].description, variable


def test_every_variable_the_compose_file_sets_is_documented() -> None:
    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text()
    documented = set(re.findall(r"`(AMID_[A-Z0-9_]+)`", _section("### Configuration")))
    assert set(re.findall(r"\b(AMID_[A-Z0-9_]+)\b", compose)) <= documented


def test_presets_table_matches_the_presets() -> None:
    from core.presets import PRESETS

    rows = re.findall(
        r"^\| `([\w-]+)` \| (-?[\d.]+) \| (-?[\d.]+) \| `(\w+)` \| (\w+) \| (.+?) \|$",
        _section("### Presets"),
        re.M,
    )
    table = {name: row for name, *row in rows}
    assert set(table) == set(PRESETS)
    for name, (alpha, lam, divergence, anchor, description) in table.items():
        preset = PRESETS[name]
        assert (float(alpha), float(lam)) == (preset.alpha, preset.lam), name
        assert (divergence, anchor, description) == (
            preset.divergence,
            preset.anchor,
            preset.description,
        ), name


def test_the_demo_figures_are_the_block_the_demo_script_writes(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "demo_script", Path(__file__).resolve().parents[2] / "scripts" / "demo.py"
    )
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    # The README quotes the demo's figures in one block, the one the script rewrites.
    assert len(demo.README_BLOCK.findall(README)) == 1
    copy = tmp_path / "README.md"
    copy.write_text(README)
    monkeypatch.setattr(demo, "README", copy)
    demo.write_readme(["== job abcd…: succeeded", "   eval/rouge_l: 0.5000 (step 800)"])
    written = copy.read_text()
    assert "   eval/rouge_l: 0.5000 (step 800)\n```\n<!-- demo-output:end -->" in written
    assert written.replace(demo.README_BLOCK.search(written).group(0), "") == README.replace(
        demo.README_BLOCK.search(README).group(0), ""
    )
