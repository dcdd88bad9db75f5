"""Staged writes against real kills: the target is absent, the old one or the whole new one, never a mix.

Writers run in subprocesses that are SIGKILLed, from outside while they stage, or by
themselves at an exact step of the final replace (the only way to hit a window between
two renames); what they leave is then inspected and cleaned by the next real write.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_kit import QLoRAKitError, atomic

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
OLD = {"model.bin": b"old", "old-only.txt": b"only in the old folder"}
NEW = {"model.bin": b"new"}

STAGING_WRITER = """
import sys, time
from qlora_kit import atomic
with atomic.staged_folder(sys.argv[1], overwrite=True) as tmp:
    (tmp / "model.bin").write_bytes(b"new")
    (tmp / "WRITING").touch()  # tells the test the write is under way
    time.sleep(600)
"""

# Kills itself at one step of the final replace: os.replace is wrapped only to find that instant.
KILLED_AT = """
import os, signal, sys
from pathlib import Path
from qlora_kit import atomic

point = sys.argv[2]
rename = os.replace

def replace(src, dst):
    moving_old_aside = ".old-" in Path(dst).name
    if point == "before the renames" or (point == "between the renames" and not moving_old_aside):
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
    if point == "before the old one is deleted" and not moving_old_aside:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
with atomic.staged_folder(sys.argv[1], overwrite=True) as tmp:
    (tmp / "model.bin").write_bytes(b"new")
"""

# Kills itself once the new text is in the temporary file, before it is renamed over the old file.
FILE_KILLED_BEFORE_RENAME = """
import os, signal, sys
from qlora_kit import atomic
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
atomic.write_text(sys.argv[1], "new content")
"""


def _start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_killed(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]


def _write_folder(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _contents(folder: Path) -> dict[str, bytes] | None:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else None


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_killed_staged_write_leaves_no_target_or_the_old_one_and_the_next_write_cleans_up(tmp_path):
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    fresh.mkdir()
    _write_folder(existing / "out", OLD)
    procs = [_start(STAGING_WRITER, folder / "out") for folder in (fresh, existing)]
    deadline = time.monotonic() + 120
    try:
        for folder, proc in zip((fresh, existing), procs):
            while not list(folder.glob(".out.tmp-*/WRITING")):
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the writer never started staging"
                time.sleep(0.02)
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()

    assert _contents(fresh / "out") is None
    assert _contents(existing / "out") == OLD
    for folder in (fresh, existing):
        assert len(list(folder.glob(".out.tmp-*"))) == 1  # the killed writer's staging folder
        with atomic.staged_folder(folder / "out", overwrite=True) as tmp:
            (tmp / "model.bin").write_bytes(b"newer")
        assert _contents(folder / "out") == {"model.bin": b"newer"}
        assert _leftovers(folder) == [], "the stale staging folder is cleaned up"


@pytest.mark.parametrize("point, after_kill", [
    ("before the renames", OLD),
    ("between the renames", None),  # absent: the old folder waits beside it, moved aside
    ("before the old one is deleted", NEW),
])
def test_a_replace_killed_at_any_step_loses_nothing(tmp_path, point, after_kill):
    _write_folder(tmp_path / "out", OLD)
    _wait_killed(_start(KILLED_AT, tmp_path / "out", point))
    assert _contents(tmp_path / "out") == after_kill
    assert _leftovers(tmp_path)

    # The next write clears the leftovers first, putting a moved-aside folder back; then,
    # without overwrite, it refuses the (restored) folder that is there.
    with pytest.raises(QLoRAKitError, match="already exists"):
        with atomic.staged_folder(tmp_path / "out", overwrite=False):
            pass
    assert _contents(tmp_path / "out") == (NEW if after_kill == NEW else OLD)
    assert _leftovers(tmp_path) == []


def test_leftovers_not_provably_from_a_dead_writer_here_are_kept(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", ""])
    done.wait()
    dead, here = done.pid, atomic._host()
    elsewhere = f"{int(here, 16) ^ 1:08x}"
    kept = [
        ".out.tmp-made-by-someone-else",                      # not a name this module makes
        f".out.tmp-{elsewhere}-{dead}-0123abcd",              # another machine sharing the folder
        f".out.tmp-{here}-{os.getpid()}-0123abcd",            # a live writer (this process)
        f".other.tmp-{here}-{dead}-0123abcd",                 # another target's
    ]
    stale = f".out.tmp-{here}-{dead}-0123abcd"
    for name in kept + [stale]:
        (tmp_path / name).mkdir()
    with atomic.staged_folder(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "model.bin").write_bytes(b"new")
    assert _leftovers(tmp_path) == sorted(kept)

    atomic.remove_stale(tmp_path)  # every target in the folder
    assert _leftovers(tmp_path) == sorted(kept[:3])


def test_a_failed_staged_write_leaves_the_target_as_it_was(tmp_path):
    _write_folder(tmp_path / "out", OLD)
    with pytest.raises(RuntimeError):
        with atomic.staged_folder(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "model.bin").write_bytes(b"half")
            raise RuntimeError("the export failed")
    assert _contents(tmp_path / "out") == OLD and _leftovers(tmp_path) == []

    with pytest.raises(QLoRAKitError, match="pass --overwrite"):
        with atomic.staged_folder(tmp_path / "out", overwrite=False):
            pass
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(QLoRAKitError, match="not a folder"):
        with atomic.staged_folder(tmp_path / "file", overwrite=True):
            pass
    assert (tmp_path / "file").read_text() == "not a folder" and _leftovers(tmp_path) == []


def test_write_text_keeps_the_old_file_when_killed_or_failing(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old content")
    _wait_killed(_start(FILE_KILLED_BEFORE_RENAME, path))
    assert path.read_text() == "old content"
    [leftover] = _leftovers(tmp_path)
    assert leftover.startswith(".config.yaml.tmp-")

    with pytest.raises(TypeError):
        atomic.write_json(path, {"not serializable": object()})
    assert path.read_text() == "old content"

    atomic.write_text(path, "new content")
    assert path.read_text() == "new content"
    assert _leftovers(tmp_path) == [], "the killed write's temporary file is cleaned up"


STREAMING_WRITER = """
import sys, time
from qlora_kit import atomic
with atomic.staged_file(sys.argv[1], overwrite=True) as tmp:
    with open(tmp, "wb") as out:
        out.write(b"new part")
        out.flush()
        time.sleep(600)
"""


def test_staged_file_is_whole_or_absent_and_refuses_what_it_should(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")
    proc = _start(STREAMING_WRITER, path)
    deadline = time.monotonic() + 120
    try:
        while not any(p.stat().st_size for p in tmp_path.glob(".model.gguf.tmp-*")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert path.read_bytes() == b"old" and len(_leftovers(tmp_path)) == 1

    with pytest.raises(RuntimeError):
        with atomic.staged_file(path, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the export failed")
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == [], "the killed write's file is cleaned up"
    with pytest.raises(QLoRAKitError, match="already exists"):
        with atomic.staged_file(path, overwrite=False):
            pass
    with pytest.raises(QLoRAKitError, match="is a folder"):
        with atomic.staged_file(tmp_path, overwrite=True):
            pass
    with atomic.staged_file(path, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and _leftovers(tmp_path) == []


def test_writes_are_ordinary_files_and_folders(tmp_path):
    atomic.write_json(tmp_path / "summary.json", {"loss": 1.5, "steps": [1, 2]})
    assert (tmp_path / "summary.json").read_text() == '{\n  "loss": 1.5,\n  "steps": [\n    1,\n    2\n  ]\n}\n'
    atomic.write_bytes(tmp_path / "curve.png", b"\x89PNG")
    assert (tmp_path / "curve.png").read_bytes() == b"\x89PNG"
    with atomic.staged_folder(tmp_path / "export", overwrite=False) as tmp:
        (tmp / "model.bin").write_bytes(b"new")

    # The permissions a plain open() and mkdir() give (no 0o600/0o700 from temp-file helpers).
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    assert _mode(tmp_path / "summary.json") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "export") == _mode(tmp_path / "plain")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
