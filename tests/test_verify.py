"""Verification of exports: the metrics, the exact fp32 reference, token batches, texts, reports, catching bad merges."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qlora_kit import QLoRAKitError, load_base
from qlora_kit.export import merge
from qlora_kit.quantization import compute_with_dequantized_weights, dequantize_weight
from qlora_kit.verify import (BUILTIN_TEXTS, compare, load_texts, summary, to_fp32_compute, token_batches,
                              verify_export, write_report)
from tests.test_export import make_adapter


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
    assert "Passed" in (tmp_path / "out" / "verification.md").read_text()
    assert "passed" in summary(report)


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
