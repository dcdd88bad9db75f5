"""Sequence classification (model.task=sequence_classification), checked against transformers and PEFT.

Each family is a tiny random model written by transformers' own `save_pretrained`:
decoders (GPT-2, Llama) and an encoder (BERT), saved with a classification head,
and headless (a causal LM or a bare encoder) to check the head is initialised.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          BitsAndBytesConfig, PreTrainedTokenizerFast)

from qlora_kit import LoRAConfig, QLoRAKitError, apply_lora, load_adapter, load_base, save_adapter
from qlora_kit.classification import ClassificationLoss, head_names
from qlora_kit.data import collate
from qlora_kit.lora import select_targets, trainable_parameters
from qlora_kit.quantization import guard_cpu_gradients, is_4bit_linear
from qlora_kit.settings import ModelConfig

FAMILIES = {
    "bert": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256, pad_token_id=0),
    "gpt2": dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0),
    "llama": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0),
}
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}  # as in PEFT's examples
HEAD = {"bert": "classifier", "gpt2": "score", "llama": "score"}
LABELS = ["negative", "neutral", "positive"]
WORDS = ["apple", "river", "stone", "cloud", "green", "paper", "music", "table", "light", "sand"]
CUE = {"negative": "bad", "neutral": "plain", "positive": "good"}


def task_rows(n: int, seed: int) -> list[dict]:
    """A learnable three-class task: the class is named by one cue word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.sample(WORDS, 3)
        words.insert(rng.randrange(4), CUE[label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_tokenizer(folder) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([" ".join(WORDS + list(CUE.values()))] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            ).save_pretrained(folder)  # no pad token: loading sets it, as for GPT-2 and Llama


def write_model(folder, family: str, head: bool = True):
    """`family` saved by transformers: as a 3-class classifier, or headless (causal LM / bare encoder)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **FAMILIES[family], num_labels=len(LABELS))
    if head:
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModel if family == "bert" else AutoModelForCausalLM
    auto.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made = {}

    def get(family, head=True):
        if (family, head) not in made:
            made[family, head] = write_model(tmp_path_factory.mktemp(f"{family}-{head}"), family, head)
        return made[family, head]

    return get


def classifier(folder, labels=LABELS):
    return load_base(ModelConfig(base=str(folder), task="sequence_classification", labels=labels))


BNB = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)


def with_pad(model, folder):
    """Decoder configs have no pad token; users of plain transformers set the tokenizer's, as loading does."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = PreTrainedTokenizerFast.from_pretrained(folder).eos_token_id
    return model


def transformers_4bit(folder, keep_head: str | None = None):
    """transformers' own 4-bit load; `keep_head` leaves that module unquantized (transformers quantizes BERT's)."""
    config = BNB if keep_head is None else BitsAndBytesConfig(**{**BNB.to_dict(), "llm_int8_skip_modules": [keep_head]})
    model = AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16,
                                                               device_map="cpu")
    guard_cpu_gradients(model)
    return with_pad(model, folder)


def batch_of(tokenizer, rows, labels=LABELS):
    from qlora_kit.classification import encode

    examples, _ = encode(rows, labels, tokenizer, 64)
    return collate(examples, tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_in_4bit_bit_identical_to_transformers_with_the_head_unquantized(family, checkpoint):
    folder = checkpoint(family)
    ours, tokenizer, _ = classifier(folder)
    theirs = transformers_4bit(folder)
    assert type(ours).__name__ == type(theirs).__name__
    assert head_names(ours) == [HEAD[family]]
    quantized = [name for name, m in theirs.named_modules() if is_4bit_linear(m) and not name.startswith(HEAD[family])]
    assert quantized and all(is_4bit_linear(ours.get_submodule(n)) for n in quantized)
    for name in quantized:
        packed, reference = ours.get_submodule(name).weight, theirs.get_submodule(name).weight
        assert torch.equal(packed.data, reference.data), name
        for key, value in reference.quant_state.as_dict(packed=True).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(packed.quant_state.as_dict(packed=True)[key], value), (name, key)
    # The head stays in 16 bits, exactly the checkpoint's tensors (transformers quantizes BERT's; PEFT cannot train that).
    saved = load_file(folder / "model.safetensors")
    head = dict(ours.get_submodule(HEAD[family]).named_parameters())
    assert head and all(torch.equal(p, saved[f"{HEAD[family]}.{n}"]) for n, p in head.items())
    assert not any(is_4bit_linear(m) for m in ours.get_submodule(HEAD[family]).modules())
    assert ours.config.id2label == dict(enumerate(LABELS)) and ours.config.pad_token_id == tokenizer.pad_token_id
    batch = batch_of(tokenizer, task_rows(4, 0))
    same = transformers_4bit(folder, keep_head=HEAD[family])  # BERT too, with its head left in 16 bits
    torch.testing.assert_close(logits(ours, batch), logits(same, batch), atol=1e-2, rtol=0)


@pytest.mark.parametrize("targets", ["named", "all-linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_covers_what_peft_covers_and_the_head_is_trained_fully(family, targets, checkpoint):
    folder = checkpoint(family)
    patterns = TARGETS[family] if targets == "named" else ["all-linear"]
    ours, _, _ = classifier(folder)
    apply_lora(ours, LoRAConfig(rank=2, alpha=4, target_modules=patterns))
    reference = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    peft_model = get_peft_model(reference, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                      target_modules=patterns[0] if targets != "named" else patterns))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))
    ours_wrapped = sorted(select_targets(load_base(ModelConfig(base=str(folder), task="sequence_classification",
                                                               labels=LABELS))[0], patterns))
    assert ours_wrapped == wrapped and wrapped
    saved = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                   if isinstance(m, ModulesToSaveWrapper))
    assert saved == head_names(ours) == [HEAD[family]]
    # Trainable: every LoRA A/B plus the whole head, as PEFT trains them.
    peft_trainable = {n.removeprefix("base_model.model.").replace(".default", "").replace("modules_to_save.", "")
                      for n, p in peft_model.named_parameters() if p.requires_grad}
    ours_trainable = {n.replace(".base", "").replace("adapters.default.", "") for n, p in ours.named_parameters()
                      if p.requires_grad}
    assert ours_trainable == peft_trainable


def train_steps(model, tokenizer, steps=30, lr=2e-2):
    """A few optimizer steps of the classification loss; returns (losses, held-out accuracy before, after)."""
    held = batch_of(tokenizer, task_rows(48, 1))
    loss_fn = ClassificationLoss(model)

    def accuracy():
        loss_fn.eval()
        loss_fn.tally = [0, 0]
        with torch.no_grad():
            loss_fn(held)
        return loss_fn.tally[0] / loss_fn.tally[1]

    before = accuracy()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    loss_fn.train()
    losses = []
    for step in range(steps):
        batch = batch_of(tokenizer, task_rows(16, 100 + step))
        loss_sum, rows = loss_fn(batch)
        (loss_sum / rows).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss_sum.item() / rows)
    return losses, before, accuracy()


@pytest.fixture(scope="module")
def trained(checkpoint, tmp_path_factory):
    """trained(family) -> (adapter folder, our logits on PROBE, losses, accuracy before, after)."""
    made = {}

    def get(family):
        if family not in made:
            model, tokenizer, base = classifier(checkpoint(family))
            torch.manual_seed(0)
            apply_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.0, target_modules=TARGETS[family]))
            losses, before, after = train_steps(model, tokenizer)
            model.eval()
            folder = save_adapter(model, tmp_path_factory.mktemp(f"{family}-adapter") / "adapter", base=base)
            made[family] = folder, logits(model, batch_of(tokenizer, PROBE)), losses, before, after
        return made[family]

    return get


PROBE = task_rows(6, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_learn_the_task(family, trained):
    _, _, losses, before, after = trained(family)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert after >= before + 0.3 and after >= 0.8, (before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_reads_our_adapter_with_the_head_in_modules_to_save(family, checkpoint, trained):
    folder = checkpoint(family)
    adapter, ours, *_ = trained(family)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == [HEAD[family]]
    keys = set(load_file(adapter / "adapter_model.safetensors"))
    assert f"base_model.model.{HEAD[family]}.weight" in keys
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    batch = batch_of(tokenizer, PROBE)
    # The head in 16 bits (transformers would quantize BERT's, which PEFT cannot train or load a head into).
    base = transformers_4bit(folder, keep_head=HEAD[family])
    without = logits(base, batch)
    theirs = logits(PeftModel.from_pretrained(base, adapter), batch)
    assert (theirs - without).abs().max() > 0.1  # the adapter and head matter
    # PEFT's copy of the head keeps the base's bf16 and rounds our fp32 head: relative error ~2^-8.
    torch.testing.assert_close(theirs, ours, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_we_read_a_peft_adapter_with_modules_to_save(family, checkpoint, tmp_path):
    folder = checkpoint(family)
    reference = with_pad(AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32), folder)
    torch.manual_seed(1)
    peft_model = get_peft_model(reference, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                      target_modules=TARGETS[family], init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.5)  # a trained-looking head
    peft_model.save_pretrained(tmp_path / "peft")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    batch = batch_of(tokenizer, PROBE)
    theirs = logits(peft_model.eval(), batch)
    ours = with_pad(AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32), folder)
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours.eval(), batch), theirs, atol=1e-4, rtol=0)
    quantized, _, _ = classifier(folder)
    load_adapter(quantized, tmp_path / "peft")  # and on our 4-bit base: the same head, the same LoRA
    assert torch.equal(quantized.get_submodule(HEAD[family]).weight.float(),
                       peft_model.base_model.model.get_submodule(HEAD[family]).modules_to_save["default"].weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_is_a_plain_transformers_classifier(family, checkpoint, trained, tmp_path):
    from qlora_kit.export import merge

    adapter, ours, *_ = trained(family)
    result = merge(adapter, tmp_path / "merged", verify=2, dtype="float32", progress=False)
    assert result.verification["passed"] and result.verification["metrics"]["top1_agreement"] == 1.0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert type(merged).__name__.endswith("ForSequenceClassification")
    assert merged.config.id2label == dict(enumerate(LABELS)) and merged.config.pad_token_id is not None
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged.eval(), batch_of(tokenizer, PROBE)), ours, atol=0.05, rtol=0.01)
