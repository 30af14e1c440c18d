"""Training checkpoints: the trainer's tensors (safetensors) and a JSON state that points at them,
each written atomically, so a run killed at any moment resumes from a complete checkpoint
(:func:`interp.features.training.train` with ``checkpoint_dir=``); nothing is unpickled.

>>> load_checkpoint(Path("no-such-folder"), {}) is None
True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import atomic_write
from .sources import TrainingError, derived_seed

if TYPE_CHECKING:
    from .trainer import Trainer

FORMAT = "interp-train-1"
STATE_FILE = "train.json"


def _tensor_file(step: int) -> str:
    """The tensor file of the checkpoint at ``step``."""
    return f"train-{step:09d}.safetensors"


def save_checkpoint(folder: Path, settings: dict[str, Any], trainer: Trainer, step: int) -> None:
    """Tensors first (a new file), then the JSON that points at them (replacing the old one), then
    the old tensor files: a kill at any moment leaves a complete, consistent checkpoint."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    name = _tensor_file(step)
    tensors = trainer.tensors()
    atomic_write(folder / name, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT,
                                                                                 "step": str(step)}))
    per_epoch = trainer.src.n // settings["batch_size"]
    state = {"format": FORMAT, "settings": settings, "step": step, "batches_consumed": step,
             "stream": {"epoch": step // per_epoch, "batch": step % per_epoch, "batches_per_epoch": per_epoch,
                        "data_seed": derived_seed(settings["seed"], "data", step // per_epoch)},
             "tensors": name, "records": trainer.records}
    text = json.dumps(state, indent=1)
    atomic_write(folder / STATE_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    for old in folder.glob("train-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} ({old!r} there, {new!r} now)"]


def load_checkpoint(folder: Path, settings: dict[str, Any]) -> tuple[int, dict[str, torch.Tensor],
                                                                      list[dict[str, float]]] | None:
    """``(step, tensors, log records)`` of the checkpoint in ``folder`` (None when there is none),
    refusing one written with other ``settings`` (naming what differs) or damaged."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    for tmp in folder.glob(".*.tmp-*"):  # left by a killed run: never read, removed
        tmp.unlink(missing_ok=True)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path} is not valid JSON ({e}); delete {folder} to start again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a training checkpoint (format {FORMAT!r})")
    wanted = json.loads(json.dumps(settings))
    if state.get("settings") != wanted:
        diffs = _diff(state.get("settings"), wanted)
        raise TrainingError(f"the checkpoint in {folder} was written with other settings: {'; '.join(diffs)}. "
                            "Rerun with the same arguments to resume it, or use another checkpoint_dir")
    from safetensors import SafetensorError, safe_open

    tensor_path = folder / state["tensors"]
    try:
        with safe_open(str(tensor_path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise TrainingError(f"{tensor_path} cannot be read ({e}); delete {folder} to start again") from None
    if meta.get("step") != str(state["step"]):
        raise TrainingError(f"{tensor_path} holds step {meta.get('step')}, {path} says {state['step']}")
    return int(state["step"]), tensors, state["records"]


__all__ = ["FORMAT", "STATE_FILE", "save_checkpoint", "load_checkpoint"]
