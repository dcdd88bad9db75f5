"""GGUF export (models read back by transformers' GGUF loader, LoRA files against PEFT's merge, tokenizers)
and GGUF bases (one cache entry per file, origin records)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          MistralConfig, PreTrainedTokenizerFast, Qwen2Config)

from qlora_kit import QLoRAKitError
from qlora_kit.gguf_export import MIN_AGREEMENT, export_gguf, export_gguf_lora
from qlora_kit.gguf_origin import content_hash, hub_id_from_metadata
from qlora_kit.packaged import SMOLLM2_HUB_ID, gguf_origin, gguf_to_hf_folder
from qlora_kit.verify import BUILTIN_TEXTS
from tests.factories import tiny_llama_config, write_random_checkpoint

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2)


# --------------------------------------------------------------------------- helpers


def sentencepiece_style_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A ~700-token tokenizer shaped like Llama 2's / Mistral's tokenizer.json: <unk> <s> </s>, 256 byte
    tokens, then BPE pieces with '▁' for spaces and byte fallback. Small, so GGUF files read back fast."""
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner.train_from_iterator(list(BUILTIN_TEXTS), trainers.BpeTrainer(vocab_size=450, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def small_model(folder: Path, config_class=LlamaConfig, **overrides) -> Path:
    """A random 2-layer model of `config_class` with the small sentencepiece-style tokenizer, bf16."""
    folder.mkdir(parents=True, exist_ok=True)
    size = len(sentencepiece_style_tokenizer(folder))
    shard_bytes = overrides.pop("shard_bytes", None)
    write_random_checkpoint(folder, config_class(**{**SMALL, "vocab_size": size, **overrides}), shard_bytes=shard_bytes)
    # transformers picks the tokenizer class from config.json's model_type (Qwen2's adds <|endoftext|>):
    # size the model for the tokenizer users will actually get from this folder.
    loaded = len(AutoTokenizer.from_pretrained(folder))
    if loaded != size:
        write_random_checkpoint(folder, config_class(**{**SMALL, "vocab_size": loaded, **overrides}),
                                shard_bytes=shard_bytes)
    return folder


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(scalar and string metadata, tensors by name) of a GGUF file, as gguf's reader decodes them."""
    reader = gguf.GGUFReader(path)
    meta = {key: field.contents() for key, field in reader.fields.items()
            if field.types and field.types[0] != gguf.GGUFValueType.ARRAY}
    return meta, {t.name: t for t in reader.tensors}


def fields(path: Path) -> dict:
    return read_gguf(path)[0]


def tensors(path: Path) -> dict:
    return read_gguf(path)[1]


def gguf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file as transformers' GGUF loader reads it (its own names, un-permutation and dequantization)."""
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


def source_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def as_stored(value: torch.Tensor, qtype) -> torch.Tensor:
    """What a GGUF file of this type holds for a source tensor, decoded to float32."""
    if value.ndim == 1 or qtype == "f32":
        return value.float()
    if qtype == "f16":
        return value.to(torch.float16).float()
    q8 = gguf.GGMLQuantizationType.Q8_0
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(value.float().numpy(), q8), q8))


def llama_cpp_unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order back to HF's, written as transformers' GGUF reader writes it."""
    dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


# --------------------------------------------------------------------------- models


def test_f16_tiny_llama_agrees_and_carries_llama_cpp_metadata(tiny_llama_dir, tmp_path):
    out = tmp_path / "tiny.gguf"
    report = export_gguf(tiny_llama_dir, out, progress=False)
    verification = report["verification"]
    assert verification["passed"] and verification["metrics"]["top1_agreement"] == 1.0
    assert verification["metrics"]["mean_kl"] < 1e-6 and verification["metrics"]["max_abs_logit_diff"] < 1e-4
    assert verification["tokenizer_roundtrip"] == {"texts": len(BUILTIN_TEXTS), "identical": len(BUILTIN_TEXTS)}
    assert json.loads(Path(str(out) + ".verification.json").read_text()) == json.loads(json.dumps(report))

    meta, found = read_gguf(out)
    config = tiny_llama_config()
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (meta["llama.context_length"], meta["llama.embedding_length"], meta["llama.block_count"],
            meta["llama.feed_forward_length"], meta["llama.attention.head_count"],
            meta["llama.attention.head_count_kv"], meta["llama.rope.dimension_count"],
            meta["llama.vocab_size"]) == (512, 64, 2, 128, 4, 2, 16, 49152)
    assert meta["llama.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False  # SmolLM2's tokenizer adds no BOS
    assert "<|im_start|>" in meta["tokenizer.chat_template"]

    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(2) for part in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(found) == expected
    # Names as gguf's own llama tensor map gives them.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert {names.get_name(k, try_suffixes=(".weight",)) for k in source_state_dict(tiny_llama_dir)} == expected
    assert {found[n].tensor_type.name for n in expected if "norm" in n} == {"F32"}
    assert {found[n].tensor_type.name for n in expected if "norm" not in n} == {"F16"}


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    source = small_model(tmp_path / "src")
    out_dir = tmp_path / "out"
    copy = out_dir / "model.gguf"
    export_gguf(source, copy, verify=False, progress=False)
    Path(str(copy) + ".verification.json").write_text("{}")
    before = copy.read_bytes()
    with pytest.raises(QLoRAKitError, match="already exists"):
        export_gguf(source, copy, verify=False, progress=False)
    assert copy.read_bytes() == before
    report = export_gguf(source, copy, type="q8_0", verify=False, overwrite=True, progress=False)
    assert fields(copy)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0 and report["verification"] is None
    assert not Path(str(copy) + ".verification.json").exists()  # the old report described the old file
    assert sorted(os.listdir(out_dir)) == ["model.gguf"]  # no staging leftovers
    with pytest.raises(QLoRAKitError, match="must end in .gguf"):
        export_gguf(source, out_dir / "model.bin", verify=False, progress=False)
    with pytest.raises(QLoRAKitError, match="unknown GGUF type 'q4_0'"):
        export_gguf(source, out_dir / "x.gguf", type="q4_0", progress=False)


def test_smollm2_f16_keeps_tied_embeddings_and_agrees_exactly(smollm2_dir, tmp_path):
    out = tmp_path / "smollm2.gguf"
    report = export_gguf(smollm2_dir, out, verify_batches=1, progress=False)
    metrics = report["verification"]["metrics"]
    # SmolLM2's bf16 weights are all exact in f16, so the logits are identical.
    assert report["verification"]["passed"] and metrics["top1_agreement"] == 1.0 and metrics["mean_kl"] < 1e-6
    # 30 blocks of 9 tensors, token_embd and output_norm: no `output`, llama.cpp reuses token_embd.
    assert report["tied_embeddings"] and report["tensors"] == 30 * 9 + 2
    assert report["verification"]["tokenizer_roundtrip"]["identical"] == len(BUILTIN_TEXTS)
    assert 265e6 < report["bytes"] < 275e6  # 135M parameters at 2 bytes


def test_q8_0_agrees_and_holds_exactly_the_quantized_weights(tmp_path):
    source = small_model(tmp_path / "small")
    out = tmp_path / "small-q8_0.gguf"
    report = export_gguf(source, out, type="q8_0", progress=False)
    metrics = report["verification"]["metrics"]
    assert report["verification"]["passed"] and metrics["top1_agreement"] >= MIN_AGREEMENT["q8_0"]
    assert report["tensor_types"] == {"Q8_0": 16, "F32": 5}
    f16 = export_gguf(source, tmp_path / "small-f16.gguf", verify=False, progress=False)
    assert report["bytes"] < 0.6 * f16["bytes"]  # 34 bytes per 32 values instead of 64
    theirs = gguf_state_dict(out)
    for name, value in source_state_dict(source).items():
        assert torch.equal(theirs[name], as_stored(value, "q8_0")), name


@pytest.mark.parametrize("config_class,arch", [(LlamaConfig, "llama"), (MistralConfig, "llama"),
                                               (Qwen2Config, "qwen2")])
def test_llama_family_architectures_round_trip_exactly(config_class, arch, tmp_path):
    extra = {"sliding_window": 128} if config_class is MistralConfig else {}
    # The Llama checkpoint is sharded: export reads tensors across shards through the index. Exact weights
    # (read back by transformers' own GGUF loader, names and Q/K un-permutation included) are checked here
    # because random tiny models' logits hardly depend on attention: a wrong Q/K layout would still agree.
    shards = {"shard_bytes": 40_000} if config_class is LlamaConfig else {}
    source = small_model(tmp_path / "src", config_class, **extra, **shards)
    out = tmp_path / "model.gguf"
    report = export_gguf(source, out, verify_batches=1, progress=False)
    assert report["gguf_architecture"] == arch and report["verification"]["passed"]
    assert report["verification"]["metrics"]["top1_agreement"] == 1.0
    assert fields(out)["tokenizer.ggml.model"] == "llama"
    if config_class is not Qwen2Config:  # transformers wraps any tokenizer of a qwen2 folder in its own class
        assert report["verification"]["tokenizer_roundtrip"]["identical"] == len(BUILTIN_TEXTS)
    else:
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(tensors(out))
        assert fields(out)["qwen2.attention.head_count_kv"] == 2
    if config_class is MistralConfig:
        assert "sliding window of 128" in report["notes"][0]
    theirs = gguf_state_dict(out)
    for name, value in source_state_dict(source).items():
        assert torch.equal(theirs[name], as_stored(value, "f16")), name


def test_llama3_rope_scaling_is_written_as_llama_cpp_rope_freqs(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256, "rope_theta": 500000.0}
    source = small_model(tmp_path / "src", rope_scaling=rope, rope_theta=500000.0)
    out = tmp_path / "model.gguf"
    report = export_gguf(source, out, verify_batches=1, progress=False)
    assert report["verification"]["passed"]
    stored = tensors(out)["rope_freqs.weight"]
    assert stored.tensor_type.name == "F32"
    # llama.cpp divides each rotary frequency by its factor: factor = default frequency / Llama 3 frequency.
    config = LlamaConfig.from_pretrained(source)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    expected = (default / scaled.double()).numpy()
    np.testing.assert_allclose(np.asarray(stored.data, dtype=np.float64), expected, rtol=1e-5)
    assert {1.0, 8.0} <= set(np.round(stored.data, 5).tolist())  # both ends of the band are used


def test_failed_verification_leaves_no_file(tmp_path):
    source = small_model(tmp_path / "src")
    out_dir = tmp_path / "out"
    with pytest.raises(QLoRAKitError, match="GGUF verification failed, .* not written"):
        export_gguf(source, out_dir / "model.gguf", verify_batches=1, min_agreement=1.01, progress=False)
    assert os.listdir(out_dir) == []


def test_refuses_unsupported_architecture_with_its_name(tmp_path):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(folder)
    with pytest.raises(QLoRAKitError, match="does not support the GPT2LMHeadModel architecture"):
        export_gguf(folder, tmp_path / "gpt2.gguf", progress=False)
    assert not (tmp_path / "gpt2.gguf").exists()


def test_refuses_a_byte_level_tokenizer_llama_cpp_would_split_differently(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(BUILTIN_TEXTS), trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    write_random_checkpoint(folder, LlamaConfig(**{**SMALL, "vocab_size": 400}))
    with pytest.raises(QLoRAKitError, match="splits text in a way this exporter does not know"):
        export_gguf(folder, tmp_path / "out" / "model.gguf", progress=False)
    assert os.listdir(tmp_path / "out") == []


# --------------------------------------------------------------------------- LoRA


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(base: Path, folder: Path, use_rslora: bool) -> Path:
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, lora_dropout=0.0,
                                                  task_type="CAUSAL_LM", target_modules=TARGETS))
    trained_looking(p for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.save_pretrained(folder)
    return folder


def qlora_kit_adapter(base: Path, folder: Path, use_rslora: bool) -> Path:
    from qlora_kit import LoRAConfig, apply_lora, save_adapter
    from qlora_kit.lora import lora_layers

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, use_rslora=use_rslora, target_modules=TARGETS))
    trained_looking(layer.lora_B.weight for _, layer in lora_layers(model))
    return save_adapter(model, folder)


def trained_looking(b_matrices) -> None:
    """Non-zero B matrices, as training leaves them (freshly initialised adapters are zero)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in b_matrices:
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("make_adapter,use_rslora", [(peft_adapter, False), (peft_adapter, True),
                                                     (qlora_kit_adapter, False)])
def test_lora_file_reproduces_peft_merge_in_llama_cpp_layout(tmp_path, make_adapter, use_rslora):
    from peft import PeftModel

    base = small_model(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", use_rslora)
    base_weights = source_state_dict(base)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    merged = peft_model.merge_and_unload().state_dict()  # the reference: PEFT's own merge

    out = tmp_path / "adapter.gguf"
    report = export_gguf_lora(adapter, out, base=str(base), progress=False)
    meta, found = read_gguf(out)
    assert (meta["general.architecture"], meta["general.type"], meta["adapter.type"]) == ("llama", "adapter", "lora")
    assert len(found) == report["tensors"] == 2 * 7 * 2
    alpha = meta["adapter.lora.alpha"]
    assert alpha == pytest.approx(8 * 4 ** 0.5 if use_rslora else 8)  # llama.cpp scales by alpha / rank

    heads = {"attn_q": 4, "attn_k": 2}
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for layer in range(2):
        for part, hf_part in parts.items():
            name = f"model.layers.{layer}.{hf_part}.weight"
            a = torch.from_numpy(np.array(found[f"blk.{layer}.{part}.weight.lora_a"].data))
            b = torch.from_numpy(np.array(found[f"blk.{layer}.{part}.weight.lora_b"].data))
            out_features, in_features = base_weights[name].shape
            assert a.shape == (4, in_features) and b.shape == (out_features, 4)  # ggml ne: [in, r] and [r, out]
            if part in heads:  # B's rows are in llama.cpp's rotary order, like the base model's Q and K
                b = llama_cpp_unpermute(b, heads[part])
            rebuilt = base_weights[name] + (b @ a) * (alpha / a.shape[0])
            torch.testing.assert_close(rebuilt, merged[name], atol=1e-6, rtol=0, msg=name)


def test_lora_on_lm_head_goes_to_output_and_is_refused_for_a_tied_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    untied = small_model(tmp_path / "untied")
    model = AutoModelForCausalLM.from_pretrained(untied, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"])).save_pretrained(
        tmp_path / "adapter", save_embedding_layers=False)
    export_gguf_lora(tmp_path / "adapter", tmp_path / "a.gguf", base=str(untied), progress=False)
    assert {"output.weight.lora_a", "output.weight.lora_b"} <= set(tensors(tmp_path / "a.gguf"))

    tied = small_model(tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(QLoRAKitError, match="ties it to the embeddings"):
        export_gguf_lora(tmp_path / "adapter", tmp_path / "b.gguf", base=str(tied), progress=False)
    assert not (tmp_path / "b.gguf").exists()


# --------------------------------------------------------------------------- GGUF bases: cache key and origin


def test_one_cache_entry_per_gguf_file_whatever_path_reaches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    source = small_model(tmp_path / "src")
    first = tmp_path / "a" / "model.gguf"
    export_gguf(source, first, verify=False, progress=False, name="tiny-test")
    second = tmp_path / "b" / "renamed-copy.gguf"
    second.parent.mkdir()
    shutil.copy(first, second)

    folder = gguf_to_hf_folder(first)
    assert gguf_to_hf_folder(second) == folder
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()] == [folder.name]
    origin = gguf_origin(folder)
    assert origin["gguf_file"] == str(first.resolve())
    assert origin["gguf_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert origin["general"]["general.name"] == "tiny-test" and origin["hub_id"] is None
    assert gguf_origin(source) is None  # a folder not converted from GGUF
    # The converted folder is a working checkpoint with the source's weights (f16 of bf16: exact here).
    assert torch.equal(source_state_dict(folder)["model.norm.weight"], source_state_dict(source)["model.norm.weight"])

    # Same size, one byte different: another identity.
    changed = tmp_path / "changed.gguf"
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    assert content_hash(changed, tmp_path / "memo") != content_hash(first, tmp_path / "memo")


def test_packaged_smollm2_records_its_hub_id(smollm2_dir):
    origin = gguf_origin(smollm2_dir)
    assert origin["hub_id"] == SMOLLM2_HUB_ID and origin["gguf_file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert origin["general"]["general.organization"] == "HuggingFaceTB"


def test_hub_id_comes_from_urls_naming_the_model_itself():
    assert hub_id_from_metadata({"general.source.url": "https://huggingface.co/Qwen/Qwen2.5-7B-Instruct"}) == (
        "Qwen/Qwen2.5-7B-Instruct", "general.source.url")
    assert hub_id_from_metadata({"general.repo_url": "https://huggingface.co/org/name/tree/main"})[0] == "org/name"
    # A base model is what this one was fine-tuned from, not this model.
    assert hub_id_from_metadata({"general.base_model.0.repo_url": "https://huggingface.co/a/b"}) == (None, None)
    assert hub_id_from_metadata({"general.source.url": "https://example.com/model"}) == (None, None)
