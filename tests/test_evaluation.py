"""evaluate_dataset: the token-weighted mean of the model's own next-token loss over supervised tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlora_kit import load_base
from qlora_kit.data import DataConfig, collate, prepare_data
from qlora_kit.evaluation import evaluate_dataset

ROWS = [{"instruction": f"Say {w} {'twice' if i % 2 else 'once'}", "input": "", "output": f"{w} " * (1 + i % 3)}
        for i, w in enumerate(["apple", "pear", "plum", "fig", "lime", "kiwi", "date"])]


def test_loss_is_token_weighted_over_supervised_tokens(tmp_path, tiny_llama_dir):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    model, tokenizer, _ = load_base(str(tiny_llama_dir))
    data = DataConfig(path=str(path), max_seq_len=64)
    result = evaluate_dataset(model, tokenizer, data, batch_size=3)

    # Reference: transformers' own loss per example (mean over its targets), re-weighted by target count.
    examples = prepare_data(DataConfig(path=str(path), max_seq_len=64, eval_fraction=0.0), tokenizer, seed=0).train
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            batch = collate([ex], tokenizer.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    assert result["examples"] == len(ROWS)
    assert result["supervised_tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=2e-3)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-4)
