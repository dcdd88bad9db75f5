"""Training-step time of qlora_kit's speed mechanisms, each alone, alternated in one process.

    python benchmarks/step_ablation.py --rounds 6    # SmolLM2-135M, batch 4 x 256, r16 all-linear
    python benchmarks/step_ablation.py --variants baseline fused-nocache fused --compile

The step is the training loop's: bf16 autocast, non-reentrant checkpointing, the fused
chunked loss on response-like labels (the first 100 tokens of each row unsupervised).

Variants (each is `baseline` plus one change, except `defaults`):
  baseline        transformers' RMSNorm autograd, LoRA update added after its own matmul,
                  1024-row loss chunks (qlora_kit's defaults before these mechanisms)
  fast-norms      RMSNorm with the closed-form backward (qlora_kit/norms.py)
  lora-addmm      the LoRA update added inside B's matmul (LoRAUpdate.add_to)
  loss-chunk-128  128-row loss chunks (train.loss_chunk_tokens)
  defaults        all three: what training runs now
  fused-nocache   the fused 4-bit + LoRA autograd function (qlora_kit/fused.py), absmax undone each time
  fused           the same with the absmax dequantized once per weight and kept
  fused+compile   `fused` with each decoder layer compiled (--compile)

Each round runs one step of every variant in rotated order; prints the median step time per
variant and each ratio's median and min-max over rounds (ratios within a round).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

MECHANISMS = {  # variant -> (fast norms, LoRA addmm, loss chunk rows, fused path, kept absmax)
    "baseline": (False, False, 1024, False, False),
    "fast-norms": (True, False, 1024, False, False),
    "lora-addmm": (False, True, 1024, False, False),
    "loss-chunk-128": (False, False, 128, False, False),
    "defaults": (True, True, 128, False, False),
    "fused-nocache": (False, False, 1024, True, False),
    "fused": (False, False, 1024, True, True),
    "fused+compile": (False, False, 1024, True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=["baseline", "fast-norms", "lora-addmm", "loss-chunk-128",
                                                          "defaults"], choices=list(MECHANISMS))
    parser.add_argument("--compile", action="store_true", help="also a `fused+compile` variant")
    args = parser.parse_args()

    from qlora_kit import LoRAConfig, apply_lora, fused, load_base, norms
    from qlora_kit.lora import LoRAUpdate, trainable_parameters
    from qlora_kit.losses import SupervisedLoss
    from qlora_kit.packaged import smollm2_path
    from qlora_kit.training import enable_checkpointing

    model, _, _ = load_base(str(smollm2_path()))
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(rank=16, alpha=32, dropout=0.0))
    enable_checkpointing(model)
    model.config.use_cache = False
    model.train()
    params = trainable_parameters(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :100] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    variants = list(args.variants) + (["fused+compile"] if args.compile else [])

    addmm = LoRAUpdate.add_to

    def separate_add(self, out, x, base):  # the update computed on its own, then added
        return out + self(x, base, out).to(out.dtype)

    compiled_calls = []  # each block's compiled call, swapped in only for the compiled variant

    def configure(variant: str) -> SupervisedLoss:
        fast_norms, lora_addmm, chunk, fused_path, kept_absmax = MECHANISMS[variant]
        for module in model.modules():  # undo the norm swap, then redo it if wanted
            if isinstance(vars(module).get("forward"), partial) and vars(module)["forward"].func is norms._fast_forward:
                del module.forward
        if fast_norms:
            norms.fast_norms(model)
        LoRAUpdate.add_to = addmm if lora_addmm else separate_add
        fused.ENABLED, fused.CACHE_ABSMAX = fused_path, kept_absmax
        if variant == "fused+compile" and not compiled_calls:
            from qlora_kit.compilation import compile_layers, repeated_blocks

            compile_layers(model)
            compiled_calls.extend((b, b._compiled_call_impl) for b in repeated_blocks(model))
        for block, call in compiled_calls:
            block._compiled_call_impl = call if variant == "fused+compile" else None
        return SupervisedLoss(model, chunk)

    def step(variant: str) -> float:
        loss_fn = configure(variant)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum, n = loss_fn(batch)
        (loss_sum / n).backward()
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
