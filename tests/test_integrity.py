"""Nothing lost, nothing silently wrong (issue #11): checksums, output folders, torn logs, the error boundary, faults.

Every persisted file kind is damaged the way disks, copies and kills damage them
(256 flipped bytes mid-file, truncation, a torn last line, a half-written staging
folder of a killed process), and generate / merge / resume must end with one clear
error naming the file, or with the correct result; never with silent success on
damaged weights. One small training run (3 steps, a checkpoint per step) is shared;
each test damages its own copy.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import QLoRAKitError, atomic
from qlora_kit.cli import main
from qlora_kit.export import merge
from qlora_kit.generation import load_model
from qlora_kit.integrity import check_safetensors_size
from qlora_kit.loading import load_base
from qlora_kit.lora import lora_state_dict
from qlora_kit.run_folder import RUN_MARKER, MetricsLog
from qlora_kit.settings import GenerateOptions, load_recipe
from qlora_kit.training import _prepare_output_dir, train
from qlora_kit.training_state import CHECKSUMS_FILE, list_checkpoints, read_state

REPO = Path(__file__).resolve().parents[1]
FAQ = (Path(importlib.util.find_spec("zaragoza_construction_faq").submodule_search_locations[0])
       / "data" / "faq-en-alpaca.jsonl")
WEIGHTS = "adapter_model.safetensors"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Enters a staged write of argv[1] (a folder), puts a partial file in it, and is killed:
# what a kill during an adapter save or an export leaves behind.
KILLED_STAGING = """
import os, signal, sys
from qlora_kit import atomic
with atomic.staged_folder(sys.argv[1], overwrite=True) as tmp:
    (tmp / "adapter_model.safetensors").write_bytes(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
"""


# ---------------------------------------------------------------- helpers


def recipe(base: Path, data: Path, out: Path, *overrides: str):
    """3 steps of 2 examples, a checkpoint after steps 1 and 2, a rank-2 adapter on q_proj."""
    return load_recipe(None, [
        f"model.base={base}", f"data.path={data}", f"train.output_dir={out}",
        "data.max_seq_len=64", "data.eval_fraction=0", "train.batch_size=2", "train.max_steps=3",
        "train.save_every=1", "train.keep_checkpoints=2", "train.eval_every=0", "train.sample_prompts=0",
        "train.warmup_steps=1", "train.learning_rate=1e-3", "train.gradient_checkpointing=false",
        "lora.rank=2", "lora.alpha=4", "lora.target_modules=[q_proj]", *overrides,
    ])


def flip_middle(path: Path, n: int = 256) -> None:
    """Invert `n` bytes in the middle of the file, as a bad disk block or a bad copy would."""
    data = bytearray(path.read_bytes())
    start = max(len(data) // 2 - n // 2, 0)
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def killed_staging(target: Path) -> None:
    """Leave what a process killed in the middle of a staged write of `target` leaves."""
    proc = subprocess.run([sys.executable, "-c", KILLED_STAGING, str(target)], cwd=REPO, env=ENV,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def staging_leftovers(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.tmp-*")) + sorted(folder.glob(f".{name}.old-*"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = FAQ.read_text().splitlines()[:8]
    path = tmp_path_factory.mktemp("data") / "faq8.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    train(recipe(tiny_llama_dir, data_file, out))
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run to damage (its config.yaml still names the original folder)."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def quiet_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))  # where the CLI writes a bug's log


# ---------------------------------------------------------------- 1. integrity records


def test_every_trusted_file_is_recorded_with_its_size_and_sha256(finished_run):
    def matches(folder: Path, records: dict) -> None:
        for name, record in records.items():
            data = (folder / name).read_bytes()
            assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, folder / name

    manifest = json.loads((finished_run / "adapter/qlora_kit.json").read_text())
    assert set(manifest["files"]) == {WEIGHTS, "adapter_config.json"}
    matches(finished_run / "adapter", manifest["files"])

    checkpoints = list_checkpoints(finished_run / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-000001", "step-000002"]
    for folder in checkpoints:
        records = json.loads((folder / CHECKSUMS_FILE).read_text())["files"]
        every_file = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(records) == every_file - {CHECKSUMS_FILE}
        assert {"optimizer.pt", "scheduler.pt", "rng-rank0.pt", "state.json", f"adapter/{WEIGHTS}",
                "adapter/adapter_config.json", "adapter/qlora_kit.json"} <= set(records)
        matches(folder, records)

    assert json.loads((finished_run / RUN_MARKER).read_text())["kind"] == "qlora_kit training run"


def test_damaged_adapter_is_one_clear_error_for_generate_and_merge(finished_run, run_copy, tmp_path, capsys,
                                                                   quiet_cache):
    flip_middle(run_copy / "adapter" / WEIGHTS)
    expected = f"{WEIGHTS} does not match the checksum recorded when it was written"

    assert main(["generate", str(run_copy), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "changed or damaged" in err and str(run_copy / "adapter") in err
    assert err.count("error:") == 1 and "Traceback" not in err

    with pytest.raises(QLoRAKitError, match=expected):
        merge(run_copy, tmp_path / "merged", verify=0, progress=False)
    assert not (tmp_path / "merged").exists() and not staging_leftovers(tmp_path, "merged")

    # adapter_config.json is checked too (it decides the scaling), before the base is even loaded.
    shutil.copy(finished_run / "adapter" / WEIGHTS, run_copy / "adapter" / WEIGHTS)
    config = run_copy / "adapter/adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 4', '"lora_alpha": 8'))  # same size
    with pytest.raises(QLoRAKitError, match="adapter_config.json does not match the checksum.*delete its entry"):
        load_model(adapter=str(run_copy))


def test_adapters_without_records_still_load(finished_run, tiny_llama_dir, tmp_path):
    """PEFT's own adapters (no qlora_kit.json) and manifests from before the records load as before."""
    peft = Path(shutil.copytree(finished_run / "adapter", tmp_path / "peft"))
    (peft / "qlora_kit.json").unlink()
    older = Path(shutil.copytree(finished_run / "adapter", tmp_path / "older"))
    manifest = json.loads((older / "qlora_kit.json").read_text())
    del manifest["files"]
    (older / "qlora_kit.json").write_text(json.dumps(manifest))
    want = load_file(finished_run / "adapter" / WEIGHTS)
    for folder in (peft, older):
        loaded = load_model(base=str(tiny_llama_dir), adapter=str(folder))
        got = {f"base_model.model.{k}": v for k, v in lora_state_dict(loaded.model).items()}
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k].float(), want[k].float()) for k in want)


def test_base_shard_checks(finished_run, tiny_llama_dir, tmp_path, capsys, quiet_cache):
    """A truncated shard is named before any tensor is read; a shard changed in place is not 'another base'."""
    truncated = Path(shutil.copytree(tiny_llama_dir, tmp_path / "truncated"))
    shard = truncated / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    message = r"model.safetensors is truncated: its header describes [0-9,]+ bytes but the file holds [0-9,]+"
    with pytest.raises(QLoRAKitError, match=message):
        merge(finished_run, tmp_path / "merged", base=str(truncated), verify=0, progress=False)
    with pytest.raises(QLoRAKitError, match=message):
        load_base(str(truncated))
    assert main(["generate", "--base", str(truncated), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "is truncated" in err and err.count("error:") == 1 and "Traceback" not in err

    longer = tmp_path / "longer.safetensors"
    longer.write_bytes((tiny_llama_dir / "model.safetensors").read_bytes() + b"\0" * 10)
    with pytest.raises(QLoRAKitError, match="longer than its header says"):
        check_safetensors_size(longer)

    # The fingerprint samples each shard (see checkpoint.fingerprint), the middle included: bytes
    # flipped there in the folder training used are reported as that folder having changed.
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    base = Path(shutil.copytree(tiny_llama_dir, tmp_path / "base"))
    manifest = json.loads((run / "adapter/qlora_kit.json").read_text())
    manifest["base"]["folder"] = str(base)
    (run / "adapter/qlora_kit.json").write_text(json.dumps(manifest))
    flip_middle(base / "model.safetensors")
    with pytest.raises(QLoRAKitError, match=f"trained on a different base: the files in {base} changed since "
                                            "training.*replaced, modified or damaged"):
        merge(run, tmp_path / "merged", verify=0, progress=False)
    assert not (tmp_path / "merged").exists()


def test_export_records_its_shards_and_they_are_checked_when_it_is_used_as_a_base(finished_run, tmp_path):
    out = tmp_path / "merged"
    merge(finished_run, out, verify=0, progress=False)
    records = json.loads((out / "qlora_kit_export.json").read_text())["files"]
    shard = out / "model.safetensors"
    assert records == {"model.safetensors": {"size": shard.stat().st_size,
                                             "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}}
    load_base(str(out))  # intact: loads

    flip_middle(shard)
    with pytest.raises(QLoRAKitError, match="model.safetensors does not match the checksum.*qlora_kit_export.json"):
        load_base(str(out))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(QLoRAKitError, match="model.safetensors is [0-9,]+ bytes, but was [0-9,]+ bytes when it was "
                                            "written.*truncated"):
        load_base(str(out))


# ---------------------------------------------------------------- 1 + 3. resume falls back, saying so


def _damage_state_keys(folder: Path) -> None:
    """A state.json with a key this version does not know, consistently recorded (another version wrote it)."""
    state = folder / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "learning_phase": 2}))
    checksums = json.loads((folder / CHECKSUMS_FILE).read_text())
    checksums["files"]["state.json"] = {"size": state.stat().st_size,
                                        "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(checksums))


DAMAGE = {
    "adapter weights": (lambda f: flip_middle(f / "adapter" / WEIGHTS), f"adapter/{WEIGHTS} does not match"),
    "optimizer state": (lambda f: flip_middle(f / "optimizer.pt"), "optimizer.pt does not match"),
    "state keys": (_damage_state_keys, "state.json has unexpected key\\(s\\) 'learning_phase'"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_to_the_previous_checkpoint_and_reaches_the_same_adapter(
        finished_run, run_copy, tiny_llama_dir, data_file, caplog, damage):
    damage_fn, message = DAMAGE[damage]
    newest = run_copy / "checkpoints/step-000002"
    damage_fn(newest)
    caplog.set_level(logging.INFO, logger="qlora_kit")

    summary = train(recipe(tiny_llama_dir, data_file, run_copy, "train.resume=true"))

    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"cannot resume from {newest}" in warnings
    assert re.search(message, warnings), warnings
    assert "resuming from" in warnings and "step-000001, an older checkpoint" in warnings
    assert (run_copy / "checkpoints/step-000002.damaged").is_dir()  # kept for inspection, out of the way
    # The resumed run trained steps 2 and 3 again: exactly the uninterrupted run's adapter and metrics.
    assert summary["steps"] == 3 and steps(run_copy) == [0, 1, 2, 3]
    want = load_file(finished_run / "adapter" / WEIGHTS)
    got = load_file(run_copy / "adapter" / WEIGHTS)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert [p.name for p in list_checkpoints(run_copy / "checkpoints")] == ["step-000001", "step-000002"]


def test_resume_with_every_checkpoint_damaged_is_one_clear_error(run_copy, capsys):
    flip_middle(run_copy / "checkpoints/step-000002/optimizer.pt")
    (run_copy / "checkpoints/step-000001/rng-rank0.pt").write_bytes(b"")
    adapter_before = (run_copy / "adapter" / WEIGHTS).read_bytes()
    code = main(["train", str(run_copy / "config.yaml"), f"train.output_dir={run_copy}", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert f"no checkpoint in {run_copy / 'checkpoints'} can be resumed from" in err
    assert "step-000002/optimizer.pt does not match" in err and "step-000001/rng-rank0.pt is 0 bytes" in err
    assert [p.name for p in list_checkpoints(run_copy / "checkpoints")] == ["step-000001", "step-000002"]
    assert (run_copy / "adapter" / WEIGHTS).read_bytes() == adapter_before


def test_checkpoint_state_with_unexpected_or_wrong_values_is_a_clear_error(tmp_path):
    folder = tmp_path / "step-000001"
    folder.mkdir()
    cases = {
        '{"step": 1, "epoch": 0, "surprise": true}': r"state.json has unexpected key\(s\) 'surprise'",
        '{"step": "1"}': "wrong type for 'step'",
        '{"epoch": 0}': "has no 'step'",
        '[1, 2]': "is not a JSON object",
        '{"step": 1, "ep': "is unreadable",
    }
    for text, message in cases.items():
        (folder / "state.json").write_text(text)
        with pytest.raises(QLoRAKitError, match=f"cannot resume from {folder}: .*{message}"):
            read_state(folder)
    (folder / "state.json").write_text('{"step": 4, "elapsed_s": 3}')
    assert read_state(folder).step == 4


# ---------------------------------------------------------------- 2. output folders


def test_train_refuses_output_folders_that_are_not_its_own(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "home" / "projects" / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for name, message in [("", "is empty or '.'"), (".", "is empty or '.'"), ("/", "the filesystem root"),
                          ("~", "your home folder"), (str(home), "your home folder"),
                          (str(work), "the current folder"), ("..", "a folder holding the current folder")]:
        with pytest.raises(QLoRAKitError, match=message):
            _prepare_output_dir(Path(name), resume=False, overwrite=True)
    assert sorted(p.name for p in home.rglob("*")) == ["projects", "work"]  # nothing written anywhere

    # A folder of other files: refused, untouched; --overwrite empties it and trains there, writing nowhere else.
    parent = tmp_path / "elsewhere"
    foreign = parent / "results"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(QLoRAKitError, match=f"{foreign} is not empty and is not a qlora_kit run folder.*--overwrite"):
        train(recipe(tiny_llama_dir, data_file, foreign, "train.max_steps=1"))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(QLoRAKitError, match="contradict"):
        _prepare_output_dir(foreign, resume=True, overwrite=True)

    train(recipe(tiny_llama_dir, data_file, foreign, "train.max_steps=1", "train.overwrite=true"))
    assert not (foreign / "notes.txt").exists() and (foreign / RUN_MARKER).is_file()
    assert (foreign / "adapter" / WEIGHTS).is_file()
    assert sorted(p.name for p in parent.iterdir()) == ["results"]
    assert list(work.iterdir()) == []


def test_used_and_finished_runs_are_never_silently_replaced(run_copy, tiny_llama_dir, data_file, capsys):
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    config = str(run_copy / "config.yaml")

    # A new run into a used run folder: the hint spells both flags.
    assert main(["train", config, f"train.output_dir={run_copy}"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "train.resume=true" in err and "--overwrite" in err
    assert main(["train", config, f"train.output_dir={run_copy}", "--overwrite", "--resume"]) == 2
    assert "contradict each other" in capsys.readouterr().err

    # A finished run with no checkpoint left: resuming would start it over, so it is refused.
    shutil.rmtree(run_copy / "checkpoints")
    assert main(["train", config, f"train.output_dir={run_copy}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "nothing to resume" in err and err.count("error:") == 1
    assert all(p.read_bytes() == data for p, data in before.items() if p.exists())
    assert (run_copy / "adapter" / WEIGHTS).read_bytes() == before[run_copy / "adapter" / WEIGHTS]

    # A run folder from before the marker (config.yaml + metrics.jsonl) is still recognised as a run.
    (run_copy / RUN_MARKER).unlink()
    with pytest.raises(QLoRAKitError, match="already holds a run"):
        _prepare_output_dir(run_copy, resume=False)


# ---------------------------------------------------------------- 3 + 5. torn logs, stale staging


def test_metrics_log_drops_a_torn_last_line_and_names_any_other_bad_line(tmp_path, caplog):
    good = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(4))
    (tmp_path / "metrics.jsonl").write_text(good + '{"step": 4, "lo')
    MetricsLog(tmp_path, resume_step=2)
    assert steps(tmp_path) == [0, 1, 2]
    (tmp_path / "metrics.jsonl").write_text(good + "\0" * 40)  # a tail a crash left zero-filled
    assert [r["step"] for r in MetricsLog(tmp_path, resume_step=9).records()] == [0, 1, 2, 3]
    assert "dropping its last line" in caplog.text

    (tmp_path / "metrics.jsonl").write_text(good.replace('"step": 1', '"step": one') + '{"step": 4}\n')
    with pytest.raises(QLoRAKitError, match="metrics.jsonl, line 2: not a metrics record.*Fix or delete that line"):
        MetricsLog(tmp_path, resume_step=2)


def test_resume_after_a_kill_during_the_final_adapter_save(finished_run, run_copy, tiny_llama_dir, data_file,
                                                           caplog):
    """The kill came after checkpoint 2 and during the final save: staging left behind, a torn metrics
    line, and (damaged later) a truncated samples_before.json. The resume cleans and finishes the run."""
    shutil.rmtree(run_copy / "adapter")
    (run_copy / "summary.json").unlink()
    killed_staging(run_copy / "adapter")
    leftover = staging_leftovers(run_copy, "adapter")
    assert len(leftover) == 1 and (leftover[0] / WEIGHTS).read_bytes() == b"partial"
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 10.7')
    samples = run_copy / "samples_before.json"
    samples.write_text(samples.read_text()[:1])
    caplog.set_level(logging.INFO, logger="qlora_kit")

    summary = train(recipe(tiny_llama_dir, data_file, run_copy, "train.resume=true"))

    assert summary["steps"] == 3 and steps(run_copy) == [0, 1, 2, 3]
    assert staging_leftovers(run_copy, "adapter") == []
    assert f"removing {leftover[0]}, left by an interrupted write" in caplog.text
    assert "dropping its last line" in caplog.text and "samples_before.json is damaged" in caplog.text
    assert json.loads(samples.read_text()) == []  # generated again (no sample prompts in this run)
    want, got = load_file(finished_run / "adapter" / WEIGHTS), load_file(run_copy / "adapter" / WEIGHTS)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_merge_clears_its_own_stale_staging_and_puts_back_an_export_a_kill_moved_aside(finished_run, tmp_path,
                                                                                       caplog):
    caplog.set_level(logging.INFO, logger="qlora_kit")
    out = tmp_path / "merged"
    killed_staging(out)
    [stale] = staging_leftovers(tmp_path, "merged")
    merge(finished_run, out, verify=0, progress=False)
    assert staging_leftovers(tmp_path, "merged") == [] and (out / "model.safetensors").is_file()
    assert f"removing {stale}, left by an interrupted write" in caplog.text

    # A kill between the two renames of a replace: the previous export sits aside, the target is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".merged.old-{atomic._host()}-{int(dead.stdout)}-0badc0de"
    os.replace(out, aside)
    with pytest.raises(QLoRAKitError, match="already exists.*--overwrite"):
        merge(finished_run, out, verify=0, progress=False)  # the previous export is back, and kept
    assert "putting back" in caplog.text and (out / "model.safetensors").is_file()
    assert staging_leftovers(tmp_path, "merged") == []


# ---------------------------------------------------------------- 4. the error boundary


@pytest.fixture
def failing_generate(monkeypatch):
    """Make `qlora-kit generate` raise the given exception."""
    import qlora_kit.cli as cli

    def install(exc: BaseException):
        def handler(opts):
            raise exc
        monkeypatch.setitem(cli.COMMANDS, "generate", (GenerateOptions, handler, None))
    return install


def _expected_failures():
    import jinja2

    return {
        "file": (PermissionError(errno.EACCES, "Permission denied", "/data/x.jsonl"),
                 "Permission denied: /data/x.jsonl"),
        "disk full": (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        "utf-8": (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not valid UTF-8"),
        "json": (json.JSONDecodeError("Expecting value", "{", 1), "not valid JSON"),
        "remote code": (ValueError("The repository x/y contains custom code which must be executed to correctly "
                                   "load the model.\nPlease pass the argument `trust_remote_code=True`"),
                        "model.trust_remote_code=true"),
        "template": (jinja2.TemplateSyntaxError("unexpected '}'", 1), "the chat template failed"),
        "gpu memory": (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                       "out of GPU memory"),
    }


@pytest.mark.parametrize("kind", list(_expected_failures()))
def test_expected_failures_are_one_error_line_and_exit_2(failing_generate, capsys, quiet_cache, kind):
    exc, text = _expected_failures()[kind]
    failing_generate(exc)
    assert main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err
    assert text in err


def test_a_bug_exits_1_with_its_traceback_in_a_log_file(failing_generate, capsys, quiet_cache, tmp_path):
    failing_generate(RuntimeError("boom: a bug"))
    assert main(["generate", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "error: unexpected RuntimeError: boom: a bug" in err and "Traceback" not in err and "-v" in err
    [log_file] = (tmp_path / "cache" / "logs").glob("generate-*.log")
    assert str(log_file) in err
    assert "Traceback" in log_file.read_text() and "boom: a bug" in log_file.read_text()

    assert main(["-v", "generate", "--prompt", "hi"]) == 1
    assert "Traceback" in capsys.readouterr().err  # -v: on the terminal too


def test_a_bug_during_train_is_logged_in_the_runs_train_log(tiny_llama_dir, data_file, tmp_path, monkeypatch,
                                                           capsys, quiet_cache):
    import qlora_kit.training as training

    def broken(*args, **kwargs):
        raise KeyError("a bug inside the loop")

    monkeypatch.setattr(training, "_train", broken)
    config = tmp_path / "recipe.yaml"
    config.write_text(f"model: {{base: {tiny_llama_dir}}}\ndata: {{path: {data_file}}}\n")
    out = tmp_path / "run"
    assert main(["train", str(config), f"train.output_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert f"the traceback is in {out / 'train.log'}" in err and "Traceback" not in err
    log = (out / "train.log").read_text()
    assert "Traceback" in log and "a bug inside the loop" in log
