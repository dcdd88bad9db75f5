"""Staged writes: files and folders that appear whole under their final name, or not at all.

Everything written now and trusted later (adapters, training checkpoints, exports,
the converted-model cache, configs, run-folder files) is built under a temporary
name beside its target, flushed to disk, and renamed into place only when complete:
a crash or kill leaves the target absent or as it was, never half-written.

Temporary names record their writer: `.NAME.tmp-HOST-PID-RANDOM` holds new content,
`.NAME.old-HOST-PID-RANDOM` a previous folder moved aside while a new one takes its
name (HOST is a hash of this machine's name). A later write of the same target uses
the name to prove that a leftover is ours and that its writer is gone before it
touches it; anything else, including a live writer's staging and files from another
machine sharing the folder, is left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import QLoRAKitError

log = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}")


@contextmanager
def staged_folder(target: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success put it at `target`, else delete it.

    Refuses an existing `target` unless `overwrite`. What killed writes of the same
    target left behind is cleared first (it can be as large as a model).
    """
    target = Path(target).expanduser().absolute()
    remove_stale(target.parent, target.name)  # first: it may put back a folder a killed replace moved aside
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()  # not mkdtemp: its 0o700 would follow the folder to its final name
    try:
        yield tmp
        _check_target(target, overwrite)  # something may have appeared there meanwhile
        replace_dir(tmp, target)
    finally:
        _remove(tmp)


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put folder `new` at `target`, replacing any old one with at most a rename's gap.

    `new`'s files are flushed to disk first, so that after a power cut the renamed
    folder holds data rather than empty files. The old folder is moved aside
    (`.NAME.old-*`) and deleted only after the new one is in place; if the process
    dies between the two renames, the next staged write of `target` puts it back.
    """
    new, target = Path(new), Path(target)
    _fsync_tree(new)
    old = None
    if target.exists() or target.is_symlink():
        old = _sibling(target, "old")
        os.replace(target, old)
    os.replace(new, target)
    _fsync_dir(target.parent)
    if old is not None:
        _remove(old)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically: readers see the old file or the new one, never part of one."""
    path = Path(path)
    remove_stale(path.parent, path.name)
    tmp = _sibling(path, "tmp")
    try:
        # 0o666 less the umask, as a plain open() gives (mkstemp's 0o600 would hide the file from others).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `write_bytes`)."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write `obj` as indented JSON with a final newline, atomically (see `write_bytes`)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


@contextmanager
def staged_file(target: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a path beside `target` to write one file at; on success flush it and put it at `target`, else delete it.

    For files streamed to disk, too large for `write_bytes`. Refuses an existing
    `target` unless `overwrite`; a failed or killed write leaves any old file as it was.
    """
    target = Path(target).expanduser().absolute()
    remove_stale(target.parent, target.name)
    _check_file_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        _check_file_target(target, overwrite)  # something may have appeared there meanwhile
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _check_file_target(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise QLoRAKitError(f"{target} is a folder; give the path of the file to write")
    if target.exists() and not overwrite:
        raise QLoRAKitError(f"{target} already exists; choose another name or pass --overwrite")


def remove_stale(folder: str | os.PathLike, name: str | None = None) -> None:
    """Clear what killed writes left in `folder` (for target `name` only, if given).

    Only names this module makes, from this machine, whose writing process is gone
    are touched. A folder that a killed replace moved aside goes back to its name
    when nothing took that name since; every other leftover is deleted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    stale = []
    for path in folder.iterdir():
        match = _LEFTOVER.fullmatch(path.name)
        if (match and (name is None or match["name"] == name) and match["host"] == _host()
                and not _alive(int(match["pid"]))):
            stale.append((match["kind"], path, folder / match["name"]))
    # Moved-aside folders first: one may be its target's only copy.
    for kind, path, target in sorted(stale, key=lambda item: (item[0] != "old", item[1].name)):
        try:
            if kind == "old" and not (target.exists() or target.is_symlink()):
                log.warning("putting back %s, moved aside by a replace that was killed", target)
                os.replace(path, target)
            else:
                log.info("removing %s, left by an interrupted write", path)
                _remove(path)
        except FileNotFoundError:
            pass  # another process cleared it first


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise QLoRAKitError(f"{target} exists and is not a folder; choose another output folder")
    if target.exists() and not overwrite:
        raise QLoRAKitError(f"{target} already exists; choose another output folder or pass --overwrite")


def _sibling(target: Path, kind: str) -> Path:
    """A fresh name beside `target` that records this process as its writer."""
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _host() -> str:
    # A hash, not the name itself: a host name can be long or hold characters a file name cannot.
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: never claim it is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(folder: str | os.PathLike) -> None:
    """Make the folder's entries (new names, renames) durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a folder, and needs no folder flush for its renames
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic there
    finally:
        os.close(fd)
