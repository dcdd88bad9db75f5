"""Merging a sequence-classification adapter: the trained head written in, the config made a classifier's, verified.

`export.merge` streams the base checkpoint as for causal LMs; for a classifier it
also needs to know (`ClassifierMerge`):

- which checkpoint tensors belong to the base model, written under the
  classifier's own parameter names (`bert.encoder...`, even from a bare encoder
  saved without the prefix), and which belong to another head (a causal LM's
  `lm_head`, BERT's pretraining `cls.*`, or the classifier's untrained head),
  dropped in favour of the adapter's trained head (PEFT's `modules_to_save`);
- the config: `architectures` names the `...ForSequenceClassification` class, with
  `num_labels`, `id2label` / `label2id` and, for decoders, `pad_token_id`.

Verification runs both models whole (the streaming verifier compares LM logits,
layer by layer, and does not know heads): the merged checkpoint loaded by plain
transformers against the 4-bit base + adapter, both computing in fp32, on the
run's held-out rows (or the given / built-in texts). It compares class logits:
argmax agreement, KL of the class distributions, largest logit difference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import classification
from .errors import QLoRAKitError

log = logging.getLogger(__name__)

VERIFY_ROWS_PER_BATCH = 4
VERIFY_MAX_TOKENS = 128
REPORT_JSON = "verification.json"


@dataclass
class ClassifierMerge:
    """What merging a classifier adds to the streamed merge (see the module docstring)."""

    architecture: str  # e.g. LlamaForSequenceClassification
    labels: list[str]
    heads: dict[str, torch.Tensor]  # trained head parameters by model name (score.weight)
    output_names: dict[str, str | None]  # checkpoint tensor name -> name written (None: dropped)
    pad_token_id: int | None

    def output_name(self, name: str) -> str | None:
        return self.output_names.get(name, name)

    def update_config(self, folder: Path) -> None:
        path = Path(folder) / "config.json"
        config = json.loads(path.read_text())
        config["architectures"] = [self.architecture]
        config["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
        config["label2id"] = {name: i for i, name in enumerate(self.labels)}
        config.pop("num_labels", None)  # transformers derives it from id2label
        if config.get("pad_token_id") is None and self.pad_token_id is not None:
            config["pad_token_id"] = self.pad_token_id
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def plan(record, checkpoint, model_cfg, quant) -> ClassifierMerge:
    """The classifier part of a merge plan, from a meta skeleton of the classifier the adapter trained."""
    from transformers import AutoConfig

    from .loading import CheckpointKeys, build_skeleton, load_tokenizer

    heads = record.head_weights()
    if not heads:
        raise QLoRAKitError(f"adapter {record.folder} was trained for sequence classification but holds no head "
                            "(modules_to_save): there is nothing to classify with; train it again")
    config = AutoConfig.from_pretrained(checkpoint.folder, trust_remote_code=model_cfg.trust_remote_code)
    labels = list(model_cfg.labels) or _labels_from(config, heads)
    classification.configure_labels(config, labels)
    skeleton = build_skeleton(config, quant, replace(model_cfg, labels=labels))
    keys = CheckpointKeys(skeleton)
    prefix = skeleton.base_model_prefix + "."
    expected = set(classification.head_parameter_names(skeleton))
    if set(heads) != expected:
        raise QLoRAKitError(f"adapter {record.folder} holds head parameters {sorted(heads)}, but a "
                            f"{type(skeleton).__name__} has {sorted(expected)}: it was trained on another architecture")
    names = {}
    for name in checkpoint.tensor_names():
        key, fused = keys.target(name)
        # Fused tensors (MoE experts) keep their stored names, as causal LM merges write them.
        names[name] = name if fused is not None else (key if key.startswith(prefix) else None)
    tokenizer = load_tokenizer(checkpoint, model_cfg.trust_remote_code)
    return ClassifierMerge(architecture=type(skeleton).__name__, labels=labels, heads=heads, output_names=names,
                           pad_token_id=tokenizer.pad_token_id)


def _labels_from(config, heads: dict[str, torch.Tensor]) -> list[str]:
    """An adapter without recorded class names (made by PEFT): the base config's, if it has as many classes."""
    classes = min(t.shape[0] for t in heads.values() if t.ndim == 2)  # (classes, hidden) is the narrowest output
    known = getattr(config, "id2label", None) or {}
    if len(known) == classes:
        return [known[i] for i in range(classes)]
    return [f"LABEL_{i}" for i in range(classes)]


# ---------------------------------------------------------------- verification


def verify(export_dir: Path, record, model_cfg, quant_cfg, *, batches: int, min_agreement: float, texts=None,
           force: bool = False) -> dict:
    """Class logits of the merged checkpoint (plain transformers) vs the base + adapter, both in fp32.

    The base is loaded with `quant_cfg`: in 4-bit as trained (nf4 merges), or with every
    layer skipped, i.e. its 16-bit weights (original merges).
    """
    from transformers import AutoModelForSequenceClassification

    from . import quantization
    from .adapter_io import load_adapter
    from .loading import load_base

    merged = AutoModelForSequenceClassification.from_pretrained(export_dir, dtype=torch.float32)
    merged.eval()
    reference, tokenizer, info = load_base(replace(model_cfg, device="cpu"), quant_cfg)
    load_adapter(reference, record.folder, base=info, strict_base=not force)
    reference.float()  # embeddings, norms and head in fp32; the 4-bit layers dequantize to fp32 below
    quantization.compute_with_dequantized_weights(reference, torch.float32)
    reference.eval()
    inputs, source = _inputs(tokenizer, record, model_cfg, texts, batches)
    ours, theirs = [], []
    with torch.no_grad():
        for batch in inputs:
            ours.append(reference(**batch).logits.float())
            theirs.append(merged(**batch).logits.float())
    ref, out = torch.cat(ours), torch.cat(theirs)
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    metrics = {
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).float().mean()),
        "mean_kl": max(float(kl.sum(-1).mean()), 0.0),  # rounding can make a zero KL slightly negative
        "max_abs_logit_diff": float((ref - out).abs().max()),
        "finite": bool(torch.isfinite(out).all()),
        "rows": int(ref.shape[0]),
    }
    report = {
        "kind": "classification",
        "passed": metrics["top1_agreement"] >= min_agreement and metrics["finite"],
        "min_agreement": float(min_agreement),
        "reference": ("16-bit base" if quant_cfg.skip_modules == ["*"] else "4-bit base (as trained)")
                     + " + adapter and head, both sides computing in float32",
        "method": "whole models: class logits of the merged classifier (plain transformers) vs the reference",
        "texts": source,
        "labels": classification.labels_of(merged.config),
        "metrics": metrics,
    }
    log.info("verification: %s", summary(report))
    return report


def _inputs(tokenizer, record, model_cfg, texts, batches: int) -> tuple[list[dict], str]:
    from .data import collate
    from .verify import load_texts

    pad = tokenizer.pad_token_id
    count = batches * VERIFY_ROWS_PER_BATCH
    examples, source = [], None
    if texts is None and record.run is not None:
        try:
            prepared = classification.prepare(record.run.data, model_cfg.labels, tokenizer, record.run.train.seed)
            examples = prepared.eval[:count]
            source = f"{len(examples)} held-out rows of the run's data ({record.run.data.path})"
        except QLoRAKitError as exc:  # the data moved: fall back to text
            log.warning("verification: cannot read the run's held-out rows (%s); using text", exc)
    if not examples:
        text_list, source = load_texts(texts)
        examples = [{"input_ids": list(tokenizer(t, add_special_tokens=True)["input_ids"])[:VERIFY_MAX_TOKENS],
                     "labels": [0]} for t in text_list[:count]]
    batched = []
    for start in range(0, len(examples), VERIFY_ROWS_PER_BATCH):
        batch = collate(examples[start:start + VERIFY_ROWS_PER_BATCH], pad)
        batched.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    return batched, source


def summary(report: dict) -> str:
    m = report["metrics"]
    return (f"class agreement {m['top1_agreement']:.2%} (min {report['min_agreement']:.2%}), KL {m['mean_kl']:.2e} "
            f"nats, max |logit diff| {m['max_abs_logit_diff']:.3g}, {m['rows']} rows: "
            f"{'passed' if report['passed'] else 'FAILED'}")


def write_report(folder: Path, report: dict) -> None:
    (Path(folder) / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
