"""Tiled MLP (train.mlp_chunk_tokens): the same gradients as the whole-sequence MLP, less memory."""

from __future__ import annotations

import pytest
import torch

from qlora_kit import load_base
from qlora_kit import tiling
from qlora_kit.lora import apply_lora, trainable_parameters
from qlora_kit.losses import SupervisedLoss
from qlora_kit.settings import LoRAConfig, ModelConfig
from qlora_kit.training import enable_checkpointing

IDS = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}


def lora_model(base_dir, dropout: float, checkpointing: bool):
    model, _, _ = load_base(ModelConfig(base=str(base_dir), device="cpu"))
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=dropout))
    for p in trainable_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    return model


def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss_sum, n = SupervisedLoss(model)(BATCH)
    (loss_sum / n).backward()
    return (loss_sum / n).detach(), [p.grad.clone() for p in trainable_parameters(model)]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_tiled_mlp_gives_the_whole_sequence_gradients(tiny_llama_dir, checkpointing):
    model = lora_model(tiny_llama_dir, dropout=0.0, checkpointing=checkpointing)
    loss, grads = loss_and_grads(model)
    assert tiling.tile_mlps(model, 16) == model.config.num_hidden_layers  # 40 tokens: slices of 16, 16, 8
    tiled_loss, tiled_grads = loss_and_grads(model)
    torch.testing.assert_close(tiled_loss, loss)
    for a, b in zip(grads, tiled_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_recomputed_slices_replay_their_dropout(tiny_llama_dir, monkeypatch):
    """With LoRA dropout each slice draws its own mask; backward's recompute must draw the same one."""
    model = lora_model(tiny_llama_dir, dropout=0.3, checkpointing=True)
    tiling.tile_mlps(model, 16)
    tiled_loss, tiled_grads = loss_and_grads(model)
    # The reference: the same slices kept whole for backward (no recompute), so no replay is involved.
    monkeypatch.setattr(tiling, "checkpoint", lambda fn, x, use_reentrant: fn(x))
    kept_loss, kept_grads = loss_and_grads(model)
    torch.testing.assert_close(tiled_loss, kept_loss)
    for a, b in zip(kept_grads, tiled_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in tiled_grads)


def test_inference_and_short_sequences_are_not_tiled(tiny_llama_dir, monkeypatch):
    model = lora_model(tiny_llama_dir, dropout=0.0, checkpointing=False)
    tiling.tile_mlps(model, 16)
    tiling.tile_mlps(model, 16)  # idempotent
    calls = []
    monkeypatch.setattr(tiling, "checkpoint", lambda fn, x, use_reentrant: calls.append(x.shape) or fn(x))
    with torch.no_grad():
        model(input_ids=IDS)
    model(input_ids=IDS[:, :16])
    assert calls == []
    model(input_ids=IDS)
    h = model.config.hidden_size
    assert calls == [(2, 16, h), (2, 16, h), (2, 8, h)] * model.config.num_hidden_layers
