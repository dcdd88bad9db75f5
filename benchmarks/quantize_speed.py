"""CPU NF4 quantization of SmolLM2-135M's real weights: qlora_kit's table lookup vs bitsandbytes' bucketize.

    python benchmarks/quantize_speed.py --rounds 5

Every 2-D weight of the checkpoint is quantized in bf16 (as loading does), by
`qlora_kit.quantization.quantize_4bit` and by `bitsandbytes.functional.quantize_4bit`,
alternating the two each round; the packed bytes are checked equal. Prints the median
time of a whole pass over the weights for each, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import bitsandbytes.functional as bnbF
    from safetensors.torch import load_file

    from qlora_kit import quantization
    from qlora_kit.packaged import smollm2_path

    weights = [t.to(torch.bfloat16) for name, t in load_file(smollm2_path() / "model.safetensors").items()
               if t.ndim == 2 and "embed" not in name]
    systems = {
        "qlora_kit": lambda w: quantization.quantize_4bit(w),
        "bitsandbytes": lambda w: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
    }
    for w in weights[:7]:  # one decoder layer: the same bytes
        assert torch.equal(systems["qlora_kit"](w)[0], systems["bitsandbytes"](w)[0])
    times = {name: [] for name in systems}
    for r in range(args.rounds):
        for name in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
            start = time.perf_counter()
            for w in weights:
                systems[name](w)
            times[name].append(time.perf_counter() - start)
    elements = sum(w.numel() for w in weights)
    for name, values in times.items():
        print(f"{name:13s} median {statistics.median(values):.3f} s for {len(weights)} weights "
              f"({elements / 1e6:.0f}M values; min {min(values):.3f}, max {max(values):.3f})")
    ratio = statistics.median(times["bitsandbytes"]) / statistics.median(times["qlora_kit"])
    print(f"bitsandbytes / qlora_kit: {ratio:.2f}x")


if __name__ == "__main__":
    main()
