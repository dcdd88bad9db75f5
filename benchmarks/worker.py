"""One measurement in one fresh process: `python -m benchmarks.worker SPEC.json`.

The orchestrator (benchmarks/run.py) writes a spec, starts this module in a new Python
process and reads the result JSON it writes. A fresh process per system keeps peak RSS
(VmHWM), CUDA peak memory, imports and allocator caches from leaking between the two.
The reference functions never import qlora_kit.

Tasks:
  train   load the base in 4-bit (timed, peak host RAM), add LoRA, train warmup + steps
          on fixed batches; per-step time and loss, peak memory.
  merge   merge a trained adapter into its base and write a 16-bit HF checkpoint.
  maxlen  (CUDA) the longest batch-1 sequence whose training step fits a memory budget.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- measuring


def _status_mb(field: str) -> float:
    """A field of /proc/self/status in MiB. Read here, not through qlora_kit.memory, so the
    reference's process never imports qlora_kit (its memory baseline stays its own)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def vmhwm_mb() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    return _status_mb("VmHWM")


def vmrss_mb() -> float:
    return _status_mb("VmRSS")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_peak_mb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _reset_cuda_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _device(spec):
    import torch

    return torch.device("cuda", 0) if spec["device"] == "cuda" else torch.device("cpu")


# ----------------------------------------------------------------------------- qlora_kit


def qlora_kit_setup(spec, device):
    """qlora_kit as its training loop sets it up (qlora_kit/training.py `_train`)."""
    import torch

    from qlora_kit import LoRAConfig, ModelConfig, QuantConfig, apply_lora, load_base
    from qlora_kit.losses import SupervisedLoss
    from qlora_kit.lora import lora_state_dict, trainable_parameters
    from accelerate.utils import set_seed

    from qlora_kit.settings import TrainConfig
    from qlora_kit.training import make_accelerator, make_optimizer, prepare_layers

    cfg = TrainConfig(mixed_precision="bf16", learning_rate=spec["lr"], optimizer="auto",
                      gradient_checkpointing=True, output_dir=spec["scratch"])
    accelerator = make_accelerator(cfg, Path(spec["scratch"]))
    _sync(device)
    rss_before = round(vmrss_mb(), 1)  # imports and runtime, before any weight is read
    start = time.perf_counter()
    model, tokenizer, base = load_base(ModelConfig(base=spec["model_dir"], device=str(accelerator.device),
                                                attn_implementation="sdpa"), QuantConfig())
    _sync(device)
    load = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": round(vmhwm_mb(), 1),
            "rss_before_mb": rss_before, "rss_after_mb": round(vmrss_mb(), 1), "cuda_peak_mb": _cuda_peak_mb(device)}
    set_seed(spec["seed"])
    apply_lora(model, LoRAConfig(rank=spec["rank"], alpha=spec["alpha"], dropout=0.0))
    if spec.get("init_lora_out"):
        from safetensors.torch import save_file

        save_file({k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(model).items()},
                  spec["init_lora_out"])
    prepare_layers(model, cfg, accelerator.device)  # checkpointing and the rest, as training does
    optimizer = make_optimizer(cfg, trainable_parameters(model), accelerator.device)
    loss_fn = SupervisedLoss(model, cfg.loss_chunk_tokens)
    loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
    loss_fn.train()  # the model and its checkpointed layers in training mode
    pad_id = tokenizer.pad_token_id

    def step(input_ids, labels):
        from qlora_kit.training import _accumulate

        examples = [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in zip(input_ids, labels)]
        loss_sum, n_tokens = _accumulate(loss_fn, [examples], pad_id, torch.bfloat16, accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / max(n_tokens, 1)

    def save(folder):
        from qlora_kit import save_adapter

        save_adapter(model, folder, base=base)

    info = {"optimizer": type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__,
            "lora_dtype": str(next(p for p in trainable_parameters(model)).dtype),
            "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
            "mixed_precision": accelerator.mixed_precision}
    return SimpleNamespace(step=step, save=save, load=load, info=info,
                           zero_grad=lambda: optimizer.zero_grad(set_to_none=True))


# ----------------------------------------------------------------------------- reference


def reference_setup(spec, device, fp32_cast: bool = True):
    """transformers + PEFT + bitsandbytes as their QLoRA docs set it up, and a plain training step.

    `fp32_cast=False` is the same recipe without `prepare_model_for_kbit_training`'s cast of
    every non-4-bit parameter (embeddings, norms, lm_head) to fp32: the residual stream then
    runs in bf16 as in qlora_kit, so the comparison isolates the loss and LoRA paths.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    _sync(device)
    rss_before = round(vmrss_mb(), 1)
    start = time.perf_counter()
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], quantization_config=bnb_config, dtype=torch.bfloat16, attn_implementation="sdpa",
        device_map={"": 0 if device.type == "cuda" else "cpu"},
    )
    AutoTokenizer.from_pretrained(spec["model_dir"])
    _sync(device)
    load = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": round(vmhwm_mb(), 1),
            "rss_before_mb": rss_before, "rss_after_mb": round(vmrss_mb(), 1), "cuda_peak_mb": _cuda_peak_mb(device)}
    # Non-reentrant checkpointing, as qlora_kit uses and as transformers' Trainer defaults to
    # (PEFT's bare default, {} -> torch's reentrant variant, computes the same thing).
    if fp32_cast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # what prepare_model_for_kbit_training does, less the fp32 cast
        model.requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    copied = _copy_initial_lora(model, spec.get("init_lora_in"))
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=spec["lr"], weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    model.train()

    def step(input_ids, labels):
        input_ids, labels = input_ids.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def save(folder):
        model.save_pretrained(folder)

    info = {"optimizer": type(optimizer).__name__, "lora_dtype": str(params[0].dtype),
            "trainable_params": sum(p.numel() for p in params), "mixed_precision": "bf16 (torch.autocast)",
            "initial_lora_copied_from_qlora_kit": copied, "fp32_cast_of_non_4bit_params": fp32_cast,
            "norm_dtype": str(next(p.dtype for n, p in model.named_parameters() if "norm" in n))}
    return SimpleNamespace(step=step, save=save, load=load, info=info,
                           zero_grad=lambda: optimizer.zero_grad(set_to_none=True))


def _copy_initial_lora(model, path) -> int:
    """Give PEFT's adapters qlora_kit's initial A/B, so both start from the same function and weights."""
    if not path or not Path(path).is_file():
        return 0
    import torch
    from safetensors.torch import load_file

    theirs = load_file(path)
    copied = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                continue
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            if key not in theirs:
                raise RuntimeError(f"no initial weight for PEFT parameter {name} (looked for {key})")
            param.copy_(theirs.pop(key).to(param.dtype))
            copied += 1
    if theirs:
        raise RuntimeError(f"{len(theirs)} qlora_kit adapter weights have no PEFT counterpart, e.g. {next(iter(theirs))}")
    return copied


SETUPS = {"qlora_kit": qlora_kit_setup, "reference": reference_setup,
          "reference_nocast": lambda spec, device: reference_setup(spec, device, fp32_cast=False)}


# ----------------------------------------------------------------------------- tasks


def task_train(spec) -> dict:
    import torch

    device = _device(spec)
    torch.manual_seed(spec["seed"])
    system = SETUPS[spec["system"]](spec, device)
    step, load, info = system.step, system.load, system.info
    batches = torch.load(spec["batches_path"])
    input_ids, labels = batches["input_ids"], batches[f"labels_{spec['labels']}"]
    _reset_cuda_peak(device)
    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        start = time.perf_counter()
        loss = step(input_ids[i], labels[i])
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    measured = times[spec["warmup"]:]
    batch_tokens = int(input_ids[0].numel())
    supervised = [int((labels[i][:, 1:] != IGNORE_INDEX).sum()) for i in range(len(times))]
    median = statistics.median(measured)
    result = {
        "load": load,
        "info": info,
        "step_seconds": [round(t, 4) for t in times],
        "losses": losses,
        "median_step_s": round(median, 4),
        "input_tokens_per_step": batch_tokens,
        "supervised_tokens_per_step": supervised,
        "input_tokens_per_s": round(batch_tokens / median, 2),
        "supervised_tokens_per_s": round(statistics.median(supervised[spec["warmup"]:]) / median, 2),
        "peak_rss_mb": round(vmhwm_mb(), 1),
        "cuda_peak_train_mb": _cuda_peak_mb(device),
    }
    if device.type == "cuda":
        result["cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    if spec.get("profile_out"):
        result["profile"] = _profile_step(step, input_ids[-1], labels[-1], spec["profile_out"], device)
    if spec.get("adapter_out"):
        system.save(spec["adapter_out"])
    return result


def _profile_step(step, input_ids, labels, out_path, device) -> str:
    """One extra step under torch.profiler (after the timed ones); the op table goes to out_path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step(input_ids, labels)
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    Path(out_path).write_text(table)
    return str(out_path)


def task_merge(spec) -> dict:
    """Adapter + 16-bit base -> merged 16-bit HF checkpoint on disk, on the CPU for both systems."""
    if spec["system"] == "qlora_kit":
        from qlora_kit.export import merge

        rss_before = vmrss_mb()
        start = time.perf_counter()
        mode = spec.get("mode") or "nf4"
        result = merge(spec["adapter_dir"], spec["out_dir"], base=spec["model_dir"], mode=mode,
                       dtype="bfloat16", verify=spec.get("verify_batches", 0), progress=False)
        seconds = time.perf_counter() - start
        what = (f"qlora_kit.export.merge(mode='{mode}', dtype='bfloat16', "
                f"verify={spec.get('verify_batches', 0)}): streams the bf16 shards, "
                "re-quantizes/dequantizes 4-bit layers (nf4 mode), adds scaling*B@A, writes shards")
        written = result.bytes
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        rss_before = vmrss_mb()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16, device_map={"": "cpu"})
        model = PeftModel.from_pretrained(model, spec["adapter_dir"])
        merged = model.merge_and_unload()
        merged.save_pretrained(spec["out_dir"])
        AutoTokenizer.from_pretrained(spec["model_dir"]).save_pretrained(spec["out_dir"])
        seconds = time.perf_counter() - start
        what = ("AutoModelForCausalLM.from_pretrained(bf16) + PeftModel.from_pretrained + merge_and_unload() + "
                "save_pretrained + tokenizer: the 16-bit base plus the adapter (like qlora_kit's mode='original')")
        written = sum(f.stat().st_size for f in Path(spec["out_dir"]).glob("*.safetensors"))
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(vmhwm_mb(), 1), "rss_before_mb": round(rss_before, 1),
            "bytes_written": written, "what": what}


def task_maxlen(spec) -> dict:
    """Binary search for the longest batch-1 training step within `budget_bytes` of CUDA memory."""
    import torch

    device = _device(spec)
    if device.type != "cuda":
        return {"skipped": "CUDA only"}
    total = torch.cuda.get_device_properties(device).total_memory
    budget = min(int(spec["budget_bytes"]), total)
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    system = SETUPS[spec["system"]](spec, device)
    vocab_ids = int(spec.get("token_id_limit", 49152))
    gen = torch.Generator().manual_seed(spec["seed"])
    probes = []

    def fits(length: int) -> bool:
        ids = torch.randint(0, vocab_ids, (1, length), generator=gen)
        ok = True
        try:
            system.step(ids, ids.clone())
            _sync(device)
        except torch.cuda.OutOfMemoryError:
            ok = False
            system.zero_grad()
        gc.collect()
        torch.cuda.empty_cache()
        probes.append({"seq_len": length, "fits": ok, "cuda_peak_mb": _cuda_peak_mb(device)})
        _reset_cuda_peak(device)
        return ok

    gran, cap = int(spec.get("granularity", 256)), int(spec.get("cap", 262144))
    lo, hi, length = 0, None, int(spec.get("start", 1024))
    while length <= cap:
        if not fits(length):
            hi = length
            break
        lo, length = length, length * 2
    if hi is not None:
        while hi - lo > max(gran, lo // 32):
            mid = (lo + hi) // 2 // gran * gran
            if mid <= lo:
                break
            if fits(mid):
                lo = mid
            else:
                hi = mid
    return {"max_seq_len": lo, "upper_bound_failed": hi, "cap": cap, "budget_mb": round(budget / 2**20),
            "probes": probes}


TASKS = {"train": task_train, "merge": task_merge, "maxlen": task_maxlen}


def run_task(spec: dict) -> dict:
    result = TASKS[spec["task"]](spec)
    result["system"] = spec["system"]
    result["task"] = spec["task"]
    return result


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(Path(argv[0]).read_text())
    result = run_task(spec)
    Path(spec["result_path"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
