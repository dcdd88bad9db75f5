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


def tensor_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_an_extra_adapter_costs_only_its_own_weights(adapters, tiny_llama_dir):
    from qlora_kit.adapter_io import AdapterRecord

    model, _, info = load_base(str(tiny_llama_dir))
    load_adapter(model, adapters["a"], adapter_name="a", base=info)
    one = tensor_bytes(model)
    load_adapter(model, adapters["b"], adapter_name="b", base=info)
    b_weights = AdapterRecord.read(adapters["b"]).weights()
    # b's tensors in the dtype the layers keep them in (the base's compute dtype here), nothing more
    dtype = next(layer.adapters["b"].lora_A.weight.dtype for _, layer in wrapped_layers(model) if "b" in layer.adapters)
    expected = sum(t.numel() for t in b_weights.values()) * torch.empty((), dtype=dtype).element_size()
    assert tensor_bytes(model) - one == expected


# ---------------------------------------------------------------- the command line: --adapter NAME=PATH, per prompt

PROMPTS = ["What is a permit?", "Say hello.", "Count to three."]


@pytest.fixture(scope="module")
def alone_replies(adapters, tiny_llama_dir):
    """Each prompt answered by each adapter loaded alone, and by the base alone (the references)."""
    from qlora_kit.generation import load_model
    from qlora_kit.settings import GenerationOptions

    settings = GenerationOptions(max_new_tokens=6)
    replies = {}
    for name in ("a", "b", None):
        source = dict(adapter=adapters[name]) if name else dict(base=str(tiny_llama_dir))
        loaded = load_model(**source, settings=settings)
        replies[name] = [loaded.generate(p) for p in PROMPTS]
    return replies


def test_generate_answers_a_prompts_file_each_row_with_its_adapter(tmp_path, adapters, alone_replies, capsys):
    import json

    from qlora_kit.cli import main

    rows = [{"prompt": PROMPTS[0], "adapter": "b"}, {"prompt": PROMPTS[1], "adapter": None},
            {"prompt": PROMPTS[2], "adapter": "a"}, {"prompt": PROMPTS[0]}]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["generate", "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
                 "--prompts", str(file), "--max-new-tokens", "6", "--batch-size", "3"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = [alone_replies["b"][0], alone_replies[None][1], alone_replies["a"][2], alone_replies[None][0]]
    assert [o["reply"] for o in out] == expected
    assert [o["adapter"] for o in out] == ["b", None, "a", None]


def test_use_picks_the_adapter_that_answers(adapters, alone_replies, capsys):
    from qlora_kit.cli import main

    both_flags = ["--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}", "--max-new-tokens", "6"]
    for use, expected in (("b", alone_replies["b"][1]), ("base", alone_replies[None][1]), (None, alone_replies["a"][1])):
        assert main(["generate", *both_flags, "--prompt", PROMPTS[1]] + (["--use", use] if use else [])) == 0
        assert capsys.readouterr().out.strip() == expected.strip()


def test_chat_switches_adapters_with_use(adapters, alone_replies, monkeypatch, capsys):
    import io
    import sys

    from qlora_kit.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/use b\n{PROMPTS[1]}\n/use nobody\n/reset\n/use base\n{PROMPTS[1]}\n"))
    assert main(["chat", "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
                 "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert [line.strip() for line in captured.out.splitlines()] == [alone_replies["b"][1].strip(),
                                                                    alone_replies[None][1].strip()]
    assert "answering with b" in captured.err and "no adapter named 'nobody' is loaded; loaded: a, b" in captured.err


def test_adapter_name_mistakes_are_reported_before_generating(tmp_path, adapters, capsys):
    from qlora_kit.cli import main

    both_flags = ["--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}"]
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "hi", "adapter": "c"}\n')
    assert main(["generate", *both_flags, "--prompts", str(file)]) == 2
    assert "no adapter named 'c' is loaded; loaded: a, b (or 'base' for the base alone)" in capsys.readouterr().err
    file.write_text('{"prompt": "", "adpter": "a"}\n')
    assert main(["generate", *both_flags, "--prompts", str(file)]) == 2
    err = capsys.readouterr().err
    assert "row 1: unknown key(s) adpter" in err and "row 1: 'prompt' must be a non-empty string" in err
    assert main(["generate", *both_flags, "--prompt", "hi", "--use", "c"]) == 2
    assert "loaded: a, b" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapters["a"]), "--adapter", str(adapters["a"]), "--prompt", "x"]) == 2
    assert "two adapters are named 'a'; name them: --adapter NAME=PATH" in capsys.readouterr().err
    assert main(["eval", *both_flags]) == 2
    assert "this command takes one adapter (2 given)" in capsys.readouterr().err


def test_chat_refuses_to_switch_to_an_adapter_prompted_without_a_chat_template(adapters, capsys):
    from qlora_kit.cli import _switch_adapter
    from qlora_kit.generation import PromptFormat, load_model

    loaded = load_model(adapter={"a": adapters["a"], "b": adapters["b"]})
    loaded.adapters["b"].format = PromptFormat("alpaca")  # as for a run trained on Alpaca prompts
    _switch_adapter(loaded, ["b"])
    assert loaded.active == "a" and active_adapter(loaded.model) == "a"
    assert "b is prompted in the 'alpaca' style" in capsys.readouterr().err
