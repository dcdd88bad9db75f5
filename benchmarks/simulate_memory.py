"""Simulated GPU memory and FLOPs of QLoRA training: qlora_kit vs the transformers + PEFT recipe.

Every number this script writes is SIMULATED: no GPU is used. Each system's real
training step runs on fake (shape-only) tensors on a simulated GPU
(`qlora_kit.gpu_sim`), and a tracker counts the tensors alive at the peak
(`qlora_kit.memory_plan`); an assumed CUDA context/workspace allowance
(`memory_plan.CUDA_OVERHEAD_BYTES`) is added for "fits in N GB" answers. See
`benchmarks/reference_sim.py` for exactly how the reference is set up.

    python benchmarks/simulate_memory.py --models llama-3.1-8b            # ~30 min on 2 CPU cores
    python benchmarks/simulate_memory.py --models llama-3.2-1b llama-3.1-8b qwen2.5-7b gemma-2-9b
    python benchmarks/simulate_memory.py --models llama-3.1-8b --skip-search   # peaks only, minutes

Writes benchmarks/results/<date>-simulated-memory.json (every report, appended per
model) and .md (the tables). This process installs the simulated GPU (irreversible),
so it is its own worker: run it as a script, not from an interpreter you keep using.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import reference_sim  # noqa: E402
from qlora_kit import memory_plan as mp  # noqa: E402
from qlora_kit.settings import ModelConfig, RunConfig  # noqa: E402

CONFIGS = ROOT / "recipes" / "configs"
# name -> (published config.json copy, attention implementation as its recipe uses it)
MODELS = {
    "llama-3.2-1b": ("llama-3.2-1b-instruct.json", "sdpa"),
    "llama-3.1-8b": ("llama-3.1-8b-instruct.json", "sdpa"),
    "qwen2.5-7b": ("qwen2.5-7b-instruct.json", "sdpa"),
    "gemma-2-9b": ("gemma-2-9b-it.json", "eager"),  # recipes/gemma-2-9b-alpaca.yaml: softcapping needs eager
}
# A "24 GB" card (RTX 3090/4090) has 24 GiB (nvidia-smi: 24,564 MiB); an "80 GB" A100/H100 has 80 GiB.
GPUS = {"24GB": 24 * 2**30, "80GB": 80 * 2**30}
SEQ = 2048
# Published figures, quoted for comparison only (nothing here is fitted to them).
PUBLISHED = {
    "torchtune_llama31_8b_qlora_4090": "torchtune: Llama-3.1-8B QLoRA, RTX 4090, batch 2, packed 2048, "
                                       "torch.compile: peak 7.4 GiB",
    "unsloth_hf_fa2_llama31_8b": "Unsloth's context-length table, Llama-3.1-8B QLoRA batch 1, "
                                 "transformers + FA2: longest context 5,789 tokens at 24 GB, 28,454 at 80 GB",
}

log = logging.getLogger("simulate_memory")


def base_run(name: str) -> RunConfig:
    config_file, attn = MODELS[name]
    return RunConfig(model=ModelConfig(base=str(CONFIGS / config_file), attn_implementation=attn))


def with_offloading(run: RunConfig) -> RunConfig:
    import copy

    run = copy.deepcopy(run)
    run.train.activation_offloading = True
    return run


def timed(label: str, fn):
    start = time.perf_counter()
    value = fn()
    log.info("%s: %s (%.0f s)", label, _short(value), time.perf_counter() - start)
    return value


def _short(value) -> str:
    if isinstance(value, mp.MemoryReport):
        return f"peak {value.peak_bytes / 2**30:.2f} GiB, total {value.total_bytes / 2**30:.2f} GiB"
    return str(value)


def simulate_model(name: str, search: bool) -> dict:
    run = base_run(name)
    hf_config = mp.model_config(run.model)
    result = {"model": name, "config": MODELS[name][0], "attn_implementation": MODELS[name][1],
              "layers": hf_config.num_hidden_layers, "reports": {}, "longest_sequence": {}}
    reports = result["reports"]

    def ours(batch, flops):
        return mp._simulate_step(run, device="cuda", batch_size=batch, seq_len=SEQ, steps=1, flops=flops,
                                 hf_config=hf_config)

    def ref(batch, cast, flops):
        return reference_sim.simulate_reference(run, batch_size=batch, seq_len=SEQ, fp32_cast=cast, flops=flops,
                                                hf_config=hf_config)

    for batch in (1, 4):
        flops = batch == 1
        reports[f"qlora_kit_b{batch}"] = timed(f"{name} qlora_kit b{batch}", lambda: ours(batch, flops)).as_dict()
        reports[f"reference_b{batch}"] = timed(f"{name} reference b{batch}",
                                               lambda: ref(batch, True, flops)).as_dict()
        reports[f"reference_nocast_b{batch}"] = timed(f"{name} reference no-cast b{batch}",
                                                      lambda: ref(batch, False, False)).as_dict()
    if search:
        longest = result["longest_sequence"]
        for gpu, nbytes in GPUS.items():
            longest[f"qlora_kit_{gpu}"] = timed(f"{name} qlora_kit longest {gpu}",
                                                lambda: mp.longest_sequence(run, nbytes))
            longest[f"qlora_kit_offload_{gpu}"] = timed(
                f"{name} qlora_kit+offload longest {gpu}", lambda: mp.longest_sequence(with_offloading(run), nbytes))
            longest[f"reference_{gpu}"] = timed(
                f"{name} reference longest {gpu}",
                lambda: reference_sim.longest_reference_sequence(run, nbytes, hf_config=hf_config))
        longest["cap_max_position_embeddings"] = hf_config.max_position_embeddings
    if name == "llama-3.1-8b":
        # For the published torchtune figure (batch 2, packed 2048), and one lever at long context.
        import copy

        packed = copy.deepcopy(run)
        packed.data.packing = True
        reports["qlora_kit_b2_packed"] = timed(f"{name} qlora_kit b2 packed", lambda: mp._simulate_step(
            packed, device="cuda", batch_size=2, seq_len=SEQ, steps=1, flops=False, hf_config=hf_config)).as_dict()
        if search:
            no_dropout = with_offloading(run)
            no_dropout.lora.dropout = 0.0
            result["longest_sequence"]["qlora_kit_offload_dropout0_24GB"] = timed(
                f"{name} qlora_kit+offload, lora.dropout=0, longest 24GB",
                lambda: mp.longest_sequence(no_dropout, GPUS["24GB"]))
    return result


def _gib(n) -> str:
    return f"{n / 2**30:.2f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def render(results: list[dict], meta: dict) -> str:
    lines = [f"# Simulated GPU memory: qlora_kit vs transformers + PEFT ({meta['date']})", "",
             "**Every number here is simulated** (`benchmarks/simulate_memory.py`): real training steps run on "
             "fake, shape-only tensors on a simulated GPU (`qlora_kit/gpu_sim.py`), and a tracker counts the "
             "tensors alive at the peak, rounded to 512-byte allocator blocks (the analogue of "
             "`torch.cuda.max_memory_allocated`). *total* adds an assumed "
             f"{mp.CUDA_OVERHEAD_BYTES / 2**30:.2f} GiB for the CUDA context, workspaces and allocator slack "
             "(not simulated). No GPU was used; nothing is fitted to published figures.", "",
             f"Settings (both systems): NF4 + double quant, bf16 compute and autocast, LoRA r=16 alpha=32 "
             f"dropout=0.05 on every linear but the head (fp32 adapters), gradient checkpointing (non-reentrant), "
             f"paged 8-bit AdamW, grad clipping, seq {SEQ} unpacked rows with every token supervised, no padding. "
             "qlora_kit: its training loop's path (fused chunked loss, 1024-row chunks). reference: "
             "`prepare_model_for_kbit_training` (fp32 cast of embeddings/norms/head) + `get_peft_model` + "
             "`model(**batch, labels=...)` (full logits); *no-cast*: the same without the fp32 cast. "
             "Gemma-2 uses eager attention in both, as its recipe does.", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"peft {meta['peft']}, bitsandbytes {meta['bitsandbytes']}.", "",
             "## Peak at seq 2048 (GiB, simulated)", "",
             "| model | batch | qlora_kit peak | reference peak | no-cast peak | qlora_kit / reference | "
             "qlora_kit / no-cast | qlora_kit total | reference total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        r = res["reports"]
        for b in (1, 4):
            o, ref, nc = r.get(f"qlora_kit_b{b}"), r.get(f"reference_b{b}"), r.get(f"reference_nocast_b{b}")
            if not o:
                continue
            lines.append(f"| {res['model']} | {b} | {_gib(o['peak_bytes'])} | {_gib(ref['peak_bytes'])} | "
                         f"{_gib(nc['peak_bytes'])} | {_ratio(o['peak_bytes'], ref['peak_bytes'])} | "
                         f"{_ratio(o['peak_bytes'], nc['peak_bytes'])} | {_gib(o['total_bytes'])} | "
                         f"{_gib(ref['total_bytes'])} |")
    if any(res["longest_sequence"] for res in results):
        lines += ["", "## Longest sequence that fits, batch 1 (tokens, simulated; total incl. the assumed overhead; "
                  "24GB = 24 GiB, 80GB = 80 GiB, the cards' real sizes)",
                  "", "| model | GPU | qlora_kit | qlora_kit + activation offloading | reference | "
                  "qlora_kit / reference | offloading / reference |", "|---|---|---|---|---|---|---|"]
        for res in results:
            ls = res["longest_sequence"]
            for gpu in GPUS:
                if f"qlora_kit_{gpu}" not in ls:
                    continue
                o, off, ref = ls[f"qlora_kit_{gpu}"], ls[f"qlora_kit_offload_{gpu}"], ls[f"reference_{gpu}"]
                cap = ls["cap_max_position_embeddings"]
                mark = lambda n: f"{n:,}" + (" (= max_position_embeddings)" if n >= cap else "")  # noqa: E731
                bound = lambda n: ">= " if n >= cap and ref < cap else ""  # noqa: E731  (capped: a lower bound)
                lines.append(f"| {res['model']} | {gpu} | {mark(o)} | {mark(off)} | {mark(ref)} | "
                             f"{bound(o)}{_ratio(o, ref)} | {bound(off)}{_ratio(off, ref)} |")
    lines += ["", "## FLOPs per step, batch 1 x 2048 (simulated count; recompute included)", "",
              "| model | model FLOPs 4N·tokens (TFLOP) | qlora_kit counted (TFLOP) | reference counted (TFLOP) | "
              "qlora_kit counted / model | reference counted / model |", "|---|---|---|---|---|---|"]
    for res in results:
        o, ref = res["reports"].get("qlora_kit_b1"), res["reports"].get("reference_b1")
        if not o or not o.get("flops_per_step"):
            continue
        m = o["model_flops_per_step"]
        lines.append(f"| {res['model']} | {m / 1e12:.1f} | {o['flops_per_step'] / 1e12:.1f} | "
                     f"{ref['flops_per_step'] / 1e12:.1f} | {o['flops_per_step'] / m:.2f} | "
                     f"{ref['flops_per_step'] / m:.2f} |")
    lines += ["", "4N·tokens: N = weights that multiply activations (every linear incl. the head, not the "
              "input embedding); a frozen base needs forward (2N) and input gradients (2N). Counted: "
              "torch.utils.flop_counter's formulas over every matmul and attention kernel the simulated step "
              "runs (checkpointing's recomputed forward included; attention counted as full, not causal, as "
              "torch's counter does).", "", "## Breakdown at the peak, batch 1 x 2048 (GiB, simulated)", ""]
    for res in results:
        for key in ("qlora_kit_b1", "reference_b1"):
            rep = res["reports"].get(key)
            if rep:
                lines.append(f"**{res['model']} {key}** (peak during {rep['peak_phase']}): " + ", ".join(
                    f"{mp.CATEGORIES.get(k, k)} {_gib(v)}" for k, v in rep["breakdown"].items() if v >= 2**24))
                lines.append("")
    for res in results:
        extra, ls = res["reports"].get("qlora_kit_b2_packed"), res["longest_sequence"]
        if extra:
            lines += [f"**{res['model']}, batch 2 x {SEQ} packed rows (4D block-causal mask, memory-efficient "
                      f"attention)**: qlora_kit peak {_gib(extra['peak_bytes'])} GiB, total "
                      f"{_gib(extra['total_bytes'])} GiB (simulated).", ""]
        if "qlora_kit_offload_dropout0_24GB" in ls:
            lines += [f"**{res['model']}, activation offloading and lora.dropout=0**: longest sequence in 24 GiB "
                      f"{ls['qlora_kit_offload_dropout0_24GB']:,} tokens (simulated; dropout keeps a copy of every "
                      "adapter's input and a mask for backward).", ""]
    lines += ["## Published figures (quoted, not used by the simulation)", ""]
    lines += [f"- {text}" for text in PUBLISHED.values()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b"], choices=sorted(MODELS))
    parser.add_argument("--skip-search", action="store_true", help="peaks only, no longest-sequence searches")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--date", default=dt.date.today().isoformat())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    mp._IN_WORKER = True  # this script is the worker: it installs the simulated GPU in its own process
    import bitsandbytes
    import peft
    import torch
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.date}-simulated-memory.json"
    data = json.loads(json_path.read_text()) if json_path.is_file() else {"results": []}
    data["meta"] = {"date": args.date, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
                    "cuda_overhead_bytes_assumed": mp.CUDA_OVERHEAD_BYTES, "simulated": True,
                    "published_figures_quoted": PUBLISHED}
    for name in args.models:
        result = simulate_model(name, search=not args.skip_search)
        data["results"] = sorted([r for r in data["results"] if r["model"] != name] + [result],
                                 key=lambda r: list(MODELS).index(r["model"]))
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        (out / f"{args.date}-simulated-memory.md").write_text(render(data["results"], data["meta"]))
        log.info("wrote %s", json_path)
    print(render(data["results"], data["meta"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
