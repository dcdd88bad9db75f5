"""qlora_kit vs transformers + PEFT + bitsandbytes: the same QLoRA job, each in its own process.

    python benchmarks/run.py --device cpu --models smollm2-135m   # ~25 min on 2 idle cores (3 repeats)
    python benchmarks/run.py --device cuda           # Llama-3.2-1B + Llama-3.1-8B configs, random weights

Two references: the documented recipe (`reference`: PEFT's prepare_model_for_kbit_training,
which casts embeddings and norms to fp32) and the same without that cast
(`reference_nocast`). Every system runs `--repeats` times, in rotated order
(qlora_kit, reference, no-cast; then reference, no-cast, qlora_kit; ...), each run in a fresh
process; medians and min-max spreads are reported, and a ratio only where the spreads do not
overlap ("within noise" otherwise).

Writes benchmarks/results/<date>-<device>-<model>.json per model and
benchmarks/results/<date>-<device>.md, prints the table, and prints the ratio lines
(qlora_kit / each reference) last. See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import data as bench_data  # noqa: E402
from benchmarks import models as bench_models  # noqa: E402

SYSTEMS = ("qlora_kit", "reference", "reference_nocast")
REFERENCES = ("reference", "reference_nocast")
MERGE_SYSTEMS = ("qlora_kit", "reference")  # merging has no fp32-cast variant
LABEL_OF = {"qlora_kit": "qlora_kit", "reference": "reference (documented recipe)",
            "reference_nocast": "reference without the fp32 cast"}
DEFAULT_MODELS = {"cpu": ["tiny-llama", "smollm2-135m"], "cuda": ["llama-3.2-1b", "llama-3.1-8b"]}
DEFAULT_SHAPE = {"cpu": (4, 256), "cuda": (2, 2048)}  # (batch, seq_len)
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, matched on the device name in this order.
PEAK_BF16 = [("GH200", 989.4e12), ("H200", 989.4e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
             ("H100", 989.4e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12)]


# ----------------------------------------------------------------------------- environment


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), None)
        flags = next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "")
        info["cpu_avx512_bf16"] = "avx512_bf16" in flags
        meminfo = Path("/proc/meminfo").read_text()
        kb = int(next(l for l in meminfo.splitlines() if l.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    import torch

    info["torch_threads"] = torch.get_num_threads()
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict:
    import accelerate
    import bitsandbytes
    import peft
    import torch
    import transformers

    import qlora_kit

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
             "bitsandbytes": bitsandbytes.__version__, "accelerate": accelerate.__version__,
             "qlora_kit": qlora_kit.__version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qlora_kit"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        found["qlora_kit_commit"] = commit + (" (qlora_kit/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return found


def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    return next((flops for key, flops in PEAK_BF16 if key in device_name), None)


# ----------------------------------------------------------------------------- workers


class Runner:
    """Runs worker specs, each in a fresh `python -m benchmarks.worker` (or in-process for tests)."""

    def __init__(self, work: Path, in_process: bool, verbose: bool):
        self.work, self.in_process, self.verbose = work, in_process, verbose
        self.count = 0
        self.errors: list[str] = []

    def __call__(self, spec: dict) -> dict:
        self.count += 1
        label = f"{self.count:02d}-{spec['task']}-{spec['system']}-{spec.get('labels', '')}".rstrip("-")
        spec = {**spec, "result_path": str(self.work / f"{label}.result.json")}
        print(f"  [{time.strftime('%H:%M:%S')}] {label} ...", end="", flush=True)
        start = time.perf_counter()
        if self.in_process:
            from benchmarks import worker

            result = worker.run_task(spec)
        else:
            spec_path = self.work / f"{label}.spec.json"
            spec_path.write_text(json.dumps(spec, indent=2))
            log_path = self.work / f"{label}.log"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            with open(log_path, "w") as log:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec_path)], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                tail = log_path.read_text()[-3000:]
                print(f" FAILED (exit {proc.returncode}); log {log_path}\n{tail}", flush=True)
                self.errors.append(f"{label}: exit {proc.returncode}")
                return {"error": f"exit {proc.returncode}", "log_tail": tail[-1500:]}
            result = json.loads(Path(spec["result_path"]).read_text())
        print(f" {time.perf_counter() - start:.1f} s", flush=True)
        return result


# ----------------------------------------------------------------------------- one model


def bench_model(name: str, args, runner: Runner, scratch: Path, gpu_name: str | None) -> dict:
    import torch

    folder = bench_models.model_folder(name, scratch)
    n_params = bench_models.count_parameters(folder)
    steps = args.warmup + args.steps
    batches = bench_data.build_batches(folder, steps, args.batch_size, args.seq_len, args.seed)
    work = scratch / f"work-{name}"
    work.mkdir(parents=True, exist_ok=True)
    batches_path = work / "batches.pt"
    torch.save({k: v for k, v in batches.items() if k != "stats"}, batches_path)
    common = {"model_dir": str(folder), "device": args.device, "seed": args.seed, "rank": args.rank,
              "alpha": args.alpha, "lr": args.lr, "scratch": str(work)}
    init_lora = work / "initial_lora.safetensors"
    adapter = work / "adapter"
    out = {"model": name, "model_dir": str(folder), "base_parameters": n_params, "data": batches["stats"],
           "train": {}, "errors": []}

    for labels in args.labels:
        runs = out["train"].setdefault(labels, {system: [] for system in SYSTEMS})
        for rep in range(args.repeats):
            for system in rotated(SYSTEMS, rep):
                spec = {**common, "task": "train", "system": system, "batches_path": str(batches_path),
                        "labels": labels, "warmup": args.warmup, "steps": args.steps}
                if system == "qlora_kit" and rep == 0:
                    spec["init_lora_out"] = str(init_lora)  # the first run: rotation starts with qlora_kit
                    if labels == args.labels[0] and not args.skip_merge:
                        spec["adapter_out"] = str(adapter)
                elif system != "qlora_kit":
                    spec["init_lora_in"] = str(init_lora)
                if args.profile and rep == 0:
                    spec["profile_out"] = str(Path(args.results_dir) / f"profile-{args.device}-{name}-{system}-{labels}.txt")
                runs[system].append(runner(spec))

    if not args.skip_merge and n_params > args.merge_max_params:
        out["merge"] = {"skipped": f"{n_params:,} base parameters > --merge-max-params {args.merge_max_params:,.0f}"}
    elif not args.skip_merge and adapter.is_dir():
        out["merge"] = {system: [] for system in MERGE_SYSTEMS}
        out["merge_original"] = {"qlora_kit": []}
        runs = [("qlora_kit", "nf4"), ("qlora_kit", "original"), ("reference", None)]
        for rep in range(args.repeats):
            for system, mode in rotated(runs, rep):
                merged = work / f"merged-{system}"
                result = runner({**common, "task": "merge", "system": system, "mode": mode,
                                 "adapter_dir": str(adapter), "out_dir": str(merged)})
                (out["merge_original"] if mode == "original" else out["merge"])[system].append(result)
                shutil.rmtree(merged, ignore_errors=True)  # a merged 8B model is 16 GB of disk
    if args.device == "cuda" and not args.skip_maxlen:
        import torch as _t

        budget = int((args.memory_budget_gb or _t.cuda.get_device_properties(0).total_memory / 2**30) * 2**30)
        out["max_seq_len"] = {}
        for system in SYSTEMS:  # deterministic (a memory search): once each
            out["max_seq_len"][system] = runner({**common, "task": "maxlen", "system": system, "budget_bytes": budget,
                                                 "cap": args.maxlen_cap, "granularity": 256, "start": 1024})
    out["summary"] = summarize(out, n_params, peak_flops(gpu_name, args.peak_tflops) if args.device == "cuda" else None)
    return out


def rotated(systems: tuple[str, ...], rep: int) -> list[str]:
    """The order of repetition `rep`: each system goes first in turn, so drift favours none."""
    k = rep % len(systems)
    return list(systems[k:] + systems[:k])


def spread(values: list) -> dict | None:
    """Median and min-max of one metric over the repetitions."""
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def compare(ours: dict | None, theirs: dict | None):
    """qlora_kit / reference of the medians, or "within noise" where the min-max ranges overlap."""
    if not ours or not theirs or not theirs["median"]:
        return None
    if ours["n"] > 1 and theirs["n"] > 1 and ours["min"] <= theirs["max"] and theirs["min"] <= ours["max"]:
        return "within noise"
    return round(ours["median"] / theirs["median"], 3)


def summarize(out: dict, n_params: int, peak: float | None) -> dict:
    """Per metric: each system's median and spread, and qlora_kit's ratio to each reference."""
    rows = []

    def add(metric, per_system: dict, better: str):
        stats = {system: spread(values) for system, values in per_system.items()}
        rows.append({"metric": metric, "stats": stats, "better": better,
                     "ratios": {ref: compare(stats.get("qlora_kit"), stats.get(ref)) for ref in REFERENCES
                                if ref in stats}})

    def train_metric(runs, key):
        return {system: [r.get(key) for r in results if "error" not in r] for system, results in runs.items()}

    agreement = {}
    for labels, runs in out["train"].items():
        for results in runs.values():
            for run in results:
                if "error" in run:
                    continue
                # A frozen base has no weight gradients: 4N model FLOPs per token (forward 2N, input
                # gradients 2N); checkpointing recomputes the forward, 6N of hardware FLOPs.
                per_s = run["input_tokens_per_step"] / run["median_step_s"]
                run["model_tflops_per_s"] = round(4 * n_params * per_s / 1e12, 4)
                run["hardware_tflops_per_s"] = round(6 * n_params * per_s / 1e12, 4)
                run["mfu"] = round(4 * n_params * per_s / peak, 4) if peak else None
                run["hfu"] = round(6 * n_params * per_s / peak, 4) if peak else None
        add(f"[{labels}] supervised tokens/s", train_metric(runs, "supervised_tokens_per_s"), "higher")
        add(f"[{labels}] input tokens/s", train_metric(runs, "input_tokens_per_s"), "higher")
        if peak:
            add(f"[{labels}] MFU (4N model FLOPs/token)", train_metric(runs, "mfu"), "higher")
            add(f"[{labels}] HFU (6N with recompute)", train_metric(runs, "hfu"), "higher")
        if any(r.get("cuda_peak_train_mb") is not None for r in runs["qlora_kit"]):
            add(f"[{labels}] peak CUDA memory allocated (MiB)", train_metric(runs, "cuda_peak_train_mb"), "lower")
        add(f"[{labels}] peak RSS, whole process (MiB)", train_metric(runs, "peak_rss_mb"), "lower")
        first = {system: next((r for r in results if "error" not in r), None) for system, results in runs.items()}
        if all(first.values()):
            agreement[labels] = {system: [round(x, 5) for x in run["losses"]] for system, run in first.items()}
            for ref in REFERENCES:
                rel = [abs(a - b) / abs(b) for a, b in zip(first["qlora_kit"]["losses"], first[ref]["losses"]) if b]
                agreement[labels][f"max_rel_diff_vs_{ref}"] = float(f"{max(rel):.3g}") if rel else None
    runs = next(iter(out["train"].values()), {})
    loads = {system: [r["load"] for r in results if "load" in r] for system, results in runs.items()}
    if all(loads.values()):
        add("load into 4-bit (s)", {s: [x["seconds"] for x in v] for s, v in loads.items()}, "lower")
        add("peak RSS while loading, above the pre-load RSS (MiB)",
            {s: [round(x["peak_rss_mb"] - x["rss_before_mb"], 1) for x in v] for s, v in loads.items()}, "lower")
        if any(x.get("cuda_peak_mb") is not None for x in loads["qlora_kit"]):
            add("peak CUDA memory while loading (MiB)", {s: [x["cuda_peak_mb"] for x in v] for s, v in loads.items()},
                "lower")
    merge = out.get("merge", {})
    if merge and "skipped" not in merge:
        ok = {s: [r for r in v if "error" not in r] for s, v in merge.items()}
        add("merge + write 16-bit checkpoint (s)", {s: [r["seconds"] for r in v] for s, v in ok.items()}, "lower")
        add("peak RSS while merging, above the pre-merge RSS (MiB)",
            {s: [round(r["peak_rss_mb"] - r["rss_before_mb"], 1) for r in v] for s, v in ok.items()}, "lower")
        # qlora_kit's mode='original' adds the update to the 16-bit weights as stored, as PEFT's merge does.
        original = {"qlora_kit": [r for r in out.get("merge_original", {}).get("qlora_kit", []) if "error" not in r],
                    "reference": ok.get("reference", [])}
        if original["qlora_kit"]:
            add("merge + write, qlora_kit mode=original (s)", {s: [r["seconds"] for r in v] for s, v in original.items()},
                "lower")
            add("peak RSS while merging, mode=original (MiB)",
                {s: [round(r["peak_rss_mb"] - r["rss_before_mb"], 1) for r in v] for s, v in original.items()},
                "lower")
    maxlen = out.get("max_seq_len", {})
    if maxlen and all("max_seq_len" in maxlen[s] for s in maxlen):
        add(f"longest batch-1 sequence in {maxlen['qlora_kit']['budget_mb']} MiB (tokens)",
            {s: [v["max_seq_len"]] for s, v in maxlen.items()}, "higher")
    return {"rows": rows, "loss_agreement": agreement}


# ----------------------------------------------------------------------------- output


def _cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    if stats["n"] == 1:
        return f"{stats['median']:g}"
    return f"{stats['median']:g} ({stats['min']:g}-{stats['max']:g})"


def markdown(results: list[dict], date: str, device: str) -> str:
    """One section per model; each result carries its own command, machine, versions and load."""
    lines = [f"# QLoRA benchmark: qlora_kit vs transformers + PEFT + bitsandbytes, {date}, {device}", "",
             "Cells are the median over repetitions (min-max in brackets). Ratios are qlora_kit / reference "
             "of the medians, from the same run, given only where the min-max ranges do not overlap. "
             "See benchmarks/README.md for what is measured.", ""]
    for res in results:
        lines += [f"## {res['model']} ({res['base_parameters']:,} base parameters)", "",
                  f"Command: `{res['command']}`", "",
                  f"Machine: {json.dumps(res['machine'])}", "",
                  f"Versions: {json.dumps(res['versions'])}", "",
                  f"Load average (1/5/15 min) before: {res['load_average_before']}, after: {res['load_average_after']}; "
                  f"wall time {res.get('wall_seconds')} s", "", f"Settings: {json.dumps(res['settings'])}", "",
                  f"Data: {json.dumps(res['data'])}", "",
                  "| metric | " + " | ".join(LABEL_OF[s] for s in SYSTEMS)
                  + " | qlora_kit / documented | qlora_kit / no-cast | better |",
                  "|---|" + "---:|" * (len(SYSTEMS) + 2) + "---|"]
        for row in res["summary"]["rows"]:
            cells = [_cell(row["stats"].get(system)) for system in SYSTEMS]
            ratios = [str(row["ratios"].get(ref, "-")) if row["ratios"].get(ref) is not None else "-"
                      for ref in REFERENCES]
            lines.append(f"| {row['metric']} | " + " | ".join(cells + ratios) + f" | {row['better']} |")
        lines.append("")
        for labels, agr in res["summary"]["loss_agreement"].items():
            steps = len(agr["qlora_kit"])
            lines += [f"Loss per step [{labels}] (first repetition; same batches, same initial LoRA weights; "
                      f"max relative difference vs documented {agr['max_rel_diff_vs_reference']}, "
                      f"vs no-cast {agr['max_rel_diff_vs_reference_nocast']}):", "",
                      "| step | " + " | ".join(str(i) for i in range(steps)) + " |", "|---|" + "---:|" * steps]
            lines += [f"| {LABEL_OF[s]} | " + " | ".join(f"{x:.4f}" for x in agr[s]) + " |" for s in SYSTEMS]
            lines.append("")
        if res.get("errors"):
            lines += ["Errors: " + "; ".join(res["errors"]), ""]
    return "\n".join(lines) + "\n"


def ratio_lines(results: list[dict]) -> list[str]:
    lines = []
    for res in results:
        for row in res["summary"]["rows"]:
            for ref, ratio in row["ratios"].items():
                lines.append(f"RATIO {res['model']}: {row['metric']}: qlora_kit/{ref} = {ratio} "
                             f"({row['better']} is better for qlora_kit; medians {_cell(row['stats'].get('qlora_kit'))} "
                             f"vs {_cell(row['stats'].get(ref))})")
        for labels, agr in res["summary"]["loss_agreement"].items():
            lines.append(f"LOSS {res['model']} [{labels}]: max relative difference over {len(agr['qlora_kit'])} steps "
                         f"= {agr['max_rel_diff_vs_reference_nocast']} vs no-cast, "
                         f"{agr['max_rel_diff_vs_reference']} vs documented")
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--models", nargs="+", choices=bench_models.MODELS, help="default: per device")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (their losses are compared)")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--repeats", type=int, default=3, help="runs per system, in rotated order (default 3)")
    p.add_argument("--labels", nargs="+", choices=bench_data.LABEL_SETS, default=list(bench_data.LABEL_SETS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--merge-max-params", type=float, default=3e9,
                   help="skip the merge for larger bases (both merges run on the CPU; an 8B NF4 re-quantization "
                        "takes long there); default 3e9")
    p.add_argument("--skip-maxlen", action="store_true")
    p.add_argument("--memory-budget-gb", type=float, help="CUDA budget for the max-length search; default: the whole GPU")
    p.add_argument("--maxlen-cap", type=int, default=262144)
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    p.add_argument("--profile", action="store_true", help="also profile one extra step per run (torch.profiler)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--work-dir", help="scratch for random checkpoints, batches, adapters, merges (default: a temp dir)")
    p.add_argument("--in-process", action="store_true", help="tests only: no subprocesses, numbers not per-system")
    p.add_argument("--no-save", action="store_true", help="print only, write no result files")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.models = args.models or DEFAULT_MODELS[args.device]
    batch, seq = DEFAULT_SHAPE[args.device]
    args.batch_size = args.batch_size or batch
    args.seq_len = args.seq_len or seq
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU here")
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in raw)
    date = dt.date.today().isoformat()
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    machine = machine_info(args.device)
    header = {"date": date, "device": args.device, "command": command, "machine": machine, "versions": versions(),
              "load_average_before": load_before,
              "settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "warmup_steps": args.warmup,
                           "timed_steps": args.steps, "repeats": args.repeats, "lora_rank": args.rank, "lora_alpha": args.alpha,
                           "lora_dropout": 0.0, "target_modules": "all linear except lm_head", "lr": args.lr,
                           "optimizer": "PagedAdamW8bit" if args.device == "cuda" else "torch AdamW",
                           "quantization": "NF4, double quant, blocksize 64, bf16 compute",
                           "mixed_precision": "bf16 autocast", "gradient_checkpointing": "non-reentrant",
                           "attention": "sdpa", "grad_clipping": "none", "seed": args.seed,
                           "in_process": args.in_process}}
    print(f"benchmark on {args.device}: {', '.join(args.models)}; batch {args.batch_size} x {args.seq_len}, "
          f"{args.warmup} warm-up + {args.steps} timed steps; load average {load_before}", flush=True)
    scratch_ctx = tempfile.TemporaryDirectory(prefix="qlora-bench-") if not args.work_dir else None
    scratch = Path(args.work_dir or scratch_ctx.name)
    scratch.mkdir(parents=True, exist_ok=True)
    results_dir = Path(args.results_dir)
    if args.profile or not args.no_save:
        results_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(scratch, args.in_process, verbose=False)
    results = []
    try:
        for name in args.models:
            print(f"{name}:", flush=True)
            model_start, model_load = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
            errors_before = len(runner.errors)
            res = {**header, "load_average_before": model_load,
                   **bench_model(name, args, runner, scratch, machine.get("gpu")),
                   "load_average_after": [round(x, 2) for x in os.getloadavg()],
                   "wall_seconds": round(time.perf_counter() - model_start, 1)}
            res["errors"] = runner.errors[errors_before:]
            results.append(res)
            if not args.no_save:  # written as soon as a model is done: a later timeout keeps it
                path = results_dir / f"{date}-{args.device}-{name}.json"
                path.write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if scratch_ctx is not None:
            scratch_ctx.cleanup()
    load_after = [round(x, 2) for x in os.getloadavg()]
    wall = round(time.perf_counter() - started, 1)
    if not args.no_save:
        # The day's table covers every model run on this device that day (e.g. one command per model).
        saved = [json.loads(p.read_text()) for p in sorted(results_dir.glob(f"{date}-{args.device}-*.json"))]
        (results_dir / f"{date}-{args.device}.md").write_text(markdown(saved, date, args.device))
    print()
    print(markdown(results, date, args.device))
    print(f"wall time {wall} s; load average before {load_before}, after {load_after}")
    if runner.errors:
        print("ERRORS: " + "; ".join(runner.errors))
    for line in ratio_lines(results):
        print(line)
    return 1 if runner.errors else 0


if __name__ == "__main__":
    sys.exit(main())
