"""Every model family users fine-tune, checked against transformers, PEFT and bitsandbytes themselves.

Each family is a tiny random model (hidden 64, 2 layers, vocabulary 1000) written by
transformers' own `save_pretrained`, so the checkpoint has the names and layouts real
checkpoints of that family have (GPT-2's transposed Conv1D weights, GPT-NeoX's
`embed_out`, Mixtral's per-expert `block_sparse_moe.experts.N.w1`), not the names
our own synthetic writer would give it.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerFast

from qlora_kit import LoRAConfig, QLoRAKitError, apply_lora, load_adapter, load_base, save_adapter
from qlora_kit.lora import select_targets, trainable_parameters
from qlora_kit.quantization import guard_cpu_gradients, is_4bit_linear

_DECODER = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
FAMILIES = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "gemma2": dict(_DECODER, head_dim=16),
    "gpt2": dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, bos_token_id=0, eos_token_id=0),
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "falcon": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
                   eos_token_id=0),
}
# Mixtral's experts are stacked parameters, not linear layers: 'all-linear' is refused for it
# (see test_moe_all_linear_is_refused_with_the_reason), so it trains its attention.
TARGETS = {"mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"]}
# transformers' bitsandbytes integration quantizes exactly `nn.Linear` and Conv1D; Falcon's layers
# are `FalconLinear` (an nn.Linear subclass), which it leaves in 16 bits and qlora_kit quantizes.
# Adapters are compared with PEFT on the same base: for Falcon, the fp32 model.
UNQUANTIZED_BY_TRANSFORMERS = {"falcon"}
# Linear layers LoRA wraps (all-linear, or TARGETS): per layer 7 in Llama-likes, 4 in GPT-2/NeoX/Falcon.
WRAPPED = {family: 14 for family in FAMILIES} | {"gpt2": 8, "gpt_neox": 8, "mixtral": 8, "falcon": 8}
INPUT = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(0))


def write_family(folder, family):
    """A random `family` model saved by transformers, with a small byte-level BPE tokenizer."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **FAMILIES[family])
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["Every model family users fine-tune, loaded in four bits."], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> the family's folder, written once per test module."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = write_family(tmp_path_factory.mktemp(family), family)
        return made[family]

    return get


@pytest.fixture(scope="module")
def trained(checkpoint, tmp_path_factory):
    """trained(family) -> (adapter folder, losses, our logits on INPUT) after a few steps of training."""
    made = {}

    def get(family):
        if family not in made:
            model, _, base = load_base(str(checkpoint(family)))
            apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0,
                                         target_modules=TARGETS.get(family, ["all-linear"])))
            optimizer = torch.optim.AdamW(trainable_parameters(model), lr=2e-2)
            model.train()
            losses = []
            for _ in range(5):
                loss = model(input_ids=INPUT, labels=INPUT).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            model.eval()
            folder = save_adapter(model, tmp_path_factory.mktemp(f"{family}-adapter") / "adapter", base=base)
            made[family] = folder, losses, logits(model)
        return made[family]

    return get


def transformers_4bit(folder):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16,
                                                 device_map="cpu")
    guard_cpu_gradients(model)  # the same bitsandbytes CPU kernel path as ours
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_in_4bit_bit_identical_to_transformers(family, checkpoint):
    folder = checkpoint(family)
    ours, _, _ = load_base(str(folder))
    theirs = transformers_4bit(folder)
    mine = dict(ours.named_modules())
    quantized = [name for name, m in theirs.named_modules() if is_4bit_linear(m)]
    assert len(quantized) == (0 if family in UNQUANTIZED_BY_TRANSFORMERS else WRAPPED[family])
    for name in quantized:
        packed, reference = mine[name].weight, theirs.get_submodule(name).weight
        assert is_4bit_linear(mine[name]), name
        assert torch.equal(packed.data, reference.data), name
        for key, value in reference.quant_state.as_dict(packed=True).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(packed.quant_state.as_dict(packed=True)[key], value), (name, key)
    ours_params = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if not is_4bit_linear(theirs.get_submodule(name.rpartition(".")[0])) and not is_4bit_linear(
                ours.get_submodule(name.rpartition(".")[0])):
            assert torch.equal(ours_params[name], param), name  # embeddings, norms, experts, routers
    assert set(ours_params) == {n for n, _ in theirs.named_parameters()}
    if family not in UNQUANTIZED_BY_TRANSFORMERS:
        torch.testing.assert_close(logits(ours), logits(theirs), atol=0.02, rtol=0)


def test_gemma2_falls_back_to_an_attention_kernel_it_supports(checkpoint, caplog):
    """Gemma-2 refuses SDPA (the default setting); loading picks eager attention and says so."""
    with caplog.at_level(logging.INFO, logger="qlora_kit.loading"):
        model, _, _ = load_base(str(checkpoint("gemma2")))
    assert model.config._attn_implementation == "eager"
    assert "does not support attn_implementation='sdpa'; using 'eager'" in caplog.text


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in TARGETS])
def test_all_linear_wraps_exactly_what_peft_wraps(family, checkpoint):
    folder = checkpoint(family)
    ours = select_targets(load_base(str(folder))[0], ["all-linear"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2, target_modules="all-linear"))
    theirs = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert sorted(ours) == sorted(theirs) and ours


def test_moe_all_linear_is_refused_with_the_reason(checkpoint):
    model, _, _ = load_base(str(checkpoint("mixtral")))
    with pytest.raises(QLoRAKitError, match=r"cannot cover this mixtral model: its mixture-of-experts weights .*"
                                            r"experts.gate_up_proj \(4, 256, 64\).*target_modules=\[q_proj"):
        apply_lora(model, LoRAConfig(target_modules=["all-linear"]))
    apply_lora(model, LoRAConfig(target_modules=TARGETS["mixtral"]))  # named linear layers are fine
    assert len(trainable_parameters(model)) == 2 * 4 * 2


def test_gpt2_conv1d_layers_are_named_and_wrapped(checkpoint):
    model, _, _ = load_base(str(checkpoint("gpt2")))
    assert select_targets(model, ["c_attn"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(QLoRAKitError, match="Linear layers here: c_attn, c_fc, c_proj"):
        select_targets(model, ["q_proj"])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_reduce_the_loss_and_peft_reads_the_adapter(family, checkpoint, trained):
    folder = checkpoint(family)
    adapter, losses, ours = trained(family)
    assert losses[-1] < losses[0] - 0.2, losses
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (family == "gpt2")  # as PEFT writes it for Conv1D layers
    if family in UNQUANTIZED_BY_TRANSFORMERS:
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        load_adapter(ours, adapter)
        ours, base = logits(ours), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        base = transformers_4bit(folder)
    without = logits(base)
    theirs = logits(PeftModel.from_pretrained(base, adapter))
    assert (theirs - without).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(theirs, ours, atol=1e-2, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_loads_in_plain_transformers(family, trained, tmp_path):
    from qlora_kit.export import merge

    adapter, _, ours = trained(family)
    result = merge(adapter, tmp_path / "merged", verify=1, progress=False)
    assert result.verification["passed"] and result.merged_modules == WRAPPED[family]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.config.model_type == family
    torch.testing.assert_close(logits(merged), ours, atol=0.1, rtol=0)


def test_training_names_targets_that_match_nothing_before_reading_the_data(checkpoint, tmp_path, monkeypatch):
    from qlora_kit import training
    from qlora_kit.settings import load_recipe

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    monkeypatch.setattr(training, "prepare_data", lambda *a, **k: pytest.fail("the data was prepared first"))
    run = load_recipe(None, [f"model.base={checkpoint('gpt2')}", f"data.path={data}",
                             f"train.output_dir={tmp_path / 'run'}", "lora.target_modules=[q_proj]"])
    with pytest.raises(QLoRAKitError, match=r"\['q_proj'\] match no linear layer.*c_attn, c_fc, c_proj"):
        training.train(run)
