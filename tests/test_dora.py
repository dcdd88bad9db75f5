"""DoRA (weight-decomposed LoRA): the layer against its formula, PEFT both ways, merge and verification."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from qlora_kit import LoRAConfig, LoRALinear, QLoRAKitError, apply_lora, load_adapter, load_base, save_adapter
from qlora_kit.export import merge
from qlora_kit.lora import lora_layers, trainable_parameters
from tests.test_adapter_io import logits, transformers_4bit


def test_layer_computes_magnitude_times_normalised_direction():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, LoRAConfig(rank=3, alpha=6.0, dropout=0.0, use_dora=True))
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x), base(x))  # m starts at ||W||: a fresh layer is its base
    nn.init.normal_(layer.lora_B.weight)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.3)
    direction = base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # W + s·BA
    expected = layer.lora_magnitude_vector[:, None] * direction / direction.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ expected.T + base.bias)


def test_magnitude_is_trained_and_the_norm_is_a_constant(tiny_llama_dir):
    model, tokenizer, _ = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.1, target_modules=["q_proj"], use_dora=True))
    params = trainable_parameters(model)
    assert len(params) == 3 * 2  # A, B and the magnitude on each of the 2 q_proj layers
    model.train()
    ids = tokenizer("DoRA trains a magnitude per row.", return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    for _, layer in lora_layers(model):
        assert layer.lora_magnitude_vector.grad is not None and layer.lora_magnitude_vector.grad.abs().sum() > 0


def _trained_dora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude_vector.shape, generator=gen))
    return model


def test_our_dora_adapter_loads_into_peft_with_the_same_logits(tmp_path, tiny_llama_dir):
    model, tokenizer, base = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "down_proj"], use_dora=True))
    _trained_dora(model).eval()
    save_adapter(model, tmp_path / "adapter", base=base)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = PeftModel.from_pretrained(transformers_4bit(tiny_llama_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, tokenizer), logits(model, tokenizer), atol=1e-2, rtol=0)


def test_peft_dora_adapter_loads_into_qlora_kit_with_the_same_logits(tmp_path, tiny_llama_dir):
    peft_model = get_peft_model(transformers_4bit(tiny_llama_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], lora_dropout=0.0,
                                           use_dora=True, task_type="CAUSAL_LM"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    peft_model.eval().save_pretrained(tmp_path / "peft-dora")
    model, tokenizer, _ = load_base(str(tiny_llama_dir))
    load_adapter(model, tmp_path / "peft-dora")
    model.eval()
    assert all(layer.config.use_dora for _, layer in lora_layers(model))
    torch.testing.assert_close(logits(model, tokenizer), logits(peft_model, tokenizer), atol=1e-2, rtol=0)


def test_dora_merges_and_verifies(tmp_path, tiny_llama_dir):
    model, _, base = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, use_dora=True))
    save_adapter(_trained_dora(model), tmp_path / "adapter", base=base)
    result = merge(tmp_path / "adapter", tmp_path / "merged", dtype="float32", verify=1, progress=False)
    assert result.verification["passed"] and result.verification["metrics"]["top1_agreement"] == 1.0

    from qlora_kit.gguf_export import export_gguf_lora

    with pytest.raises(QLoRAKitError, match="DoRA adapter"):
        export_gguf_lora(tmp_path / "adapter", tmp_path / "lora.gguf")
