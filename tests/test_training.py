"""The training loop end to end on CPU: run folder, overfitting, accumulation, kill/resume, schedules.

Every run trains a real 4-bit model (a tiny random Llama with SmolLM2's tokenizer)
on rows of the Zaragoza construction FAQ, with a fixed seed, and checks behaviour
against an independent reference: the schedule formula, one big batch, an
uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit import QLoRAKitError, apply_lora, load_base
from qlora_kit.config import to_dict
from qlora_kit.data import DataConfig, collate, prepare_data, supervised_count
from qlora_kit.lora import LoRAConfig, lora_layers, trainable_parameters
from qlora_kit.losses import SupervisedLoss
from qlora_kit.quantization import QuantConfig
from qlora_kit.settings import TrainConfig, load_recipe
from qlora_kit.training import _accumulate, make_optimizer, make_scheduler, train
from qlora_kit.training_state import LoopState, list_checkpoints, load_checkpoint, save_checkpoint
from tests.factories import tiny_llama_config, write_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
FAQ_PACKAGE = Path(importlib.util.find_spec("zaragoza_construction_faq").submodule_search_locations[0])
FAQ = FAQ_PACKAGE / "data" / "faq-en-alpaca.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- helpers


def faq_rows(n: int) -> list[dict]:
    with open(FAQ) as f:
        return [json.loads(next(f)) for _ in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(base: Path, data: Path, out: Path, *overrides: str):
    """A small CPU run: short sequences, no samples, no checkpoints unless the test asks."""
    return load_recipe(None, [
        f"model.base={base}", f"data.path={data}", f"train.output_dir={out}",
        "data.max_seq_len=64", "train.batch_size=2", "train.sample_prompts=0",
        "train.eval_every=0", "train.save_every=0", *overrides,
    ])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def expected_factor(k: int, kind: str, warmup: int, total: int) -> float:
    """The documented schedule (transformers' get_scheduler, as HF Trainer uses it): linear warmup
    that reaches the peak at update `warmup`, then decay to 0 at `total`.

    Update k (0-based) uses peak * factor(k); warmup is k/warmup, so the first warmup update runs at lr 0.
    """
    warmup = min(warmup, total)
    if k < warmup:
        return k / warmup
    if kind == "constant":
        return 1.0
    p = min((k - warmup) / max(total - warmup, 1), 1.0)
    return 1.0 - p if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def faq16(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "faq16.jsonl", faq_rows(16))


# ---------------------------------------------------------------- 1. the run folder


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, faq16, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    run = recipe(tiny_llama_dir, faq16, out,
                 "data.eval_fraction=0.25", "train.max_steps=5", "train.eval_every=2", "train.save_every=2",
                 "train.keep_checkpoints=2", "train.warmup_steps=2", "train.lr_scheduler=cosine",
                 "train.learning_rate=1e-3", "train.sample_prompts=2", "train.sample_max_new_tokens=8",
                 "lora.rank=8", "lora.alpha=16")
    summary = train(run)
    return run, summary, out


def test_run_writes_every_file_of_the_run_folder(finished_run):
    run, summary, out = finished_run
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "samples.md", "summary.json", "README.md",
                 "train.log", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/qlora_kit.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    # config.yaml is the resolved config: reloading it gives the same run.
    assert to_dict(load_recipe(out / "config.yaml")) == to_dict(run)

    # summary.json is what train() returned, and agrees with the metrics.
    records = metrics(out)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == 5
    assert summary["data"]["train_examples"] == 12 and summary["data"]["eval_examples"] == 4
    assert summary["supervised_tokens"] == records[-1]["tokens"]
    assert summary["first_eval_loss"] == records[0]["eval_loss"]
    assert summary["final_eval_loss"] == records[-1]["eval_loss"]
    assert summary["final_train_loss"] == records[-1]["loss"]
    assert summary["device"] == "cpu" and summary["mixed_precision"] == "bf16"

    # The final adapter: PEFT config with our rank, manifest at the last step, trained weights.
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert json.loads((out / "adapter/qlora_kit.json").read_text())["step"] == 5
    weights = load_file(out / "adapter/adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert all(torch.count_nonzero(v) > 0 for k, v in weights.items() if ".lora_B." in k)  # B starts at 0

    # A valid PNG of the size the plot asks for (7x4 inches at 110 dpi).
    assert (out / "loss_curve.png").read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    assert matplotlib.image.imread(out / "loss_curve.png").shape[:2] == (440, 770)

    samples = (out / "samples.md").read_text()
    for heading in ("## Prompt 1", "## Prompt 2", "**Before training:**", "**After training:**", "**Reference:**"):
        assert heading in samples
    assert "## Prompt 3" not in samples
    assert any(row["output"][:40] in samples for row in faq_rows(16))  # a held-out reference answer
    assert len(json.loads((out / "samples_before.json").read_text())) == 2

    readme = (out / "README.md").read_text()
    assert "| steps | 5 |" in readme and str(run.model.base) in readme
    listed = {name for name in ("config.yaml", "adapter/", "checkpoints/", "train.log") if f"`{name}`" in readme}
    assert listed == {name for name in ("config.yaml", "adapter/", "checkpoints/", "train.log")
                      if (out / name.rstrip("/")).exists()}  # lists what is there, nothing more


def test_train_log_records_the_run(finished_run):
    """train.log is "the log of the run" whatever logging the caller configured (here: none)."""
    _, _, out = finished_run
    log = (out / "train.log").read_text()
    assert "were cut" in log  # a data warning
    assert "trainable parameters" in log and "done:" in log  # the loop's own INFO lines
    assert "MiB of packed weights" in log and "CPU threads:" in log  # the start-up banner
    assert "step 0: eval loss" in log and "step 5: eval loss" in log  # every evaluation
    assert "checkpoint" in log


def test_metrics_has_one_record_per_step_with_eval_on_schedule(finished_run):
    run, _, out = finished_run
    records = metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert all({"step", "loss", "lr"} <= r.keys() for r in records)
    assert records[0]["loss"] is None and all(r["loss"] > 0 for r in records[1:])
    # Evaluated at the start, every eval_every steps, and at the end.
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4, 5]
    for r in records:
        if "eval_loss" in r:
            assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-4)
    tokens = [r["tokens"] for r in records[1:]]
    assert all(b > a for a, b in zip(tokens, tokens[1:]))
    # "lr" is the scheduler's rate after the step's update, i.e. the rate of the next update.
    cfg = run.train
    for r in records:
        assert r["lr"] == pytest.approx(cfg.learning_rate * expected_factor(r["step"], "cosine", 2, 5), abs=1e-12)


def test_checkpoints_hold_everything_needed_to_resume(finished_run):
    _, _, out = finished_run
    records = {r["step"]: r for r in metrics(out)}
    # save_every=2 over 5 steps: steps 2 and 4 (the last step is the final adapter, not a checkpoint).
    folders = list_checkpoints(out / "checkpoints")
    assert [p.name for p in folders] == ["step-000002", "step-000004"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]  # no .tmp left
    for folder in folders:
        for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/qlora_kit.json",
                     "optimizer.pt", "scheduler.pt", "rng-rank0.pt", "state.json"):
            assert (folder / name).is_file(), folder / name
        state = json.loads((folder / "state.json").read_text())
        step = int(folder.name.split("-")[1])
        assert state["step"] == step
        assert state["tokens_seen"] == records[step]["tokens"]
        assert state["batch_in_epoch"] == step  # one micro-batch per step, 6 per epoch
        assert torch.load(folder / "scheduler.pt", weights_only=True)["last_epoch"] == step


def test_new_run_into_a_used_folder_is_refused(finished_run):
    run, _, out = finished_run
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(QLoRAKitError, match="already holds a run") as info:
        train(run)
    assert "train.resume=true" in str(info.value)
    assert (out / "metrics.jsonl").read_bytes() == before

    # A run killed before its first checkpoint (its marker and metrics only) is a run too.
    partial = out.parent / "partial"
    partial.mkdir()
    (partial / "qlora_kit_run.json").write_text('{"kind": "qlora_kit training run"}\n')
    (partial / "metrics.jsonl").write_text('{"step": 0, "loss": null, "lr": 0.001}\n')
    with pytest.raises(QLoRAKitError, match="train.resume=true"):
        train(load_recipe(None, [f"model.base={run.model.base}", f"data.path={run.data.path}",
                                 f"train.output_dir={partial}"]))


def test_resume_without_a_checkpoint_starts_from_step_zero(tiny_llama_dir, faq16, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "qlora_kit_run.json").write_text('{"kind": "qlora_kit training run"}\n')  # a run killed before step 2
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": null, "lr": 1.0}\n{"step": 1, "loss": 9.0, "lr": 1.0}\n')
    summary = train(recipe(tiny_llama_dir, faq16, out, "train.max_steps=2", "train.resume=true",
                           "data.eval_fraction=0"))
    assert summary["steps"] == 2
    records = metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["lr"] != 1.0  # the stale lines are gone
    assert (out / "adapter/adapter_model.safetensors").is_file()
    # The user is told that nothing was resumed, in the run's own log too.
    assert "no checkpoint yet" in (out / "train.log").read_text()


# ---------------------------------------------------------------- 2. it learns


@pytest.fixture(scope="module")
def memorising_llama_dir(tmp_path_factory, smollm2_dir):
    """The tiny Llama with a final-norm gain of 20.

    With 0.02-std random weights, hidden 64 and a frozen head, logits are bounded
    by |norm(h)|·|w| ≈ 8 · 0.16, so no adapter can get the loss far below
    ln(49152) ≈ 10.8 - 1.3. Trained models have much larger head/norm scales; a
    gain of 20 gives the logit range a trained model has.
    """
    folder = write_random_checkpoint(tmp_path_factory.mktemp("tiny-llama-gain"), tiny_llama_config(),
                                     tokenizer_from=smollm2_dir)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 20
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_overfits_four_examples(memorising_llama_dir, tmp_path):
    rows = faq_rows(4)
    data = write_rows(tmp_path / "four.jsonl", rows)
    out = tmp_path / "run"
    summary = train(recipe(memorising_llama_dir, data, out,
                           "data.eval_fraction=0", "train.batch_size=4", "train.max_steps=40",
                           "train.learning_rate=1e-2", "train.lr_scheduler=constant", "train.warmup_steps=0",
                           "train.gradient_checkpointing=false", "lora.rank=16", "lora.alpha=32", "lora.dropout=0",
                           "train.sample_prompts=1", "train.sample_max_new_tokens=12"))
    losses = [r["loss"] for r in metrics(out)[1:]]
    assert len(losses) == 40
    assert losses[0] > 5  # a random model starts far from the data
    assert summary["final_train_loss"] < 0.1, losses
    assert summary["final_train_loss"] < 0.05 * losses[0]
    # Memorised: greedy decoding of a training prompt (no held-out set) reproduces its answer.
    samples = (out / "samples.md").read_text()
    after = samples.split("**After training:**")[1].split("**Reference:**")[0]
    first_words = " ".join(rows[0]["output"].split()[:4])  # samples come from the first training rows
    assert first_words in after, after


# ---------------------------------------------------------------- 3. accumulation


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate's state is a process-wide singleton fixed by the first Accelerator: reset it around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accumulated_gradients_equal_one_big_token_normalised_batch(tiny_llama_dir, tmp_path, fresh_accelerator_state):
    from accelerate import Accelerator

    model, tokenizer, _ = load_base(str(tiny_llama_dir), QuantConfig(compute_dtype="float32"))
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    for _, layer in lora_layers(model):  # B = 0 would give A no gradient
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    model.train()
    data = prepare_data(DataConfig(path=str(write_rows(tmp_path / "d.jsonl", faq_rows(24))), max_seq_len=128,
                                   eval_fraction=0), tokenizer, seed=0)
    # Pair short with short and long with long, so micro-batches hold very different token counts.
    examples = sorted(data.train, key=supervised_count)[::3][:8]
    group = [examples[i:i + 2] for i in range(0, 8, 2)]
    counts = [sum(supervised_count(e) for e in micro) for micro in group]
    assert len(set(counts)) == 4 and max(counts) > 1.5 * min(counts), counts

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    loss_fn = accelerator.prepare(SupervisedLoss(model, chunk_rows=64))
    params = trainable_parameters(model)

    loss_sum, n_tokens = _accumulate(loss_fn, group, data.pad_id, torch.float32, accelerator)
    accumulated = lora_grads(model)

    for p in params:
        p.grad = None
    big = collate(examples, data.pad_id)
    ref_sum, ref_n = loss_fn(big)
    (ref_sum / ref_n).backward()
    reference = lora_grads(model)

    assert n_tokens == ref_n == sum(counts)
    assert loss_sum == pytest.approx(float(ref_sum), rel=1e-5)
    assert accumulated.keys() == reference.keys() and len(reference) == 2 * 2 * 7
    for name in reference:
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)

    # The test discriminates: averaging the micro-batch means weighs tokens unequally.
    for p in params:
        p.grad = None
    for micro in group:
        s, n = loss_fn(collate(micro, data.pad_id))
        (s / n / len(group)).backward()
    mean_of_means = lora_grads(model)
    diff = sum((mean_of_means[k] - reference[k]).norm() ** 2 for k in reference).sqrt()
    scale = sum(reference[k].norm() ** 2 for k in reference).sqrt()
    assert diff > 0.02 * scale


# ---------------------------------------------------------------- 4. kill and resume

KILLABLE = """
import sys, time
import qlora_kit.training as training
from qlora_kit.settings import load_recipe

real = training._accumulate
def slow(*args):  # a slow step, so the kill lands between checkpoints as in a real run
    time.sleep(1.0)
    return real(*args)
training._accumulate = slow
training.train(load_recipe(sys.argv[1], sys.argv[2:]))
"""


def test_killed_run_resumes_to_the_same_adapter(tiny_llama_dir, faq16, tmp_path):
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(f"""\
model: {{base: {tiny_llama_dir}}}
lora: {{rank: 8, alpha: 16, dropout: 0.1}}
data: {{path: {faq16}, max_seq_len: 64, eval_fraction: 0.25}}
train:
  max_steps: 8
  batch_size: 2
  save_every: 2
  keep_checkpoints: 2
  eval_every: 0
  warmup_steps: 2
  learning_rate: 0.001
  sample_prompts: 0
""")
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(yaml_path), f"train.output_dir={killed}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 4"
            # Kill after checkpoint 4 and after step 5 is logged, so its metrics line must be dropped.
            if (killed / "checkpoints/step-000004").is_dir() and (killed / "metrics.jsonl").is_file() \
                    and any(r["step"] >= 5 for r in metrics(killed)):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(killed / "checkpoints")][-1] == "step-000004"
    assert not (killed / "adapter").exists()

    resumed = train(load_recipe(yaml_path, [f"train.output_dir={killed}", "train.resume=true"]))
    reference = train(load_recipe(yaml_path, [f"train.output_dir={straight}"]))

    assert resumed["steps"] == reference["steps"] == 8
    assert resumed["supervised_tokens"] == reference["supervised_tokens"]
    got = load_file(killed / "adapter/adapter_model.safetensors")
    want = load_file(straight / "adapter/adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)

    records, straight_records = metrics(killed), metrics(straight)
    assert [r["step"] for r in records] == list(range(9))  # every step exactly once
    for r, s in zip(records, straight_records):
        assert (r["loss"], r["lr"], r["tokens"] if "tokens" in r else None) == \
               (s["loss"], s["lr"], s["tokens"] if "tokens" in s else None), (r, s)
        assert r.get("eval_loss") == s.get("eval_loss")


def test_model_trains_in_train_mode_even_without_held_out_set(tiny_llama_dir, faq16, tmp_path, monkeypatch):
    """Dropout (and gradient checkpointing) need train mode on every step, whatever the eval settings."""
    import qlora_kit.training as training

    modes = []
    real = training._accumulate

    def spy(loss_fn, *args):
        modes.append({m.training for m in loss_fn.modules() if isinstance(m, torch.nn.Dropout)})
        return real(loss_fn, *args)

    monkeypatch.setattr(training, "_accumulate", spy)
    train(recipe(tiny_llama_dir, faq16, tmp_path / "run", "data.eval_fraction=0", "train.max_steps=2",
                 "lora.dropout=0.1", "lora.target_modules=[q_proj]"))
    assert modes == [{True}, {True}]


def test_runs_with_different_precision_in_one_process(tiny_llama_dir, faq16, tmp_path):
    """A notebook or a sweep calls train() repeatedly; each run must get the precision it asks for."""
    first = train(recipe(tiny_llama_dir, faq16, tmp_path / "bf16", "train.max_steps=1", "data.eval_fraction=0",
                         "train.mixed_precision=bf16"))
    second = train(recipe(tiny_llama_dir, faq16, tmp_path / "fp32", "train.max_steps=1", "data.eval_fraction=0",
                          "train.mixed_precision='no'"))
    assert (first["mixed_precision"], second["mixed_precision"]) == ("bf16", "no")


# ---------------------------------------------------------------- 5. non-finite loss


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tiny_llama_dir, faq16, tmp_path):
    # An absurd rate: after one Adam step the adapters are ~1e20, and the MLP's gate·up
    # product overflows float32 on the next forward. (1e6 is not enough: RMSNorm
    # saturates and the loss just sits at ln(vocab).)
    out = tmp_path / "run"
    with pytest.raises(QLoRAKitError) as info:
        train(recipe(tiny_llama_dir, faq16, out, "data.eval_fraction=0", "train.max_steps=6",
                     "train.learning_rate=1e20", "train.max_grad_norm=0", "train.warmup_steps=0",
                     "train.lr_scheduler=constant", "train.save_every=1"))
    message = str(info.value)
    assert "the loss became nan at step 2" in message
    good = out / "checkpoints" / "step-000001"
    assert str(good) in message and "train.learning_rate" in message
    assert list_checkpoints(out / "checkpoints") == [good]
    assert json.loads((good / "state.json").read_text())["step"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(good / "adapter/adapter_model.safetensors").values())
    assert [r["step"] for r in metrics(out)] == [0, 1]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


# ---------------------------------------------------------------- 7. schedules


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,total", [(3, 11), (0, 5), (20, 6)])
def test_schedule_matches_formula(kind, warmup, total):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    sched = make_scheduler(TrainConfig(learning_rate=0.5, warmup_steps=warmup, lr_scheduler=kind), opt, total)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    after = opt.param_groups[0]["lr"]
    w = min(warmup, total)
    for k, lr in enumerate(used):
        assert lr == pytest.approx(0.5 * expected_factor(k, kind, warmup, total), rel=1e-12, abs=1e-15), (k, lr)
    # Properties that do not depend on how the formula is written:
    assert all(0 <= lr <= 0.5 for lr in used)  # none above the peak
    assert all(lr > 0 for lr in used[1:]) and (used[0] > 0) == (w == 0)  # only a warmup's first update is at 0
    assert all(b > a for a, b in zip(used[:w], used[1:w + 1]))  # warmup rises
    if w < total:
        assert used[w] == pytest.approx(0.5)  # peak right after warmup
        decay = used[w:]
        if kind == "constant":
            assert decay == pytest.approx([0.5] * len(decay)) and after == pytest.approx(0.5)
        else:
            assert all(b < a for a, b in zip(decay, decay[1:]))
            assert after == pytest.approx(0.0, abs=1e-15)  # decays to 0 at the last step
    if kind != "constant" and (total - w) % 2 == 0 and w < total:
        assert used[w + (total - w) // 2] == pytest.approx(0.25)  # half way down both curves


def test_schedule_at_named_steps():
    """A few values worked out by hand: peak 1e-3, warmup 4, 14 steps."""
    def lrs(kind):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = make_scheduler(TrainConfig(learning_rate=1e-3, warmup_steps=4, lr_scheduler=kind), opt, 14)
        out = []
        for _ in range(14):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cosine, linear, constant = lrs("cosine"), lrs("linear"), lrs("constant")
    assert cosine[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert linear[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # 10 decay steps: update 4+d is at progress d/10.
    assert cosine[9] == pytest.approx(5e-4) and linear[9] == pytest.approx(5e-4)
    assert cosine[6] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.2)))  # 9.045e-4
    assert linear[6] == pytest.approx(8e-4)
    assert cosine[13] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.9)))  # 2.447e-5
    assert linear[13] == pytest.approx(1e-4)
    assert constant[4:] == pytest.approx([1e-3] * 10)


# ---------------------------------------------------------------- 8. checkpoint files


@pytest.fixture
def small_trainable(tiny_llama_dir):
    model, _, base = load_base(str(tiny_llama_dir))
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = make_scheduler(TrainConfig(learning_rate=1e-2, warmup_steps=2), opt, 10)
    return model, base, params, opt, sched


def _fake_step(params, opt, sched):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    opt.zero_grad()


def test_checkpoint_rotation_keeps_the_newest(small_trainable, tmp_path):
    model, base, params, opt, sched = small_trainable
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        _fake_step(params, opt, sched)
        path = save_checkpoint(root, model, base, opt, sched, LoopState(step=step, batch_in_epoch=step), keep=2)
        assert path == root / f"step-{step:06d}"
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000005"]
    assert list_checkpoints(root) == [root / "step-000004", root / "step-000005"]

    # Leftovers of a killed save are never taken for a checkpoint, even a complete-looking one.
    leftover = root / ".step-000009.tmp-abc123"
    leftover.mkdir()
    (leftover / "state.json").write_text('{"step": 9}')
    (root / "step-000008").mkdir()  # no state.json: not a complete checkpoint
    (root / "step-notanumber").mkdir()
    assert list_checkpoints(root) == [root / "step-000004", root / "step-000005"]
    # Steps sort as numbers, not strings.
    _fake_step(params, opt, sched)
    save_checkpoint(root, model, base, opt, sched, LoopState(step=1000000), keep=3)
    assert list_checkpoints(root) == [root / "step-000004", root / "step-000005", root / "step-1000000"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_checkpoint_restores_weights_optimizer_scheduler_and_rng(small_trainable, tmp_path):
    model, base, params, opt, sched = small_trainable
    for _ in range(3):
        _fake_step(params, opt, sched)
    state = LoopState(step=3, epoch=1, batch_in_epoch=2, tokens_seen=123, elapsed_s=4.5)
    folder = save_checkpoint(tmp_path, model, base, opt, sched, state, keep=1)
    weights = [p.detach().clone() for p in params]
    exp_avg = [opt.state[p]["exp_avg"].clone() for p in params]
    lr = opt.param_groups[0]["lr"]
    next_draws = (torch.rand(4), random.random())

    for _ in range(2):  # move everything on
        _fake_step(params, opt, sched)
    torch.manual_seed(99)
    random.seed(99)
    assert not torch.equal(params[0], weights[0])

    assert load_checkpoint(folder, model, opt, sched) == state
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert all(torch.equal(opt.state[p]["exp_avg"], e) for p, e in zip(params, exp_avg))
    assert opt.param_groups[0]["lr"] == lr and sched.last_epoch == 3
    assert torch.equal(torch.rand(4), next_draws[0]) and random.random() == next_draws[1]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_checkpoint_is_a_clear_error(small_trainable, tmp_path, damage):
    model, base, params, opt, sched = small_trainable
    _fake_step(params, opt, sched)
    folder = save_checkpoint(tmp_path, model, base, opt, sched, LoopState(step=1), keep=1)
    data = (folder / "optimizer.pt").read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint"}[damage]
    (folder / "optimizer.pt").write_bytes(damaged)
    with pytest.raises(QLoRAKitError, match="cannot resume from .*step-000001"):
        load_checkpoint(folder, model, opt, sched)


# ---------------------------------------------------------------- 9. optimizers


def test_auto_optimizer_is_adamw_on_cpu_and_paged_8bit_for_cuda():
    import bitsandbytes as bnb

    p = [torch.nn.Parameter(torch.zeros(8))]
    cfg = TrainConfig(learning_rate=3e-4, weight_decay=0.01)
    cpu = make_optimizer(cfg, p, torch.device("cpu"))
    assert type(cpu) is torch.optim.AdamW
    assert cpu.param_groups[0]["lr"] == 3e-4 and cpu.param_groups[0]["weight_decay"] == 0.01
    # The choice itself needs no GPU (the paged buffers are allocated at the first step).
    assert type(make_optimizer(cfg, p, torch.device("cuda"))) is bnb.optim.PagedAdamW8bit


def test_8bit_adamw_steps_on_cpu_close_to_adamw():
    torch.manual_seed(0)
    target = torch.randn(8192)
    start = torch.randn(8192)

    def run(name):
        p = torch.nn.Parameter(start.clone())
        opt = make_optimizer(TrainConfig(optimizer=name, learning_rate=1e-2), [p], torch.device("cpu"))
        for _ in range(20):
            ((p - target) ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
        return p.detach(), opt

    eight, opt8 = run("adamw_8bit")
    full, _ = run("adamw")
    assert opt8.state[next(iter(opt8.state))]["state1"].dtype == torch.uint8  # really 8-bit states
    moved = (full - start).abs().mean()
    assert moved > 0.1  # 20 steps of ~lr each
    assert (eight - full).abs().mean() < 0.05 * moved
    assert ((eight - target) ** 2).sum() < ((start - target) ** 2).sum()


def test_training_with_8bit_adamw_on_cpu_checkpoints_and_resumes(tiny_llama_dir, faq16, tmp_path):
    import shutil

    # rank 64 makes q_proj A, B and k_proj A 64x64 = 4096 values: the size from which bnb keeps 8-bit states.
    settings = ("data.eval_fraction=0", "train.max_steps=3", "train.optimizer=adamw_8bit", "train.save_every=1",
                "lora.target_modules=[q_proj,k_proj]",
                "train.keep_checkpoints=3", "lora.rank=64", "lora.dropout=0", "train.warmup_steps=0",
                "train.learning_rate=1e-3")
    out = tmp_path / "run"
    summary = train(recipe(tiny_llama_dir, faq16, out, *settings))
    assert summary["steps"] == 3 and math.isfinite(summary["final_train_loss"])
    state = torch.load(out / "checkpoints/step-000002/optimizer.pt", weights_only=True)["state"]
    first_moments = [s["__bnb_optimizer_quant_state__"]["state1"] for s in state.values()]
    assert {t.dtype for t in first_moments} == {torch.uint8, torch.float32}  # k_proj.lora_B (32x64 < 4096) stays 32-bit

    # The 8-bit state round-trips: resuming from step 2 gives the uninterrupted run's step 3.
    other = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints/step-000002", other / "checkpoints/step-000002")
    train(recipe(tiny_llama_dir, faq16, other, *settings, "train.resume=true"))
    got = load_file(other / "adapter/adapter_model.safetensors")
    want = load_file(out / "adapter/adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert metrics(other)[-1]["loss"] == metrics(out)[-1]["loss"]


@pytest.mark.cuda
def test_auto_optimizer_on_cuda_is_paged_8bit_and_steps():
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.randn(8192, device="cuda"))
    opt = make_optimizer(TrainConfig(), [p], torch.device("cuda"))
    assert type(opt) is bnb.optim.PagedAdamW8bit
    before = p.detach().clone()
    (p ** 2).sum().backward()
    opt.step()
    assert not torch.equal(p.detach(), before)
    assert opt.state[p]["state1"].dtype == torch.uint8


@pytest.mark.cuda
def test_two_step_bf16_train_on_cuda(tiny_llama_dir, faq16, tmp_path):
    out = tmp_path / "run"
    summary = train(recipe(tiny_llama_dir, faq16, out, "train.max_steps=2", "train.save_every=1",
                           "data.eval_fraction=0.25", "train.mixed_precision=bf16"))
    assert summary["device"].startswith("cuda") and summary["mixed_precision"] == "bf16"
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])
    assert summary["peak_memory_mb"] > 0
    assert (out / "adapter/adapter_model.safetensors").is_file()
    opt_state = torch.load(out / "checkpoints/step-000001/optimizer.pt", weights_only=True)
    assert opt_state["state"]  # paged 8-bit AdamW state was written


def test_tensorboard_logging_writes_events_with_the_losses(tiny_llama_dir, faq16, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(recipe(tiny_llama_dir, faq16, out, "train.max_steps=3", "data.eval_fraction=0.25",
                 "train.report_to=tensorboard"))
    folders = {p.parent for p in out.rglob("events.out.tfevents.*")}
    assert folders, "no TensorBoard event file in the run folder"
    accumulators = [EventAccumulator(str(folder)) for folder in folders]
    for accumulator in accumulators:
        accumulator.Reload()
    # Accelerate writes the scalars in one folder and the run's config (hparams) in another.
    scalars = [a for a in accumulators if "loss" in a.Tags()["scalars"]]
    assert len(scalars) == 1
    logged = [e.value for e in scalars[0].Scalars("loss")]
    assert logged == pytest.approx([r["loss"] for r in metrics(out) if r.get("loss") is not None], rel=1e-6)
    evals = [(e.step, e.value) for e in scalars[0].Scalars("eval_loss")]
    assert evals[0][0] == 0 and evals[0][1] == pytest.approx(metrics(out)[0]["eval_loss"], rel=1e-6)


def test_a_tracker_without_its_package_is_refused_before_training(tmp_path, monkeypatch):
    import importlib.util

    import qlora_kit.training as training

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run = load_recipe(None, ["data.path=x.jsonl", f"train.output_dir={tmp_path / 'run'}", "train.report_to=wandb"])
    with pytest.raises(QLoRAKitError, match="pip install wandb"):
        training.train(run)
    assert not (tmp_path / "run").exists()


def test_bad_data_is_reported_before_the_base_loads(tmp_path, monkeypatch):
    """A malformed row fails in seconds, before any model is read and before a run folder exists."""
    import qlora_kit.training as training

    def no_loading(*args, **kwargs):
        raise AssertionError("the base must not load before the data is checked")

    monkeypatch.setattr(training, "load_base", no_loading)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "no answer"}\n')
    run = load_recipe(None, [f"data.path={data}", f"train.output_dir={tmp_path / 'run'}", "model.base=/nowhere"])
    with pytest.raises(QLoRAKitError, match="row 2: missing 'output'"):
        train(run)
    assert not (tmp_path / "run").exists()


def test_cpu_threads_are_chosen_deliberately(monkeypatch, caplog):
    from qlora_kit.training import set_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        with caplog.at_level("INFO", logger="qlora_kit"):
            assert set_cpu_threads(1, processes=1) == 1 and torch.get_num_threads() == 1
            cores = len(os.sched_getaffinity(0))
            assert set_cpu_threads(None, processes=2) == max(1, cores // 2)  # shared among the processes
        assert "CPU threads:" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_a_large_base_without_a_gpu_is_refused_before_any_download(tmp_path):
    from qlora_kit.training import check_cpu_model_size

    run = load_recipe(REPO / "recipes" / "llama-3.1-8b-alpaca.yaml")  # Llama-3.1-8B's bundled shape
    with pytest.raises(QLoRAKitError, match=r"no CUDA GPU here.*8\.0B parameters.*model.device=cpu"):
        check_cpu_model_size(run)
    run.model.device = "cpu"  # asked for explicitly: go ahead
    check_cpu_model_size(run)
