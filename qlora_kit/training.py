"""The training loop on Accelerate: config, optimizer, schedule, accumulation, eval, checkpoints.

It reads top to bottom: set up the run folder and the accelerator, load the base
in 4-bit, prepare the data, wrap LoRA, build optimizer and schedule, resume if
asked, then step; evaluate and checkpoint on schedule; write the final adapter,
samples, loss curve and summary.

Under several processes (`accelerate launch`, torchrun) every process runs the
same loop on its slice of each global batch; the main process alone writes the
run folder. `train.distributed` picks how the model is spread: DDP (a whole 4-bit
model per process, gradients averaged) or FSDP2 through Accelerate (the 4-bit base,
stored in bfloat16 containers, and the adapters sharded across processes, each
layer gathered as it runs), for bases that do not fit one GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import atomic, memory, quantization
from .adapter_io import RUN_ADAPTER_DIR, save_adapter, versions
from .config import save_config, to_dict
from .data import (IGNORE_INDEX, PreparedData, batch_indices, check_rows, collate, count_supervised_tokens,
                   prepare_data)
from .errors import QLoRAKitError
from .evaluation import token_loss
from .loading import load_base
from .lora import apply_lora, parameter_counts, set_adapters_enabled, trainable_parameters
from .losses import SupervisedLoss, perplexity
from .precision import resolve_mixed_precision, torch_dtype
from .run_folder import MetricsLog, add_file_log, plot_loss_curve, write_run_readme, write_samples
from .settings import RunConfig, TrainConfig
from .training_state import (LoopState, check_resumable, gathered_adapter, list_checkpoints, load_adapter_state,
                             load_training_state, remove_partial_checkpoints, save_checkpoint)

log = logging.getLogger(__name__)

# transformers' schedule for each `train.lr_scheduler`.
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
EXIT_USER_ERROR = 2  # the command line's exit status for a QLoRAKitError
# How long a process other than the main one waits, after a problem every process found,
# for the launcher to end it once the main process has reported the problem and exited.
QUIET_EXIT_WAIT_S = 10.0


def train(run: RunConfig) -> dict:
    """Train an adapter as `run` describes; return the summary written to the run folder.

    Under several processes every process calls it and the main one returns the
    summary (the others an empty dict). A problem every process finds in the input
    (config, data, a checkpoint of another world size) is reported once, by the main
    process; the others exit with the same status instead of waiting for it.
    """
    cfg = run.train
    # Seconds, before the run folder exists and before the base loads (for an 8B model, a long download).
    _checked(lambda: check_tracker(cfg.report_to))
    rows = _checked(lambda: check_rows(run.data))
    out = Path(cfg.output_dir)
    accelerator = _checked(lambda: make_accelerator(cfg, out))
    main = accelerator.is_main_process
    resume_from = _on_main(accelerator, lambda: _resume_point(out, cfg, accelerator))
    file_log = add_file_log(out) if main else None
    package_log = logging.getLogger("qlora_kit")
    level = package_log.level
    if not main:
        package_log.setLevel(max(level, logging.WARNING))  # one process tells the story; any reports trouble
    try:
        log.info("data: %d rows in %s checked", rows, run.data.path)
        if accelerator.num_processes > 1:
            log.info("%d processes, %s", accelerator.num_processes, "FSDP" if accelerator.is_fsdp2 else "DDP")
        if cfg.resume and resume_from is None:
            log.warning("train.resume is set but %s has no checkpoint yet: starting from step 0", out)
        return _train(run, out, resume_from, accelerator)
    finally:
        package_log.setLevel(level)
        if file_log is not None:
            package_log.removeHandler(file_log)
            file_log.close()


def _resume_point(out: Path, cfg: TrainConfig, accelerator) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), refused if this launch cannot continue it."""
    resume_from = _prepare_output_dir(out, cfg.resume)
    if resume_from is not None:
        check_resumable(resume_from, accelerator.num_processes, accelerator.is_fsdp2)
    return resume_from


def _train(run: RunConfig, out: Path, resume_from: Path | None, accelerator) -> dict:
    cfg = run.train
    main, world, fsdp = accelerator.is_main_process, accelerator.num_processes, accelerator.is_fsdp2
    if fsdp:
        _checked(lambda: _check_fsdp(run))
    set_seed(cfg.seed)
    # Under FSDP every process loads the base into host RAM; sharding then moves only its
    # shards to its GPU, so no GPU ever holds the whole 4-bit model.
    load_device = "cpu" if fsdp else str(accelerator.device)
    model, tokenizer, base = load_base(replace(run.model, device=load_device), run.quant)
    data = prepare_data(run.data, tokenizer, seed=cfg.seed)
    _checked(lambda: _check_processes(data, world))
    _log_data(data)
    set_seed(cfg.seed)  # adapter init does not depend on how much randomness loading used
    apply_lora(model, run.lora)
    counts = parameter_counts(model)  # before sharding: FSDP's shards hide the 4-bit shapes
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{counts['trainable']:,}", f"{counts['total']:,}",
             100 * counts["trainable"] / counts["total"])
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False

    # Each process reads its own slice of every global batch of batch_size x processes examples.
    micro_per_epoch = math.ceil(len(data.train) / (cfg.batch_size * world))
    total_steps = cfg.max_steps or math.ceil(micro_per_epoch * cfg.num_epochs / cfg.gradient_accumulation_steps)
    if resume_from is not None:
        load_adapter_state(resume_from, model)  # into the whole weights, before FSDP shards them
    optimizer = make_optimizer(cfg, trainable_parameters(model), accelerator.device, sharded=fsdp)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    loss_fn = SupervisedLoss(model, cfg.loss_chunk_tokens)
    if fsdp:
        _fsdp_units(accelerator, model)
    # The scheduler stays out of `prepare`: Accelerate's wrapper steps it once per process,
    # and the schedule must advance once per optimizer step whatever the process count.
    loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)
    if fsdp:
        _after_fsdp_prepare(accelerator, model, loss_fn)

    state = LoopState(world_size=world, fsdp=fsdp)
    if world > 1:
        set_seed(cfg.seed, device_specific=True)  # each process draws its own dropout masks
    if resume_from is not None:
        state = load_training_state(resume_from, model, optimizer, scheduler, accelerator)
        log.info("resumed from %s at step %d", resume_from, state.step)
    if main:  # under several processes, one writes the run folder
        save_config(run, out / "config.yaml")
    metrics = MetricsLog(out, resume_step=state.step if resume_from else None, enabled=main)
    eval_fn = lambda: evaluate(loss_fn, data, cfg, accelerator)  # noqa: E731
    mask_dtype = torch_dtype(run.quant.compute_dtype)
    samples = lambda: _samples(model, tokenizer, data, cfg, accelerator, loss_fn)  # noqa: E731

    if cfg.report_to != "none":
        accelerator.init_trackers(out.name, config=_flat(to_dict(run)))
    before = _samples_before(out, model, samples, fresh=resume_from is None, main=main)
    if resume_from is None:
        start = {"step": 0, "loss": None, "lr": scheduler.get_last_lr()[0], **eval_fn()}
        metrics.write(start)
        if accelerator.trackers:  # the step-0 evaluation is the baseline of every curve
            accelerator.log({k: v for k, v in start.items() if isinstance(v, (int, float))}, step=0)

    loss_fn.train()  # load_base returns an eval-mode model; dropout and checkpointing need train mode
    progress = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    while state.step < total_steps:
        step_start = time.perf_counter()
        group = _next_micro_batches(data, cfg, state, micro_per_epoch, accelerator)
        loss_sum, n_tokens = _accumulate(loss_fn, group, data.pad_id, mask_dtype, accelerator)
        if not math.isfinite(loss_sum):
            _stop_non_finite(out, "loss", loss_sum, state.step + 1)
        grad_norm = _clip(accelerator, loss_fn, cfg.max_grad_norm)
        # Under fp16 an overflow makes the norm inf: the loss scaler skips that update and
        # lowers its scale, as every trainer does. Without a scaler it is a real divergence.
        if grad_norm is not None and not math.isfinite(grad_norm) and accelerator.scaler is None:
            _stop_non_finite(out, "gradient norm", grad_norm, state.step + 1)
        optimizer.step()
        if not optimizer.step_was_skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state.step += 1
        state.tokens_seen += n_tokens
        state.elapsed_s += time.perf_counter() - step_start
        window_tokens += n_tokens
        loss = loss_sum / max(n_tokens, 1)
        record = {"step": state.step, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, "tokens": state.tokens_seen, "epoch": state.epoch}
        if cfg.eval_every and state.step % cfg.eval_every == 0 or state.step == total_steps:
            record.update(eval_fn())
        if state.step % cfg.log_every == 0 or "eval_loss" in record:
            elapsed = time.perf_counter() - window_start
            record["tokens_per_s"] = round(window_tokens / elapsed, 1) if elapsed > 0 else None
            window_tokens, window_start = 0, time.perf_counter()
            metrics.write(record)
            if accelerator.trackers:
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state.step)
        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{state.tokens_seen / max(state.elapsed_s, 1e-9):.0f}",
                             **({"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}))
        progress.update(1)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
            if main:
                save_checkpoint(out / "checkpoints", model, base, optimizer, scheduler, state, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
    progress.close()
    if accelerator.trackers:
        accelerator.end_training()
    if not main:
        return {}
    return _finish(run, out, model, tokenizer, base, data, state, metrics, before, accelerator)


# The package each `train.report_to` tracker needs.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(report_to: str) -> None:
    """Refuse a tracker whose package is missing before anything runs (Accelerate would only warn)."""
    import importlib.util

    package = TRACKER_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise QLoRAKitError(f"train.report_to={report_to} needs the {package} package: pip install {package} "
                            "(or set train.report_to=none)")


def enable_checkpointing(model) -> None:
    """Recompute each layer's activations in backward instead of keeping them.

    Non-reentrant checkpointing needs no input that requires grad, which a frozen
    4-bit base lacks. Recent transformers call it activation checkpointing.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _stop_non_finite(out: Path, what: str, value: float, step: int) -> None:
    last = list_checkpoints(out / "checkpoints")
    raise QLoRAKitError(
        f"the {what} became {value} at step {step}; training stopped before applying it. "
        f"Last good checkpoint: {last[-1] if last else 'none'}. Lower train.learning_rate, "
        "keep train.max_grad_norm > 0, or check the data for extreme examples"
    )


def make_accelerator(cfg: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    precision = resolve_mixed_precision(cfg.mixed_precision, cuda)
    # A previous train() in this process (a notebook, a sweep) leaves its precision in
    # Accelerate's global state; reset it, keeping the distributed setup (PartialState).
    AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=precision,
        cpu=not cuda,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
    )


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    name = cfg.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return quantization.eight_bit_optimizer(name, params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    """Linear warmup from 0 to the peak rate, then cosine or linear decay to 0, or constant.

    transformers' schedules, as HF Trainer uses them: the rate of step k is the
    schedule at k (0 during the first warmup step); metrics log the rate after
    each step, i.e. the one the next step will use.
    """
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[cfg.lr_scheduler], optimizer,
                         num_warmup_steps=min(cfg.warmup_steps, total_steps), num_training_steps=total_steps)


def _next_micro_batches(data: PreparedData, cfg: TrainConfig, state: LoopState, per_epoch: int,
                        accelerator) -> list[list[dict]]:
    """This process's next `gradient_accumulation_steps` micro-batches, crossing epochs as needed.

    The epoch's order of global batches (batch_size x processes examples) is a pure
    function of (seed, epoch), and process i takes the i-th slice of each, so the
    processes read disjoint examples, one process reads what several would, and a
    resumed run that restores (epoch, batch_in_epoch) reads exactly the same batches.
    """
    group = []
    world, rank = accelerator.num_processes, accelerator.process_index
    for _ in range(cfg.gradient_accumulation_steps):
        if state.batch_in_epoch >= per_epoch:
            state.epoch += 1
            state.batch_in_epoch = 0
        order = batch_indices(len(data.train), cfg.batch_size * world, cfg.seed, state.epoch)
        global_batch = order[state.batch_in_epoch]
        group.append([data.train[i] for i in global_batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]])
        state.batch_in_epoch += 1
    return group


def _accumulate(loss_fn, group, pad_id, mask_dtype, accelerator) -> tuple[float, int]:
    """Forward/backward every micro-batch of one optimizer step.

    Each micro-batch's summed loss is divided by the supervised tokens of the whole
    group (across processes too), so the step's gradient is that of one big batch
    with every token weighted equally, not a mean of micro-batch means.
    """
    batches = [collate(examples, pad_id, mask_dtype) for examples in group]
    local_tokens = sum(count_supervised_tokens(b) for b in batches)
    total_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
    scale = accelerator.num_processes / max(total_tokens, 1)  # DDP averages gradients over processes
    loss_total = 0.0
    for i, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = i == len(batches) - 1
        with nullcontext() if sync else accelerator.no_sync(loss_fn):
            loss_sum, _ = loss_fn(batch)
            accelerator.backward(loss_sum * scale)
        loss_total += float(loss_sum.detach())
    reduced = float(accelerator.reduce(torch.tensor(loss_total, device=accelerator.device), "sum"))
    return reduced, total_tokens


def _clip(accelerator, module, max_norm: float) -> float | None:
    if max_norm <= 0:
        return None
    norm = accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], max_norm)
    return round(float(norm), 6)


def evaluate(loss_fn, data: PreparedData, cfg: TrainConfig, accelerator) -> dict:
    """Token-weighted mean loss and perplexity on the held-out set (empty dict if there is none)."""
    if not data.eval:
        return {}
    total, count = token_loss(loss_fn, data.eval, data.pad_id, batch_size=cfg.batch_size,
                              device=accelerator.device, max_batches=cfg.eval_batches)
    loss = total / max(count, 1)
    return {"eval_loss": round(loss, 6), "eval_ppl": round(perplexity(loss), 4)}


def generate_samples(model, tokenizer, data: PreparedData, cfg: TrainConfig) -> list[str]:
    """Greedy continuations of the first held-out prompts."""
    if not cfg.sample_prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    answers = []
    for ids in data.eval_prompt_ids[: cfg.sample_prompts]:
        prompt = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=cfg.sample_max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=data.pad_id)
        answers.append(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return answers


def _samples_before(out: Path, model, tokenizer, data, cfg, fresh: bool) -> list[str]:
    """Base-model generations, computed once per run and kept across resumes."""
    path = out / "samples_before.json"
    if not fresh and path.is_file():
        return json.loads(path.read_text())
    set_adapters_enabled(model, False)
    answers = generate_samples(model, tokenizer, data, cfg)
    set_adapters_enabled(model, True)
    atomic.write_json(path, answers)
    return answers


def _finish(run, out, model, tokenizer, base, data, state, metrics, before, accelerator) -> dict:
    save_adapter(model, out / RUN_ADAPTER_DIR, base=base, extra={"step": state.step})
    after = generate_samples(model, tokenizer, data, run.train)
    write_samples(out / "samples.md", data.eval_prompts[: len(after)], before, after, data.eval_references)
    records = metrics.records()
    plot_loss_curve(records, out / "loss_curve.png")
    evals = [r for r in records if r.get("eval_loss") is not None]
    summary = {
        "steps": state.step,
        "epochs": state.epoch + 1,
        "supervised_tokens": state.tokens_seen,
        "train_time_s": round(state.elapsed_s, 2),
        "tokens_per_s": round(state.tokens_seen / state.elapsed_s, 1) if state.elapsed_s else None,
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "final_eval_ppl": evals[-1]["eval_ppl"] if evals else None,
        "final_train_loss": next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None),
        "peak_memory_mb": _peak_memory_mb(accelerator.device),
        "parameters": parameter_counts(model),
        "data": data.stats,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "versions": versions(),
    }
    atomic.write_json(out / "summary.json", summary)
    write_run_readme(out, run, summary)
    log.info("done: eval loss %s -> %s; adapter in %s", summary["first_eval_loss"], summary["final_eval_loss"],
             out / RUN_ADAPTER_DIR)
    return summary


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(memory.peak_rss_mb(), 1)


def _prepare_output_dir(out: Path, resume: bool) -> Path | None:
    """Return the checkpoint to resume from; refuse to mix a new run into an old folder."""
    remove_partial_checkpoints(out / "checkpoints")  # left by a run killed mid-write; first, as it may put one back
    checkpoints = list_checkpoints(out / "checkpoints")
    if resume:
        if checkpoints:
            return checkpoints[-1]
    elif (out / "metrics.jsonl").exists() or checkpoints:
        raise QLoRAKitError(
            f"{out} already holds a run. Continue it with train.resume=true, "
            "or choose a new train.output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    return None


def _log_data(data: PreparedData) -> None:
    stats = data.stats
    log.info("data: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
