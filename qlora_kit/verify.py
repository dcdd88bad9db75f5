"""Fidelity report of a merged export: the exported checkpoint against the adapter on its base, on the same tokens.

What is compared
    candidate  the export, loaded with plain `transformers.AutoModelForCausalLM`
               in float32 (no qlora_kit, no PEFT): what users will load.
    reference  what the export claims to compute:
               - mode nf4: the base loaded in 4-bit exactly as for training
                 (`load_base` with the manifest's quantization) + the adapter
                 (`load_adapter`), i.e. the trained model;
               - mode original: the original-precision base + the adapter. The
                 drift from the trained 4-bit model is reported too
                 (`drift_from_trained`), for information: it measures the
                 trade-off the user chose, not a fault of the export.

Both sides compute in float32. The 4-bit reference normally computes in its
compute dtype (bf16), and on the CPU bitsandbytes' fused 4-bit kernel rounds
activations to bf16 even when asked for fp32. So each of its `Linear4bit` layers
is made to compute `F.linear(x, dequantize_weight(layer))` in fp32 (exactly the
values the 4-bit model multiplies by; its 4-bit storage is kept), and its other
weights and the adapter are upcast. Comparing a bf16-compute reference with an
fp32 candidate would mostly measure bf16 activation rounding, which depends on
hardware and kernels and says nothing about the export (on SmolLM2 it alone
flips ~1% of top-1 tokens and moves logits by up to 2); with fp32 on both sides
the only differences left are the export's own (rounding the merged weights to
the output dtype, summation order), so the check is strict and stable. A served
bf16 model adds the same activation rounding to both.

Metrics, over every position of `batches` x 4 x 128 tokens of text (a
--verify-file, else a built-in set of English paragraphs; the token stream is
repeated if too short):
    mean_kl             mean KL(reference || candidate) of next-token distributions, nats
    top1_agreement      fraction of positions where both pick the same top token
    ppl_reference/ppl_merged  perplexity of each on the text
    max_abs_logit_diff, mean_abs_logit_diff
The export passes when top1_agreement >= min_agreement (`merge --min-agreement`;
the same in both modes, since each is compared with its own reference) and every
logit is finite.

Memory: both models are in host RAM at once (the candidate at 4 bytes/parameter,
the 4-bit reference at ~0.5), plus one batch's logits. Merges of models that do
not fit should skip verification (`--verify 0`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import quantization
from .errors import QLoRAKitError

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
                  force: bool = False) -> dict:
    """Compare the export in `export_dir` with its reference (see the module docstring); returns the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threshold = float(min_agreement)
    text_list, text_source = load_texts(texts)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    inputs = token_batches(tokenizer, text_list, batches)
    candidate = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    reference = reference_model(base_folder, adapter_dir, quant, quantized=(mode == "nf4"), force=force)
    metrics = compare(reference, candidate, inputs)
    del reference
    report = {
        "passed": metrics["top1_agreement"] >= threshold and metrics["finite"],
        "mode": mode,
        "min_agreement": threshold,
        "reference": ("4-bit base (as trained) + adapter" if mode == "nf4" else "original base + adapter")
                     + ", both sides computing in float32",
        "texts": text_source,
        "batches": len(inputs),
        "seq_len": SEQ_LEN,
        "batch_size": BATCH_SIZE,
        "metrics": metrics,
    }
    if mode == "original":
        trained = reference_model(base_folder, adapter_dir, quant, quantized=True, force=force)
        report["drift_from_trained"] = compare(trained, candidate, inputs)
        del trained
    log.info("verification: %s", summary(report))
    return report


def reference_model(base_folder, adapter_dir, quant: dict, *, quantized: bool, force: bool = False) -> nn.Module:
    """The base (4-bit as trained, or original) plus the adapter, computing in float32."""
    from .adapter_io import load_adapter

    if quantized:
        from .loading import load_base
        from .settings import ModelConfig

        model, _, info = load_base(ModelConfig(base=str(base_folder), device="cpu"),
                                   quantization.quant_config_from_record(quant))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a --force'd base mismatch was already reported by the merge
            load_adapter(model, adapter_dir, base=info, strict_base=not force)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
        load_adapter(model, adapter_dir)  # a plain model has no base record: nothing to re-check
    to_fp32_compute(model)
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


@torch.no_grad()
def compare(reference: nn.Module, candidate: nn.Module, batches: list[torch.Tensor]) -> dict:
    """Next-token agreement metrics of `candidate` against `reference` on the same token batches."""
    tokens = agree = 0
    kl_sum = nll_ref = nll_cand = abs_sum = 0.0
    max_abs = 0.0
    finite = True
    for ids in batches:
        ref = reference(input_ids=ids).logits.float()
        cand = candidate(input_ids=ids).logits.float()
        finite = finite and bool(torch.isfinite(cand.sum()))  # one NaN/inf makes the sum non-finite
        logp_ref, logp_cand = F.log_softmax(ref, -1), F.log_softmax(cand, -1)
        # sum p_ref * (log p_ref - log p_cand); written out, as F.kl_div is several times slower on CPU
        kl_sum += (logp_ref.exp() * (logp_ref - logp_cand)).sum().item()
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        diff = (ref - cand).abs()
        max_abs = max(max_abs, diff.max().item())
        abs_sum += diff.mean(-1).sum().item()
        targets = ids[:, 1:].unsqueeze(-1)
        nll_ref -= logp_ref[:, :-1].gather(-1, targets).sum().item()
        nll_cand -= logp_cand[:, :-1].gather(-1, targets).sum().item()
        tokens += ids.numel()
        del ref, cand, logp_ref, logp_cand, diff
    predicted = sum(ids[:, 1:].numel() for ids in batches)
    return {
        "tokens": tokens,
        "top1_agreement": agree / tokens,
        "mean_kl": kl_sum / tokens,
        "ppl_reference": math.exp(nll_ref / predicted),
        "ppl_merged": math.exp(nll_cand / predicted),
        "max_abs_logit_diff": max_abs,
        "mean_abs_logit_diff": abs_sum / tokens,
        "finite": finite,
    }


def token_batches(tokenizer, texts: list[str], batches: int, seq_len: int = SEQ_LEN,
                  batch_size: int = BATCH_SIZE) -> list[torch.Tensor]:
    """`batches` tensors of (batch_size, seq_len) ids cut from the texts joined by EOS (repeated if short)."""
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            stream.extend(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    if not stream:
        raise QLoRAKitError("verification texts are empty")
    needed = batches * batch_size * seq_len
    if len(stream) < needed:
        log.info("verification texts give %d tokens; repeating them to fill %d", len(stream), needed)
        stream = (stream * (needed // len(stream) + 1))
    ids = torch.tensor(stream[:needed], dtype=torch.long).view(batches, batch_size, seq_len)
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
    m = report["metrics"]
    text = (
        f"top-1 agreement {m['top1_agreement']:.2%} (min {report['min_agreement']:.2%}), "
        f"KL {m['mean_kl']:.2e} nats, perplexity {m['ppl_reference']:.3f} (reference) vs "
        f"{m['ppl_merged']:.3f} (merged), max |logit diff| {m['max_abs_logit_diff']:.3g}, "
        f"{m['tokens']} tokens: {'passed' if report['passed'] else 'FAILED'}"
    )
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
    lines = [
        "# Export verification",
        "",
        f"**{'Passed' if report['passed'] else 'FAILED'}** (mode `{report['mode']}`, "
        f"minimum top-1 agreement {report['min_agreement']:.2%})",
        "",
        f"Reference: {report['reference']}. Text: {report['texts']}, {m['tokens']} tokens "
        f"({report['batches']} batches of {report['batch_size']} x {report['seq_len']}).",
        "",
        "| metric | merged vs reference |" + (" merged vs trained 4-bit |" if "drift_from_trained" in report else ""),
        "|---|---|" + ("---|" if "drift_from_trained" in report else ""),
    ]
    rows = [("top-1 agreement", "top1_agreement", "{:.4%}"), ("mean KL (nats)", "mean_kl", "{:.3e}"),
            ("perplexity, reference", "ppl_reference", "{:.4f}"), ("perplexity, merged", "ppl_merged", "{:.4f}"),
            ("max abs logit diff", "max_abs_logit_diff", "{:.4g}"),
            ("mean abs logit diff", "mean_abs_logit_diff", "{:.4g}")]
    drift = report.get("drift_from_trained")
    for label, key, fmt in rows:
        line = f"| {label} | {fmt.format(m[key])} |"
        if drift:
            line += f" {fmt.format(drift[key])} |"
        lines.append(line)
    (folder / REPORT_MD).write_text("\n".join(lines) + "\n")
