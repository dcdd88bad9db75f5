"""The fused, chunked supervised loss against transformers' own loss and autograd."""

import pytest
import torch
from torch import nn

from qlora_kit import LoRAConfig, apply_lora, load_base
from qlora_kit.losses import fused_linear_cross_entropy, supervised_loss_sum
from qlora_kit.lora import lora_layers


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_and_gradient_match_plain_cross_entropy(softcap, dtype):
    torch.manual_seed(0)
    head = nn.Linear(16, 300, bias=False).to(dtype).requires_grad_(False)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    ours = fused_linear_cross_entropy(hidden, head, targets, chunk_rows=8, softcap=softcap)
    (grad_ours,) = torch.autograd.grad(ours * 0.5, hidden)

    logits = (hidden @ head.weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = nn.functional.cross_entropy(logits, targets, reduction="sum")
    (grad_ref,) = torch.autograd.grad(reference * 0.5, hidden)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, reference, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_ours.float(), grad_ref.float(), rtol=tol, atol=tol)


def test_supervised_loss_equals_transformers_loss_and_gradients(tiny_llama_dir):
    model, tokenizer, _ = load_base(str(tiny_llama_dir))
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0))
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    ids = tokenizer(["the first example is longer than", "short one"], return_tensors="pt", padding=True)
    labels = ids["input_ids"].clone()
    labels[ids["attention_mask"] == 0] = -100
    labels[:, :2] = -100  # an unsupervised prompt
    batch = {**ids, "labels": labels}

    loss_sum, count = supervised_loss_sum(model, batch, chunk_rows=3)
    assert count == int((labels[:, 1:] != -100).sum())
    (loss_sum / count).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    reference = model(**batch).loss  # transformers: mean CE over the same shifted targets
    reference.backward()
    torch.testing.assert_close(loss_sum / count, reference.float(), rtol=1e-2, atol=1e-2)
    for name, grad in ours.items():
        ref = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(grad, ref, rtol=5e-2, atol=1e-4), name


def test_the_training_default_chunk_is_the_loss_modules():
    """settings.py imports no torch, so it repeats the number; this keeps the two equal."""
    from qlora_kit.losses import CHUNK_ROWS
    from qlora_kit.settings import TrainConfig

    assert TrainConfig().loss_chunk_tokens == CHUNK_ROWS
