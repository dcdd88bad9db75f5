"""Fidelity report of a merged export: the exported checkpoint against the adapter on its base, on the same tokens.

What is compared
    candidate  the export as plain transformers computes it (no qlora_kit, no PEFT):
               what users will load.
    reference  what the export claims to compute:
               - mode nf4: the base in 4-bit exactly as for training + the adapter,
                 i.e. the trained model;
               - mode original: the original-precision base + the adapter. The
                 drift from the trained 4-bit model is reported too
                 (`drift_from_trained`), for information: it measures the
                 trade-off the user chose, not a fault of the export.

Both sides compute in float32: every 4-bit layer computes `F.linear(x, W)` in fp32
with W exactly the values the 4-bit model multiplies by (its dequantized weight),
everything else upcast. (On the CPU bitsandbytes' fused kernel rounds activations to
bf16 even when asked for fp32.) With fp32 on both sides the only differences left
are the export's own (rounding the merged weights to the output dtype, summation
order), so the check is strict and stable. Beside it the report gives
    noise_floor  the reference computed in bf16 (activations, norms, attention) vs
                 fp32: what precision alone changes. The export is "within the
                 noise floor" when it agrees at least as well and its KL is no larger.
    served       the export computed in its own dtype (float16/bfloat16), as
                 transformers' and vLLM's dtype "auto" serve it; non-finite logits
                 there (float16 overflow) fail the export.

Text: held-out rows of the training run's data when the adapter is in a run folder
(as training rendered them, cut to 512 tokens, `batches` x 4 rows); else a
--verify-file or built-in English paragraphs, cut into `batches` x 4 windows of 128
tokens that each start with BOS (see `token_batches` for why).

Metrics, over every real position:
    mean_kl             mean KL(reference || candidate) of next-token distributions, nats
    top1_agreement      fraction of positions where both pick the same top token
    ppl_reference/ppl_merged  perplexity of each on the text
    max_abs_logit_diff, mean_abs_logit_diff, and the position of the largest KL (`worst`)
The export passes when top1_agreement >= min_agreement (`merge --min-agreement`;
the same in both modes, since each is compared with its own reference) and every
logit is finite.

Memory: verification streams (`stream_compare`). The decoder runs once per batch
with its layers replaced by recorders, which gives the hidden states entering layer
0 and what each layer is called with (masks, position embeddings: the model's own
code). Then, layer by layer, the reference's layer is built from the base's shards
(4-bit, + adapter), run on every batch and dropped, then the export's layer; each
side's stream of hidden states goes on through its own layers, and the export's
layer also runs on the reference's input (the layer's local error). The final norm
and the output head come last, the head a block of vocabulary rows at a time with
the softmax statistics kept online. Host RAM: the larger of one layer of each side
(the export's in its dtype, the reference's in 4 bits), plus activations and 1M-element
blocks of cast or dequantized weights. Architectures it cannot stream (checkpoint
names that differ from parameter names, Conv1D, stacked MoE experts, scaled logits)
fall back to `whole_compare`, with both models whole in RAM.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import logging
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import integrity, memory, quantization
from .checkpoint import read_tensor
from .errors import QLoRAKitError
from .precision import dtype_name, torch_dtype

log = logging.getLogger(__name__)

SEQ_LEN = 128
BATCH_SIZE = 4
REPORT_JSON = "verification.json"
REPORT_MD = "verification.md"

# A fixed, offline set of varied English prose (narrative, technical, instructions,
# dialogue, history, science, code talk) so verification needs no data or network.
BUILTIN_TEXTS = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out of habit "
    "rather than necessity. There were one hundred and twelve of them, worn smooth in the middle by a century "
    "of boots. From the gallery at the top she could see the whole bay: the fishing boats returning in a loose "
    "line, the gulls wheeling over the harbour wall, and far out, where the water turned from green to slate, "
    "the low shape of the island that no one visited any more.",
    "To replace a bicycle inner tube, first shift to the smallest rear cog and open the brake's quick release. "
    "Remove the wheel, then use two tyre levers to lift one side of the tyre over the rim. Pull out the old tube "
    "and run your fingers carefully around the inside of the tyre to find whatever caused the puncture. Inflate "
    "the new tube just enough to give it shape, tuck it in, and work the tyre bead back over the rim with your thumbs.",
    "Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent reactions, "
    "chlorophyll absorbs photons and the energy is used to split water, releasing oxygen and producing ATP and "
    "NADPH. The Calvin cycle then uses these molecules to fix carbon dioxide into three-carbon compounds, which "
    "the plant assembles into glucose, starch and cellulose.",
    "\"Are you sure this is the right address?\" asked Maria, peering at the faded number on the gate. "
    "\"The message said the blue house after the bakery,\" Tom replied, \"and that bakery has been closed since "
    "spring.\" They stood in the rain for a moment, neither wanting to be the first to knock. Somewhere inside, "
    "a radio was playing an old song about trains.",
    "The printing press, introduced in Europe in the middle of the fifteenth century, changed how knowledge "
    "spread. Books that had taken scribes months to copy could be produced in days, and their prices fell. "
    "Pamphlets carried arguments about religion and politics to readers far from universities, and the "
    "standardisation of spelling and grammar followed slowly from the needs of printers and their customers.",
    "A hash table stores key-value pairs in an array of buckets. A hash function maps each key to a bucket "
    "index; when two keys land in the same bucket, the table resolves the collision, for example by chaining "
    "entries in a list or by probing for the next free slot. With a good hash function and a load factor kept "
    "below a threshold by resizing, lookups, insertions and deletions take constant time on average.",
    "Our quarterly results reflect steady demand in the domestic market and a slower recovery abroad. Revenue "
    "grew four percent compared with the same period last year, while operating costs rose mainly because of "
    "higher energy prices. The board recommends keeping the dividend unchanged and will review the investment "
    "plan for the new warehouse once the supplier contracts are signed.",
    "When you make bread by hand, the dough should feel sticky at first and become smooth and elastic as you "
    "knead it. Let it rise in a warm place until it has roughly doubled, which may take one to two hours "
    "depending on the temperature of your kitchen. Shape the loaf gently so you do not knock out all the air, "
    "and bake it until the crust is deep brown and the bottom sounds hollow when tapped.",
    "Glaciers move because ice deforms under its own weight. Near the bed, meltwater can lubricate the contact "
    "with the rock and let the whole glacier slide. As they flow, glaciers pluck and grind the rock beneath them, "
    "carving U-shaped valleys, sharp ridges and deep basins that later fill with water to become lakes.",
    "Please remember that the library will close early on Friday for the staff training day. Books due that "
    "day can be returned on Saturday without a fine. The reading room on the second floor remains closed while "
    "the new shelving is installed, and study spaces have been moved temporarily to the hall beside the café.",
)


def verify_export(export_dir: str | os.PathLike, adapter_dir: str | os.PathLike, base_folder: str | os.PathLike,
                  quant: dict, *, mode: str, batches: int, min_agreement: float, texts=None,
                  force: bool = False, streaming: bool = True) -> dict:
    """Compare the export in `export_dir` with its reference (see the module docstring); returns the report.

    `streaming` (the default) holds one decoder layer of each model at a time
    (`stream_compare`); models it cannot stream fall back to loading both whole.
    """
    from transformers import AutoTokenizer

    from .adapter_io import AdapterRecord

    threshold = float(min_agreement)
    record = AdapterRecord.read(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    inputs, text_source = verification_inputs(tokenizer, texts, batches, record)
    result = None
    if streaming:
        try:
            result = stream_compare(export_dir, record, base_folder, quant, mode=mode, inputs=inputs, force=force)
        except NotStreamable as exc:
            log.warning("verifying with both models loaded whole: %s", exc)
    if result is None:
        result = whole_compare(export_dir, adapter_dir, base_folder, quant, mode=mode, inputs=inputs, force=force)
    metrics, noise, served = result["metrics"], result["noise_floor"], result.get("served")
    for found in (metrics, noise, served, result.get("drift_from_trained")):
        if found and found.get("worst"):
            found["worst"]["token"] = tokenizer.decode([found["worst"]["token_id"]])
    report = {
        "passed": metrics["top1_agreement"] >= threshold and metrics["finite"] and (served or {}).get("finite", True),
        "mode": mode,
        "min_agreement": threshold,
        "reference": ("4-bit base (as trained) + adapter" if mode == "nf4" else "original base + adapter")
                     + ", both sides computing in float32",
        "method": result["method"],
        "texts": text_source,
        "batches": len(inputs),
        "seq_len": max(b["input_ids"].shape[1] for b in inputs),
        "batch_size": max(b["input_ids"].shape[0] for b in inputs),
        "metrics": metrics,
        "noise_floor": noise,
        "within_noise_floor": _within(metrics, noise),
        "noise_floor_verdict": noise_verdict(metrics, noise),
    }
    if served is not None:
        report["served"] = served
        report["served_dtype"] = dtype_name(served_dtype(_export_config(export_dir)))
    if "drift_from_trained" in result:
        report["drift_from_trained"] = result["drift_from_trained"]
    if "layers" in result:
        report["layers"] = result["layers"]
    log.info("verification: %s", summary(report))
    return report


def _within(metrics: dict, noise: dict) -> bool:
    return metrics["top1_agreement"] >= noise["top1_agreement"] and metrics["mean_kl"] <= noise["mean_kl"]


def noise_verdict(metrics: dict, noise: dict) -> str:
    """One sentence: is the export's deviation below what computing the reference in bf16 alone causes?"""
    ratio = metrics["mean_kl"] / noise["mean_kl"] if noise["mean_kl"] > 0 else math.inf
    points = (metrics["top1_agreement"] - noise["top1_agreement"]) * 100
    return (f"{'within' if _within(metrics, noise) else 'outside'} the noise floor: KL {ratio:.2g}x the floor's, "
            f"top-1 agreement {abs(points):.2f} points {'above' if points >= 0 else 'below'} it")


# ---------------------------------------------------------------------------
# What is compared on: held-out rows of the run, a given file, or built-in text
# ---------------------------------------------------------------------------

ROW_TOKENS = 4 * SEQ_LEN  # held-out rows are cut to this many tokens


def verification_inputs(tokenizer, texts, batches: int, record=None) -> tuple[list[dict], str]:
    """(batches of {'input_ids', 'attention_mask'}, where they came from).

    `texts` (a file or list of strings) wins; else, for an adapter in a training run
    folder, `batches` x 4 held-out rows of the run's own data, rendered as in training
    (`prepare_data(...).eval`); else the built-in paragraphs.
    """
    if texts is None and record is not None and record.run is not None:
        rows = _held_out_rows(tokenizer, record.run, batches * BATCH_SIZE)
        if rows:
            return rows, f"{sum(len(b['input_ids']) for b in rows)} held-out rows of the run's data ({record.run.data.path})"
    text_list, source = load_texts(texts)
    windows = token_batches(tokenizer, text_list, batches)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in windows], source


def _held_out_rows(tokenizer, run, count: int) -> list[dict]:
    from dataclasses import replace

    from .data import collate, prepare_data

    try:
        prepared = prepare_data(replace(run.data, packing=False), tokenizer, seed=run.train.seed)
    except Exception as exc:  # noqa: BLE001 - data moved, offline Hub dataset...: fall back to the built-in text
        log.warning("verification: cannot read the run's held-out data (%s); using the built-in text", exc)
        return []
    examples = [{"input_ids": e["input_ids"][:ROW_TOKENS], "labels": e["labels"][:ROW_TOKENS]}
                for e in prepared.eval[:count] if len(e["input_ids"]) > 1]
    if not examples:
        log.warning("verification: the run has no held-out rows (eval_fraction 0?); using the built-in text")
        return []
    batches = []
    for start in range(0, len(examples), BATCH_SIZE):
        batch = collate(examples[start:start + BATCH_SIZE], prepared.pad_id)
        batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    return batches


def _as_batch(batch) -> dict:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
    return batch


# ---------------------------------------------------------------------------
# Agreement metrics, accumulated over vocabulary chunks, then positions
# ---------------------------------------------------------------------------

VOCAB_CHUNK = 8192  # logits columns scored at a time by `compare`


class _Scores:
    """One model's next-token logits at N positions, seen a vocabulary chunk at a time (running softmax)."""

    def __init__(self, targets: torch.Tensor):
        n = targets.shape[0]
        self.targets = targets  # next token id per position, -1 where there is none
        self.max = torch.full((n,), -math.inf)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.best = torch.zeros(n, dtype=torch.long)
        self.target = torch.zeros(n)
        self.finite = True

    def update(self, logits: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Take in a chunk (n, v) of fp32 logits; returns exp(logits - running max) and the old sums' rescale."""
        self.finite = self.finite and bool(torch.isfinite(logits.sum()))
        top, where = logits.max(-1)
        new = torch.maximum(self.max, top)
        scale = torch.exp(self.max - new).double()
        weights = torch.exp(logits - new[:, None])
        self.sum = self.sum * scale + weights.sum(-1).double()
        self.best = torch.where(top > self.max, where + start, self.best)  # ties keep the first index, as argmax
        self.max = new
        inside = (self.targets >= start) & (self.targets < start + logits.shape[1])
        if inside.any():
            rows = inside.nonzero().squeeze(1)
            self.target[rows] = logits[rows, self.targets[rows] - start]
        return weights, scale

    def logsumexp(self) -> torch.Tensor:
        return self.max.double() + torch.log(self.sum)


class _Pair:
    """Per position, over the vocabulary chunks seen so far, with d = l_ref - l_cand and w = exp(l_ref - max):
    sum w*d and sum w*expm1(-d), from which KL = E_ref[d] + log E_ref[exp(-d)] follows without cancellation
    (the difference of two log-sum-exps would lose a 1e-9 KL to fp32 rounding); and sum |d|."""

    def __init__(self, n: int):
        self.cross = torch.zeros(n, dtype=torch.float64)
        self.tilt = torch.zeros(n, dtype=torch.float64)
        self.abs = torch.zeros(n, dtype=torch.float64)
        self.max_abs = 0.0
        self.vocab = 0

    def update(self, ref: torch.Tensor, cand: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor) -> None:
        """One vocabulary chunk (n, v) of both sides' logits, with `_Scores.update`'s result for the reference."""
        diff = ref - cand
        self.cross = self.cross * scale + (weights * diff).sum(-1).double()
        self.tilt = self.tilt * scale + (weights * torch.expm1(-diff)).sum(-1).double()
        diff.abs_()
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.abs += diff.sum(-1).double()
        self.vocab += ref.shape[1]


class Agreement:
    """Next-token agreement of a candidate with a reference, summed over positions.

    Each batch's positions are scored chunk by chunk of the vocabulary (`_Scores` per
    side, `_Pair` for both), so no full logits tensor is needed.
    """

    def __init__(self):
        self.tokens = self.agree = self.predicted = 0
        self.kl_sum = self.nll_ref = self.nll_cand = self.abs_sum = self.max_abs = 0.0
        self.finite = True
        self.worst = None

    def add(self, pair: _Pair, ref: _Scores, cand: _Scores, where: list | None = None) -> torch.Tensor:
        """Count a batch's positions, once every chunk was seen; returns their KL. `where[i]` locates position i."""
        kl = pair.cross / ref.sum + torch.log1p(pair.tilt / ref.sum)
        self.tokens += kl.numel()
        self.kl_sum += float(kl.sum())
        self.agree += int((ref.best == cand.best).sum())
        self.abs_sum += float(pair.abs.sum()) / max(pair.vocab, 1)
        self.max_abs = max(self.max_abs, pair.max_abs)
        has_next = ref.targets >= 0
        self.predicted += int(has_next.sum())
        self.nll_ref += float((ref.logsumexp() - ref.target)[has_next].sum())
        self.nll_cand += float((cand.logsumexp() - cand.target)[has_next].sum())
        self.finite = self.finite and cand.finite
        if where is not None and kl.numel():
            i = int(kl.argmax())
            if self.worst is None or float(kl[i]) > self.worst["kl"]:
                self.worst = {"kl": float(kl[i]), **where[i]}
        return kl

    def result(self) -> dict:
        tokens = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "top1_agreement": self.agree / tokens,
            "mean_kl": self.kl_sum / tokens,
            "ppl_reference": math.exp(self.nll_ref / max(self.predicted, 1)),
            "ppl_merged": math.exp(self.nll_cand / max(self.predicted, 1)),
            "max_abs_logit_diff": self.max_abs,
            "mean_abs_logit_diff": self.abs_sum / tokens,
            "finite": self.finite,
            "worst": self.worst,  # the position of largest KL: batch, row, position, input token
        }


def _positions(batch: dict, index: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(flat indices of the real positions, next-token target per position (-1: none), their locations)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], -1)
    flat = mask.reshape(-1).nonzero().squeeze(1)
    width = ids.shape[1]
    where = [{"batch": batch.get("batch", index), "row": batch.get("row", int(i) // width),
              "position": int(i) % width, "token_id": int(ids.reshape(-1)[i])} for i in flat]
    return flat, nxt.reshape(-1)[flat], where


@torch.no_grad()
def compare(reference: nn.Module, candidate: nn.Module, batches: list) -> dict:
    """Next-token agreement metrics of `candidate` against `reference` on the same batches (whole models).

    `batches` are id tensors (every position real) or dicts with input_ids and attention_mask.
    """
    agreement = Agreement()
    for index, batch in enumerate(batches):
        batch = _as_batch(batch)
        flat, targets, where = _positions(batch, index)
        ref = reference(**batch).logits
        cand = candidate(**batch).logits
        ref, cand = ref.reshape(-1, ref.shape[-1])[flat], cand.reshape(-1, cand.shape[-1])[flat]
        _score_chunks(agreement, ref, cand, targets, where)
        del ref, cand
    return agreement.result()


def _score_chunks(agreement: Agreement, ref: torch.Tensor, cand: torch.Tensor, targets, where) -> torch.Tensor:
    ref_scores, cand_scores, pair = _Scores(targets), _Scores(targets), _Pair(len(targets))
    for start in range(0, ref.shape[1], VOCAB_CHUNK):
        r, c = ref[:, start:start + VOCAB_CHUNK].float(), cand[:, start:start + VOCAB_CHUNK].float()
        pair.update(r, c, *ref_scores.update(r, start))
        cand_scores.update(c, start)
    return agreement.add(pair, ref_scores, cand_scores, where)


# ---------------------------------------------------------------------------
# Whole-model verification (both models in RAM): the fallback, and the check of the streaming one
# ---------------------------------------------------------------------------


def whole_compare(export_dir, adapter_dir, base_folder, quant: dict, *, mode: str, inputs: list,
                  force: bool = False) -> dict:
    """Metrics of the export against its reference, its noise floor (and drift), with whole models."""
    from transformers import AutoModelForCausalLM

    candidate = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    reference = reference_model(base_folder, adapter_dir, quant, quantized=(mode == "nf4"), force=force)
    result = {"method": "whole models", "metrics": compare(reference, candidate, inputs)}
    served = served_dtype(candidate.config) or served_dtype(_export_config(export_dir))
    if served is not None:
        result["served"] = compare(reference, AutoModelForCausalLM.from_pretrained(export_dir, dtype=served).eval(),
                                   inputs)
    noisy = reference_model(base_folder, adapter_dir, quant, quantized=(mode == "nf4"), force=force,
                            dtype=torch.bfloat16)
    result["noise_floor"] = compare(reference, noisy, inputs)
    del reference, noisy
    if mode == "original":
        trained = reference_model(base_folder, adapter_dir, quant, quantized=True, force=force)
        result["drift_from_trained"] = compare(trained, candidate, inputs)
    return result


def _export_config(export_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(export_dir)


def reference_model(base_folder, adapter_dir, quant: dict, *, quantized: bool, force: bool = False,
                    dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base (4-bit as trained, or original) plus the adapter, computing in float32.

    `dtype=torch.bfloat16` computes it in bf16 instead, as a bf16 model does (4-bit
    weights dequantized and multiplied in bf16; the adapter in its own fp32): the
    noise floor's other side.
    """
    from .adapter_io import load_adapter

    if quantized:
        from .loading import load_base
        from .settings import ModelConfig

        qcfg = quantization.quant_config_from_record(quant)
        if dtype != torch.float32:
            qcfg.compute_dtype = "bfloat16"
        model, _, info = load_base(ModelConfig(base=str(base_folder), device="cpu"), qcfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a --force'd base mismatch was already reported by the merge
            load_adapter(model, adapter_dir, base=info, strict_base=not force)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=dtype)
        load_adapter(model, adapter_dir)  # a plain model has no base record: nothing to re-check
    if dtype == torch.float32:
        to_fp32_compute(model)
    else:
        quantization.compute_with_dequantized_weights(model, dtype)
    return model.eval()


def to_fp32_compute(model: nn.Module) -> nn.Module:
    """Make a (possibly 4-bit) model compute in float32 without touching its 4-bit weights."""
    quantization.compute_with_dequantized_weights(model, torch.float32)
    for module in model.modules():
        packed = module.weight if quantization.is_4bit_linear(module) else None
        for param in module.parameters(recurse=False):
            if param is not packed and param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
    return model


# ---------------------------------------------------------------------------
# Streaming verification: one decoder layer of each model in RAM at a time
# ---------------------------------------------------------------------------


class NotStreamable(QLoRAKitError):
    """This architecture cannot be verified layer by layer (the caller falls back to whole models)."""


class _Tensors:
    """A checkpoint's tensors by name, whole or a range of rows, read with plain file reads.

    Not through a memory map: pages of a mapped shard count in the process's RSS while
    any tensor viewing them lives, and safetensors' slices keep them mapped. Here each
    tensor read is one owned buffer and nothing else.
    """

    def __init__(self, checkpoint):
        self.folder = checkpoint.folder
        self.where = checkpoint.tensor_names()  # also checks every shard's header
        self.headers: dict = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _info(self, name: str) -> tuple[Path, int, dict]:
        shard = self.where[name]
        if shard not in self.headers:
            self.headers[shard] = integrity.check_safetensors_size(shard)
        start, header = self.headers[shard]
        return shard, start, header[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[2]["shape"])

    def _read(self, name: str, first_row: int, rows: int) -> torch.Tensor:
        shard, start, info = self._info(name)
        with open(shard, "rb") as f:
            return read_tensor(f, shard, name, start, info, first_row, rows)

    def get(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self._read(name, 0, shape[0] if shape else 1)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, start, stop - start)

    def pick_rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor, read one by one: an embedding is never loaded whole."""
        return torch.cat([self._read(name, i, 1) for i in ids.tolist()])


class _Recorder(nn.Module):
    """Stands in for a decoder layer while the model's own forward computes what each layer is given."""

    def __init__(self, layer: nn.Module, calls: list, first: list):
        super().__init__()
        for attr in ("attention_type", "is_sliding", "layer_idx"):  # what model forwards read off their layers
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self.calls, self.first = calls, first

    def forward(self, hidden_states, *args, **kwargs):
        if not self.calls:
            self.first.append(hidden_states)
        self.calls.append((args, kwargs))
        return hidden_states


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _Side:
    """One model of the comparison, built a decoder layer at a time from its checkpoint.

    `net` is its skeleton on the meta device (4-bit layers where training had them);
    `stored(name, tensor)` is the value the model holds for a checkpoint tensor (the
    4-bit reference holds everything in its compute dtype, as loading does); an
    `adapter` (LoRAConfig, weights by module) is applied to each layer as it is built.
    Layers compute in their input's dtype: linear weights are cast (4-bit ones
    dequantized) a block of rows at a time, so no compute-dtype copy of a layer exists.
    """

    def __init__(self, net, checkpoint, *, stored, adapter=None):
        self.net = net
        self.tensors = _Tensors(checkpoint)
        self.stored = stored
        self.adapter = adapter
        self.config = net.config
        self.prefix, self.layers = _decoder_layers(net)
        self.decoder = net.get_decoder()
        self.norm_attr = next((a for a in ("norm", "final_layernorm", "final_layer_norm", "ln_f")
                               if hasattr(self.decoder, a)), None)
        names = {id(m): n for n, m in net.named_modules()}
        self.embed_name = names[id(net.get_input_embeddings())] + ".weight"
        self.norm_name = names[id(getattr(self.decoder, self.norm_attr))] if self.norm_attr else None
        head = names[id(net.get_output_embeddings())] + ".weight"
        self.head_name = head if head in self.tensors else self.embed_name  # tied: the embedding
        self.head_4bit = quantization.is_4bit_linear(net.get_output_embeddings()) and head in self.tensors
        self._head = None
        self._check()

    def _check(self) -> None:
        from transformers.pytorch_utils import Conv1D

        problems = []
        if self.norm_attr is None:
            problems.append("no final norm found")
        for attr in ("logit_scale", "logits_scaling"):
            if getattr(self.config, attr, None) not in (None, 1, 1.0):
                problems.append(f"its logits are scaled ({attr})")
        layer = self.layers[0]
        params = dict(layer.named_parameters())
        if any(p.ndim == 3 for p in params.values()):
            problems.append("its experts are stacked 3-D parameters")
        if any(isinstance(m, Conv1D) or issubclass(getattr(m, "source_cls", nn.Linear), Conv1D)
               for m in layer.modules()):
            problems.append("it has Conv1D layers (weights stored transposed)")
        missing = [n for n in params if f"{self.prefix}.0.{n}" not in self.tensors]
        if missing or self.embed_name not in self.tensors:
            problems.append(f"its checkpoint names differ from its parameter names (e.g. {self.prefix}.0.{missing[0] if missing else ''})")
        if problems:
            raise NotStreamable(f"{self.tensors.folder} ({self.config.model_type}): " + "; ".join(problems))

    # -- the pieces around the layers

    def layer_inputs(self, batch: dict, dtype: torch.dtype) -> tuple[torch.Tensor, list]:
        """(hidden states entering layer 0, each layer's (args, kwargs)) from the model's own forward.

        The decoder runs with recorders in place of its layers and an embedding that
        holds only the batch's rows, so the masks, position embeddings and embedding
        scaling are the model's own code's, in `dtype`.
        """
        ids = batch["input_ids"]
        unique, compact = torch.unique(ids, return_inverse=True)
        embed = self.net.get_input_embeddings()
        saved = embed.weight, getattr(embed, "padding_idx", None)
        rows = self.stored(self.embed_name, self.tensors.pick_rows(self.embed_name, unique)).to(dtype)
        calls: list = []
        first: list = []
        originals = list(self.layers)
        norm = getattr(self.decoder, self.norm_attr)
        try:
            embed.weight = nn.Parameter(rows, requires_grad=False)
            embed.padding_idx = None  # only gradients care; the index may lie outside the compact table
            for i, layer in enumerate(originals):
                self.layers[i] = _Recorder(layer, calls, first)
            setattr(self.decoder, self.norm_attr, nn.Identity())
            with torch.no_grad():
                self.decoder(input_ids=compact, attention_mask=batch["attention_mask"], use_cache=False)
        finally:
            embed.weight = saved[0]
            embed.padding_idx = saved[1]
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            setattr(self.decoder, self.norm_attr, norm)
        if len(calls) != len(originals):
            raise NotStreamable(f"{self.config.model_type}'s forward called {len(calls)} of its "
                                f"{len(originals)} layers")
        return first[0], calls

    def final_norm(self) -> nn.Module:
        module = copy.deepcopy(getattr(self.decoder, self.norm_attr))
        self._fill(module, self.norm_name)
        return _Computing(module)

    def head_rows(self, start: int, stop: int) -> torch.Tensor:
        if self.head_4bit:  # an unusual setup (lm_head not skipped): the head is rebuilt once, whole
            if self._head is None:
                self._head = quantization.quantize_roundtrip(
                    self.stored(self.head_name, self.tensors.get(self.head_name)), self.quant)
            return self._head[start:stop]
        return self.stored(self.head_name, self.tensors.rows(self.head_name, start, stop))

    def vocab_size(self) -> int:
        return self.tensors.shape(self.head_name)[0]

    # -- the layers

    def layer(self, index: int) -> "_Computing":
        module = self.layers[index]
        self.layers[index] = nn.Identity()  # the skeleton's copy is not needed again
        self._fill(module, f"{self.prefix}.{index}")
        if self.adapter is not None:
            self._apply_adapter(module, f"{self.prefix}.{index}.")
        return _Computing(module.eval())

    def _fill(self, module: nn.Module, prefix: str) -> None:
        for name, param in list(module.named_parameters()):
            full = f"{prefix}.{name}"
            if full not in self.tensors:
                raise NotStreamable(f"{self.tensors.folder} has no tensor {full}")
            value = self.stored(full, self.tensors.get(full))
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if tuple(value.shape) != tuple(param.shape):
                raise QLoRAKitError(f"{full} in {self.tensors.folder} has shape {tuple(value.shape)}, "
                                    f"the config expects {tuple(param.shape)}")
            if quantization.is_4bit_linear(owner) and leaf == "weight":
                quantization.linear4bit_from(owner, value)
            else:
                setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
            del value
            memory.release()  # the quantizer's temporaries and the shard pages read

    def _apply_adapter(self, module: nn.Module, prefix: str) -> None:
        from .adapter_io import split_key
        from .lora import apply_lora, lora_state_dict

        cfg, weights = self.adapter
        targets = sorted({split_key(k[len(prefix):])[0] for k in weights if k.startswith(prefix)})
        if not targets:
            return
        apply_lora(module, cfg, targets=targets)
        with torch.no_grad():
            for key, param in lora_state_dict(module).items():
                param.copy_(weights[prefix + key])


class _Computing:
    """A filled module that computes in its input's dtype, with every weight cast a block of rows at a time.

    Linear weights (4-bit ones dequantized) are cast as each block is used; the other
    floating parameters (norms) are switched to the pass's dtype from their stored
    values. The LoRA adapters keep their own precision, as in training.
    """

    def __init__(self, module: nn.Module):
        from .lora import LoRALinear

        self.module = module
        inside_lora = set()
        for m in module.modules():
            if isinstance(m, LoRALinear):
                inside_lora |= {id(x) for x in m.modules()} - {id(x) for x in m.base.modules()}
        linear_params = set()
        for m in module.modules():
            if id(m) in inside_lora:
                continue
            if quantization.is_4bit_linear(m):
                quantization.compute_with_dequantized_weights(m, None)
            elif isinstance(m, nn.Linear):
                m.forward = functools.partial(_cast_linear_forward, m)
            else:
                continue
            linear_params |= {id(p) for p in m.parameters()}
        self.others = [(m, leaf, p.data) for m in module.modules() if id(m) not in inside_lora
                       for leaf, p in m.named_parameters(recurse=False)
                       if id(p) not in linear_params and p.is_floating_point()]
        self.dtype = None

    def __call__(self, dtype: torch.dtype) -> nn.Module:
        if dtype != self.dtype:
            for m, leaf, stored in self.others:
                getattr(m, leaf).data = stored.to(dtype)
            self.dtype = dtype
        return self.module

    def close(self) -> None:
        """Free the layer now: its patched forwards and 4-bit weights refer back to their modules (cycles)."""
        for m in self.module.modules():
            m.__dict__.pop("forward", None)
        self.module = self.others = None
        gc.collect()


def _cast_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    rows = weight.shape[0]
    step = max(1, quantization.CHUNK_ELEMENTS // weight.shape[1])
    if step >= rows:  # also when no cast is needed: CPU float16 products convert their whole weight
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    out = torch.empty(*x.shape[:-1], rows, dtype=x.dtype, device=x.device)
    for start in range(0, rows, step):
        part = None if bias is None else bias[start:start + step].to(x.dtype)
        out[..., start:start + step] = F.linear(x, weight[start:start + step].to(x.dtype), part)
    return out


def served_dtype(config) -> torch.dtype | None:
    """The dtype an export is served in by default (its config's; transformers' and vLLM's 'auto'), unless float32."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    return None if dtype in (None, torch.float32) else dtype


def _decoder_layers(net: nn.Module) -> tuple[str, nn.ModuleList]:
    count = getattr(net.config, "num_hidden_layers", None)
    for name, module in net.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            return name, module
    raise NotStreamable(f"{type(net).__name__} has no list of {count} decoder layers")


def _plain_skeleton(config, model_cfg, dtype: torch.dtype = torch.float32):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from . import loading

    attention = model_cfg.attn_implementation
    if hasattr(loading, "attention_for"):  # the kernel the 4-bit skeleton gets, for a model that lacks the asked one
        attention = loading.attention_for(config, attention)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                                                attn_implementation=attention)


class _Stream:
    """One chain of hidden states through one side's layers in one dtype, batch by batch."""

    def __init__(self, name: str, side: _Side, dtype: torch.dtype, inputs: list):
        self.name, self.side, self.dtype = name, side, dtype
        self.hidden, self.calls = [], []
        for batch in inputs:
            first, calls = side.layer_inputs(batch, dtype)
            self.hidden.append(first)
            self.calls.append(calls)

    def run(self, layer: _Computing, index: int) -> None:
        module = layer(self.dtype)
        self.hidden = [_released(_run_layer(module, h, calls[index])) for h, calls in zip(self.hidden, self.calls)]


def _released(value):
    """`value`, after handing the heap's free pages back to the OS: a layer's temporaries, freed, would
    otherwise stay resident (glibc keeps them) and pile up from one forward to the next."""
    memory.release()
    return value


def _rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per real position: |a - b| / |scale or b|."""
    a, b = a.float()[mask], b.float()[mask]
    den = (scale.float()[mask] if scale is not None else b).norm(dim=-1).clamp_min(1e-30)
    return (a - b).norm(dim=-1) / den


@torch.no_grad()
def stream_compare(export_dir, record, base_folder, quant: dict, *, mode: str, inputs: list,
                   force: bool = False, noise_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The export against its reference, one decoder layer of each in RAM at a time.

    Streams of hidden states, each fed its own side's layers: the reference (fp32),
    the merged export (fp32), the reference computed in bf16 (the noise floor) and,
    for mode original, the trained 4-bit model. Layer by layer, each side's layer is
    built from its checkpoint, run on every batch, and dropped; the export's layer is
    also run on the reference's input (`local`: its own error, free of what earlier
    layers passed on). The final logits are scored a vocabulary chunk at a time.
    """
    from transformers import AutoConfig

    from .checkpoint import resolve
    from .loading import build_skeleton

    model_cfg = record.base_model(str(base_folder))
    base = resolve(str(base_folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a --force'd base mismatch was already reported by the merge
        record.check_base(base.fingerprint(), str(base.folder), force=force)
    base_config = AutoConfig.from_pretrained(base.folder, trust_remote_code=model_cfg.trust_remote_code)
    export_config = AutoConfig.from_pretrained(export_dir, trust_remote_code=model_cfg.trust_remote_code)
    served = served_dtype(export_config)  # before from_config overwrites the config's dtype
    inputs = _single_rows(inputs)
    adapter = (record.lora_config(), record.weights())
    qcfg = quantization.quant_config_from_record(quant)
    compute = torch_dtype(qcfg.compute_dtype)

    def as_trained(name, tensor):  # what loading holds: every float tensor in the compute dtype
        return tensor.to(compute) if tensor.is_floating_point() else tensor

    def as_stored(name, tensor):
        return tensor

    trained = _Side(build_skeleton(base_config, qcfg, model_cfg), base, stored=as_trained, adapter=adapter)
    trained.quant = quant
    merged = _Side(_plain_skeleton(export_config, model_cfg), resolve(str(export_dir)), stored=as_stored)
    reference = trained
    if mode == "original":
        reference = _Side(_plain_skeleton(base_config, model_cfg), base, stored=as_stored, adapter=adapter)
    sides = [reference] + ([trained] if reference is not trained else []) + [merged]

    streams = {"reference": _Stream("reference", reference, torch.float32, inputs),
               "noise": _Stream("noise", reference, noise_dtype, inputs),
               "merged": _Stream("merged", merged, torch.float32, inputs)}
    if mode == "original":
        streams["trained"] = _Stream("trained", trained, torch.float32, inputs)
    if served is not None:
        streams["served"] = _Stream("served", merged, served, inputs)
    masks = [b["attention_mask"].bool() for b in inputs]
    layers = []
    count = len(reference.layers)
    for index in range(count):
        before = streams["reference"].hidden
        local = []
        for side in sides:
            layer = side.layer(index)
            for stream in streams.values():
                if stream.side is side:
                    stream.run(layer, index)
            if side is merged:  # the export's layer on exactly the reference's input
                module = layer(torch.float32)
                for b, (h, calls) in enumerate(zip(before, streams["merged"].calls)):
                    out = _released(_run_layer(module, h, calls[index]))
                    ref_out = streams["reference"].hidden[b]
                    local.append(_rel(out, ref_out, masks[b], scale=ref_out - h))
                del module, out
            layer.close()
            del layer
            memory.release()
        layers.append(_layer_stats(index, local, streams, masks))
        log.debug("layer %d/%d: %s", index + 1, count, layers[-1])
    return {"method": "streaming, one decoder layer of each model at a time", "layers": layers,
            **_score_streams(streams, sides, inputs, mode)}


def _single_rows(inputs: list) -> list:
    """Each row alone, padding dropped: activations stay those of one sequence (the metrics are per position)."""
    rows = []
    for b, batch in enumerate(inputs):
        batch = _as_batch(batch)
        for r, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            length = int(mask.sum())
            if not bool(mask[:length].all()):
                raise NotStreamable("verification rows must be right-padded")
            if length:
                rows.append({"input_ids": ids[None, :length], "attention_mask": mask[None, :length],
                             "batch": b, "row": r})
    return rows


def _layer_stats(index: int, local: list, streams: dict, masks: list) -> dict:
    ref = streams["reference"].hidden
    chain = torch.cat([_rel(h, r, m) for h, r, m in zip(streams["merged"].hidden, ref, masks)])
    noise = torch.cat([_rel(h, r, m) for h, r, m in zip(streams["noise"].hidden, ref, masks)])
    local = torch.cat(local)
    stats = {"layer": index, "local_rel_mean": float(local.mean()), "local_rel_max": float(local.max()),
             "merged_rel_mean": float(chain.mean()), "merged_rel_max": float(chain.max()),
             "noise_rel_mean": float(noise.mean()), "noise_rel_max": float(noise.max())}
    if "served" in streams:
        served = torch.cat([_rel(h, r, m) for h, r, m in zip(streams["served"].hidden, ref, masks)])
        stats["served_rel_mean"] = float(served.mean())
    return stats


def _score_streams(streams: dict, sides: list, inputs: list, mode: str) -> dict:
    """Final norm, then the head a block of vocabulary rows at a time, scored online for every pair."""
    pairs = {"metrics": ("reference", "merged"), "noise_floor": ("reference", "noise")}
    if "served" in streams:
        pairs["served"] = ("reference", "served")
    if mode == "original":
        pairs["drift_from_trained"] = ("trained", "merged")
    norms = {id(side): side.final_norm() for side in sides}
    finals, positions = {}, []
    for b, batch in enumerate(inputs):
        flat, targets, where = _positions(batch, b)
        positions.append((targets, where))
        for name, stream in streams.items():
            norm = norms[id(stream.side)](stream.dtype)
            h = norm(stream.hidden[b])
            finals[name, b] = h.reshape(-1, h.shape[-1])[flat]
    for stream in streams.values():
        stream.hidden = None
    cap = getattr(streams["reference"].side.config, "final_logit_softcapping", None)
    batches = range(len(inputs))
    scores = {(name, b): _Scores(positions[b][0]) for name in streams for b in batches}
    running = {(key, b): _Pair(len(positions[b][0])) for key in pairs for b in batches}
    vocab = streams["reference"].side.vocab_size()
    step = max(1, quantization.CHUNK_ELEMENTS // finals["reference", 0].shape[-1])
    for start in range(0, vocab, step):
        rows = {id(side): side.head_rows(start, min(start + step, vocab)) for side in sides}
        for b in batches:
            chunk, seen = {}, {}
            for name, stream in streams.items():
                logits = F.linear(finals[name, b], rows[id(stream.side)].to(stream.dtype))
                if cap:  # Gemma-2's final soft-capping, as its forward applies it
                    logits = torch.tanh(logits / cap) * cap
                chunk[name] = logits.float()
                seen[name] = scores[name, b].update(chunk[name], start)
            for key, (ref, cand) in pairs.items():
                running[key, b].update(chunk[ref], chunk[cand], *seen[ref])
        del rows, chunk, seen
        memory.release()
    result = {}
    for key, (ref, cand) in pairs.items():
        agreement = Agreement()
        for b in batches:
            agreement.add(running[key, b], scores[ref, b], scores[cand, b], positions[b][1])
        result[key] = agreement.result()
    return result


def token_batches(tokenizer, texts: list[str], batches: int, seq_len: int = SEQ_LEN,
                  batch_size: int = BATCH_SIZE) -> list[torch.Tensor]:
    """`batches` tensors of (batch_size, seq_len) ids cut from the texts joined by EOS (repeated if short).

    Every window starts with the tokenizer's BOS (else EOS, the separator the texts are
    joined by), as a real input starts with a start or chat token. A window cut
    mid-sentence puts an arbitrary token first, where models form their attention-sink
    "massive activations" (SmolLM2: hidden-state norms of ~24000 at position 0, and at
    times a second one at position 1); such positions are out of distribution and
    amplify any rounding ~20x, so a handful of them dominated the old metrics (one
    position gave half the mean KL of a bf16 export and all of an fp16 one's).
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            stream.extend(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    if not stream:
        raise QLoRAKitError("verification texts are empty")
    body = seq_len - (start is not None)
    needed = batches * batch_size * body
    if len(stream) < needed:
        log.info("verification texts give %d tokens; repeating them to fill %d", len(stream), needed)
        stream = (stream * (needed // len(stream) + 1))
    ids = torch.tensor(stream[:needed], dtype=torch.long).view(batches, batch_size, body)
    if start is not None:
        ids = torch.cat([torch.full((batches, batch_size, 1), start, dtype=torch.long), ids], dim=-1)
    return list(ids.unbind(0))


def load_texts(texts) -> tuple[list[str], str]:
    """(texts, where they came from) from None (built-in), a list of strings or a .txt/.jsonl file."""
    if texts is None:
        return list(BUILTIN_TEXTS), "built-in"
    if isinstance(texts, (list, tuple)):
        return [str(t) for t in texts], f"{len(texts)} given texts"
    path = Path(texts).expanduser()
    if not path.is_file():
        raise QLoRAKitError(f"verification file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        found = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    found.append("\n".join(_strings(json.loads(line))))
                except ValueError as exc:
                    raise QLoRAKitError(f"{path}:{number} is not valid JSON ({exc})") from exc
    else:
        found = [part for part in raw.split("\n\n")]
    found = [t for t in found if t.strip()]
    if not found:
        raise QLoRAKitError(f"verification file {path} holds no text")
    return found, str(path)


def _strings(value) -> list[str]:
    """Every string in a JSON record (text, prompt/response, chat messages...), in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def summary(report: dict) -> str:
    if report.get("kind") == "classification":  # a classifier's report compares class logits
        from .classifier_export import summary as classifier_summary

        return classifier_summary(report)
    m = report["metrics"]
    text = (
        f"top-1 agreement {m['top1_agreement']:.2%} (min {report['min_agreement']:.2%}), "
        f"KL {m['mean_kl']:.2e} nats, perplexity {m['ppl_reference']:.3f} (reference) vs "
        f"{m['ppl_merged']:.3f} (merged), max |logit diff| {m['max_abs_logit_diff']:.3g}, "
        f"{m['tokens']} tokens: {'passed' if report['passed'] else 'FAILED'}"
    )
    noise = report.get("noise_floor")
    if noise:
        text += (f"; noise floor (reference in bf16 vs fp32): top-1 {noise['top1_agreement']:.2%}, "
                 f"KL {noise['mean_kl']:.2e}: {report['noise_floor_verdict']}")
    served = report.get("served")
    if served:
        text += (f"; served in {report['served_dtype']}: top-1 {served['top1_agreement']:.2%}, "
                 f"KL {served['mean_kl']:.2e}" + ("" if served["finite"] else ", NON-FINITE logits (overflow)"))
    drift = report.get("drift_from_trained")
    if drift:
        text += (f"; vs the trained 4-bit model: top-1 agreement {drift['top1_agreement']:.2%}, "
                 f"KL {drift['mean_kl']:.2e}, perplexity {drift['ppl_reference']:.3f} (trained)")
    return text


def write_report(folder: str | os.PathLike, report: dict) -> None:
    """verification.json (everything) and verification.md (for people) into the export folder."""
    folder = Path(folder)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    m = report["metrics"]
    columns = [("merged vs reference", m)]
    if report.get("noise_floor"):
        columns.append(("noise floor: reference in bf16 vs fp32", report["noise_floor"]))
    if report.get("served"):
        columns.append((f"merged computed in {report['served_dtype']} vs reference", report["served"]))
    if report.get("drift_from_trained"):
        columns.append(("merged vs trained 4-bit", report["drift_from_trained"]))
    lines = [
        "# Export verification",
        "",
        f"**{'Passed' if report['passed'] else 'FAILED'}** (mode `{report['mode']}`, "
        f"minimum top-1 agreement {report['min_agreement']:.2%})",
        "",
        f"Reference: {report['reference']}. Text: {report['texts']}, {m['tokens']} tokens "
        f"({report['batches']} batches of up to {report['batch_size']} x {report['seq_len']}). "
        f"Method: {report.get('method', 'whole models')}.",
        "",
    ]
    if report.get("noise_floor_verdict"):
        lines += [f"The export is {report['noise_floor_verdict']} (the noise floor is what computing the "
                  "reference itself in bf16 instead of fp32 changes).", ""]
    lines += ["| metric | " + " | ".join(name for name, _ in columns) + " |",
              "|---|" + "---|" * len(columns)]
    rows = [("top-1 agreement", "top1_agreement", "{:.4%}"), ("mean KL (nats)", "mean_kl", "{:.3e}"),
            ("perplexity, reference", "ppl_reference", "{:.4f}"), ("perplexity, compared", "ppl_merged", "{:.4f}"),
            ("max abs logit diff", "max_abs_logit_diff", "{:.4g}"),
            ("mean abs logit diff", "mean_abs_logit_diff", "{:.4g}"), ("finite logits", "finite", "{}")]
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(col[key]) for _, col in columns) + " |")
    worst = m.get("worst")
    if worst:
        lines += ["", f"Largest KL of the merged model: {worst['kl']:.3e} at batch {worst['batch']}, row "
                      f"{worst['row']}, position {worst['position']} (input token {worst.get('token', worst['token_id'])!r})."]
    layers = report.get("layers")
    if layers:
        served = "served_rel_mean" in layers[0]
        lines += ["", "## Layer by layer", "",
                  "Relative differences of the hidden states after each decoder layer, mean (max) over "
                  "positions. *local*: the merged layer and the reference layer on the same input, relative "
                  "to the layer's update (the layer's own error). *merged* / *noise*"
                  + (" / *served*" if served else "") + ": each model's own chain against the reference's, "
                  "relative to the hidden state (what has accumulated).", "",
                  "| layer | local | merged | noise (bf16) |" + (" served |" if served else ""),
                  "|---:|---:|---:|---:|" + ("---:|" if served else "")]
        for row in layers:
            line = (f"| {row['layer']} | {row['local_rel_mean']:.2e} ({row['local_rel_max']:.1e}) | "
                    f"{row['merged_rel_mean']:.2e} ({row['merged_rel_max']:.1e}) | "
                    f"{row['noise_rel_mean']:.2e} ({row['noise_rel_max']:.1e}) |")
            if served:
                line += f" {row['served_rel_mean']:.2e} |"
            lines.append(line)
    (folder / REPORT_MD).write_text("\n".join(lines) + "\n")
