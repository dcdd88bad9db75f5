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


# ---------------------------------------------------------------- the command line, end to end


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def classifier_recipe(folder, base, data, **train):
    import yaml

    recipe = {
        "model": {"base": str(base), "task": "sequence_classification"},
        "lora": {"rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "max_seq_len": 32, "eval_fraction": 0.25},
        "train": {"output_dir": str(folder / "run"), "max_steps": 30, "batch_size": 16, "warmup_steps": 0,
                  "learning_rate": 2e-2, "gradient_checkpointing": False, "eval_every": 15, "save_every": 0,
                  "sample_prompts": 2, **train},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def cli_run(checkpoint, tmp_path_factory):
    """A classifier trained through `qlora-kit train` on the headless Llama (a causal LM checkpoint)."""
    from qlora_kit.cli import main

    folder = tmp_path_factory.mktemp("cli-classifier")
    data = write_rows(folder / "rows.jsonl", task_rows(320, 3))
    assert main(["train", str(classifier_recipe(folder, checkpoint("llama", head=False), data))]) == 0
    return folder / "run"


def test_train_logs_eval_accuracy_and_records_the_labels(cli_run):
    records = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[-1]["eval_accuracy"] >= evals[0]["eval_accuracy"] + 0.3 and evals[-1]["eval_accuracy"] >= 0.8
    summary = json.loads((cli_run / "summary.json").read_text())
    assert summary["final_eval_accuracy"] == evals[-1]["eval_accuracy"]
    manifest = json.loads((cli_run / "adapter" / "qlora_kit.json").read_text())
    assert manifest["task"] == {"type": "sequence_classification", "labels": LABELS, "heads": ["score"]}
    assert "labels:\n  - negative" in (cli_run / "config.yaml").read_text()


def test_eval_reports_the_accuracy_transformers_and_peft_compute(cli_run, checkpoint, tmp_path, capsys):
    from qlora_kit.cli import main

    rows = task_rows(40, 11)
    data = write_rows(tmp_path / "held.jsonl", rows)
    assert main(["eval", str(cli_run), "--data", str(data), "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert f"accuracy {result['accuracy']:.4f}" in capsys.readouterr().out
    # The reference: PEFT's model on transformers' own 4-bit load of the same base, argmax of its logits.
    base_folder = checkpoint("llama", head=False)
    config = AutoConfig.from_pretrained(base_folder, num_labels=3)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_folder, config=config, quantization_config=BitsAndBytesConfig(**{**BNB.to_dict(), "llm_int8_skip_modules": ["score"]}),
        dtype=torch.bfloat16, device_map="cpu")
    guard_cpu_gradients(with_pad(base, base_folder))
    reference = PeftModel.from_pretrained(base, cli_run / "adapter").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_folder)
    predicted = logits(reference, batch_of(tokenizer, rows)).argmax(-1)
    expected = sum(int(p) == LABELS.index(r["label"]) for p, r in zip(predicted, rows))
    assert result["examples"] == len(rows) and result["correct"] == expected
    assert result["accuracy"] == pytest.approx(expected / len(rows))


def test_a_headless_checkpoint_gets_a_head_initialised_as_transformers_does(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        model, _, _ = classifier(checkpoint("bert", head=False))
    assert "no classification head (classifier.bias, classifier.weight)" in caplog.text
    weight = model.classifier.weight.float()
    std = AutoConfig.from_pretrained(checkpoint("bert", head=False)).initializer_range
    assert weight.std().item() == pytest.approx(std, rel=0.2) and torch.all(model.classifier.bias == 0)
    gpt2, _, _ = classifier(checkpoint("gpt2", head=False))  # the causal LM's lm_head is not used
    assert gpt2.score.weight.shape == (3, 64) and torch.isfinite(gpt2.score.weight).all()


def test_lora_and_head_gradients_flow_after_an_inference_forward(checkpoint):
    """bitsandbytes' CPU kernel repacks a 4-bit weight on the first no-grad eval forward (field notes)."""
    model, tokenizer, _ = classifier(checkpoint("llama"))
    apply_lora(model, LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    batch = batch_of(tokenizer, task_rows(4, 5))
    logits(model.eval(), batch)
    loss_fn = ClassificationLoss(model).train()
    loss_sum, _ = loss_fn(batch)
    loss_sum.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # B starts at zero, so A's gradient is zero at the first step; B's and the head's are not.
    checked = [n for n in grads if "lora_B" in n or n.startswith("score")]
    assert len(checked) == 4 + 1 and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in checked)


def test_bad_rows_are_one_clear_error(checkpoint, tmp_path, capsys):
    from qlora_kit.cli import main

    rows = task_rows(12, 0) + [{"label": "positive"}, {"text": "apple bad", "label": "awful"},
                               {"text": "apple good", "label": 1.5}]
    data = write_rows(tmp_path / "rows.jsonl", rows)
    recipe = classifier_recipe(tmp_path, checkpoint("llama"), data)
    assert main(["train", str(recipe), "model.labels=[negative,neutral,positive]"]) == 2
    err = capsys.readouterr().err
    assert "3 of 15 row(s) are not usable" in err and "row 13: missing 'text'" in err
    assert "row 14: unknown label 'awful'; known labels: negative, neutral, positive" in err
    assert "row 15: 'label' is float" in err and "Traceback" not in err
    with pytest.raises(QLoRAKitError, match="label id 7 is out of range: there are 3 classes"):
        from qlora_kit.classification import check_rows
        check_rows([{"text": "x", "label": 7}], LABELS, "rows.jsonl")


def test_an_architecture_without_a_classifier_is_refused_naming_it(tmp_path, capsys):
    """transformers has no ...ForSequenceClassification for some families: one message, exit 2, nothing loaded."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    from qlora_kit.cli import main

    family = "codegen"
    assert family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and family not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    config = AutoConfig.for_model(family, vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    write_tokenizer(tmp_path / "base")
    data = write_rows(tmp_path / "rows.jsonl", task_rows(8, 0))
    assert main(["train", str(classifier_recipe(tmp_path, tmp_path / "base", data))]) == 2
    err = capsys.readouterr().err
    assert "cannot build a sequence classifier (...ForSequenceClassification) for model_type 'codegen'" in err
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_recipe_reads_the_packaged_spam_collection_as_the_csv_module_does():
    """recipes/smollm2-spam.yaml's data: a tab-separated file without a header, inside an installed package."""
    import csv
    from pathlib import Path

    from qlora_kit.classification import read_rows, resolve_labels
    from qlora_kit.data import resolve_package_path
    from qlora_kit.settings import load_recipe

    run = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "smollm2-spam.yaml")
    data = run.data.__class__(**{**run.data.__dict__, "max_samples": None})
    rows = read_rows(data, data.path, data.split)
    with open(resolve_package_path(data.path), encoding="utf-8", newline="") as f:
        reference = [{"label": label, "text": text} for label, text in csv.reader(f, delimiter="\t")]
    assert rows == reference and len(rows) > 4000
    assert resolve_labels(run.model, data) == run.model.labels == ["ham", "spam"]


def test_a_classifier_adapter_is_refused_where_it_cannot_go(checkpoint, trained, tmp_path):
    """Clear errors, before any work: a causal LM base, a second head on one model, GGUF files."""
    from qlora_kit.gguf_export import export_gguf_lora

    adapter, *_ = trained("llama")
    with pytest.raises(QLoRAKitError, match=r"is a sequence classifier \(LlamaForSequenceClassification\), not a causal "
                                            "LM: load it with model.task=sequence_classification"):
        load_base(str(checkpoint("llama")))
    causal, _, _ = load_base(str(checkpoint("llama", head=False)))
    with pytest.raises(QLoRAKitError, match="trained for sequence classification .* load the base with "
                                            "model.task=sequence_classification"):
        load_adapter(causal, adapter)
    model, _, _ = classifier(checkpoint("llama"))
    load_adapter(model, adapter)
    with pytest.raises(QLoRAKitError, match="brings its own classification head"):
        load_adapter(model, adapter, adapter_name="second")
    with pytest.raises(QLoRAKitError, match="is a sequence classifier; GGUF export covers causal language models"):
        export_gguf_lora(adapter, tmp_path / "lora.gguf")
    other, _, _ = classifier(checkpoint("llama"), labels=["a", "b"])  # the checkpoint's 3-class head is not used
    assert other.score.weight.shape == (2, 64)
    with pytest.raises(QLoRAKitError, match=r"trained for 3 classes; load the base with the adapter's model.labels"):
        load_adapter(other, adapter)


def test_merge_and_eval_of_the_export_through_the_command_line(cli_run, tmp_path, capsys):
    from qlora_kit.cli import main

    assert main(["merge", str(cli_run), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "verification: class agreement 100.00%" in out and "passed" in out
    report = json.loads((tmp_path / "merged" / "verification.json").read_text())
    assert report["kind"] == "classification" and "held-out rows of the run's data" in report["texts"]
    data = write_rows(tmp_path / "held.jsonl", task_rows(40, 11))
    assert main(["eval", "--base", str(tmp_path / "merged"), "--data", str(data), "--json", str(tmp_path / "a.json")]) == 0
    assert main(["eval", str(cli_run), "--data", str(data), "--json", str(tmp_path / "b.json")]) == 0
    merged, adapter = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    # The export, loaded again in 4-bit, classifies as the adapter on its base (re-quantization moves logits a little).
    assert merged["labels"] == adapter["labels"] == LABELS and abs(merged["correct"] - adapter["correct"]) <= 2


def test_original_mode_merge_is_verified_against_the_16bit_base(trained, tmp_path):
    from qlora_kit.export import merge

    adapter, ours, *_ = trained("llama")
    result = merge(adapter, tmp_path / "merged", mode="original", verify=2, dtype="float32", progress=False)
    assert result.verification["passed"] and result.verification["reference"].startswith("16-bit base")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "merged")
    # The adapter on the original weights: close to, not equal to, what the 4-bit model computed.
    assert torch.equal(logits(merged.eval(), batch_of(tokenizer, PROBE)).argmax(-1), ours.argmax(-1))
