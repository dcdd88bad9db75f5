"""Training checkpoints: writing them atomically, keeping the last K, and resuming from one.

A checkpoint folder `checkpoints/step-000050/` holds the adapter (PEFT format),
the optimizer and scheduler states, every RNG state and the loop's position in
the data, so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import atomic
from .adapter_io import load_adapter_weights, save_adapter
from .errors import QLoRAKitError

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoopState:
    """Where the loop is: optimizer steps taken, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # index of the next micro-batch within the epoch's shuffled order
    tokens_seen: int = 0  # supervised target tokens trained on
    elapsed_s: float = 0.0


def save_checkpoint(root: Path, model, base, optimizer, scheduler, state: LoopState, keep: int) -> Path:
    """Write `root/step-N` atomically, then delete all but the newest `keep` checkpoints.

    `base` is the `BaseInfo` of the model's base, recorded with the adapter.
    """
    target = root / f"step-{state.step:06d}"
    with atomic.staged_folder(target, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter", base=base, extra={"step": state.step})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        atomic.write_json(tmp / "state.json", asdict(state))
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written `.tmp` folders are ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def remove_partial_checkpoints(root: Path) -> None:
    """Clear what a killed run left mid-write: half-written checkpoints, and puts back one moved aside."""
    atomic.remove_stale(root)


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> LoopState:
    """Restore adapter weights, optimizer, scheduler and RNG states; return the loop position."""
    try:
        load_adapter_weights(model, folder / "adapter")
        # weights_only: a checkpoint is data, never code to unpickle.
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
        return LoopState(**json.loads((folder / "state.json").read_text()))
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise QLoRAKitError(f"cannot resume from {folder}: {exc}. Delete it to resume from an older checkpoint") from exc


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
