"""Where a converted GGUF base came from: the file's content identity and the origin record beside its conversion.

A GGUF file is converted once into a cached Hugging Face folder (packaged.py). The
cache is keyed by a sha256 of the file's bytes, so a file reached through another
path or name (a copy, a link, a moved download) finds the same folder. Hashing
reads the whole file (about 1 GB/s here: 0.1-0.2 s for the 93 MB SmolLM2 file), so
the digest is remembered per (path, size, modification time) and each file is
read once.

The converted folder holds `qlora_kit_source.json`: the GGUF file it came from, its
digest, the file's `general.*` metadata (name, organization, ...) and, when the
file names one, the Hugging Face Hub id of the model it is a copy of, so an adapter
trained on the converted folder can point PEFT or vLLM at something they can load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

from . import atomic

ORIGIN_FILE = "qlora_kit_source.json"
_MEMO_FILE = "hashes.json"
# Keys that name the model the file itself is a copy of, most specific first. (general.base_model.N
# names a model this one was fine-tuned *from*: reported, but not this model's id.)
_OWN_URL_KEYS = ("general.source.repo_url", "general.source.url", "general.repo_url", "general.url")
_HUB_URL = re.compile(r"https?://(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+?)(?:\.git)?(?:[/?#].*)?")


def content_hash(gguf_file: str | os.PathLike, memo_dir: str | os.PathLike) -> str:
    """sha256 of the file's bytes, remembered in `memo_dir` per (resolved path, size, mtime)."""
    path = Path(gguf_file).resolve()
    stat = path.stat()
    ident = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = Path(memo_dir) / _MEMO_FILE
    memo = _read_json(memo_path)
    if isinstance(memo.get(ident), str):
        return memo[ident]
    digest = _sha256(path)
    # Re-read before writing: another process may have added entries meanwhile. A lost
    # update only costs that file one more hash.
    memo = _read_json(memo_path)
    memo[ident] = digest
    try:
        Path(memo_dir).mkdir(parents=True, exist_ok=True)
        atomic.write_json(memo_path, memo)
    except OSError:
        pass  # a read-only cache still works, it just hashes every time
    return digest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_origin(folder: str | os.PathLike, gguf_file: str | os.PathLike, digest: str,
                 hub_id: str | None = None, name: str | None = None) -> dict:
    """Write `qlora_kit_source.json` into the converted folder.

    `hub_id` overrides what the file's metadata says; `name` is the name qlora_kit
    knows the file by (the packaged model's), if any.
    """
    gguf_file = Path(gguf_file).resolve()
    general = read_general_metadata(gguf_file)
    found, key = hub_id_from_metadata(general)
    record = {
        "gguf_file": str(gguf_file),
        "gguf_sha256": digest,
        "gguf_bytes": gguf_file.stat().st_size,
        "name": name,
        "hub_id": hub_id or found,
        "hub_id_from": "given by qlora_kit" if hub_id else key,
        "base_models": [v for k, v in sorted(general.items())
                        if re.fullmatch(r"general\.base_model\.\d+\.repo_url", k)],
        "general": general,
    }
    atomic.write_json(Path(folder) / ORIGIN_FILE, record)
    return record


def gguf_origin(folder: str | os.PathLike) -> dict | None:
    """The origin record of a folder converted from a GGUF file, or None for any other folder."""
    path = Path(folder) / ORIGIN_FILE
    if not path.is_file():
        return None
    record = _read_json(path)
    return record or None


def hub_id_from_metadata(general: dict) -> tuple[str | None, str | None]:
    """(owner/name, the key it came from) from the first Hub URL among the keys naming the file's own model."""
    for key in _OWN_URL_KEYS:
        match = _HUB_URL.fullmatch(str(general.get(key, "")).strip())
        if match:
            return match.group(1), key
    return None, None


# --------------------------------------------------------------------------- GGUF header

# GGUF value types: scalar struct formats by type id; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_general_metadata(gguf_file: str | os.PathLike) -> dict:
    """The scalar `general.*` key-value pairs of a GGUF file's header.

    Reads the header only, skipping arrays (the tokenizer's tens of thousands of
    strings) without decoding them: milliseconds, where gguf.GGUFReader takes seconds.
    """
    with open(gguf_file, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{gguf_file} is not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack("<IQQ", fh.read(20))
        if version < 2:
            raise ValueError(f"{gguf_file} is GGUF version {version}; only 2 and later are read")
        found = {}
        for _ in range(n_kv):
            key = _read_string(fh)
            kind = struct.unpack("<I", fh.read(4))[0]
            value = _read_value(fh, kind)
            if key.startswith("general.") and kind != _ARRAY:
                found[key] = value
    return found


def _read_string(fh) -> str:
    (length,) = struct.unpack("<Q", fh.read(8))
    return fh.read(length).decode("utf-8", errors="replace")


def _read_value(fh, kind: int):
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _read_string(fh)
    if kind == _ARRAY:
        item_kind, count = struct.unpack("<IQ", fh.read(12))
        if item_kind in _SCALARS:
            fh.seek(count * struct.calcsize(_SCALARS[item_kind]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _read_value(fh, item_kind)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
