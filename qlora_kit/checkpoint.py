"""Base checkpoints on disk: finding them, listing their safetensors shards, fingerprinting.

A base is named by a local HF folder, a Hub id, a GGUF file or the packaged
SmolLM2 model; all of them resolve to a local folder of safetensors shards, so
loading and merging have one code path.

Integrity: every shard's safetensors header must describe exactly the file's size
(checked when the folder is resolved, before anything reads a tensor: a truncated
shard is named as such). A folder qlora_kit exported (`qlora_kit_export.json`)
records each shard's size and SHA-256: sizes are checked on resolving, contents as
each shard is read (`iter_tensors`). Other bases carry no such record, and the
fingerprint samples their content rather than hashing all of it (see `fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from . import integrity
from .errors import QLoRAKitError
from .packaged import SMOLLM2_NAME, gguf_to_hf_folder, smollm2_path

# A safetensors header's dtype names and the torch dtypes they hold (those read and written here).
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXPORT_MANIFEST = "qlora_kit_export.json"  # an export's manifest (qlora_kit.export), with its files' checksums
_EXPORT_FIX = "Export it again, or copy the folder again from a good copy"
# Files a Hub download needs: config, tokenizer, chat template and the safetensors weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


@dataclass(frozen=True)
class Checkpoint:
    """A resolved base: a local folder and its ordered safetensors shards."""

    source: str  # what the user asked for (path, Hub id, GGUF file, packaged name)
    folder: Path
    shards: tuple[Path, ...]

    def fingerprint(self) -> str:
        return fingerprint(self.folder, self.shards)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for every tensor (in name order, as safetensors lists them), one shard at a time.

        Each tensor is read with plain file reads into a buffer of its own, not
        through a memory map: the pages of a mapped shard count in the process's RSS
        until the shard is closed, so host RAM would hold the whole shard. Here it
        holds one tensor plus whatever the caller keeps. A shard whose export
        manifest records its SHA-256 is hashed first (one more sequential read), and
        refused if it differs.
        """
        records = integrity.read_records(self.folder / EXPORT_MANIFEST)
        for shard in self.shards:
            if shard.name in records:
                integrity.check_file(shard, records[shard.name], recorded_in=self.folder / EXPORT_MANIFEST,
                                     fix=_EXPORT_FIX)
            start, header = integrity.check_safetensors_size(shard)
            with open(shard, "rb") as f:
                for name in sorted(k for k in header if k != "__metadata__"):
                    yield name, read_tensor(f, shard, name, start, header[name])

    def tensor_names(self) -> dict[str, Path]:
        """Every tensor name mapped to the shard that holds it (reads headers only)."""
        names = {}
        for shard in self.shards:
            with _open_shard(shard) as f:
                names.update({name: shard for name in f.keys()})
        return names

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the shard headers (no tensor data is read)."""
        shapes = {}
        for shard in self.shards:
            with _open_shard(shard) as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        return shapes


def read_tensor(f, shard: Path, name: str, data_start: int, info: dict, first_row: int = 0,
                rows: int | None = None) -> torch.Tensor:
    """Tensor `name` (or `rows` of its rows from `first_row`) from the open shard file `f`, by plain reads.

    `data_start` and `info` come from the shard's header (`integrity.check_safetensors_size`).
    """
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    shape = list(info["shape"])
    if rows is None:
        rows = shape[0] if shape else 1
    if dtype is None:  # an unusual dtype (fp8, ...): let safetensors decode it
        with _open_shard(shard) as st:
            return st.get_slice(name)[first_row:first_row + rows].clone() if shape else st.get_tensor(name)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    out = torch.empty(rows * row_bytes, dtype=torch.uint8)
    f.seek(data_start + info["data_offsets"][0] + first_row * row_bytes)
    if f.readinto(out.numpy()) != out.numel():
        raise QLoRAKitError(f"shard {shard} is truncated: {name} cannot be read whole")
    return out.view(dtype).reshape([rows] + shape[1:] if shape else [])


@contextmanager
def _open_shard(shard: Path):
    """safe_open, with a corrupt or truncated file reported as the user's problem to fix."""
    try:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as exc:
        raise QLoRAKitError(f"shard {shard} is corrupt or truncated ({exc}); download or copy it again") from exc


def resolve(source: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Turn what the user named into a local safetensors checkpoint, or say what is wrong."""
    text = str(source)
    if text == SMOLLM2_NAME:
        return _local_folder(text, smollm2_path())
    path = Path(text).expanduser()
    if path.is_dir():
        return _local_folder(text, path)
    if path.is_file():
        if path.suffix == ".gguf":
            return _local_folder(text, gguf_to_hf_folder(path))
        raise QLoRAKitError(
            f"unsupported base file {path}: give a Hugging Face model folder (config.json + "
            f"*.safetensors), a .gguf file, a Hub id, or '{SMOLLM2_NAME}'"
        )
    if _looks_like_hub_id(text) and not path.exists():
        return _local_folder(text, _download(text, revision))
    raise QLoRAKitError(
        f"base '{text}' not found: no such folder or file, and it is not a Hub id (owner/name)"
    )


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, gated, or a misspelt id: the hub raises many types
        raise QLoRAKitError(
            f"could not download '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Check the id, your network and `hf auth login` for gated models, "
            "or pass a local folder"
        ) from exc


def _local_folder(source: str, folder: Path) -> Checkpoint:
    if not (folder / "config.json").is_file():
        raise QLoRAKitError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    index = folder / INDEX_FILE
    if index.is_file():
        records = integrity.read_records(folder / EXPORT_MANIFEST)
        if INDEX_FILE in records:
            integrity.check_file(index, records[INDEX_FILE], recorded_in=folder / EXPORT_MANIFEST, fix=_EXPORT_FIX)
        shards = _shards_from_index(index)
    elif (folder / SINGLE_FILE).is_file():
        shards = [folder / SINGLE_FILE]
    else:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = (
            f" It holds pickled weights ({', '.join(pickles[:3])}), which qlora_kit does not load because "
            "unpickling can run arbitrary code; convert them to safetensors first."
            if pickles
            else ""
        )
        raise QLoRAKitError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}.{hint}")
    _check_shards(folder, shards)
    return Checkpoint(source=source, folder=folder.resolve(), shards=tuple(shards))


def _check_shards(folder: Path, shards: list[Path]) -> None:
    """What is cheap to check before any tensor is read: sizes against headers (and an export's records)."""
    records = integrity.read_records(folder / EXPORT_MANIFEST)
    for shard in shards:
        if shard.name in records:
            integrity.check_size(shard, records[shard.name], recorded_in=folder / EXPORT_MANIFEST, fix=_EXPORT_FIX)
        integrity.check_safetensors_size(shard)


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise QLoRAKitError(f"{index} is not a valid safetensors index ({exc})") from exc
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise QLoRAKitError(
            f"{index.parent} is missing shard(s) listed in {INDEX_FILE}: {', '.join(missing)}"
        )
    return shards


# Bytes sampled from each shard for the fingerprint: enough that two fine-tunes of
# the same architecture (identical headers, different weights) never collide,
# cheap enough to compute on a 140 GB checkpoint.
_SAMPLES_PER_SHARD = 32
_SAMPLE_BYTES = 4096


def fingerprint(folder: Path, shards: tuple[Path, ...] | list[Path]) -> str:
    """A sha256 over config.json, each shard's size, safetensors header and sampled bytes.

    Reads a few hundred KB per shard instead of hashing whole files: it tells apart
    different weights of one architecture, not a single flipped bit.
    """
    digest = hashlib.sha256()
    digest.update((folder / "config.json").read_bytes())
    for shard in shards:
        size = shard.stat().st_size
        digest.update(f"{shard.name}|{size}".encode())
        with open(shard, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, size)))
            step = max(size // _SAMPLES_PER_SHARD, 1)
            for offset in range(0, size, step):
                f.seek(offset)
                digest.update(f.read(_SAMPLE_BYTES))
    return "sha256-sampled:" + digest.hexdigest()
