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
import time
from dataclasses import replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from .data import DataConfig, collate, prepare_data
from .losses import CHUNK_ROWS, SupervisedLoss, perplexity

log = logging.getLogger(__name__)

LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


def evaluate_dataset(model, tokenizer, data: DataConfig, *, batch_size: int = 8, held_out_seed: int | None = None,
                     max_examples: int | None = None, loss_chunk_tokens: int = CHUNK_ROWS) -> dict:
    """Token-weighted mean loss and perplexity over every row of `data`.

    With `held_out_seed`, only the held-out split a training run with that seed
    carved off (`data.eval_fraction` or `data.eval_file`) is evaluated, carved
    exactly as training carved it. `max_examples` then caps the examples
    evaluated: it never shrinks the rows a split is carved from, which would let
    training rows into the held-out set. A sequence classifier is scored by
    `classification.evaluate_dataset` instead: loss per example and accuracy.
    """
    from . import classification

    if classification.is_classifier(model):
        return classification.evaluate_dataset(model, tokenizer, data, batch_size=batch_size,
                                               held_out_seed=held_out_seed, max_examples=max_examples)
    if held_out_seed is None:
        prepared = prepare_data(replace(data, eval_fraction=0.0, eval_file=None, packing=False), tokenizer, seed=0)
        examples = prepared.train
    else:
        prepared = prepare_data(replace(data, packing=False), tokenizer, seed=held_out_seed)
        examples = prepared.eval
    examples = examples[:max_examples]
    started = time.perf_counter()
    device = next(model.parameters()).device
    loss_sum, tokens = token_loss(SupervisedLoss(model, loss_chunk_tokens), examples, prepared.pad_id,
                                  batch_size=batch_size, device=device)
    loss = loss_sum / max(tokens, 1)
    return {
        "loss": round(loss, 6),
        "perplexity": round(perplexity(loss), 4),
        "examples": len(examples),
        "supervised_tokens": tokens,
        "truncated": prepared.stats["truncated"],
        "seconds": round(time.perf_counter() - started, 2),
    }


@torch.no_grad()
def token_loss(loss_fn: LossFn | torch.nn.Module, examples: list[dict], pad_id: int, *, batch_size: int,
               device: torch.device, max_batches: int | None = None,
               mask_dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """(summed cross-entropy over supervised targets, number of targets) of `examples`.

    `loss_fn(batch) -> (summed loss, targets)`: a `SupervisedLoss`, bare or wrapped
    by Accelerate (autocast). `max_batches` caps the examples at the first
    `max_batches * batch_size`; they are then batched shortest first, which changes
    nothing in a token-weighted sum but wastes less compute on padding.
    """
    if max_batches is not None:
        examples = examples[: max_batches * batch_size]
    was_training = getattr(loss_fn, "training", False)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    total, count = 0.0, 0
    for idx in tqdm(batches, desc="evaluating", unit="batch", disable=None, leave=False):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id, mask_dtype).items()}
        loss_sum, n = loss_fn(batch)
        total += float(loss_sum)
        count += int(n)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn.train(was_training)
    return total, count
