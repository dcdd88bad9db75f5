"""Sequence classification: labelled rows, the classification head trained beside the adapters, accuracy.

With `model.task: sequence_classification` the base loads as transformers'
`...ForSequenceClassification` (GPT-2, Llama, BERT and the other families
transformers has one for). Its head (`score` in decoders, `classifier` in
encoders: every top-level module outside the base model) is kept in higher
precision, never quantized nor wrapped by LoRA, and trained fully beside the
adapters; adapters save it as PEFT saves `modules_to_save`.

Rows are `{"text": ..., "label": ...}`; a label is a class name or an integer id.
Class names map to ids in `model.labels` order (default: sorted), recorded in the
model config's `id2label` / `label2id`, so exports load with the right names.

An example is `{"input_ids": [...], "labels": [-100, ..., -100, class id]}`: the
class sits on the last token, so the training loop's batching, padding and
per-target loss normalisation (one target per example) apply unchanged.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .data import (IGNORE_INDEX, MAX_LISTED_PROBLEMS, PreparedData, csv_reader_options, load_rows, pad_id,
                   split_indices)
from .errors import QLoRAKitError
from .settings import DataConfig, ModelConfig

log = logging.getLogger(__name__)

TASK = "sequence_classification"
PEFT_TASK_TYPE = "SEQ_CLS"  # PEFT's name for the task (adapter_config.json's task_type)


def is_classifier(model: nn.Module) -> bool:
    """Whether `model` is a transformers sequence classifier (decided from its class, as transformers names them)."""
    return type(model).__name__.endswith("ForSequenceClassification")


def head_names(model: nn.Module) -> list[str]:
    """The classifier's head modules: its top-level children with parameters outside the base model.

    `score` (GPT-2, Llama), `classifier` (BERT, RoBERTa): the modules PEFT keeps in
    `modules_to_save` for SEQ_CLS. Empty for a model that is not a classifier.
    """
    if not is_classifier(model):
        return []
    prefix = model.base_model_prefix
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


def head_parameter_names(model: nn.Module) -> list[str]:
    return [f"{head}.{name}" for head in head_names(model) for name, _ in model.get_submodule(head).named_parameters()]


def in_head(name: str, heads: list[str]) -> bool:
    return any(name == head or name.startswith(head + ".") for head in heads)


def head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's parameters by full name (`score.weight`), as PEFT saves `modules_to_save`."""
    return {name: model.get_parameter(name) for name in head_parameter_names(model)}


def make_heads_trainable(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Train the head fully: its parameters in `dtype` (fp32 masters), requiring grad; returns the head names.

    A pre-hook casts the head's input to its dtype: without autocast, the base's
    bf16 hidden states would meet fp32 weights (the same reason `LoRAUpdate` casts).
    """
    heads = head_names(model)
    for head in heads:
        module = model.get_submodule(head)
        module.to(dtype).requires_grad_(True)
        if not getattr(module, "_qlora_kit_casts_input", False):
            module.register_forward_pre_hook(_cast_input)
            module._qlora_kit_casts_input = True
    return heads


def _cast_input(module: nn.Module, args: tuple):
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


# ---------------------------------------------------------------- model config


def check_architecture(model: ModelConfig) -> None:
    """Refuse, from the config alone (before a download), a model type transformers has no classifier for."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from . import memory_plan

    try:
        config = memory_plan.model_config(model)
    except Exception:  # noqa: BLE001 - an unreadable config is loading's to report
        return
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not model.trust_remote_code:
        raise QLoRAKitError(
            f"cannot build a sequence classifier (...ForSequenceClassification) for model_type '{config.model_type}': "
            "transformers has no such class for it. Pick a base of a family that has one (Llama, Mistral, Qwen2, "
            "Gemma, GPT-2, GPT-NeoX, BERT, RoBERTa, ...)")


def configure_labels(config, labels: list[str]) -> None:
    """Put the class names into a transformers config: num_labels, id2label, label2id."""
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}


def labels_of(config) -> list[str]:
    """The class names a (classifier's) config records, in id order."""
    return [config.id2label[i] for i in range(config.num_labels)]


def set_pad_token(model: nn.Module, tokenizer) -> None:
    """Decoder classifiers read the class at the last non-pad token, so they need `pad_token_id`.

    GPT-2 and Llama configs have none (transformers then refuses batches of more
    than one row); the tokenizer's pad token (EOS when it has none) is used, and logged.
    """
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        log.info("config has no pad_token_id; set it to the tokenizer's pad token %r (id %d): the classifier "
                 "reads each row's class at its last non-pad token", tokenizer.pad_token, tokenizer.pad_token_id)


def other_classes(model: nn.Module, key: str, tensor: torch.Tensor, expected: dict) -> bool:
    """Whether checkpoint tensor `key` is a head for another number of classes (then not loaded, and logged).

    Fine-tuning a classifier checkpoint for new classes starts from a fresh head, as
    transformers' `ignore_mismatched_sizes=True` does.
    """
    if key not in expected or not in_head(key, head_names(model)) or tuple(tensor.shape) == tuple(expected[key].shape):
        return False
    log.info("the checkpoint's %s is %s, the model's labels need %s: that head is not used", key,
             tuple(tensor.shape), tuple(expected[key].shape))
    return True


def initialise_missing_head(model: nn.Module, missing: list[str], device) -> list[str]:
    """Initialise the head parameters a checkpoint lacks, as transformers does (`_init_weights`); logged.

    A base LM or a bare encoder has no classification head. Returns the missing
    parameters that are not in the head (the checkpoint really is incomplete).
    """
    heads = head_names(model)
    absent = sorted({name for name in missing if in_head(name, heads)})
    if absent:
        for head in heads:
            module = model.get_submodule(head)
            if any(p.device.type == "meta" for p in module.parameters()):
                dtype = next(p.dtype for p in module.parameters())
                module.to_empty(device=device)
                with torch.no_grad():
                    module.float().apply(model._init_weights)
                module.to(dtype)
        log.info("the checkpoint has no classification head (%s): initialised as transformers does "
                 "(training trains it; an adapter brings its trained head)", ", ".join(absent))
    return [name for name in missing if not in_head(name, heads)]


# ---------------------------------------------------------------- rows


def read_rows(data: DataConfig, path: str, split: str) -> list[dict]:
    rows = load_rows(path, split, csv_reader_options(data))
    return rows[: data.max_samples] if path == data.path and data.max_samples is not None else rows


def _row_problem(row: dict) -> str | None:
    text, label = row.get("text"), row.get("label")
    if text is None:
        return "missing 'text'"
    if not isinstance(text, str):
        return f"'text' is {type(text).__name__}, not a string"
    if not text.strip():
        return "empty 'text'"
    if label is None:
        return "missing 'label'"
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        return f"'label' is {type(label).__name__}: give a class name or an integer id"
    return None


def label_names(rows: list[dict]) -> list[str]:
    """The classes a training set uses, in id order: sorted names, or 0..max for integer ids."""
    values = {row["label"] for row in rows}
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    if any(isinstance(v, int) for v in values):
        raise QLoRAKitError("the data mixes class names and integer ids in 'label'; use one kind, or name the "
                            "classes in model.labels (ids then index that list)")
    return sorted(values)


def label_id(label: str | int, labels: list[str]) -> int:
    """A row's class id; raises ValueError naming the known classes for an unknown one."""
    if isinstance(label, int):
        if 0 <= label < len(labels):
            return label
        raise ValueError(f"label id {label} is out of range: there are {len(labels)} classes (0..{len(labels) - 1})")
    if label in labels:
        return labels.index(label)
    raise ValueError(f"unknown label {label!r}; known labels: {', '.join(labels)} (set model.labels to name them all)")


def check_rows(rows: list[dict], labels: list[str] | None, source: str) -> None:
    """Every malformed row (and, given `labels`, every unknown label) reported at once."""
    problems = []
    for number, row in enumerate(rows, 1):
        problem = _row_problem(row)
        if problem is None and labels is not None:
            try:
                label_id(row["label"], labels)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            problems.append(f"  row {number}: {problem}")
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS] + (
            [f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"] if len(problems) > MAX_LISTED_PROBLEMS else [])
        raise QLoRAKitError(f"{source}: {len(problems)} of {len(rows)} row(s) are not usable for sequence "
                            "classification (rows are {\"text\": ..., \"label\": ...}):\n" + "\n".join(shown))


def resolve_labels(model: ModelConfig, data: DataConfig) -> list[str]:
    """The class names of a run: `model.labels`, else those of the training rows; every row is checked.

    Runs before the base loads: the head's size depends on it, and bad rows are
    reported in seconds.
    """
    rows = read_rows(data, data.path, data.split)
    if not rows:
        raise QLoRAKitError(f"{data.path} has no rows")
    check_rows(rows, list(model.labels) or None, data.path)  # given classes: unknown labels reported with the rest
    labels = list(model.labels) or label_names(rows)
    if len(labels) < 2:
        raise QLoRAKitError(f"{data.path} has only the label(s) {labels}: a classifier needs at least two classes "
                            "(name them in model.labels if the data lacks some)")
    if len(set(labels)) != len(labels):
        raise QLoRAKitError(f"model.labels {labels} names a class twice")
    check_rows(rows, labels, data.path)
    if data.eval_file:
        check_rows(read_rows(data, data.eval_file, "train"), labels, data.eval_file)
    return labels


def with_labels(run):
    """(the run with `model.labels` resolved, the number of training rows), checked before the base loads."""
    from dataclasses import replace

    labels = resolve_labels(run.model, run.data)
    rows = len(read_rows(run.data, run.data.path, run.data.split))
    return replace(run, model=replace(run.model, labels=labels)), rows


def encode(rows: list[dict], labels: list[str], tokenizer, max_seq_len: int) -> tuple[list[dict], int]:
    """(examples, how many were cut to max_seq_len): the class id on each example's last token."""
    examples, truncated = [], 0
    for row in rows:
        ids = list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
        if len(ids) > max_seq_len:
            truncated += 1
            ids = ids[:max_seq_len]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - 1) + [label_id(row["label"], labels)]})
    return examples, truncated


def prepare(data: DataConfig, labels: list[str], tokenizer, seed: int) -> PreparedData:
    """Labelled rows tokenized and split (held-out rows carved as for causal LM data)."""
    rows = read_rows(data, data.path, data.split)
    check_rows(rows, labels, data.path)
    examples, truncated = encode(rows, labels, tokenizer, data.max_seq_len)
    if data.eval_file:
        held_rows = read_rows(data, data.eval_file, "train")
        check_rows(held_rows, labels, data.eval_file)
        train, (held, cut) = examples, encode(held_rows, labels, tokenizer, data.max_seq_len)
        truncated += cut
    else:
        train_idx, eval_idx = split_indices(len(examples), data.eval_fraction, seed)
        train, held = [examples[i] for i in train_idx], [examples[i] for i in eval_idx]
    stats = {
        "rows": len(rows),
        "train_examples": len(train),
        "eval_examples": len(held),
        "truncated": truncated,
        "tokens": sum(len(e["input_ids"]) for e in train),
        "supervised_tokens": len(train),  # one target per example: its class
        "packed_rows": 0,
        "labels": labels,
        "train_label_counts": _counts(train, labels),
    }
    return PreparedData(train=train, eval=held, stats=stats, pad_id=pad_id(tokenizer))


def _counts(examples: list[dict], labels: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(labels, 0)
    for example in examples:
        counts[labels[example["labels"][-1]]] += 1
    return counts


# ---------------------------------------------------------------- loss and accuracy


def targets_of(labels: torch.Tensor) -> torch.Tensor:
    """(B,) class ids from (B, T) token labels: each row's one target, -100 for a row without one."""
    return labels.amax(dim=1)


class ClassificationLoss(nn.Module):
    """The classifier plus its loss as one module, like `SupervisedLoss` for causal LMs.

    forward(batch) -> (summed cross-entropy over the batch's rows, number of rows with
    a class). In eval mode it also counts correct argmax predictions in `tally`
    (correct, rows), for accuracy.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.tally = [0, 0]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        logits = self.model(**inputs, use_cache=False).logits.float()  # (B, num_labels)
        targets = targets_of(batch["labels"])
        keep = targets != IGNORE_INDEX
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        if not self.training:
            self.tally[0] += int((logits.argmax(-1)[keep] == targets[keep]).sum())
            self.tally[1] += int(keep.sum())
        return loss, int(keep.sum())


@torch.no_grad()
def predict(model: nn.Module, examples: list[dict], pad: int, *, batch_size: int, device) -> torch.Tensor:
    """(N, num_labels) fp32 logits of `examples`, in their order."""
    from .data import collate

    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad)
        out.append(model(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def scores(loss_sum: float, correct: int, rows: int) -> dict:
    return {"loss": round(loss_sum / max(rows, 1), 6), "accuracy": round(correct / max(rows, 1), 6)}


def evaluate_dataset(model: nn.Module, tokenizer, data: DataConfig, *, batch_size: int = 8,
                     held_out_seed: int | None = None, max_examples: int | None = None) -> dict:
    """Mean loss per example and accuracy of a classifier on `data` (rows checked against its classes).

    With `held_out_seed`, only the held-out split a training run with that seed
    carved off is evaluated, as `evaluation.evaluate_dataset` does for causal LMs.
    """
    import time
    from dataclasses import replace

    from .evaluation import token_loss

    labels = labels_of(model.config)
    if held_out_seed is None:
        prepared = prepare(replace(data, eval_fraction=0.0, eval_file=None), labels, tokenizer, seed=0)
        examples = prepared.train
    else:
        prepared = prepare(data, labels, tokenizer, seed=held_out_seed)
        examples = prepared.eval
    examples = examples[:max_examples]
    started = time.perf_counter()
    loss_fn = ClassificationLoss(model)
    device = next(model.parameters()).device
    loss_sum, rows = token_loss(loss_fn, examples, prepared.pad_id, batch_size=batch_size, device=device)
    correct = loss_fn.tally[0]
    return {
        **scores(loss_sum, correct, rows),
        "correct": correct,
        "examples": rows,
        "labels": labels,
        "truncated": prepared.stats["truncated"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def checkpoint_task(folder) -> str:
    """The task a local checkpoint was saved for: its config's architectures say ...ForSequenceClassification."""
    import json
    from pathlib import Path

    config = Path(folder).expanduser() / "config.json"
    if not config.is_file():
        return "causal_lm"
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return TASK if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal_lm"
