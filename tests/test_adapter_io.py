"""Adapters in PEFT's format: both directions against PEFT itself, and the base checks."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlora_kit import LoRAConfig, QLoRAKitError, QuantConfig, apply_lora, load_adapter, load_base, save_adapter
from qlora_kit.adapter_io import MANIFEST_FILE
from qlora_kit.lora import lora_layers
from qlora_kit.quantization import guard_cpu_gradients, quant_record
from tests.factories import tiny_llama_config, write_random_checkpoint


def transformers_4bit(folder):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16,
                                                 device_map="cpu")
    guard_cpu_gradients(model)  # same bitsandbytes CPU kernel path as ours
    return model


def trained_looking(model, seed=0):
    """Give every B non-zero values, as training would, so the adapter changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.02)
    return model


def logits(model, tokenizer, text="Adapters should travel between toolkits unchanged."):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_our_adapter_loads_into_peft_with_the_same_logits(tmp_path, smollm2_dir):
    model, tokenizer, _ = load_base(str(smollm2_dir))
    apply_lora(model, LoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    trained_looking(model)
    ours = logits(model, tokenizer)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["r"] == 8
    peft_model = PeftModel.from_pretrained(transformers_4bit(smollm2_dir), tmp_path / "adapter")
    theirs = logits(peft_model, tokenizer)
    assert not torch.equal(ours, logits(load_base(str(smollm2_dir))[0], tokenizer))  # the adapter matters
    torch.testing.assert_close(theirs, ours, atol=1e-2, rtol=0)


def test_peft_adapter_loads_into_qlora_kit_with_the_same_logits(tmp_path, tiny_llama_dir):
    reference = transformers_4bit(tiny_llama_dir)
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                                                      lora_dropout=0.0, task_type="CAUSAL_LM", use_rslora=True))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    model, tokenizer, _ = load_base(str(tiny_llama_dir))
    load_adapter(model, tmp_path / "peft-adapter")
    layers = dict(lora_layers(model))
    assert sorted(layers) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.k_proj", "mlp.up_proj"))
    assert next(iter(layers.values())).scaling == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(4)
    torch.testing.assert_close(logits(model, tokenizer), logits(peft_model, tokenizer), atol=1e-2, rtol=0)


def test_round_trip_restores_exact_weights_and_manifest(tmp_path, tiny_llama_dir):
    model, tokenizer, base = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4, target_modules=["model.layers.1.*"]))
    trained_looking(model)
    save_adapter(model, tmp_path / "a", base=base, extra={"step": 7})
    manifest = json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())
    assert manifest["quantization"] == quant_record(QuantConfig())
    assert manifest["quantization"]["blocksize"] == 64 and manifest["quantization"]["nested_blocksize"] == 256
    assert manifest["base"]["fingerprint"] == base.fingerprint
    assert set(manifest["versions"]) == {"qlora_kit", "torch", "bitsandbytes", "transformers"}
    assert manifest["step"] == 7
    # Layer-restricted targets are saved as an exact regex so PEFT wraps only those layers.
    target = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(target, str) and "model\\.layers\\.1\\.mlp\\.up_proj" in target
    fresh, _, fresh_base = load_base(str(tiny_llama_dir))
    load_adapter(fresh, tmp_path / "a", base=fresh_base)
    assert torch.equal(logits(fresh, tokenizer), logits(model, tokenizer))


def test_adapter_for_another_base_is_refused_unless_forced(tmp_path, tiny_llama_dir):
    model, _, base = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "a", base=base)
    other = write_random_checkpoint(tmp_path / "other", tiny_llama_config(), seed=99, tokenizer_from=tiny_llama_dir)
    other_model, _, other_base = load_base(str(other))
    with pytest.raises(QLoRAKitError, match="was trained on base"):
        load_adapter(other_model, tmp_path / "a", base=other_base)
    with pytest.warns(UserWarning, match="was trained on base"):
        load_adapter(other_model, tmp_path / "a", base=other_base, strict_base=False)


def test_different_quantization_warns(tmp_path, tiny_llama_dir):
    model, _, base = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "a", base=base)
    fp4, _, fp4_base = load_base(str(tiny_llama_dir), QuantConfig(quant_type="fp4"))
    with pytest.warns(UserWarning, match="quant_type"):
        load_adapter(fp4, tmp_path / "a", base=fp4_base)


def test_shape_mismatch_and_missing_files_are_clear(tmp_path, tiny_llama_dir):
    model, _, _ = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / MANIFEST_FILE).unlink()  # a plain PEFT folder: no fingerprint to compare
    wider = write_random_checkpoint(tmp_path / "wide", tiny_llama_config(intermediate_size=256),
                                    tokenizer_from=tiny_llama_dir)
    with pytest.raises(QLoRAKitError, match="shape"):
        load_adapter(load_base(str(wider))[0], tmp_path / "a")
    with pytest.raises(QLoRAKitError, match="adapter or run folder not found"):
        load_adapter(load_base(str(tiny_llama_dir))[0], tmp_path / "missing")


def test_saving_over_an_adapter_replaces_it_whole(tmp_path, tiny_llama_dir):
    model, _, _ = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "a", extra={"step": 1})
    save_adapter(trained_looking(model), tmp_path / "a", extra={"step": 2})
    assert json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp or old folders left


def test_a_model_wrapped_by_hand_saves_without_a_base_record(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from qlora_kit.adapter_io import AdapterRecord

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # not loaded by qlora_kit
    apply_lora(model, LoRAConfig(rank=2, alpha=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    record = AdapterRecord.read(tmp_path / "a")
    assert record.lora_config().rank == 2 and record.lora_config().scaling == 2.0
    assert record.manifest["base"]["fingerprint"] is None and record.run is None


def test_adapter_names_a_base_peft_can_load(tmp_path, smollm2_dir):
    """The packaged model's name means nothing to PEFT; the converted folder does."""
    from peft import AutoPeftModelForCausalLM

    model, _, base = load_base("smollm2-135m-instruct")
    apply_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a", base=base)
    named = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(smollm2_dir.resolve())
    assert AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a") is not None


def test_garbage_manifest_is_a_clear_error(tmp_path, tiny_llama_dir):
    model, _, base = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a", base=base)
    (tmp_path / "a" / MANIFEST_FILE).write_text("{not json")
    fresh, _, fresh_base = load_base(str(tiny_llama_dir))
    with pytest.raises(QLoRAKitError, match="qlora_kit.json is not valid JSON"):
        load_adapter(fresh, tmp_path / "a", base=fresh_base)


def test_an_adapter_on_a_gguf_base_records_the_gguf_file(tmp_path, smollm2_dir):
    model, _, base = load_base("smollm2-135m-instruct")
    apply_lora(model, LoRAConfig(rank=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a", base=base)
    recorded = json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())["base"]["gguf"]
    assert recorded["gguf_file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and len(recorded["gguf_sha256"]) == 64
    assert recorded["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
