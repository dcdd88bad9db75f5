"""Load time and peak RSS: qlora_kit's 4-bit load vs transformers' BitsAndBytesConfig load, fresh processes.

    python benchmarks/load_compare.py --rounds 5 [--old PATH]   # SmolLM2-135M (one shard)

Each load runs in its own process (peak RSS is per process; reported above the RSS after imports),
timed after imports, systems in rotated order; `--old`
adds qlora_kit imported from another checkout (PATH on PYTHONPATH), to compare two versions.
Prints medians, and per-round ratios to transformers (median, min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from benchmarks.worker import vmhwm_mb
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from qlora_kit import ModelConfig, QuantConfig, load_base
from benchmarks.worker import vmrss_mb
folder, system = sys.argv[1], sys.argv[2]
before = vmrss_mb()  # imports, not loading: peak RSS is reported above this
start = time.perf_counter()
if system == "transformers":
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16,
                                         attn_implementation="sdpa", device_map={"": "cpu"})
    AutoTokenizer.from_pretrained(folder)
else:
    load_base(ModelConfig(base=folder, device="cpu", attn_implementation="sdpa"), QuantConfig())
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": vmhwm_mb() - before}))
"""


def load_once(folder: str, system: str, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, folder, system], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old", help="another checkout's root, loaded as system 'old'")
    parser.add_argument("--folder", help="an HF folder (default: the packaged SmolLM2-135M)")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from qlora_kit.packaged import smollm2_path

    folder = args.folder or str(smollm2_path())
    systems = {"transformers": here, "qlora_kit": here}
    if args.old:
        systems["old"] = f"{args.old}{os.pathsep}{here}"
    names = list(systems)
    results = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(load_once(folder, name if name == "transformers" else "qlora_kit", systems[name]))
    ref = results["transformers"]
    for name in names:
        secs = [x["seconds"] for x in results[name]]
        rss = [x["peak_rss_mb"] for x in results[name]]
        ratio = [a["seconds"] / b["seconds"] for a, b in zip(results[name], ref)]
        rss_ratio = [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(results[name], ref)]
        print(f"{name:12s} load {statistics.median(secs):.2f} s, peak RSS {statistics.median(rss):.0f} MiB; "
              f"vs transformers: time {statistics.median(ratio):.3f}x ({min(ratio):.3f}-{max(ratio):.3f}), "
              f"RSS {statistics.median(rss_ratio):.3f}x ({min(rss_ratio):.3f}-{max(rss_ratio):.3f})")


if __name__ == "__main__":
    main()
