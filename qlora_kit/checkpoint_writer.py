"""Writing Hugging Face checkpoint folders: streamed safetensors shards, index, config and side files.

Exports (merge, dequantize) produce tensors one at a time; `ShardWriter` holds at
most one output shard before writing it, so host RAM stays near one output shard
plus whatever the producer holds. They write into a folder that
`atomic.staged_folder` renames into place only when everything succeeded: a crash
or kill leaves either no target or the previous one untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import memory
from .checkpoint import INDEX_FILE, SINGLE_FILE
from .errors import QLoRAKitError

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "2GB"
# Files in a base folder that hold weights (or weight indexes) and are never copied to an export.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf",
                   "*.safetensors.index.json", "*.bin.index.json", "config.json",
                   # adapter files would make transformers load the folder as a PEFT adapter
                   "adapter_config.json", "adapter_model.*", "qlora_kit.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from `1000000`, `'500MB'`, `'2GB'` or `'1.5GiB'` (decimal units, as transformers reads them)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if match is None or match.group(2) not in _UNITS:
            raise QLoRAKitError(f"invalid size '{size}': use bytes or a number with KB, MB, GB (e.g. 2GB)")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise QLoRAKitError(f"shard size must be positive, got {size}")
    return value


class ShardWriter:
    """Collects tensors into safetensors shards of at most `max_shard_bytes`, writing each when full.

    Shards are written as `model-00001.safetensors`, ... and renamed to
    `model-00001-of-0000N.safetensors` (with an index) by `finish`, since N is
    known only at the end; a single shard becomes `model.safetensors`, as
    `save_pretrained` does. A tensor larger than the limit gets a shard of its own.
    """

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f"model-{len(self._written) + 1:05d}.safetensors"
        # safetensors writes from the tensors' memory directly: no second copy of the shard.
        save_file(self._pending, path, metadata={"format": "pt"})
        log.debug("wrote %s (%d tensors, %.1f MB)", path.name, len(self._pending), self._pending_bytes / 1e6)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0
        memory.release()  # the shard's tensors are freed: give their pages back to the OS

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index; returns file names."""
        if self._pending or not self._written:
            self._flush()
        if len(self._written) == 1:
            path, _ = self._written[0]
            os.replace(path, self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        count = len(self._written)
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self._written, 1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / final)
            weight_map.update({tensor: final for tensor in tensors})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX_FILE]


def write_config(source_folder: Path, target_folder: Path, dtype: torch.dtype) -> dict:
    """Copy config.json as a plain 16/32-bit model's: no quantization_config, `dtype` set."""
    config = json.loads((Path(source_folder) / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("_pre_quantization_dtype", None)
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:  # older transformers read this key; keep it consistent
        config["torch_dtype"] = dtype_name
    (Path(target_folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def copy_side_files(source_folder: Path, target_folder: Path) -> list[str]:
    """Copy the non-weight top-level files (tokenizer, chat template, generation config, README, license...)."""
    copied = []
    for path in sorted(Path(source_folder).iterdir()):
        if not path.is_file() or path.name.startswith(".") or any(path.match(p) for p in WEIGHT_PATTERNS):
            continue
        shutil.copy2(path, Path(target_folder) / path.name)
        copied.append(path.name)
    return copied

