"""Verification of exports: the metrics, the exact fp32 reference, token batches, texts, reports, catching bad
merges; chunked 4-bit arithmetic; streaming (layer by layer) against whole models, and its RAM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from qlora_kit import QLoRAKitError, load_base, quantization
from qlora_kit.adapter_io import AdapterRecord
from qlora_kit.data import prepare_data
from qlora_kit.export import merge
from qlora_kit.quantization import compute_with_dequantized_weights, dequantize_weight
from qlora_kit.verify import (BUILTIN_TEXTS, compare, load_texts, stream_compare, summary, to_fp32_compute,
                              token_batches, verification_inputs, verify_export, whole_compare, write_report)
from tests.factories import tiny_llama_config, write_random_checkpoint
from tests.test_export import REPO, SUBPROCESS_ENV, make_adapter, write_adapter_files


@pytest.fixture(scope="module")
def tiny_4bit(tiny_llama_dir):
    return load_base(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama_dir):
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("verify") / "adapter")


def test_dequantized_fp32_forward_is_exact(tiny_llama_dir):
    """Guards the reference: bitsandbytes' fused CPU kernel rounds activations even in fp32 compute."""
    model, _, _ = load_base(str(tiny_llama_dir))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 17, layer.in_features)
    assert compute_with_dequantized_weights(model) == 14
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, dequantize_weight(layer).float()))


def test_identical_models_agree_completely(tiny_4bit):
    model, tokenizer, _ = tiny_4bit
    batches = token_batches(tokenizer, ["a short text about cats and dogs"], batches=1, seq_len=16, batch_size=2)
    metrics = compare(model, model, batches)
    assert metrics["top1_agreement"] == 1.0 and metrics["max_abs_logit_diff"] == 0.0
    assert abs(metrics["mean_kl"]) < 1e-6 and metrics["ppl_reference"] == metrics["ppl_merged"]
    assert metrics["tokens"] == 32 and metrics["finite"]


def test_token_batches_repeat_short_text_and_builtin_text_is_varied(tiny_4bit):
    _, tokenizer, _ = tiny_4bit
    batches = token_batches(tokenizer, ["hello world"], batches=3)
    assert len(batches) == 3 and all(b.shape == (4, 128) for b in batches)
    # Every window starts as a real input does (BOS), not with an arbitrary mid-sentence token.
    assert all((b[:, 0] == tokenizer.bos_token_id).all() for b in batches)
    builtin = token_batches(tokenizer, list(BUILTIN_TEXTS), batches=1)[0]
    assert len(set(builtin.flatten().tolist())) > 200  # real prose, not one repeated sentence
    with pytest.raises(QLoRAKitError, match="empty"):
        token_batches(tokenizer, [""], batches=1)


def test_load_texts_from_files(tmp_path):
    assert load_texts(None)[1] == "built-in"
    (tmp_path / "t.txt").write_text("first paragraph\n\nsecond paragraph\n")
    assert load_texts(tmp_path / "t.txt")[0] == ["first paragraph", "second paragraph\n"]
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    assert load_texts(tmp_path / "t.jsonl")[0] == ["user\nhi\nassistant\nhello"]
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(QLoRAKitError, match="bad.jsonl:1 is not valid JSON"):
        load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(QLoRAKitError, match="not found"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(QLoRAKitError, match="holds no text"):
        load_texts(tmp_path / "empty.txt")


def test_merge_writes_reports_from_a_verify_file(adapter, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("The quick brown fox jumps over the lazy dog.\n\nA second, different paragraph of text.")
    result = merge(adapter, tmp_path / "out", dtype="float32", verify=1, verify_file=texts, progress=False)
    report = json.loads((tmp_path / "out" / "verification.json").read_text())
    assert report["passed"] and report["texts"] == str(texts) and report == result.verification
    # fp32 weights: only summation order differs from the 4-bit reference.
    assert report["metrics"]["top1_agreement"] == 1.0 and report["metrics"]["max_abs_logit_diff"] < 1e-3
    assert report["method"].startswith("streaming") and len(report["layers"]) == 2
    # Beside it, the noise floor: the reference itself computed in bf16. An fp32 export is far inside it.
    assert report["noise_floor"]["mean_kl"] > 100 * max(report["metrics"]["mean_kl"], 1e-12)
    assert report["within_noise_floor"] and "served" not in report  # float32 is served as it is verified
    md = (tmp_path / "out" / "verification.md").read_text()
    assert "Passed" in md and "noise floor" in md and "Layer by layer" in md and "| 1 |" in md
    assert "passed" in summary(report) and "noise floor" in summary(report)


def test_verification_catches_a_merge_of_the_wrong_adapter(adapter, tiny_llama_dir, tmp_path):
    merge(adapter, tmp_path / "out", verify=0, progress=False)
    other = shutil.copytree(adapter, tmp_path / "other")
    weights = load_file(other / "adapter_model.safetensors")
    save_file({k: v * 3 if ".lora_B." in k else v for k, v in weights.items()}, other / "adapter_model.safetensors")
    manifest = json.loads((other / "qlora_kit.json").read_text())
    manifest.pop("files", None)  # changed on purpose: drop the integrity records of the original files
    (other / "qlora_kit.json").write_text(json.dumps(manifest))
    report = verify_export(tmp_path / "out", other, tiny_llama_dir, manifest["quantization"], mode="nf4", batches=1,
                           min_agreement=0.98)
    assert not report["passed"] and report["metrics"]["top1_agreement"] < 0.98
    write_report(tmp_path, report)
    assert "FAILED" in (tmp_path / "verification.md").read_text()


def test_fp32_compute_upcasts_everything_but_4bit_storage(tiny_llama_dir):
    model, _, _ = load_base(str(tiny_llama_dir))
    packed = model.model.layers[0].self_attn.q_proj.weight
    to_fp32_compute(model)
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight is packed and packed.dtype == torch.uint8


# --------------------------------------------------------------------------- chunked 4-bit arithmetic


@pytest.mark.parametrize("shape, double_quant, quant_type, storage", [
    ((300, 128), True, "nf4", torch.uint8),
    ((256, 192), False, "fp4", torch.uint8),
    ((130, 128), True, "nf4", torch.bfloat16),
    ((40, 100), True, "nf4", torch.uint8),  # rows not on block boundaries: quantized whole
])
def test_chunked_quantization_is_bit_identical_to_whole(monkeypatch, shape, double_quant, quant_type, storage):
    """Quantizing a block of rows at a time (small temporaries) gives the very bytes of a whole-tensor quantization."""
    bnb, bnbF = quantization.bnb, quantization.bnbF
    monkeypatch.setattr(quantization, "CHUNK_ELEMENTS", 4096)  # many chunks even on a small weight
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    whole = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, blocksize=64,
                              compress_statistics=double_quant, quant_storage=storage).to("cpu")
    expected = bnbF.dequantize_4bit(whole.data, whole.quant_state)
    packed, state = quantization.quantize_4bit(weight, quant_type=quant_type, double_quant=double_quant,
                                               quant_storage=storage)
    assert torch.equal(packed.view(torch.uint8), whole.data.view(torch.uint8))
    assert torch.equal(bnbF.dequantize_4bit(packed, state), expected)
    record = {"quant_type": quant_type, "double_quant": double_quant, "quant_storage": str(storage)[6:]}
    assert torch.equal(quantization.quantize_roundtrip(weight, record), expected)

    # A Linear4bit filled by row chunks computes, a block of output rows at a time, with exactly those values.
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=True, compress_statistics=double_quant, quant_type=quant_type,
                              quant_storage=storage, device="meta")
    quantization.linear4bit_from(layer, weight)
    layer.bias = torch.nn.Parameter(torch.randn(shape[0]).to(torch.bfloat16), requires_grad=False)
    assert torch.equal(dequantize_weight(layer), expected)
    x = torch.randn(2, 5, shape[1])
    compute_with_dequantized_weights(layer, torch.float32)
    torch.testing.assert_close(layer(x), F.linear(x, expected.float(), layer.bias.float()), rtol=1e-6, atol=1e-6)
    compute_with_dequantized_weights(layer, None)  # the input's dtype
    assert layer(x.bfloat16()).dtype == torch.bfloat16


# --------------------------------------------------------------------------- streaming against whole models


def same_metrics(streamed: dict, whole: dict, *, low_precision: bool = False) -> None:
    """fp32 on both sides: the same numbers. A side computed in bf16/fp16 rounds differently when its products
    are cut differently (a row at a time, blocks of weight rows), which can flip a near-tie."""
    assert streamed["tokens"] == whole["tokens"] and streamed["finite"] == whole["finite"]
    if low_precision:
        assert streamed["top1_agreement"] == pytest.approx(whole["top1_agreement"], abs=0.01)
        assert streamed["mean_kl"] == pytest.approx(whole["mean_kl"], rel=0.3)
        return
    assert streamed["top1_agreement"] == whole["top1_agreement"]
    assert streamed["mean_kl"] == pytest.approx(whole["mean_kl"], rel=1e-3, abs=1e-12)
    for key in ("ppl_reference", "ppl_merged"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-5)
    assert streamed["max_abs_logit_diff"] == pytest.approx(whole["max_abs_logit_diff"], rel=1e-2, abs=1e-5)
    assert streamed["mean_abs_logit_diff"] == pytest.approx(whole["mean_abs_logit_diff"], rel=1e-3, abs=1e-7)


def verified_both_ways(out, adapter, base, *, mode: str, batches: int = 1, tokenizer_from=None):
    """Streaming and whole-model verification of the export in `out` against `adapter` on `base`, same inputs."""
    record = AdapterRecord.read(adapter)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or out)
    inputs, _ = verification_inputs(tokenizer, None, batches, record)
    quant = record.manifest["quantization"]
    return (stream_compare(out, record, base, quant, mode=mode, inputs=inputs),
            whole_compare(out, adapter, base, quant, mode=mode, inputs=inputs))


def test_streaming_verification_agrees_with_whole_models(adapter, tiny_llama_dir, tmp_path):
    merge(adapter, tmp_path / "out", dtype="bfloat16", verify=0, progress=False)
    streamed, whole = verified_both_ways(tmp_path / "out", adapter, tiny_llama_dir, mode="nf4", batches=2)
    same_metrics(streamed["metrics"], whole["metrics"])
    for key in ("noise_floor", "served"):  # served: the bf16 export computed in bf16
        same_metrics(streamed[key], whole[key], low_precision=True)
    where = ("batch", "row", "position", "token_id")
    assert [streamed["metrics"]["worst"][k] for k in where] == [whole["metrics"]["worst"][k] for k in where]
    layers = streamed["layers"]
    assert [row["layer"] for row in layers] == [0, 1]
    # bf16 rounding of the merged weights: a small local error in every layer, below bf16 compute's.
    assert all(0 < row["local_rel_mean"] < 2e-2 and row["merged_rel_mean"] < row["noise_rel_mean"] for row in layers)


def test_streaming_original_mode_reports_drift_like_whole_models(fp32_base_and_adapter, tmp_path):
    base, adapter = fp32_base_and_adapter
    merge(adapter, tmp_path / "out", mode="original", dtype="float32", verify=0, progress=False)
    streamed, whole = verified_both_ways(tmp_path / "out", adapter, base, mode="original", tokenizer_from=base)
    for key in ("metrics", "drift_from_trained"):
        same_metrics(streamed[key], whole[key])
    same_metrics(streamed["noise_floor"], whole["noise_floor"], low_precision=True)
    assert streamed["metrics"]["top1_agreement"] == 1.0 and "served" not in streamed
    assert streamed["drift_from_trained"]["mean_kl"] > 1e3 * streamed["metrics"]["mean_kl"]  # 4-bit vs fp32 base


@pytest.mark.slow
def test_streaming_verification_agrees_with_whole_models_on_smollm2(smollm2_dir, tmp_path):
    """The real model: tied embeddings, 30 layers, massive activations at the first position."""
    adapter = make_adapter(smollm2_dir, tmp_path / "adapter", targets=("q_proj", "v_proj", "down_proj"))
    merge(adapter, tmp_path / "out", verify=0, progress=False)  # the default: float16
    streamed, whole = verified_both_ways(tmp_path / "out", adapter, smollm2_dir, mode="nf4")
    same_metrics(streamed["metrics"], whole["metrics"])
    for key in ("noise_floor", "served"):
        same_metrics(streamed[key], whole[key], low_precision=True)
    assert len(streamed["layers"]) == 30 and streamed["metrics"]["top1_agreement"] > 0.995
    assert streamed["metrics"]["mean_kl"] < streamed["noise_floor"]["mean_kl"]


# --------------------------------------------------------------------------- what verification runs on


def write_run(root, base_dir, adapter, *, eval_fraction: float):
    """A training run folder around an adapter: config.yaml naming a small instruction dataset."""
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}, since adding a number to "
             f"itself doubles it."} for i in range(40)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = root / "run"
    shutil.copytree(adapter, run / "adapter")
    (run / "config.yaml").write_text(
        f"model: {{base: {base_dir}}}\ndata: {{path: {root / 'data.jsonl'}, eval_fraction: {eval_fraction}}}\n"
        "train: {seed: 3}\n")
    return run


def test_held_out_rows_of_the_run_are_the_default_text(adapter, tiny_llama_dir, tmp_path):
    run = write_run(tmp_path, tiny_llama_dir, adapter, eval_fraction=0.25)
    record = AdapterRecord.read(run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    inputs, source = verification_inputs(tokenizer, None, 2, record)
    held_out = prepare_data(record.run.data, tokenizer, seed=3).eval
    assert "held-out rows" in source and len(held_out) == 10
    rows = [ids[mask.bool()].tolist() for batch in inputs for ids, mask in zip(batch["input_ids"],
                                                                                batch["attention_mask"])]
    assert rows == [e["input_ids"] for e in held_out[:8]]  # 2 batches of 4, padding masked out
    # A --verify-file wins; a run without held-out rows falls back to the built-in text.
    assert verification_inputs(tokenizer, ["some other text"], 1, record)[1] == "1 given texts"
    (tmp_path / "bare").mkdir()
    bare = write_run(tmp_path / "bare", tiny_llama_dir, adapter, eval_fraction=0.0)
    assert verification_inputs(tokenizer, None, 1, AdapterRecord.read(bare))[1] == "built-in"

    report = merge(run, tmp_path / "out", verify=2, progress=False).verification
    assert report["passed"] and "held-out rows" in report["texts"] and report["metrics"]["tokens"] == sum(
        len(r) for r in rows)


def test_float16_export_that_overflows_when_served_in_float16_fails(tmp_path, smollm2_dir):
    """Activations beyond float16's range: the fp32 check passes, computing the export in float16 does not."""
    base = write_random_checkpoint(tmp_path / "base", tiny_llama_config(), seed=5, tokenizer_from=smollm2_dir)
    tensors = load_file(base / "model.safetensors")
    for name in tensors:
        if name.endswith("post_attention_layernorm.weight"):
            tensors[name] = torch.full_like(tensors[name], 1e4)  # MLP inputs ~1e4: gate * up ~1e6 > 65504
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter = make_adapter(base, tmp_path / "adapter")
    with pytest.raises(QLoRAKitError, match=r"computed in float16.*overflow.*--dtype bfloat16"):
        merge(adapter, tmp_path / "out", verify=1, progress=False)
    assert not (tmp_path / "out").exists()
    report = merge(adapter, tmp_path / "out", dtype="bfloat16", verify=1, progress=False).verification
    assert report["passed"] and report["served"]["finite"] and report["served_dtype"] == "bfloat16"


# --------------------------------------------------------------------------- streaming RAM

MEASURE_STREAMING = """
import json, sys
import torch
import torch.nn.functional as F
import transformers.models.llama.modeling_llama  # noqa: F401  (model code imported before the baseline)
from qlora_kit import memory, verify
from qlora_kit.adapter_io import AdapterRecord

record = AdapterRecord.read(sys.argv[1])
ids = torch.randint(0, int(sys.argv[3]), (4, 128), generator=torch.Generator().manual_seed(0))
inputs = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
x = torch.randn(1, 4, 16, 64)
for dtype in (torch.float32, torch.bfloat16, torch.float16):  # kernels' first-use workspaces
    F.scaled_dot_product_attention(x.to(dtype), x.to(dtype), x.to(dtype), is_causal=True)
    F.linear(x.to(dtype), x[0, 0].to(dtype))
memory.release()
memory.reset_peak_rss()
baseline = memory.current_rss_mb()
result = verify.stream_compare(sys.argv[2], record, record.manifest["base"]["folder"],
                               record.manifest["quantization"], mode="nf4", inputs=inputs)
print(json.dumps({"increase_mb": memory.peak_rss_mb() - baseline, "top1": result["metrics"]["top1_agreement"],
                  "layers": len(result["layers"])}))
"""


def tensor_bytes(folder, prefix: str) -> int:
    total = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    piece = f.get_slice(name)
                    total += torch.Size(piece.get_shape()).numel() * 2  # fp16 / bf16
    return total


@pytest.mark.slow
def test_streaming_verification_peak_ram_stays_near_one_layer_of_each(tmp_path, smollm2_dir):
    """Layers of 134 MB (float16) in 64 MB shards; an embedding and a head of 200 MB each, never loaded whole."""
    config = tiny_llama_config(hidden_size=2048, intermediate_size=8192, num_hidden_layers=3,
                               num_attention_heads=16, num_key_value_heads=16)
    base = write_random_checkpoint(tmp_path / "base", config, shard_bytes=64_000_000, tokenizer_from=smollm2_dir)
    adapter = write_adapter_files(base, tmp_path / "adapter", rank=8)
    out = tmp_path / "out"
    merge(adapter, out, verify=0, max_shard_size="64MB", progress=False)
    layer = tensor_bytes(out, "model.layers.0.")
    assert len(list(out.glob("*.safetensors"))) >= 8 and tensor_bytes(out, "lm_head.") > 1.4 * layer
    proc = subprocess.run([sys.executable, "-c", MEASURE_STREAMING, str(adapter), str(out), str(config.vocab_size)],
                          env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(proc.stdout.strip().splitlines()[-1])
    increase = numbers["increase_mb"] * 2**20
    print(f"\npeak RSS increase {increase / 1e6:.0f} MB; one layer {layer / 1e6:.0f} MB (float16), "
          f"{increase / layer:.2f} layers")
    assert numbers["layers"] == 3 and numbers["top1"] > 0.99
    assert increase <= 2.2 * layer  # two layers + 10%: the export's layer, the 4-bit one, activations


def test_models_that_cannot_stream_are_verified_whole(adapter, tiny_llama_dir, tmp_path, monkeypatch, caplog):
    from qlora_kit import verify

    def refuse(self):
        raise verify.NotStreamable("no list of decoder layers (for this test)")

    merge(adapter, tmp_path / "out", verify=0, progress=False)
    monkeypatch.setattr(verify._Side, "_check", refuse)
    quant = AdapterRecord.read(adapter).manifest["quantization"]
    report = verify_export(tmp_path / "out", adapter, tiny_llama_dir, quant, mode="nf4", batches=1, min_agreement=0.98)
    assert report["passed"] and report["method"] == "whole models" and "layers" not in report
    assert report["served_dtype"] == "float16" and report["within_noise_floor"]
    assert "both models loaded whole: " in caplog.text and "for this test" in caplog.text


def test_streaming_verification_of_a_dora_adapter(tiny_llama_dir, tmp_path):
    from qlora_kit import LoRAConfig, apply_lora, save_adapter
    from qlora_kit.lora import lora_layers

    model, _, base = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4, use_dora=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.02)
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude_vector.shape, generator=gen))
    adapter = save_adapter(model, tmp_path / "dora", base=base)
    merge(adapter, tmp_path / "out", dtype="float32", verify=0, progress=False)
    streamed, whole = verified_both_ways(tmp_path / "out", adapter, tiny_llama_dir, mode="nf4")
    same_metrics(streamed["metrics"], whole["metrics"])
    assert streamed["metrics"]["top1_agreement"] == 1.0 and streamed["metrics"]["mean_kl"] < 1e-8
