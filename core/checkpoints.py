"""Checkpoints: complete or absent, and enough to resume a run exactly.

A checkpoint directory `<output>/checkpoints/step-<n>/` holds the student (`save_pretrained`,
safetensors), its tokenizer, `training_state.pt` (optimizer, LR scheduler, grad scaler, the
python/numpy/torch RNG states, step, data position, best metric) and `settings.json`. It is
written under a temporary name and renamed into place, so a reader (the uploader, a resume)
never sees half of one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from core.data import DataPosition
from core.errors import AmidError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STATE_FILE = "training_state.pt"
SETTINGS_FILE = "settings.json"
BEST_FILE = "best.json"


class CheckpointUnusable(AmidError):
    """A checkpoint to resume from is missing or incomplete."""

    status_code = 422


@dataclass
class TrainingState:
    step: int
    position: DataPosition
    best_metric: float | None
    best_step: int | None
    # Run parts with state of their own (the LM stream, the replay buffer, adaptive knobs).
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step}"


def rng_state() -> dict[str, Any]:
    version, keys, pos = random.getstate()
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        # Plain lists and tensors only: the file loads with torch.load(weights_only=True).
        "python": [version, list(keys), pos],
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            *[float(x) if isinstance(x, float) else int(x) for x in np_state[2:]],
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, pos = state["python"]
    random.setstate((version, tuple(keys), pos))
    name, keys_np, pos_np, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys_np.numpy().astype(np.uint32), pos_np, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path
) -> None:
    """`save_pretrained` of model and tokenizer, atomically (temp dir, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, target)


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        # Re-saving the same step (a resumed run that stopped there): the new one wins.
        shutil.rmtree(target)
    tmp.rename(target)


def save_checkpoint(
    output_dir: Path,
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainingState,
    settings_json: dict[str, Any],
) -> Path:
    """Write `checkpoints/step-<n>/` completely and return its path."""
    target = checkpoint_dir(output_dir, state.step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(
        {
            "step": state.step,
            "position": [state.position.epoch, state.position.index],
            "best_metric": state.best_metric,
            "best_step": state.best_step,
            "extra": state.extra,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
        },
        tmp / STATE_FILE,
    )
    (tmp / SETTINGS_FILE).write_text(json.dumps(settings_json, indent=2), encoding="utf-8")
    _replace_dir(tmp, target)
    return target


def mark_best(output_dir: Path, step: int, metrics: dict[str, float]) -> None:
    """Record which checkpoint is best (by eval/rouge_l) in `checkpoints/best.json`."""
    path = output_dir / "checkpoints" / BEST_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "metrics": metrics}), encoding="utf-8")
    tmp.replace(path)


def load_training_state(
    checkpoint: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> TrainingState:
    """Restore optimizer, scheduler, scaler and RNGs from `checkpoint`; return where it stood."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise CheckpointUnusable(
            f"{checkpoint}: not a checkpoint directory (no {STATE_FILE})", field="resume_from"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    epoch, index = saved["position"]
    return TrainingState(
        step=int(saved["step"]),
        position=DataPosition(int(epoch), int(index)),
        best_metric=saved["best_metric"],
        best_step=saved["best_step"],
        extra=saved.get("extra", {}),
    )
