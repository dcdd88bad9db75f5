"""Training-step time of qlora_kit's 4-bit + LoRA variants, alternated in one process.

    python benchmarks/step_ablation.py --rounds 5    # SmolLM2-135M, batch 4 x 256, r16 all-linear

Variants: `unfused` (bitsandbytes' Linear4bit + two nn.Linear), `fused-nocache` (the fused
autograd function, absmax double-dequantized each time), `fused` (fused + kept absmax).
Each round runs one step of every variant in rotated order; prints the median step time per
variant and each ratio's median and min-max over rounds (ratios within a round).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=["unfused", "fused-nocache", "fused"])
    parser.add_argument("--compile", action="store_true", help="also a `fused+compile` variant")
    args = parser.parse_args()

    from qlora_kit import LoRAConfig, apply_lora, fused, load_base
    from qlora_kit.lora import trainable_parameters
    from qlora_kit.packaged import smollm2_path
    from qlora_kit.training import enable_checkpointing

    model, _, _ = load_base(str(smollm2_path()))
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(rank=16, alpha=32, dropout=0.0))
    enable_checkpointing(model)
    model.config.use_cache = False
    model.train()
    params = trainable_parameters(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len))
    variants = list(args.variants)
    if args.compile:
        from qlora_kit.compilation import compile_layers, repeated_blocks

        variants.append("fused+compile")

    compiled_calls = []  # each block's compiled call, swapped in only for the compiled variant

    def step(variant: str) -> float:
        fused.ENABLED = variant != "unfused"  # opt-in (off by default)
        fused.CACHE_ABSMAX = variant != "fused-nocache"
        if variant == "fused+compile" and not compiled_calls:
            compile_layers(model)
            compiled_calls.extend((b, b._compiled_call_impl) for b in repeated_blocks(model))
        for block, call in compiled_calls:
            block._compiled_call_impl = call if variant == "fused+compile" else None
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in params:
            p.grad = None
        return time.perf_counter() - start

    for variant in variants:  # warm-up (and compilation)
        step(variant)
    times = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            times[variant].append(step(variant))
    base = variants[0]
    for variant in variants:
        ratios = [b / t for b, t in zip(times[base], times[variant])]
        print(f"{variant:15s} median {statistics.median(times[variant]):.3f} s   {base}/{variant}: "
              f"{statistics.median(ratios):.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
