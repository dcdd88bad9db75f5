"""The training loop on Accelerate: config, optimizer, schedule, accumulation, eval, checkpoints.

It reads top to bottom: set up the run folder and the accelerator, load the base
in 4-bit, prepare the data, wrap LoRA, build optimizer and schedule, resume if
asked, then step; evaluate and checkpoint on schedule; write the final adapter,
samples, loss curve and summary.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

import torch
from tqdm.auto import tqdm

from . import memory, quantization
from .adapter_io import RUN_ADAPTER_DIR, save_adapter, versions
from .config import save_config, to_dict
from .data import PreparedData, batch_indices, collate, count_supervised_tokens, prepare_data
from .errors import QLoRAKitError
from .loading import load_base
from .lora import apply_lora, parameter_counts, set_adapters_enabled, trainable_parameters
from .losses import SupervisedLoss
from .run_folder import MetricsLog, add_file_log, perplexity, plot_loss_curve, write_run_readme, write_samples
from .training_state import LoopState, list_checkpoints, load_checkpoint, remove_partial_checkpoints, save_checkpoint

if TYPE_CHECKING:
    from .recipe import RunConfig

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """How to train: steps, batch, optimizer, schedule, evaluation and checkpoints."""

    output_dir: str = "runs/run"  # the run folder: config, metrics, adapter, checkpoints, plots
    seed: int = 0  # seeds data order, adapter init and dropout
    max_steps: Optional[int] = None  # optimizer steps; default: num_epochs over the training set
    num_epochs: int = 1  # passes over the training set when max_steps is not set
    batch_size: int = 4  # examples per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (loss normalised by all their tokens)
    learning_rate: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay on adapter weights
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 10  # linear warmup from 0 to learning_rate
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = "auto"  # auto: paged_adamw_8bit on CUDA, adamw on CPU
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: bf16 where supported, else fp16 (CUDA) with loss scaling
    gradient_checkpointing: bool = True  # recompute activations in backward: much less memory, ~30% more compute
    loss_chunk_tokens: int = 1024  # supervised tokens per LM-head chunk in the fused loss (bounds logits memory)
    eval_every: int = 50  # evaluate every N steps (and at the start and end); 0: only start and end
    eval_batches: Optional[int] = None  # cap evaluation at N micro-batches; default: the whole held-out set
    save_every: int = 50  # checkpoint every N steps; 0: only the final adapter
    keep_checkpoints: int = 2  # newest checkpoints kept, older ones deleted; 0 keeps all
    resume: bool = False  # continue from the newest checkpoint in output_dir
    log_every: int = 1  # write metrics every N steps
    sample_prompts: int = 3  # held-out prompts to generate from before and after training; 0 disables
    sample_max_new_tokens: int = 64  # length of those generations
    report_to: Literal["none", "tensorboard"] = "none"  # extra tracker through Accelerate

    def problems(self) -> list[str]:
        found = []
        for name in ("batch_size", "gradient_accumulation_steps", "num_epochs", "loss_chunk_tokens"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            found.append(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.learning_rate <= 0:
            found.append(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints", "sample_prompts"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            found.append(f"log_every must be >= 1, got {self.log_every}")
        return found


def train(run: "RunConfig") -> dict:
    """Train an adapter as `run` describes; return the summary written to the run folder."""
    cfg = run.train
    out = Path(cfg.output_dir)
    resume_from = _prepare_output_dir(out, cfg.resume)
    file_log = add_file_log(out)
    try:
        if cfg.resume and resume_from is None:
            log.warning("train.resume is set but %s has no checkpoint yet: starting from step 0", out)
        return _train(run, out, resume_from)
    finally:
        logging.getLogger("qlora_kit").removeHandler(file_log)
        file_log.close()


def _train(run: "RunConfig", out: Path, resume_from: Path | None) -> dict:
    cfg = run.train
    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.seed)
    model, tokenizer = load_base(replace(run.model, device=str(accelerator.device)), run.quant)
    data = prepare_data(run.data, tokenizer, seed=cfg.seed)
    _log_data(data)
    set_seed(cfg.seed)  # adapter init does not depend on how much randomness loading used
    apply_lora(model, run.lora)
    counts = parameter_counts(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{counts['trainable']:,}", f"{counts['total']:,}",
             100 * counts["trainable"] / counts["total"])
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False

    micro_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(micro_per_epoch * cfg.num_epochs / cfg.gradient_accumulation_steps)
    optimizer = make_optimizer(cfg, trainable_parameters(model), accelerator.device)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    loss_fn = SupervisedLoss(model, cfg.loss_chunk_tokens)
    loss_fn, optimizer, scheduler = accelerator.prepare(loss_fn, optimizer, scheduler)

    state = LoopState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, state.step)
    main = accelerator.is_main_process  # under several processes, one writes the run folder
    if main:
        save_config(run, out / "config.yaml")
    metrics = MetricsLog(out, resume_step=state.step if resume_from else None, enabled=main)
    eval_fn = lambda: evaluate(loss_fn, data, cfg, accelerator)  # noqa: E731
    mask_dtype = quantization.DTYPES[run.quant.compute_dtype]

    before = _samples_before(out, model, tokenizer, data, cfg, fresh=resume_from is None) if main else []
    if resume_from is None:
        metrics.write({"step": 0, "loss": None, "lr": scheduler.get_last_lr()[0], **eval_fn()})
    if cfg.report_to != "none":
        accelerator.init_trackers("tensorboard", config=_flat(to_dict(run)))

    loss_fn.train()  # load_base returns an eval-mode model; dropout and checkpointing need train mode
    progress = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    while state.step < total_steps:
        step_start = time.perf_counter()
        group = _next_micro_batches(data, cfg, state, micro_per_epoch)
        loss_sum, n_tokens = _accumulate(loss_fn, group, data.pad_id, mask_dtype, accelerator)
        if not math.isfinite(loss_sum):
            _stop_non_finite(out, "loss", loss_sum, state.step + 1)
        grad_norm = _clip(accelerator, loss_fn, cfg.max_grad_norm)
        if grad_norm is not None and not math.isfinite(grad_norm):
            _stop_non_finite(out, "gradient norm", grad_norm, state.step + 1)
        optimizer.step()
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
                save_checkpoint(out / "checkpoints", model, optimizer, scheduler, state, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
    progress.close()
    if accelerator.trackers:
        accelerator.end_training()
    if not main:
        return {}
    return _finish(run, out, model, tokenizer, data, state, metrics, before, accelerator)


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
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if (not cuda or torch.cuda.is_bf16_supported()) else "fp16"
    if precision == "fp16" and not cuda:
        raise QLoRAKitError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    # A previous train() in this process (a notebook, a sweep) leaves its precision in
    # Accelerate's global state; reset it, keeping the distributed setup (PartialState).
    AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=precision,
        cpu=not cuda,
        log_with="tensorboard" if cfg.report_to == "tensorboard" else None,
        project_dir=str(out),
    )


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    name = cfg.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return quantization.eight_bit_optimizer(name, params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    """Linear warmup to the peak rate, then cosine or linear decay to 0, or constant."""
    warmup = min(cfg.warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(total_steps - warmup, 1)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _next_micro_batches(data: PreparedData, cfg: TrainConfig, state: LoopState, per_epoch: int) -> list[list[dict]]:
    """The next `gradient_accumulation_steps` micro-batches, crossing epochs as needed.

    The order within an epoch is a pure function of (seed, epoch), so a resumed run
    that restores (epoch, batch_in_epoch) reads exactly the same batches.
    """
    group = []
    for _ in range(cfg.gradient_accumulation_steps):
        if state.batch_in_epoch >= per_epoch:
            state.epoch += 1
            state.batch_in_epoch = 0
        order = batch_indices(len(data.train), cfg.batch_size, cfg.seed, state.epoch)
        group.append([data.train[i] for i in order[state.batch_in_epoch]])
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


@torch.no_grad()
def evaluate(loss_fn, data: PreparedData, cfg: TrainConfig, accelerator) -> dict:
    """Token-weighted mean loss and perplexity on the held-out set (empty dict if there is none)."""
    if not data.eval:
        return {}
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    batches = [data.eval[i:i + cfg.batch_size] for i in range(0, len(data.eval), cfg.batch_size)]
    for examples in batches[: cfg.eval_batches]:
        batch = {k: v.to(accelerator.device) for k, v in collate(examples, data.pad_id).items()}
        loss_sum, n = loss_fn(batch)
        total += float(loss_sum)
        count += int(n)
    loss_fn.train(was_training)
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
    path.write_text(json.dumps(answers, indent=2))
    return answers


def _finish(run, out, model, tokenizer, data, state, metrics, before, accelerator) -> dict:
    save_adapter(model, out / RUN_ADAPTER_DIR, extra={"step": state.step})
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
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
    checkpoints = list_checkpoints(out / "checkpoints")
    remove_partial_checkpoints(out / "checkpoints")  # left by a run killed mid-write
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
