"""The short-backward RMSNorm: transformers' forward bit for bit, its gradient to within rounding."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from qlora_kit import load_base, norms
from qlora_kit.lora import apply_lora, trainable_parameters
from qlora_kit.losses import SupervisedLoss
from qlora_kit.settings import LoRAConfig, ModelConfig, TrainConfig
from qlora_kit.training import prepare_layers

HIDDEN = 96


def norm_with_weights(cls, dtype, seed=0):
    norm = cls(HIDDEN, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)))
    norm.weight.requires_grad_(False)
    return norm


def inputs(dtype, seed=1):
    x = (torch.randn(4, 33, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)
    return x.requires_grad_()


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_forward_is_transformers_bit_for_bit(x_dtype, w_dtype):
    """(bf16 input, fp32 weight) is what PEFT's prepare_model_for_kbit_training leaves: the output is fp32."""
    norm = norm_with_weights(LlamaRMSNorm, w_dtype)
    x = inputs(x_dtype)
    ours, theirs = norms.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_input_gradient_is_as_accurate_as_autograds(dtype):
    """Against the float64 gradient, ours errs no more than autograd's chain of ops does."""
    norm = norm_with_weights(LlamaRMSNorm, dtype)
    grad_out = torch.randn(4, 33, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)

    def input_grad(fn, x):
        fn(x).backward(grad_out)
        return x.grad

    x = inputs(dtype)
    ours = input_grad(lambda t: norms.rms_norm(t, norm.weight, norm.variance_epsilon), x.detach().clone().requires_grad_())
    theirs = input_grad(norm, x.detach().clone().requires_grad_())
    xd = x.detach().double().requires_grad_()  # the formula in float64 (transformers' class would upcast to fp32 only)
    (norm.weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).backward(
        grad_out.double())
    exact = xd.grad
    ours_err = (ours.double() - exact).abs().max().item()
    theirs_err = (theirs.double() - exact).abs().max().item()
    assert ours_err <= theirs_err * 1.1
    if dtype == torch.bfloat16:  # the fp32 arithmetic differs only below bf16's last bit, nearly always
        assert (ours == theirs).float().mean() > 0.99
    torch.testing.assert_close(ours, theirs)


def test_swaps_llama_style_norms_and_keeps_the_others():
    model = torch.nn.ModuleDict({
        "llama": norm_with_weights(LlamaRMSNorm, torch.bfloat16),
        "qwen2": norm_with_weights(Qwen2RMSNorm, torch.bfloat16),
        "gemma": GemmaRMSNorm(HIDDEN, eps=1e-6).to(torch.bfloat16),  # (1 + w): another formula
        "olmo2": norm_with_weights(Olmo2RMSNorm, torch.bfloat16),  # weight applied before the downcast
    })
    assert norms.fast_norms(model) == 2
    assert "forward" in vars(model["llama"]) and "forward" in vars(model["qwen2"])
    assert "forward" not in vars(model["gemma"]) and "forward" not in vars(model["olmo2"])
    assert norms.fast_norms(model) == 0  # never swapped twice


def test_a_trained_norm_weight_still_gets_its_gradient():
    norm = norm_with_weights(LlamaRMSNorm, torch.float32)
    norms.fast_norms(torch.nn.ModuleList([norm]))
    norm.weight.requires_grad_(True)
    norm(inputs(torch.float32)).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_training_step_gradients_match_the_transformers_norms(tiny_llama_dir):
    """A whole 4-bit + LoRA step under bf16 autocast: the adapters' gradients with and without the swap."""
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def grads(swap: bool):
        model, _, _ = load_base(ModelConfig(base=str(tiny_llama_dir), device="cpu"))
        torch.manual_seed(0)
        apply_lora(model, LoRAConfig(rank=4, alpha=8))
        for p in trainable_parameters(model):
            torch.nn.init.normal_(p, std=0.05)
        if swap:
            prepare_layers(model, TrainConfig(), "cpu")
        assert any("forward" in vars(m) for m in model.modules()) == swap
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum, n = SupervisedLoss(model)(batch)
        (loss_sum / n).backward()
        return (loss_sum / n).detach(), [p.grad for p in trainable_parameters(model)]

    loss, reference = grads(swap=False)
    fast_loss, fast = grads(swap=True)
    assert torch.equal(fast_loss, loss)  # the forward is unchanged
    for a, b in zip(reference, fast):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-4)  # bf16 rounding of the backward
