"""Training on several processes: two CPU processes (gloo, launched by torchrun) checked against one.

The same recipe runs on one process with batch_size G and on two with G/2 each;
the global batches, token counts, learning rates and (within bf16 rounding) the
adapter must agree, under DDP and under FSDP with the 4-bit base sharded. A
two-process run killed after a checkpoint and resumed must end exactly where an
uninterrupted one does. Every launch has a timeout (and every collective wait
`train.distributed_timeout_s`), so a broken exchange fails the test instead of
hanging it.

The 1-process reference is launched by torchrun too, so both sides run with the
same environment (one thread per process) and the same entry point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.data import IGNORE_INDEX, PreparedData, batch_indices
from qlora_kit.settings import TrainConfig
from qlora_kit.training import _eval_share, _next_micro_batches
from qlora_kit.training_state import LoopState, list_checkpoints, rng_file

REPO = Path(__file__).resolve().parents[1]
FAQ_PACKAGE = Path(importlib.util.find_spec("zaragoza_construction_faq").submodule_search_locations[0])
FAQ = FAQ_PACKAGE / "data" / "faq-en-alpaca.jsonl"
LAUNCH_TIMEOUT_S = 240  # a whole launch; a hung collective fails after COLLECTIVE_TIMEOUT_S first
COLLECTIVE_TIMEOUT_S = 60
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
BF16_TOLERANCE = 2e-2  # relative (Frobenius) difference per adapter tensor


# ---------------------------------------------------------------- launching


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (torchrun starts each worker in a session of its own)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children, proc]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def start(processes: int, recipe: Path, out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "qlora_kit", "train", str(recipe), f"train.output_dir={out}",
           f"train.distributed_timeout_s={COLLECTIVE_TIMEOUT_S}", *overrides]
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"launch still running after {timeout} s (a hang):\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def launch(processes: int, recipe: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Train on `processes` CPU processes; the run must succeed."""
    done = finish(start(processes, recipe, out, *overrides))
    assert done.returncode == 0, done.stderr[-6000:]
    return done


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_adapters_close(got: dict, want: dict, tolerance: float = BF16_TOLERANCE) -> None:
    assert got.keys() == want.keys() and len(want) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for key in want:
        assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype, key
        difference = float((got[key] - want[key]).norm() / want[key].norm())
        assert difference < tolerance, (key, difference)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def recipe(tiny_llama_dir, tmp_path_factory) -> Path:
    """16 FAQ rows (12 train, 4 held out), 64-token rows, rank-4 LoRA without dropout, 4 steps.

    The global batch is 4 examples and accumulation 2 micro-batches: 12 training
    examples make 3 global batches an epoch, so the 4 steps cross two epochs.
    """
    folder = tmp_path_factory.mktemp("distributed")
    with open(FAQ) as f:
        rows = [next(f) for _ in range(16)]
    (folder / "faq16.jsonl").write_text("".join(rows))
    path = folder / "recipe.yaml"
    path.write_text(json.dumps({
        "model": {"base": str(tiny_llama_dir)},
        "data": {"path": str(folder / "faq16.jsonl"), "max_seq_len": 64, "eval_fraction": 0.25},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "warmup_steps": 1,
                  "eval_every": 2, "save_every": 2, "sample_prompts": 1, "sample_max_new_tokens": 4},
    }))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def one_process(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    launch(1, recipe, out, "train.batch_size=4")
    return out


@pytest.fixture(scope="module")
def ddp(recipe, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, launch(2, recipe, out, "train.batch_size=2", "train.distributed=ddp")


@pytest.fixture(scope="module")
def fsdp(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    launch(2, recipe, out, "train.batch_size=2", "train.distributed=fsdp", "quant.quant_storage=bfloat16")
    return out


# ---------------------------------------------------------------- the data split (in process)


def _process(world: int, rank: int):
    return SimpleNamespace(num_processes=world, process_index=rank)


def test_processes_read_disjoint_slices_of_the_one_process_batches():
    examples = [{"input_ids": [i, i], "labels": [i, i]} for i in range(5)]  # global batches of 4 and 1
    data = PreparedData(train=examples, eval=[], stats={}, pad_id=0)
    cfg = TrainConfig(batch_size=2, gradient_accumulation_steps=1, seed=3)
    per_epoch = 2  # ceil(5 / (2 x 2))
    expected = [b for epoch in (0, 1) for b in batch_indices(5, 4, cfg.seed, epoch)]
    states = [LoopState() for _ in range(2)]
    for global_batch in expected:
        slices = [_next_micro_batches(data, cfg, states[rank], per_epoch, _process(2, rank))[0] for rank in (0, 1)]
        real = [e for s in slices for e in s if e["labels"][0] != IGNORE_INDEX]
        assert [e["input_ids"][0] for e in real] == global_batch  # together: exactly the 1-process batch
        for s in slices:
            assert s, "every process gets a micro-batch"
            for e in s:  # an empty slice becomes one example without targets
                assert e["labels"][0] != IGNORE_INDEX or set(e["labels"]) == {IGNORE_INDEX}
    assert [len(b) for b in expected] == [4, 1, 4, 1]  # the second process has nothing of each short batch
    assert states[0] == states[1] and states[0].epoch == 1


def test_evaluation_shares_cover_the_held_out_set_once_in_equal_numbers_of_batches():
    examples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 3, 9, 4, 7, 2, 8)]
    shares = [_eval_share(examples, 2, 3, rank) for rank in range(3)]  # 4 batches over 3 processes
    real = [e for s in shares for e in s if set(e["labels"]) != {IGNORE_INDEX}]
    assert sorted(len(e["input_ids"]) for e in real) == sorted(len(e["input_ids"]) for e in examples)
    assert [-(-len(s) // 2) for s in shares] == [2, 2, 2]  # batches each process runs
    assert _eval_share(examples, 2, 1, 0) == sorted(examples, key=lambda e: len(e["input_ids"]))


# ---------------------------------------------------------------- (a) DDP


def test_ddp_on_two_processes_trains_what_one_process_trains(one_process, ddp):
    out, done = ddp
    single, double = metrics(one_process), metrics(out)
    assert [r["step"] for r in double] == [r["step"] for r in single] == [0, 1, 2, 3, 4]
    for one, two in zip(single, double):
        assert two["lr"] == one["lr"]
        assert two.get("tokens") == one.get("tokens")  # supervised tokens of all processes, counted once
        assert two.get("epoch") == one.get("epoch")
        for key in ("loss", "eval_loss"):
            if one.get(key) is not None:
                assert two[key] == pytest.approx(one[key], rel=1e-3), (key, one["step"])
    assert_adapters_close(adapter(out), adapter(one_process))

    # One writer: one run folder, one log, checkpoints holding every process's RNG state.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["supervised_tokens"] == single[-1]["tokens"]
    log = (out / "train.log").read_text()
    assert log.count("trainable parameters:") == 1 and "2 processes, DDP" in log
    [checkpoint] = list_checkpoints(out / "checkpoints")
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["world_size"] == 2 and state["fsdp"] is False and state["step"] == 2
    ranks = [torch.load(checkpoint / rng_file(rank), weights_only=True) for rank in (0, 1)]
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # each process draws its own dropout masks
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- (b) FSDP


def test_fsdp_with_the_4bit_base_sharded_trains_what_one_process_trains(one_process, ddp, fsdp):
    single, sharded = metrics(one_process), metrics(fsdp)
    for one, two in zip(single, sharded, strict=True):
        assert (two["lr"], two.get("tokens")) == (one["lr"], one.get("tokens"))
        if one.get("eval_loss") is not None:
            assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-3)
    # The final adapter and the checkpoint's were gathered from both processes' shards.
    assert_adapters_close(adapter(fsdp), adapter(one_process))
    assert_adapters_close(adapter(fsdp), adapter(ddp[0]), tolerance=1e-5)  # FSDP computes what DDP does
    [checkpoint] = list_checkpoints(fsdp / "checkpoints")
    assert json.loads((checkpoint / "state.json").read_text())["fsdp"] is True
    saved = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in adapter(one_process).items()}
    manifest = json.loads((fsdp / "adapter" / "qlora_kit.json").read_text())
    assert manifest["quantization"]["quant_storage"] == "bfloat16"
    # Generation runs on both processes in step: the base's greedy samples are the 1-process ones.
    assert (json.loads((fsdp / "samples_before.json").read_text())
            == json.loads((one_process / "samples_before.json").read_text()))
    assert "2 processes, FSDP" in (fsdp / "train.log").read_text()


def test_merge_and_verify_an_adapter_trained_with_fsdp(fsdp, tmp_path):
    from qlora_kit.export import merge

    result = merge(fsdp / "adapter", tmp_path / "merged", verify=1, progress=False)
    assert result.verification["passed"] is True and result.merged_modules == 2 * 7
    assert json.loads((tmp_path / "merged" / "verification.json").read_text())["passed"] is True


# ---------------------------------------------------------------- (c) kill and resume


def test_two_processes_killed_after_a_checkpoint_resume_to_the_uninterrupted_adapter(recipe, tmp_path):
    # FSDP: the adapter and optimizer state come back from whole tensors into each process's
    # shards. Dropout on: each process must get its own RNG stream back.
    settings = ["train.batch_size=2", "train.distributed=fsdp", "quant.quant_storage=bfloat16", "lora.dropout=0.1",
                "train.max_steps=8", "train.save_every=2", "train.eval_every=0", "train.sample_prompts=0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launch(2, recipe, straight, *settings)

    proc = start(2, recipe, killed, *settings)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not list_checkpoints(killed / "checkpoints") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_tree(proc)
    checkpoints = list_checkpoints(killed / "checkpoints")
    assert checkpoints and not (killed / "adapter").exists(), "the run must die mid-way, after a checkpoint"

    launch(2, recipe, killed, *settings, "train.resume=true")
    want, got = adapter(straight), adapter(killed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    without_speed = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]  # noqa: E731
    assert without_speed(metrics(killed)) == without_speed(metrics(straight))  # losses, norms, rates, tokens


# ---------------------------------------------------------------- bad input


def _one_message(done: subprocess.CompletedProcess, message: str) -> None:
    """The main process reported `message`, alone; the launch failed (and ended: `finish` times out a hang)."""
    assert done.returncode != 0
    assert done.stderr.count("error: ") == 1, done.stderr[-4000:]
    assert message in done.stderr, done.stderr[-4000:]


def test_more_processes_than_examples_is_one_clear_error(recipe, tmp_path):
    done = finish(start(2, recipe, tmp_path / "run", "data.max_samples=1", "data.eval_fraction=0"))
    _one_message(done, "2 processes but only 1 training example(s)")


def test_resume_on_another_number_of_processes_is_one_clear_error(one_process, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_process, run)
    done = finish(start(2, run / "config.yaml", run, "train.resume=true"))
    _one_message(done, "was written by a run on 1 process(es), and this one has 2")
