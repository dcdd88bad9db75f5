"""Streaming 4-bit loading: sources, peak RAM on a sharded checkpoint, and clear errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from qlora_kit import QLoRAKitError, load_base
from qlora_kit.checkpoint import resolve
from qlora_kit.packaged import gguf_to_hf_folder, smollm2_gguf_path
from qlora_kit.quantization import is_4bit_linear
from tests.factories import tiny_llama_config, write_random_checkpoint


def greedy_answer(model, tokenizer, question, tokens=12):
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_package_loads_in_4bit_and_answers_sensibly(smollm2_4bit):
    model, tokenizer, _ = smollm2_4bit
    assert sum(is_4bit_linear(m) for m in model.modules()) == 210
    assert "Paris" in greedy_answer(model, tokenizer, "What is the capital of France?")


def test_packaged_name_and_gguf_file_resolve_to_the_same_folder(smollm2_dir):
    assert resolve("smollm2-135m-instruct").folder == smollm2_dir.resolve()
    # A GGUF file converts once, then is served from the cache.
    assert gguf_to_hf_folder(smollm2_gguf_path()) == gguf_to_hf_folder(smollm2_gguf_path())


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, tiny_llama_dir):
    config = tiny_llama_config()
    single = write_random_checkpoint(tmp_path / "single", config, seed=3, tokenizer_from=tiny_llama_dir)
    sharded = write_random_checkpoint(tmp_path / "sharded", config, seed=3, shard_bytes=20_000,
                                      tokenizer_from=tiny_llama_dir)
    assert len(resolve(str(sharded)).shards) > 3
    a, _, _ = load_base(str(single))
    b, _, _ = load_base(str(sharded))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_tied_embeddings_stay_tied(smollm2_4bit):
    model = smollm2_4bit[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, transformers, bitsandbytes, accelerate  # imports before the baseline
    from qlora_kit import load_base
    from qlora_kit.memory import peak_rss_mb
    from qlora_kit.quantization import is_4bit_linear, quantized_bytes
    before = peak_rss_mb()
    model, _, _ = load_base(sys.argv[1])
    plain = sum(p.numel() * p.element_size() for m in model.modules() if not is_4bit_linear(m)
                for p in m.parameters(recurse=False))
    model_mb = (quantized_bytes(model) + plain) / 2**20
    print(json.dumps({"before": before, "after": peak_rss_mb(), "model_mb": model_mb}))
""")


def test_streaming_load_peak_ram_stays_near_the_4bit_model(tmp_path, tiny_llama_dir):
    # ~580 MB of bf16 weights in ~24 MB shards: a model many times larger than one shard.
    config = tiny_llama_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                               num_attention_heads=16, num_key_value_heads=4, vocab_size=8192)
    folder = write_random_checkpoint(tmp_path / "big", config, shard_bytes=24_000_000, tokenizer_from=tiny_llama_dir)
    shards = resolve(str(folder)).shards
    total_mb = sum(p.stat().st_size for p in shards) / 2**20
    largest_mb = max(p.stat().st_size for p in shards) / 2**20
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder)], capture_output=True, text=True,
                            check=True)
    peak = json.loads(result.stdout.strip().splitlines()[-1])
    growth = peak["after"] - peak["before"]
    print(f"checkpoint {total_mb:.0f} MB in {len(shards)} shards (largest {largest_mb:.0f} MB), "
          f"4-bit model {peak['model_mb']:.0f} MB; peak RSS growth while loading {growth:.0f} MB")
    assert total_mb > 20 * largest_mb
    # Tensors are read one at a time with plain reads (no shard memory map stays resident): one
    # shard of slack covers the largest tensor and allocator churn, ~100 MB the tokenizer and small objects.
    assert growth < largest_mb + peak["model_mb"] + 100, growth
    assert growth < 0.6 * total_mb


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(QLoRAKitError, match="not found"):
        load_base(str(tmp_path / "nope"))


def test_unsupported_file_is_one_clear_error(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(QLoRAKitError, match="unsupported base file"):
        load_base(str(path))


def test_pickled_weights_are_refused_with_a_reason(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(QLoRAKitError, match="unpickling"):
        load_base(str(tmp_path))


def test_corrupt_shard_is_named(tmp_path, tiny_llama_dir):
    folder = write_random_checkpoint(tmp_path / "c", tiny_llama_config(), shard_bytes=1_000_000)
    shard = resolve(str(folder)).shards[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated copy
    with pytest.raises(QLoRAKitError, match=shard.name):
        load_base(str(folder))


def test_missing_shard_is_named(tmp_path):
    folder = write_random_checkpoint(tmp_path / "m", tiny_llama_config(), shard_bytes=1_000_000)
    shard = resolve(str(folder)).shards[-1]
    shard.unlink()
    with pytest.raises(QLoRAKitError, match=f"missing shard.*{shard.name}"):
        load_base(str(folder))


def test_config_that_disagrees_with_weights_is_explained(tmp_path):
    folder = write_random_checkpoint(tmp_path / "w", tiny_llama_config())
    tiny_llama_config(intermediate_size=256).save_pretrained(folder)
    with pytest.raises(QLoRAKitError, match="config.json and the weights disagree"):
        load_base(str(folder))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QLoRAKitError, match="could not download 'no-such-org/no-such-model'"):
        load_base("no-such-org/no-such-model")
