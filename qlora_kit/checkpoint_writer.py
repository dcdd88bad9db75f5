"""Writing Hugging Face checkpoint folders: streamed safetensors shards, index, config and side files.

Exports (merge, dequantize) produce tensors one at a time; `ShardWriter` writes each
to disk as it arrives, so host RAM stays near one tensor plus whatever the producer
holds. They write into a folder that
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

from . import memory
from .checkpoint import INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE
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


_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch dtype -> header name


# Bytes kept at the front of each shard for its header (~150 bytes per tensor): a shard is
# closed early when its header would outgrow this, so the header always fits in front.
HEADER_RESERVE = 64 * 1024
_METADATA = {"__metadata__": {"format": "pt"}}  # transformers checks this key


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, each tensor as it arrives.

    A safetensors file starts with a header listing every tensor, unknown until the
    shard is complete. So each shard file starts with room for its header
    (`HEADER_RESERVE`), each tensor's bytes are written after it as they arrive, and the
    header goes into that room when the shard closes, padded with spaces as the format
    allows. Host RAM holds one tensor at a time, not one shard, and no byte is written
    twice: a merge of a model that fits one shard needs no more memory or time than an
    in-memory merge. Shards are written as `model-00001.safetensors`, ... and renamed
    to `model-00001-of-0000N.safetensors` (with an index) by `finish`, since N is
    known only at the end; a single shard becomes `model.safetensors`, as
    `save_pretrained` does. A tensor larger than the limit gets a shard of its own.
    """

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        # Small shards get a small header room (a multiple of 8: the data stays 8-byte aligned).
        self.header_reserve = -(-min(HEADER_RESERVE, max(1024, max_shard_bytes // 1024)) // 8) * 8
        self._file = None  # the open file of the shard being written
        self._entries: dict[str, dict] = {}  # its tensors: dtype, shape, data_offsets
        self._header_bytes = len(_header(_METADATA))
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _DTYPE_NAMES:
            raise QLoRAKitError(f"cannot write {name}: dtype {tensor.dtype} has no safetensors name")
        nbytes = tensor.numel() * tensor.element_size()
        entry = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [2**64, 2**64]}
        entry_bytes = len(_header({name: entry}))  # at least what it adds to the header, whatever its offsets
        if self._entries and (self._pending_bytes + nbytes > self.max_shard_bytes
                              or self._header_bytes + entry_bytes > self.header_reserve):
            self._flush()
        if self._header_bytes + entry_bytes > self.header_reserve:
            raise QLoRAKitError(f"cannot write {name[:80]}...: its name alone would not fit a shard header")
        if self._file is None:
            self._file = open(self._shard_path(), "wb")
            self._file.seek(8 + self.header_reserve)  # the header's room, filled by _flush
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        entry["data_offsets"] = [self._pending_bytes, self._pending_bytes + nbytes]
        self._entries[name] = entry
        self._header_bytes += entry_bytes
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _shard_path(self) -> Path:
        return self.folder / f"model-{len(self._written) + 1:05d}.safetensors"

    def _flush(self) -> None:
        path = self._shard_path()
        if self._file is None:  # an empty checkpoint still gets one (empty) shard
            self._file = open(path, "wb")
        header = _header({**_METADATA, **self._entries})
        header += b" " * (self.header_reserve - len(header))  # trailing spaces: the format's own padding
        self._file.seek(0)
        self._file.write(len(header).to_bytes(8, "little"))
        self._file.write(header)
        self._file.close()
        log.debug("wrote %s (%d tensors, %.1f MB)", path.name, len(self._entries), self._pending_bytes / 1e6)
        self._written.append((path, list(self._entries)))
        self._file, self._entries, self._pending_bytes = None, {}, 0
        self._header_bytes = len(_header(_METADATA))

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index; returns file names."""
        if self._entries or not self._written:
            self._flush()
        memory.release()  # the producer's freed tensors: give their pages back to the OS
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


def _header(entries: dict) -> bytes:
    return json.dumps(entries, separators=(",", ":")).encode()


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

