"""LoRALinear against its formula, target selection, and what is trainable."""

import math

import pytest
import torch
from torch import nn

from qlora_kit import LoRAConfig, LoRALinear, QLoRAKitError, apply_lora, load_base
from qlora_kit.lora import lora_layers, parameter_counts, select_targets


def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, LoRAConfig(rank=3, alpha=6.0, dropout=0.0))
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 12)
    expected = base(x) + (6.0 / 3) * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B.weight @ layer.lora_A.weight)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_update_added_inside_the_matmul_under_autocast_is_as_accurate_as_a_separate_add(dropout):
    """Training's path (autocast): out + s·(xAᵀ)Bᵀ in one addmm. Against the same layer in fp32,
    its output and gradients err no more than the update computed alone and then added."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(48, 40), LoRAConfig(rank=4, alpha=16.0, dropout=dropout))
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 5, 48)
    update = layer.adapters[layer.active]

    def run(path: str):
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same dropout mask every way
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path != "fp32"):
            out = layer.base(xg)
            y = update.add_to(out, xg, layer.base) if path == "addmm" else out + update(xg, layer.base, out)
        y.float().square().sum().backward()
        return [t.detach().float() for t in (y, xg.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)]

    exact, fused, separate = run("fp32"), run("addmm"), run("separate")
    assert update.add_to(layer.base(x), x, layer.base).dtype == torch.float32  # no autocast: the plain path
    for e, f, s in zip(exact, fused, separate):
        fused_err, separate_err = (f - e).norm() / e.norm(), (s - e).norm() / e.norm()
        assert fused_err < 2e-2 and fused_err <= 1.5 * separate_err


def test_rslora_scaling_and_initialisation():
    layer = LoRALinear(nn.Linear(64, 32), LoRAConfig(rank=16, alpha=8.0, dropout=0.0, use_rslora=True))
    assert layer.scaling == pytest.approx(8.0 / math.sqrt(16))
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.std() > bound / 4


def test_wrapped_4bit_model_starts_identical_to_its_base(smollm2_dir):
    model, tokenizer, _ = load_base(str(smollm2_dir))
    ids = tokenizer("Fine-tuning starts from the base model.", return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
    apply_lora(model, LoRAConfig(rank=8))
    with torch.no_grad():
        after = model(**ids).logits
    assert torch.equal(before, after)
    counts = parameter_counts(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # all-linear on SmolLM2: 30 layers x (q,k,v,o,gate,up,down), never the LM head
    assert len(list(lora_layers(model))) == 30 * 7
    assert not isinstance(model.lm_head, LoRALinear)
    # rank * (in + out) per layer: q 576+576, k 576+192, v 576+192, o 576+576, gate/up 576+1536, down 1536+576
    assert counts["trainable"] == 30 * 8 * (1152 + 768 + 768 + 1152 + 3 * 2112)
    # embeddings 49152*576 + 30 layers * 3,540,096 + final norm 576, counted by value not bytes
    assert counts["total"] - counts["trainable"] == 134_515_008


def test_target_patterns(tiny_llama_dir):
    model, _, _ = load_base(str(tiny_llama_dir))
    assert select_targets(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert select_targets(model, ["model.layers.1.mlp.*"]) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
    ]
    assert "lm_head" not in select_targets(model, ["all-linear"])


def test_wrong_target_name_lists_the_real_ones(tiny_llama_dir):
    model, _, _ = load_base(str(tiny_llama_dir))
    with pytest.raises(QLoRAKitError, match=r"\['qproj'\] match no linear layer.*q_proj"):
        apply_lora(model, LoRAConfig(target_modules=["qproj"]))


def test_only_adapters_train_and_gradients_reach_them(tiny_llama_dir):
    model, tokenizer, _ = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0))
    model.train()
    ids = tokenizer("gradient check", return_tensors="pt")
    model(**ids, labels=ids["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    # B starts at zero, so only B gets a gradient on the first step (dL/dA = B^T ... = 0).
    layer = dict(lora_layers(model))["model.layers.0.mlp.down_proj"]
    assert layer.lora_B.weight.grad.abs().sum() > 0
    assert layer.lora_A.weight.grad.abs().sum() == 0
