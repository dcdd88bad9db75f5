"""Exports: merging adapters (nf4 and original), dequantizing 4-bit checkpoints, streaming RAM, atomicity, errors, scripts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qlora_kit import LoRAConfig, QLoRAKitError, apply_lora, load_adapter, load_base, save_adapter
from qlora_kit.export import dequantize, merge
from qlora_kit.lora import lora_layers
from qlora_kit.quantization import dequantize_weight, is_4bit_linear
from qlora_kit.verify import to_fp32_compute
from tests.factories import rewrite_adapter_weights, tiny_llama_config, write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_adapter(base_dir: Path, folder: Path, *, seed: int = 0, rank: int = 4, targets=("all-linear",)) -> Path:
    """A trained-looking adapter: B ~ normal(0, 0.02) instead of zero, saved with its manifest."""
    model, _, base = load_base(str(base_dir))
    torch.manual_seed(seed)  # A's initialisation too: the same adapter in every test process
    apply_lora(model, LoRAConfig(rank=rank, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.02)
    return save_adapter(model, folder, base=base)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_llama_dir):
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("tiny-adapter") / "adapter")


def reference_logits(base_dir, adapter_dir, ids):
    """Base in 4-bit + adapter, computing in fp32 (what the merged fp32 model should reproduce)."""
    model, _, _ = load_base(str(base_dir))
    load_adapter(model, adapter_dir)
    to_fp32_compute(model).eval()  # eval: the LoRA dropout modules load_adapter adds start in training mode
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- nf4 merges


def test_nf4_merge_is_a_plain_checkpoint_matching_4bit_plus_adapter(tiny_llama_dir, tiny_adapter, tmp_path):
    out = tmp_path / "merged"
    result = merge(tiny_adapter, out, verify=2, progress=False)
    assert result.merged_modules == 14 and result.verification["passed"]
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "verification.json", "verification.md"} <= set(
        os.listdir(out))
    assert not list(tmp_path.glob(".merged.tmp-*"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"  # the default

    # Weights: exactly the 4-bit base as loaded for training, plus scaling*B@A, rounded once.
    model, _, _ = load_base(str(tiny_llama_dir))
    load_adapter(model, tiny_adapter)
    merged = load_file(out / "model.safetensors")
    layer = model.model.layers[1].mlp.down_proj
    expected = (dequantize_weight(layer.base).float() + layer.delta_weight()).to(torch.float16)
    assert torch.equal(merged["model.layers.1.mlp.down_proj.weight"], expected)
    head = load_file(tiny_llama_dir / "model.safetensors")["lm_head.weight"]
    assert torch.equal(merged["lm_head.weight"], head.to(torch.float16))

    # Function: plain transformers, no qlora_kit or PEFT, reproduces the trained model.
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    want = reference_logits(tiny_llama_dir, tiny_adapter, ids)
    torch.testing.assert_close(got, want, atol=4e-3, rtol=0)  # fp16 rounding of the merged weights only
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


@pytest.mark.slow
def test_smollm2_merge_keeps_tied_embeddings_and_verifies(smollm2_dir, tmp_path):
    adapter = make_adapter(smollm2_dir, tmp_path / "adapter", targets=("q_proj", "v_proj", "down_proj"))
    out = tmp_path / "merged"
    result = merge(adapter, out, verify=1, max_shard_size="100MB", progress=False)
    report = result.verification
    assert report["passed"] and report["metrics"]["top1_agreement"] > 0.99, report
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] and len(set(index["weight_map"].values())) >= 2
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert {"generation_config.json", "chat_template.jinja", "tokenizer_config.json"} <= set(os.listdir(out))
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()


# --------------------------------------------------------------------------- original mode vs PEFT


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_original_mode_equals_peft_merge_and_unload(fp32_base_and_adapter, tmp_path, dtype):
    from peft import PeftModel

    base, adapter = fp32_base_and_adapter
    merge(adapter, tmp_path / "merged", mode="original", dtype=dtype, verify=0, progress=False)
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        if dtype == "float32":
            torch.testing.assert_close(ours[name], value, atol=0, rtol=2e-7, msg=name)  # same fp32 arithmetic
        else:  # PEFT merges in fp32; ours is that sum rounded once to bf16
            assert torch.equal(ours[name], value.to(torch.bfloat16)), name


def test_original_mode_verification_reports_drift_from_trained(fp32_base_and_adapter, tmp_path):
    _, adapter = fp32_base_and_adapter
    result = merge(adapter, tmp_path / "merged", mode="original", dtype="float32", verify=1, progress=False)
    report = result.verification
    assert report["passed"] and report["metrics"]["top1_agreement"] == 1.0
    # Dropping the 4-bit error changes the function: reported, never a failure.
    assert report["drift_from_trained"]["mean_kl"] > report["metrics"]["mean_kl"]


# --------------------------------------------------------------------------- refusals and errors


def _copy_adapter(adapter: Path, target: Path) -> Path:
    shutil.copytree(adapter, target)
    return target


def test_refuses_a_base_with_another_fingerprint_unless_forced(tiny_adapter, tmp_path):
    adapter = _copy_adapter(tiny_adapter, tmp_path / "adapter")
    manifest = json.loads((adapter / "qlora_kit.json").read_text())
    manifest["base"]["fingerprint"] = "sha256-sampled:" + "0" * 64
    (adapter / "qlora_kit.json").write_text(json.dumps(manifest))
    with pytest.raises(QLoRAKitError, match="trained on a different base.*--force"):
        merge(adapter, tmp_path / "out", verify=0, progress=False)
    assert not (tmp_path / "out").exists()
    merge(adapter, tmp_path / "out", verify=0, force=True, progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_refuses_a_base_with_a_missing_shard(tmp_path, smollm2_dir):
    base = write_random_checkpoint(tmp_path / "base", tiny_llama_config(), shard_bytes=2_000_000,
                                   tokenizer_from=smollm2_dir)
    adapter = make_adapter(base, tmp_path / "adapter")
    (base / "model-00002-of-{:05d}.safetensors".format(len(list(base.glob("model-*"))))).unlink()
    with pytest.raises(QLoRAKitError, match="missing shard"):
        merge(adapter, tmp_path / "out", verify=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_adapter_shapes_or_modules_the_base_lacks(tiny_adapter, tmp_path):
    weights_file = "adapter_model.safetensors"
    wrong_shape = _copy_adapter(tiny_adapter, tmp_path / "wrong-shape")
    tensors = load_file(wrong_shape / weights_file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 96)
    rewrite_adapter_weights(wrong_shape, tensors)
    with pytest.raises(QLoRAKitError, match=r"q_proj has lora_A \(4, 96\).*base of another size"):
        merge(wrong_shape, tmp_path / "out", verify=0, progress=False)

    unknown = _copy_adapter(tiny_adapter, tmp_path / "unknown")
    tensors = load_file(unknown / weights_file)
    for part in ("lora_A", "lora_B"):
        tensors[f"base_model.model.model.layers.7.mlp.up_proj.{part}.weight"] = tensors.pop(
            f"base_model.model.model.layers.0.mlp.up_proj.{part}.weight")
    rewrite_adapter_weights(unknown, tensors)
    with pytest.raises(QLoRAKitError, match="layers.7.mlp.up_proj.*another architecture"):
        merge(unknown, tmp_path / "out", verify=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_run_folder_overwrite_and_bad_arguments(tiny_adapter, tmp_path):
    run = tmp_path / "run"
    _copy_adapter(tiny_adapter, run / "adapter")
    (run / "config.yaml").write_text(f"lora: {{rank: 4}}\ndata: {{path: {tmp_path / 'data.jsonl'}}}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(QLoRAKitError, match="already exists.*--overwrite"):
        merge(run, out, verify=0, progress=False)
    assert (out / "old.txt").is_file()
    merge(run, out, verify=0, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(QLoRAKitError, match="neither an adapter folder.*nor a run folder"):
        merge(tmp_path, tmp_path / "x", progress=False)
    with pytest.raises(QLoRAKitError, match="mode: expected one of nf4, original; got 'int8'"):
        merge(run, tmp_path / "x", mode="int8", progress=False)
    with pytest.raises(QLoRAKitError, match="invalid size"):
        merge(run, tmp_path / "x", max_shard_size="lots", progress=False)


def test_failed_verification_leaves_no_export(tiny_adapter, tmp_path, monkeypatch):
    from qlora_kit import verify

    real = verify.verify_export

    def failing(*args, **kwargs):  # the real comparison, judged as failed
        return {**real(*args, **kwargs), "passed": False}

    monkeypatch.setattr(verify, "verify_export", failing)
    with pytest.raises(QLoRAKitError, match="verification failed, export not written"):
        merge(tiny_adapter, tmp_path / "out", verify=1, progress=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(QLoRAKitError, match="min-agreement: must be >= 0 and <= 1|min_agreement: must be"):
        merge(tiny_adapter, tmp_path / "out", min_agreement=1.01, progress=False)


# --------------------------------------------------------------------------- streaming RAM and atomicity

SHARD_BYTES = 32_000_000


@pytest.fixture(scope="module")
def large_base(tmp_path_factory, smollm2_dir):
    """~300 MB of bf16 in 10 shards of 32 MB, with an adapter on every linear.

    The largest 4-bit weight (1.4 MB in bf16) is small next to a shard, as in real
    checkpoints: bitsandbytes' CPU quantizer needs ~10x a weight's bf16 size in fp32
    temporaries, which comes on top of the two shards.
    """
    root = tmp_path_factory.mktemp("large")
    config = tiny_llama_config(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=48,
                               num_attention_heads=8, num_key_value_heads=4)
    base = write_random_checkpoint(root / "base", config, shard_bytes=SHARD_BYTES, tokenizer_from=smollm2_dir)
    return base, write_adapter_files(base, root / "adapter", rank=8)


def write_adapter_files(base_dir: Path, folder: Path, rank: int, seed: int = 0) -> Path:
    """An adapter on every projection, written directly as save_adapter would (no 4-bit load: fast)."""
    from qlora_kit.checkpoint import resolve
    from qlora_kit.quantization import QuantConfig, quant_record

    checkpoint = resolve(str(base_dir))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in projection_shapes(checkpoint).items():
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * 0.02
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.02
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none", "base_model_name_or_path": str(base_dir)}))
    (folder / "qlora_kit.json").write_text(json.dumps({
        "base": {"source": str(base_dir), "folder": str(checkpoint.folder), "fingerprint": checkpoint.fingerprint()},
        "quantization": quant_record(QuantConfig())}))
    return folder


def projection_shapes(checkpoint) -> dict[str, tuple[int, int]]:
    """Shapes of every projection weight in a checkpoint, from the shard headers."""
    from safetensors import safe_open

    shapes = {}
    for shard in checkpoint.shards:
        with safe_open(str(shard), framework="pt") as f:
            shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys() if n.endswith("_proj.weight")})
    return shapes


MEASURE = """
import json, sys
from qlora_kit.export import merge
import psutil
def peak():  # VmHWM: peak resident set since the last reset
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS, after imports
baseline = psutil.Process().memory_info().rss
merge(sys.argv[1], sys.argv[2], verify=0, max_shard_size=int(sys.argv[3]), progress=False)
print(json.dumps({"baseline": baseline, "peak": peak()}))
"""


def test_merge_peak_ram_stays_near_two_shards(large_base, tmp_path):
    base, adapter = large_base
    total = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    shards = len(list(base.glob("*.safetensors")))
    assert shards >= 10 and total >= 5 * SHARD_BYTES
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(adapter), str(tmp_path / "out"), str(SHARD_BYTES)],
                          env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    increase = numbers["peak"] - numbers["baseline"]
    print(f"\npeak RSS increase {increase / 1e6:.0f} MB; shard {SHARD_BYTES / 1e6:.0f} MB; "
          f"checkpoint {total / 1e6:.0f} MB in {shards} shards")
    # Two shards (the input being read, the output being filled), per-tensor temporaries,
    # and a constant for allocator slack and library pages touched for the first time.
    assert increase < 3 * SHARD_BYTES + 64_000_000
    assert increase < 0.55 * total
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 5


KILLABLE = """
import sys
from qlora_kit.export import merge
merge(sys.argv[1], sys.argv[2], mode="original", verify=0, overwrite=True, max_shard_size=5_000_000,
      progress=False)
"""


def _kill_after_first_shard(adapter: Path, out: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(adapter), str(out)], env=SUBPROCESS_ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(out.parent.glob(f".{out.name}.tmp-*/model-*.safetensors")):
            assert proc.poll() is None, "the merge ended before it could be interrupted"
            assert time.monotonic() < deadline, "no output shard appeared"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_killed_merge_leaves_no_export_or_the_previous_one(large_base, tmp_path):
    _, adapter = large_base
    out = tmp_path / "out"
    _kill_after_first_shard(adapter, out)
    assert not out.exists()
    assert len(list(tmp_path.glob(".out.tmp-*"))) == 1  # the killed process's staging folder

    merge(adapter, out, mode="original", verify=0, max_shard_size=50_000_000, progress=False)
    assert not list(tmp_path.glob(".out.tmp-*")), "the leftover staging folder is cleaned up"
    before = _snapshot(out)
    _kill_after_first_shard(adapter, out)
    assert _snapshot(out) == before  # the previous export is untouched
    assert AutoModelForCausalLM.from_pretrained(out) is not None

    merge(adapter, out, mode="original", verify=0, overwrite=True, progress=False)
    assert not list(tmp_path.glob(".out.tmp-*")) and (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------- dequantize


def test_dequantize_transformers_4bit_checkpoint_round_trip(tiny_llama_dir, tmp_path):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config,
                                                     dtype=torch.bfloat16, device_map="cpu")
    quantized.save_pretrained(tmp_path / "4bit", max_shard_size="3MB")
    assert "quantization_config" in json.loads((tmp_path / "4bit" / "config.json").read_text())

    result = dequantize(tmp_path / "4bit", tmp_path / "plain", progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16)
    ours, _, _ = load_base(str(tiny_llama_dir))
    weights = plain.state_dict()
    for name, module in ours.named_modules():
        if is_4bit_linear(module):
            assert torch.equal(weights[f"{name}.weight"], dequantize_weight(module)), name
    assert result.tensors == len(load_file_keys(tmp_path / "plain"))

    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    to_fp32_compute(ours)
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        got = plain.float()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def load_file_keys(folder: Path) -> set[str]:
    keys = set()
    for shard in folder.glob("*.safetensors"):
        keys |= set(load_file(shard))
    return keys


def test_dequantize_refuses_a_plain_checkpoint(tiny_llama_dir, tmp_path):
    with pytest.raises(QLoRAKitError, match="no 4-bit weights"):
        dequantize(tiny_llama_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- scripts


def test_merge_script_end_to_end(tiny_adapter, tmp_path, capsys):
    from qlora_kit.cli import main

    help_text = subprocess.run([sys.executable, "tools/merge_adapter.py", "--help"], cwd=REPO, env=SUBPROCESS_ENV,
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and "--mode" in help_text.stdout and "original" in help_text.stdout
    run = subprocess.run([sys.executable, "tools/merge_adapter.py", str(tiny_adapter), str(tmp_path / "out"),
                          "--verify", "1", "--dtype", "float32"],
                         cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "merged 14 adapter modules" in run.stdout and "passed" in run.stdout
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.float32

    # A user error: one line on stderr, exit status 2 (the scripts are the CLI's commands).
    status = main(["merge", str(tiny_adapter), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: ") and "--overwrite" in err[-1]
    dequantize_help = subprocess.run([sys.executable, "tools/dequantize.py", "--help"], cwd=REPO, env=SUBPROCESS_ENV,
                                     capture_output=True, text=True)
    assert dequantize_help.returncode == 0 and "4-bit" in dequantize_help.stdout
