"""Training checkpoints: writing them atomically, keeping the last K, and resuming from one.

A checkpoint folder `checkpoints/step-000050/` holds the adapter (PEFT format),
the optimizer and scheduler states, every RNG state and the loop's position in
the data, so a resumed run continues exactly where the killed one stopped.
`checksums.json`, written last, records every other file's size and SHA-256:
a resume checks them first and falls back to the newest checkpoint that passes
(`newest_intact_checkpoint`), saying so.

Under several processes every process calls `save_checkpoint`: what lives on
each of them (its RNG state; under FSDP its shards of the adapter and of the
optimizer state) is gathered to the main process, which alone writes the
folder, and the others wait until it is in place. Each process keeps its own
RNG stream (`rng-rank{i}.pt`), and the data order depends on the number of
processes, so a checkpoint resumes only on as many processes as wrote it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import atomic, integrity
from .adapter_io import load_adapter_weights, save_adapter
from .errors import QLoRAKitError
from .lora import lora_layers

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"
# Size and SHA-256 of every other file of the checkpoint, written last: checked before resuming from it.
CHECKSUMS_FILE = "checksums.json"


@dataclass
class LoopState:
    """Where the loop is: optimizer steps taken, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # index of the next micro-batch within the epoch's shuffled order
    tokens_seen: int = 0  # supervised target tokens trained on
    elapsed_s: float = 0.0
    world_size: int = 1  # processes the run trains on: a resume needs as many (data order, RNG streams)
    fsdp: bool = False  # adapter and optimizer were sharded by FSDP (its optimizer state is keyed by name)


def save_checkpoint(root: Path, model, base, optimizer, scheduler, state: LoopState, keep: int,
                    accelerator=None) -> Path:
    """Write `root/step-N` atomically, then delete all but the newest `keep` checkpoints.

    `base` is the `BaseInfo` of the model's base, recorded with the adapter. With an
    `accelerator` of several processes, every process must call it (see the module
    docstring); it returns once the checkpoint is in place.
    """
    target = root / f"step-{state.step:06d}"
    main = accelerator is None or accelerator.is_main_process
    rngs = _gather_objects(rng_state(), accelerator)  # one per process, in rank order
    optimizer_state = _optimizer_state(model, optimizer, state.fsdp)
    with gathered_adapter(model, main):
        if main:
            with atomic.staged_folder(target, overwrite=True) as tmp:
                save_adapter(model, tmp / "adapter", base=base, extra={"step": state.step})
                torch.save(optimizer_state, tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                for rank, rng in enumerate(rngs):
                    torch.save(rng, tmp / rng_file(rank))
                atomic.write_json(tmp / "state.json", asdict(state))
                atomic.write_json(tmp / CHECKSUMS_FILE,
                                  {"files": integrity.record_files(tmp, exclude=(CHECKSUMS_FILE,))})
            for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # nobody reads or rotates checkpoints before this one is whole
    return target


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _gather_objects(obj, accelerator) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _optimizer_state(model, optimizer, fsdp: bool) -> dict:
    """The optimizer's state as one whole; under FSDP gathered from every process (all must call it).

    FSDP's state is torch's full optimizer state dict: keyed by parameter name, on the
    main process's CPU only (the others get an empty dict).
    """
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _unwrapped(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one


@contextmanager
def gathered_adapter(model: nn.Module, main: bool = True) -> Iterator[None]:
    """Inside, the main process's LoRA layers hold their whole weights, also when FSDP shards them.

    Every process must enter: each weight is gathered from all processes' shards, one
    at a time, and only the main process keeps it, on its CPU, so no GPU ever holds the
    whole adapter. `save_adapter` then writes the usual PEFT folder. Unsharded weights
    are left as they are; on exit the shards are put back.
    """
    from torch.distributed.tensor import DTensor

    swapped = []
    try:
        for _, layer in lora_layers(model):
            for linear in (layer.lora_A, layer.lora_B):
                weight = linear.weight
                if not isinstance(weight, DTensor):
                    continue
                full = weight.full_tensor().detach().to("cpu")
                if main:
                    swapped.append((linear, weight))
                    linear._parameters["weight"] = nn.Parameter(full, requires_grad=False)
        yield
    finally:
        for linear, weight in swapped:
            linear._parameters["weight"] = weight


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written `.tmp` folders are ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def remove_partial_checkpoints(root: Path) -> None:
    """Clear what a killed run left mid-write: half-written checkpoints, and puts back one moved aside."""
    atomic.remove_stale(root)


def verify_checkpoint(folder: Path) -> LoopState:
    """Check the checkpoint's files against `checksums.json` and its state's keys; return the state.

    Raises QLoRAKitError ("cannot resume from ...") naming the damaged file. Reads every
    file once (hashing), loads nothing. Checkpoints written before checksums were
    recorded pass with a warning.
    """
    records = folder / CHECKSUMS_FILE
    if records.is_file():
        try:
            integrity.check_files(folder, integrity.read_records(records), recorded_in=records, fix="")
        except QLoRAKitError as exc:
            raise QLoRAKitError(f"cannot resume from {folder}: {exc}") from exc
    else:
        log.warning("%s has no %s (written by an older qlora_kit): its files cannot be checked", folder, CHECKSUMS_FILE)
    return read_state(folder)


def read_state(folder: Path) -> LoopState:
    """The checkpoint's `state.json` as a LoopState; unreadable JSON, unknown keys or wrong types are errors."""
    path = folder / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise QLoRAKitError(f"cannot resume from {folder}: {path} is unreadable ({exc})") from exc
    defaults = {f.name: f.default for f in dataclasses.fields(LoopState)}
    if not isinstance(data, dict):
        problem = "is not a JSON object"
    elif unknown := sorted(set(data) - set(defaults)):
        problem = (f"has unexpected key(s) {', '.join(map(repr, unknown))} (a checkpoint's state holds "
                   f"{', '.join(defaults)})")
    elif "step" not in data:
        problem = "has no 'step'"
    elif wrong := [k for k, v in data.items() if not _same_kind(v, defaults[k])]:
        problem = f"has a value of the wrong type for {', '.join(map(repr, wrong))}"
    else:
        return LoopState(**data)
    raise QLoRAKitError(
        f"cannot resume from {folder}: {path} {problem}: it was edited, or written by another version of qlora_kit"
    )


def _same_kind(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def newest_intact_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under `root` that passes `verify_checkpoint`; None when there is none.

    A newer one that fails is reported, and once an older one passes it is moved
    aside to `step-N.damaged` (kept for inspection, never resumed from, never counted
    when checkpoints rotate: the resumed run writes its steps again). When every
    checkpoint fails, nothing is moved and the error lists each problem.
    """
    failed = []
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
        except QLoRAKitError as exc:
            log.warning("%s; trying the checkpoint before it", exc)
            failed.append((folder, exc))
            continue
        for bad, _ in failed:
            aside = _damaged_name(bad)
            os.replace(bad, aside)
            log.warning("moved the damaged checkpoint %s aside to %s; delete it once you have looked at it",
                        bad, aside.name)
        if failed:
            log.warning("resuming from %s, an older checkpoint: the newer one(s) failed their checks", folder)
        return folder
    if failed:
        raise QLoRAKitError(
            f"no checkpoint in {root} can be resumed from:\n" + "\n".join(f"  {exc}" for _, exc in failed)
            + "\nRestore the checkpoints from a good copy, or start the run over (train.overwrite=true deletes "
            "this run; or choose a new train.output_dir)"
        )
    return None


def _damaged_name(folder: Path) -> Path:
    aside = folder.with_name(folder.name + ".damaged")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.damaged-{n}")
    return aside


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> LoopState:
    """Restore adapter weights, optimizer, scheduler and RNG states; return the loop position."""
    verify_checkpoint(folder)
    load_adapter_state(folder, model)
    return load_training_state(folder, model, optimizer, scheduler)


def load_adapter_state(folder: Path, model) -> None:
    """Restore the checkpoint's adapter weights (before FSDP shards them: into whole weights)."""
    with _resume_errors(folder):
        load_adapter_weights(model, folder / "adapter")


def load_training_state(folder: Path, model, optimizer, scheduler, accelerator=None) -> LoopState:
    """Restore optimizer, scheduler and this process's RNG states; return the loop position.

    Under FSDP every process must call it: each takes its shards of the saved whole state.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    with _resume_errors(folder):
        state = read_state(folder)
        # weights_only: a checkpoint is data, never code to unpickle.
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
        if state.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, _unwrapped(optimizer), saved, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(saved)
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        rng = folder / rng_file(rank)
        if rank == 0 and not rng.is_file() and (folder / "rng.pt").is_file():
            rng = folder / "rng.pt"  # written before checkpoints kept one RNG state per process
        set_rng_state(torch.load(rng, weights_only=True))
        return state


def check_resumable(folder: Path, world_size: int, fsdp: bool) -> None:
    """Refuse a checkpoint that this launch cannot continue exactly, saying how to resume it."""
    saved = read_state(folder)
    saved_world, saved_fsdp = saved.world_size, saved.fsdp
    if saved_world != world_size:
        raise QLoRAKitError(
            f"{folder} was written by a run on {saved_world} process(es), and this one has {world_size}. "
            f"Resume it on {saved_world} (e.g. accelerate launch --num_processes {saved_world} ...): the global "
            "batch, each process's place in the data and its random state depend on the number of processes. "
            "To train on another number of processes, start a new run in another train.output_dir"
        )
    if saved_fsdp != fsdp:
        saved_mode, mode = ("fsdp", "ddp") if saved_fsdp else ("ddp", "fsdp")
        raise QLoRAKitError(
            f"{folder} was written by a {saved_mode} run, and this one uses {mode}: resume it with "
            f"train.distributed={saved_mode} (their optimizer states are saved differently)"
        )


@contextmanager
def _resume_errors(folder: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, TypeError, pickle.UnpicklingError) as exc:
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
