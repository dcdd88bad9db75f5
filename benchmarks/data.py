"""The fixed batches both systems train on.

Real instruction data: the Zaragoza construction FAQ (PyPI `zaragoza-construction-faq`,
CC-BY-4.0, 503 English Alpaca rows), rendered with the tokenizer's chat template by
qlora_kit's own data pipeline (labels -100 on system/user turns). The examples are then
concatenated, in a seeded order, into rows of exactly `seq_len` tokens (classic
"constant length" packing: no padding, plain causal attention across sample boundaries),
so both systems see identical dense (batch, seq_len) tensors with a plain all-ones mask.

Two label sets over the same tokens:
- instruction: response tokens only (what users of either system train on);
- all: labels = input_ids, every position supervised (the field-notes baseline).
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

FAQ_PACKAGE = "zaragoza_construction_faq"
FAQ_FILE = "data/faq-en-alpaca.jsonl"
LABEL_SETS = ("instruction", "all")


def faq_path() -> Path:
    spec = importlib.util.find_spec(FAQ_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark data needs: pip install zaragoza-construction-faq==1.2.1")
    return Path(spec.submodule_search_locations[0]) / FAQ_FILE


def build_batches(tokenizer_folder: Path, steps: int, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """{'input_ids', 'labels_instruction', 'labels_all'}: LongTensors (steps, batch, seq_len), plus stats."""
    import torch
    from transformers import AutoTokenizer

    from qlora_kit.data import IGNORE_INDEX, DataConfig, prepare_data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Whole examples (no truncation); rows are cut to seq_len below, after concatenation.
    cfg = DataConfig(path=str(faq_path()), format="instruction", eval_fraction=0.0, max_seq_len=1_000_000)
    examples = prepare_data(cfg, tokenizer, seed=seed).train
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    need = steps * batch_size * seq_len
    ids: list[int] = []
    labels: list[int] = []
    i = 0
    while len(ids) < need:  # cycle through the data if one pass is not enough
        ex = examples[order[i % len(order)]]
        ids += ex["input_ids"]
        labels += ex["labels"]
        i += 1
    input_ids = torch.tensor(ids[:need]).view(steps, batch_size, seq_len)
    labels_instruction = torch.tensor(labels[:need]).view(steps, batch_size, seq_len)
    # Position 0 of a row has no predecessor inside the row: both systems ignore it anyway
    # (HF shifts labels left, qlora_kit reads labels[:, 1:]).
    supervised = int((labels_instruction[..., 1:] != IGNORE_INDEX).sum())
    return {
        "input_ids": input_ids,
        "labels_instruction": labels_instruction,
        "labels_all": input_ids.clone(),
        "stats": {
            "source": f"{FAQ_PACKAGE} {FAQ_FILE} (CC-BY-4.0), chat template, response-only labels",
            "examples_used": i,
            "examples_available": len(examples),
            "supervised_fraction_instruction": round(supervised / (steps * batch_size * (seq_len - 1)), 4),
        },
    }
