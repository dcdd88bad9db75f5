"""The fused 4-bit + LoRA path against the unfused one (bitsandbytes' Linear4bit + two nn.Linear)."""

import contextlib

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qlora_kit import LoRAConfig, LoRALinear, QuantConfig, apply_lora, load_base
from qlora_kit import fused, quantization
from qlora_kit.lora import lora_layers, trainable_parameters
from qlora_kit.training import enable_checkpointing


@contextlib.contextmanager
def fused_path(enabled: bool):
    saved, fused.ENABLED = fused.ENABLED, enabled
    try:
        yield
    finally:
        fused.ENABLED = saved


def unfused():
    return fused_path(False)


@pytest.fixture(autouse=True)
def fused_on():
    with fused_path(True):
        yield


def four_bit_layer(source: nn.Module) -> nn.Module:
    """A Linear4bit quantized from `source` (an nn.Linear, or a Conv1D whose weight is (in, out))."""
    module = quantization.empty_linear4bit(source, QuantConfig())
    weight = source.weight.T if isinstance(source, Conv1D) else source.weight
    quantization.quantize_into(module, weight.detach().to(torch.bfloat16), torch.device("cpu"))
    if source.bias is not None:
        module.bias = nn.Parameter(source.bias.detach().to(torch.bfloat16), requires_grad=False)
    return module


def run(layer: LoRALinear, x: torch.Tensor, autocast: bool, seed: int = 0):
    """Output and the gradients of x, A and B for a fixed random output gradient."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    out.backward(torch.randn_like(out, dtype=torch.float32).to(out.dtype))
    grads = (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


def close(a, b, scale):
    # bf16 results: the two paths round the same products in a different order.
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("source_cls", [nn.Linear, Conv1D])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_layer_matches_unfused(source_cls, autocast, dropout):
    torch.manual_seed(0)
    source = nn.Linear(128, 192) if source_cls is nn.Linear else Conv1D(192, 128)
    layer = LoRALinear(four_bit_layer(source), LoRAConfig(rank=8, alpha=16.0, dropout=dropout))
    layer.train()
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 16, 128, dtype=torch.bfloat16)
    assert fused.applies(layer.base, layer.adapters[layer.active])
    out, grads = run(layer, x, autocast)
    with unfused():
        ref_out, ref_grads = run(layer, x, autocast)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    close(out, ref_out, ref_out.abs().max())
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        close(got, want, want.abs().max())


def test_cached_absmax_dequantizes_bit_identically_and_stays_out_of_the_state_dict():
    torch.manual_seed(0)
    module = four_bit_layer(nn.Linear(256, 384, bias=False))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    absmax = quantization.cached_absmax(module)
    assert quantization.cached_absmax(module) is absmax  # kept, not recomputed
    weight = quantization.dequantize_with(module, absmax, torch.bfloat16)
    assert torch.equal(weight, quantization.dequantize_weight(module))  # bitsandbytes' nested path
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model = nn.Sequential(module)
    assert quantization.absmax_cache_bytes(model) == 384 * 256 // 64 * 4
    assert quantization.quantized_bytes(model) == 384 * 256 // 2 + sum(
        t.numel() * t.element_size() for t in module.weight.quant_state.as_dict(packed=True).values()
        if isinstance(t, torch.Tensor))


def test_cached_absmax_follows_a_replaced_state():
    torch.manual_seed(0)
    module = four_bit_layer(nn.Linear(128, 64, bias=False))
    first = quantization.cached_absmax(module)
    quantization.quantize_into(module, torch.randn(64, 128, dtype=torch.bfloat16), torch.device("cpu"))
    second = quantization.cached_absmax(module)
    assert not torch.equal(first, second)
    assert torch.equal(quantization.dequantize_with(module, second, torch.bfloat16),
                       quantization.dequantize_weight(module))


def train_steps(folder, steps=2, **lora):
    torch.manual_seed(0)
    model, tokenizer, _ = load_base(str(folder))
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0, **lora))
    enable_checkpointing(model)
    model.train()
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.02)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    ids = tokenizer(["a fused step through every layer", "and a second row of text"], return_tensors="pt",
                    padding=True)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**ids, labels=ids["input_ids"]).loss
        loss.backward()
        grads = [p.grad.clone() for p in trainable_parameters(model)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


def test_checkpointed_training_steps_match_unfused(tiny_llama_dir):
    losses, grads = train_steps(tiny_llama_dir)
    with unfused():
        ref_losses, ref_grads = train_steps(tiny_llama_dir)
    assert losses == pytest.approx(ref_losses, rel=1e-2)
    for got, want in zip(grads, ref_grads):  # bf16 noise through a whole model: compare as vectors
        assert (got - want).norm() <= 0.03 * want.norm()


def test_dora_and_per_row_adapters_take_the_unfused_path(tiny_llama_dir):
    model, _, _ = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4, use_dora=True))
    layer = next(layer for _, layer in lora_layers(model))
    assert not fused.applies(layer.base, layer.adapters[layer.active])
    plain = LoRALinear(four_bit_layer(nn.Linear(64, 64)), LoRAConfig(rank=4))
    nn.init.normal_(plain.lora_B.weight)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    plain.eval()
    with torch.no_grad():
        whole = plain(x)  # fused
        plain.rows = [("default", torch.tensor([0])), ("__base__", torch.tensor([1]))]  # per-row routing
        routed = plain(x)  # unfused, row by row
    close(routed[0], whole[0], whole.abs().max())
    assert torch.equal(routed[1], plain.base(x)[1])
    assert not torch.allclose(routed[1].float(), whole[1].float())
