"""Regional compilation: each decoder layer compiled, the same gradients as eager, a clear fallback."""

import logging

import pytest
import torch

from qlora_kit import LoRAConfig, apply_lora, compilation, load_base
from qlora_kit.lora import lora_layers, trainable_parameters
from qlora_kit.training import enable_checkpointing


def lora_model(folder):
    torch.manual_seed(0)
    model, _, _ = load_base(str(folder))
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0))
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    enable_checkpointing(model)
    model.config.use_cache = False
    model.train()
    return model


def step(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in trainable_parameters(model)]
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_repeated_blocks_are_the_decoder_layers(tiny_llama_dir):
    model, _, _ = load_base(str(tiny_llama_dir))
    assert compilation.repeated_blocks(model) == list(model.model.layers)


def test_without_a_compiler_training_stays_eager_with_one_warning(tiny_llama_dir, monkeypatch, caplog):
    model = lora_model(tiny_llama_dir)
    keys = set(model.state_dict())
    monkeypatch.setattr(compilation.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert compilation.compile_layers(model) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "train.compile: no C++ compiler found (inductor needs one on the CPU: install g++, e.g. "
        "`apt-get install g++`); training without compilation"]
    assert set(model.state_dict()) == keys


@pytest.mark.slow  # compiling takes about a minute on 2 cores
def test_compiled_layers_train_like_eager_ones(tiny_llama_dir):
    if compilation.compiler_problem(torch.device("cpu")):
        pytest.skip("torch.compile does not work on this machine")
    model = lora_model(tiny_llama_dir)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    eager_loss, eager_grads = step(model, ids)
    keys = set(model.state_dict())
    assert compilation.compile_layers(model) == 2
    loss, grads = step(model, ids)
    assert set(model.state_dict()) == keys  # compiled in place: no _orig_mod. prefixes
    assert loss == pytest.approx(eager_loss, rel=1e-3)
    for got, want in zip(grads, eager_grads):
        assert (got - want).norm() <= 0.03 * want.norm()
