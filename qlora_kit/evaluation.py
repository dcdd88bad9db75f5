"""Loss and perplexity of a base (or base + adapter) on a dataset, weighted by supervised token.

The data is rendered, tokenized and masked exactly as for training (`prepare_data`),
and the loss is the training loss (`supervised_loss_sum`): the numbers are
comparable with a run's `eval_loss`. Rows are batched shortest first, which
changes nothing in a token-weighted sum but wastes less compute on padding.

    loaded = load_model(adapter="runs/quickstart")
    evaluate_dataset(loaded.model, loaded.tokenizer, DataConfig(path="held_out.jsonl"))
    # {'loss': 1.83, 'perplexity': 6.23, 'examples': 120, 'supervised_tokens': 9817, ...}
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from .data import DataConfig, collate, prepare_data
from .losses import supervised_loss_sum

log = logging.getLogger(__name__)


def evaluate_dataset(model, tokenizer, data: DataConfig, *, batch_size: int = 8, held_out_seed: int | None = None,
                     loss_chunk_tokens: int = 1024) -> dict:
    """Token-weighted mean loss and perplexity over every row of `data`.

    With `held_out_seed`, only the held-out split a training run with that seed
    carved off (`data.eval_fraction` or `data.eval_file`) is evaluated.
    """
    if held_out_seed is None:
        prepared = prepare_data(replace(data, eval_fraction=0.0, eval_file=None, packing=False), tokenizer, seed=0)
        examples = prepared.train
    else:
        prepared = prepare_data(replace(data, packing=False), tokenizer, seed=held_out_seed)
        examples = prepared.eval
    started = time.perf_counter()
    loss_sum, tokens = token_loss(model, examples, prepared.pad_id, batch_size, loss_chunk_tokens)
    loss = loss_sum / max(tokens, 1)
    return {
        "loss": round(loss, 6),
        "perplexity": round(math.exp(loss), 4) if loss < 50 else float("inf"),
        "examples": len(examples),
        "supervised_tokens": tokens,
        "truncated": prepared.stats["truncated"],
        "seconds": round(time.perf_counter() - started, 2),
    }


@torch.no_grad()
def token_loss(model, examples: list[dict], pad_id: int, batch_size: int = 8,
               loss_chunk_tokens: int = 1024) -> tuple[float, int]:
    """(summed cross-entropy over supervised targets, number of targets) of `examples`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    total, count = 0.0, 0
    for idx in tqdm(batches, desc="evaluating", unit="batch", disable=None, leave=False):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        loss_sum, n = supervised_loss_sum(model, batch, loss_chunk_tokens)
        total += float(loss_sum)
        count += int(n)
    model.train(was_training)
    return total, count
