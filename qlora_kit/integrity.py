"""Size and SHA-256 of the files qlora_kit writes and later trusts, recorded when written and checked when read.

Adapters record theirs under `files` in `qlora_kit.json`, training checkpoints in
`checksums.json`, exports under `files` in `qlora_kit_export.json`. A record is
`{"size": bytes, "sha256": hex}` keyed by the file's path relative to its folder
(`/`-separated). A file that no longer matches its record was changed or damaged
after it was written (disk or copy errors, an interrupted copy, an edit): reading it
is refused with an error naming the file, instead of computing with damaged weights.

Base checkpoints come from elsewhere and carry no record; `check_safetensors_size`
catches the damage that is cheap to see there: a shard truncated (or extended) so
that its header's data offsets no longer match the file's size.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import QLoRAKitError

CHUNK_BYTES = 4 * 2**20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """`{"size": ..., "sha256": ...}` of a file as it is now."""
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def record_files(folder: str | os.PathLike, names: list[str] | None = None, *, exclude: tuple[str, ...] = ()) -> dict:
    """Records of `names` in `folder`, or of every file under it (recursively) but `exclude`d names."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {name: file_record(folder / name) for name in names if name not in exclude}


def check_files(folder: str | os.PathLike, records: dict, *, recorded_in: str | os.PathLike, fix: str = "",
                only: list[str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """Raise QLoRAKitError for the first file under `folder` that is missing or differs from its record.

    `records` comes from a manifest (`recorded_in`, named in the message); `only`
    restricts the check to those names (when recorded), `skip` leaves names out.
    `fix` is the sentence telling the user what to do.
    """
    folder = Path(folder)
    checked = _valid_records(records, recorded_in)
    for name, record in checked.items():
        if (only is not None and name not in only) or name in skip:
            continue
        check_file(folder / name, record, recorded_in=recorded_in, fix=fix)


def check_file(path: Path, record: dict, *, recorded_in: str | os.PathLike, fix: str = "") -> None:
    """Raise QLoRAKitError unless `path` has the size and SHA-256 of `record`: size first (no read), then content."""
    check_size(path, record, recorded_in=recorded_in, fix=fix)
    if sha256_file(path) != record["sha256"]:
        raise QLoRAKitError(
            f"{path} does not match the checksum recorded when it was written (in {recorded_in}): "
            f"the file was changed or damaged.{_then(fix)}"
        )


def check_size(path: Path, record: dict, *, recorded_in: str | os.PathLike, fix: str = "") -> None:
    """The cheap half of `check_file`: the file exists and has its recorded size (nothing is read)."""
    if not path.is_file():
        raise QLoRAKitError(f"{path} is missing, but {recorded_in} records it as part of the folder.{_then(fix)}")
    size = path.stat().st_size
    if size != record["size"]:
        raise QLoRAKitError(
            f"{path} is {size:,} bytes, but was {record['size']:,} bytes when it was written (recorded in "
            f"{recorded_in}): the file was truncated, changed or damaged.{_then(fix)}"
        )


def _then(fix: str) -> str:
    return f" {fix}" if fix else ""


def read_records(manifest: Path) -> dict:
    """The checked `files` records of a JSON manifest; {} when it has none (or there is no manifest)."""
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise QLoRAKitError(f"{manifest} is not valid JSON ({exc}); the folder's manifest is damaged") from exc
    if not isinstance(data, dict) or "files" not in data:
        return {}
    return _valid_records(data["files"], manifest)


def _valid_records(records, recorded_in) -> dict:
    def ok(record) -> bool:
        return (isinstance(record, dict) and isinstance(record.get("size"), int)
                and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64)

    if not isinstance(records, dict) or not all(isinstance(k, str) and ok(v) for k, v in records.items()):
        raise QLoRAKitError(
            f"{recorded_in}: its 'files' entry is malformed (expected {{name: {{size, sha256}}}}); "
            "the manifest was edited or damaged, so its files cannot be checked. Restore the folder from a good copy"
        )
    return records


def check_safetensors_size(path: str | os.PathLike) -> tuple[int, dict]:
    """Refuse a safetensors file whose header does not describe exactly the bytes the file holds.

    Reads only the header: a truncated (or appended-to) file is caught before any
    tensor is read, with the sizes that tell what happened. Returns where the
    tensor data starts and the header (tensor name -> dtype, shape, data_offsets).
    """
    path = Path(path)
    size = path.stat().st_size
    hint = "download or copy it again"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if header_len < 0 or header_len > size - 8:
                raise QLoRAKitError(
                    f"{path} is truncated or not a safetensors file: {size:,} bytes cannot hold the "
                    f"{max(header_len, 0):,}-byte header it announces; {hint}"
                )
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise QLoRAKitError(f"{path} has a damaged safetensors header ({exc}); {hint}") from exc
    if not isinstance(header, dict):
        raise QLoRAKitError(f"{path} has a damaged safetensors header (not a JSON object); {hint}")
    try:
        data_bytes = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise QLoRAKitError(f"{path} has a damaged safetensors header (bad data_offsets: {exc}); {hint}") from exc
    expected = 8 + header_len + data_bytes
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise QLoRAKitError(
            f"{path} is {what}: its header describes {expected:,} bytes but the file holds {size:,}; {hint}"
        )
    return 8 + header_len, header
