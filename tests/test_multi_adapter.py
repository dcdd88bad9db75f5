"""Several named adapters on one 4-bit base: switching, disabling, per-row batches, and the checks."""

from __future__ import annotations

import pytest
import torch

from qlora_kit import LoRAConfig, QLoRAKitError, apply_lora, load_adapter, load_base, save_adapter
from qlora_kit.adapter_io import load_adapter_weights
from qlora_kit.lora import (active_adapter, adapter_names, adapters_per_row, lora_layers, set_active_adapter,
                            set_adapters_enabled, wrapped_layers)
from qlora_kit.quantization import is_4bit_linear
from tests.factories import tiny_llama_config, write_random_checkpoint

# Two adapters that differ in every way a layer's update can: rank, alpha, rsLoRA, which layers.
CONFIGS = {
    "a": LoRAConfig(rank=4, alpha=8, dropout=0.0),  # all-linear, scaling 2
    "b": LoRAConfig(rank=2, alpha=16, dropout=0.0, use_rslora=True, target_modules=["q_proj", "v_proj"]),  # 16/sqrt(2)
}
ROWS = torch.randint(5, 1000, (3, 12), generator=torch.Generator().manual_seed(1))


def make_adapter(folder, base_dir, cfg, seed):
    model, _, info = load_base(str(base_dir))
    torch.manual_seed(seed)
    apply_lora(model, cfg)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(std=0.05)
    return save_adapter(model, folder, base=info)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, tiny_llama_dir, cfg, seed) for seed, (name, cfg) in
            enumerate(CONFIGS.items())}


def logits(model, ids=ROWS, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float()


def alone(base_dir, adapter=None):
    """The reference: a fresh base with just this adapter (or none)."""
    model, _, info = load_base(str(base_dir))
    if adapter is not None:
        load_adapter(model, adapter, base=info)
    return model


@pytest.fixture(scope="module")
def single(adapters, tiny_llama_dir):
    """The references, loaded once: {None: the base alone, "a": base + a alone, "b": base + b alone}."""
    return {name: alone(tiny_llama_dir, adapters.get(name)) for name in (None, "a", "b")}


@pytest.fixture(scope="module")
def both(adapters, tiny_llama_dir):
    """One base holding adapters a and b (a active)."""
    model, _, info = load_base(str(tiny_llama_dir))
    load_adapter(model, adapters["a"], adapter_name="a", base=info)
    load_adapter(model, adapters["b"], adapter_name="b", base=info)
    return model


def test_switching_adapters_keeps_the_base_and_follows_each_adapters_config(both, single):
    model = both
    assert adapter_names(model) == ["a", "b"] and active_adapter(model) == "a"
    packed = [m.weight for m in model.modules() if is_4bit_linear(m)]
    expected = {name: logits(reference) for name, reference in single.items()}
    torch.testing.assert_close(logits(model), expected["a"], atol=0, rtol=0)
    set_active_adapter(model, "b")
    torch.testing.assert_close(logits(model), expected["b"], atol=0, rtol=0)
    assert {layer.scaling for _, layer in lora_layers(model)} == {CONFIGS["b"].scaling}  # 16 / sqrt(2) everywhere
    assert len(list(lora_layers(model))) == 4 and len(list(wrapped_layers(model))) == 14  # b: q, v of 2 layers
    set_adapters_enabled(model, False)
    torch.testing.assert_close(logits(model), expected[None], atol=0, rtol=0)
    set_adapters_enabled(model, True)
    set_active_adapter(model, "a")
    torch.testing.assert_close(logits(model), expected["a"], atol=0, rtol=0)
    assert [m.weight for m in model.modules() if is_4bit_linear(m)] == packed  # never reloaded


def test_a_mixed_batch_runs_each_row_with_its_own_adapter(both, single):
    names = ["b", None, "a"]
    mixed = logits(both, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], logits(single[name], ROWS[row:row + 1])[0], atol=2e-2, rtol=0)
    assert all(layer.rows is None for _, layer in wrapped_layers(both))  # the routing ends with the call
    torch.testing.assert_close(logits(both, adapter_names=["__base__"] * 3), logits(single[None]), atol=2e-2, rtol=0)


def test_generation_with_an_adapter_per_row(both, single):
    with adapters_per_row(both, ["a", "b"]):
        out = both.generate(ROWS[:2], max_new_tokens=4, do_sample=False)
    for row, name in enumerate(["a", "b"]):
        assert torch.equal(out[row], single[name].generate(ROWS[row:row + 1], max_new_tokens=4, do_sample=False)[0])


def test_unknown_names_list_the_loaded_ones(both):
    with pytest.raises(QLoRAKitError, match="no adapter named 'c' is loaded; loaded: a, b"):
        set_active_adapter(both, "c")
    with pytest.raises(QLoRAKitError, match="not loaded: c; loaded: a, b"):
        logits(both, adapter_names=["a", "c", None])
    assert all(layer.rows is None for _, layer in wrapped_layers(both))


def test_a_second_adapter_needs_a_name_of_its_own(adapters, tiny_llama_dir):
    model, _, info = load_base(str(tiny_llama_dir))
    load_adapter(model, adapters["a"], base=info)
    with pytest.raises(QLoRAKitError, match="already has adapter\\(s\\) default; give adapter .* a name"):
        load_adapter(model, adapters["b"], base=info)
    with pytest.raises(QLoRAKitError, match="an adapter named 'default' is already loaded"):
        load_adapter(model, adapters["b"], adapter_name="default", base=info)


def test_adapters_of_different_bases_are_refused_with_their_fingerprints(tmp_path, adapters, tiny_llama_dir):
    other = write_random_checkpoint(tmp_path / "other", tiny_llama_config(), seed=99, tokenizer_from=tiny_llama_dir)
    foreign = make_adapter(tmp_path / "foreign", other, CONFIGS["b"], seed=3)
    model, _, info = load_base(str(tiny_llama_dir))
    load_adapter(model, adapters["a"], adapter_name="a", base=info)
    ours = load_base(str(tiny_llama_dir))[2].fingerprint
    theirs = load_base(str(other))[2].fingerprint
    # Without the base to compare with, the adapters are compared with each other.
    with pytest.raises(QLoRAKitError, match=f"fingerprint {theirs[:32]}.*'a': {ours[:32]}"):
        load_adapter(model, foreign, adapter_name="foreign")
    with pytest.raises(QLoRAKitError, match="was trained on a different base"):
        load_adapter(model, foreign, adapter_name="foreign", base=info)
    assert adapter_names(model) == ["a"]


def test_loading_weights_in_place_takes_the_new_adapters_scaling(tmp_path, adapters, tiny_llama_dir):
    same_shape = make_adapter(tmp_path / "a32", tiny_llama_dir, LoRAConfig(rank=4, alpha=32, dropout=0.1), seed=7)
    model = alone(tiny_llama_dir, adapters["a"])
    load_adapter_weights(model, same_shape)
    assert {(layer.scaling, layer.config.dropout) for _, layer in lora_layers(model)} == {(8.0, 0.1)}
    torch.testing.assert_close(logits(model), logits(alone(tiny_llama_dir, same_shape)), atol=0, rtol=0)


def test_saving_writes_the_active_adapter(tmp_path, both, single, tiny_llama_dir):
    set_active_adapter(both, "b")
    try:
        save_adapter(both, tmp_path / "b-again")
    finally:
        set_active_adapter(both, "a")
    torch.testing.assert_close(logits(alone(tiny_llama_dir, tmp_path / "b-again")), logits(single["b"]), atol=0, rtol=0)
