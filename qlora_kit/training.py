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
import shutil
import time
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import atomic, classification, memory, quantization
from .adapter_io import RUN_ADAPTER_DIR, save_adapter, versions
from .config import save_config, to_dict
from .data import (IGNORE_INDEX, PreparedData, batch_indices, check_rows, collate, count_supervised_tokens,
                   prepare_data)
from .errors import QLoRAKitError
from .evaluation import token_loss
from .loading import load_base
from .lora import apply_lora, parameter_counts, select_targets, set_adapters_enabled, trainable_parameters
from .losses import SupervisedLoss, perplexity
from .compilation import compile_layers
from .norms import fast_norms
from .offload import enable_activation_offloading
from .tiling import tile_mlps
from .precision import resolve_mixed_precision, torch_dtype
from .run_folder import (METRICS_FILE, RUN_MARKER, MetricsLog, add_file_log, is_run_folder, plot_loss_curve,
                         write_run_marker, write_run_readme, write_samples)
from .settings import RunConfig, TrainConfig
from .training_state import (LoopState, check_resumable, gathered_adapter, list_checkpoints, load_adapter_state,
                             load_training_state, newest_intact_checkpoint, remove_partial_checkpoints,
                             save_checkpoint)

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
    if run.model.task == classification.TASK:  # the classes, from every row checked, size the head
        _checked(lambda: classification.check_architecture(run.model))
        run, rows = _checked(lambda: classification.with_labels(run))
    else:
        rows = _checked(lambda: check_rows(run.data))
    _checked(lambda: check_cpu_model_size(run))
    out = Path(cfg.output_dir)
    accelerator = _checked(lambda: make_accelerator(cfg, out))
    if accelerator.is_fsdp2:
        _checked(lambda: _check_fsdp(run))
    main = accelerator.is_main_process
    if accelerator.device.type == "cuda":
        _on_main(accelerator, lambda: check_memory_plan(run, accelerator.num_processes))
    resume_from = _on_main(accelerator, lambda: _resume_point(out, cfg, accelerator))
    file_log = add_file_log(out) if main else None
    package_log = logging.getLogger("qlora_kit")
    level = package_log.level
    if not main:
        # One process tells the story (warnings about the data or config would repeat); all report errors.
        package_log.setLevel(max(level, logging.ERROR))
    try:
        log.info("data: %d rows in %s checked", rows, run.data.path)
        if accelerator.device.type == "cpu":
            set_cpu_threads(cfg.cpu_threads, accelerator.num_processes)
        if accelerator.num_processes > 1:
            log.info("%d processes, %s", accelerator.num_processes, "FSDP" if accelerator.is_fsdp2 else "DDP")
        if cfg.resume and resume_from is None:
            log.warning("train.resume is set but %s has no checkpoint yet: starting from step 0", out)
        return _train(run, out, resume_from, accelerator)
    except KeyboardInterrupt:
        last = list_checkpoints(out / "checkpoints")
        _to_file(file_log, logging.WARNING, f"interrupted; last checkpoint: {last[-1] if last else 'none'} "
                                            "(continue with --resume)")
        raise
    except QLoRAKitError as exc:  # the console shows it once, as `error: ...`; the run's log keeps it too
        _to_file(file_log, logging.ERROR, str(exc))
        raise
    finally:
        package_log.setLevel(level)
        if file_log is not None:
            package_log.removeHandler(file_log)
            file_log.close()


def _to_file(handler: logging.Handler | None, level: int, message: str) -> None:
    """A line for train.log alone (the console reports the same event its own way)."""
    if handler is not None:
        handler.handle(log.makeRecord(log.name, level, __file__, 0, message, None, None))


def _resume_point(out: Path, cfg: TrainConfig, accelerator) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), refused if this launch cannot continue it."""
    resume_from = _prepare_output_dir(out, cfg.resume, cfg.overwrite)
    if resume_from is not None:
        check_resumable(resume_from, accelerator.num_processes, accelerator.is_fsdp2)
    return resume_from


def _train(run: RunConfig, out: Path, resume_from: Path | None, accelerator) -> dict:
    cfg = run.train
    main, world, fsdp = accelerator.is_main_process, accelerator.num_processes, accelerator.is_fsdp2
    set_seed(cfg.seed)
    # Under FSDP every process loads the base into host RAM; sharding then moves only its
    # shards to its GPU, so no GPU ever holds the whole 4-bit model.
    load_device = "cpu" if fsdp else str(accelerator.device)
    model, tokenizer, base = load_base(replace(run.model, device=load_device), run.quant)
    _checked(lambda: select_targets(model, run.lora.target_modules))  # layers LoRA can wrap, before the data
    classifier = run.model.task == classification.TASK
    data = (classification.prepare(run.data, run.model.labels, tokenizer, cfg.seed) if classifier
            else prepare_data(run.data, tokenizer, seed=cfg.seed))
    _checked(lambda: _check_processes(data, world))
    _log_data(data)
    set_seed(cfg.seed)  # adapter init does not depend on how much randomness loading used
    apply_lora(model, run.lora)
    counts = parameter_counts(model)  # before sharding: FSDP's shards hide the 4-bit shapes
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{counts['trainable']:,}", f"{counts['total']:,}",
             100 * counts["trainable"] / counts["total"])
    log.info("device %s x %d process(es), mixed precision %s; base in 4-bit %s: %.1f MiB of packed weights",
             accelerator.device, accelerator.num_processes, accelerator.mixed_precision, run.quant.quant_type,
             quantization.quantized_bytes(model) / 2**20)
    prepare_layers(model, cfg, accelerator.device)
    if cfg.compile:
        _compile(model, fsdp)

    # Each process reads its own slice of every global batch of batch_size x processes examples.
    micro_per_epoch = math.ceil(len(data.train) / (cfg.batch_size * world))
    total_steps = cfg.max_steps or math.ceil(micro_per_epoch * cfg.num_epochs / cfg.gradient_accumulation_steps)
    if resume_from is not None:
        load_adapter_state(resume_from, model)  # into the whole weights, before FSDP shards them
    optimizer = make_optimizer(cfg, trainable_parameters(model), accelerator.device, sharded=fsdp)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    loss_fn = classification.ClassificationLoss(model) if classifier else SupervisedLoss(model, cfg.loss_chunk_tokens)
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
        if "eval_loss" in start:
            log.info("step 0: %s", _eval_message(start))
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
        if not math.isfinite(loss_sum):  # reduced over processes: every one stops here
            _stop(_non_finite(out, "loss", loss_sum, state.step + 1))
        grad_norm = _clip(accelerator, loss_fn, cfg.max_grad_norm)
        # Under fp16 an overflow makes the norm inf: the loss scaler skips that update and
        # lowers its scale, as every trainer does. Without a scaler it is a real divergence.
        if grad_norm is not None and not math.isfinite(grad_norm) and accelerator.scaler is None:
            _stop(_non_finite(out, "gradient norm", grad_norm, state.step + 1))
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
            if "eval_loss" in record:
                log.info("step %d: %s", state.step, _eval_message(record))
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
            # Every process: each gives its RNG state (under FSDP, its shards too); the main one writes.
            saved = save_checkpoint(out / "checkpoints", model, base, optimizer, scheduler, state,
                                    cfg.keep_checkpoints, accelerator=accelerator)
            log.info("step %d: checkpoint %s", state.step, saved)
    progress.close()
    if accelerator.trackers:
        accelerator.end_training()
    return _finish(run, out, model, base, data, state, metrics, before, accelerator, counts, samples)


# The package each `train.report_to` tracker needs.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(report_to: str) -> None:
    """Refuse a tracker whose package is missing before anything runs (Accelerate would only warn)."""
    import importlib.util

    package = TRACKER_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise QLoRAKitError(f"train.report_to={report_to} needs the {package} package: pip install {package} "
                            "(or set train.report_to=none)")


CPU_PARAMETER_LIMIT = 3e9  # above this, training on the CPU is refused unless model.device=cpu asks for it


def check_cpu_model_size(run: RunConfig) -> None:
    """No GPU and a multi-billion-parameter base: say so before a long download, not after.

    The config alone (a local folder, a bundled shape or the Hub's config.json) gives
    the parameter count; if it cannot be had, nothing is said here and loading
    reports what is wrong.
    """
    if torch.cuda.is_available() or run.model.device:
        return
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from . import memory_plan

    try:
        config = memory_plan.model_config(run.model)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - an unknown or unreadable config is loading's to report
        return
    params = sum(p.numel() for p in skeleton.parameters())
    if params > CPU_PARAMETER_LIMIT:
        raise QLoRAKitError(
            f"there is no CUDA GPU here, and {run.model.base} has {params / 1e9:.1f}B parameters: in 4-bit it needs "
            f"about {params * 0.6 / 2**30:.0f} GiB of RAM and a training step on the CPU takes hours. Run this recipe "
            "on a GPU machine (`qlora-kit plan` shows what fits), or set model.device=cpu to train on the CPU anyway")


def check_memory_plan(run: RunConfig, processes: int = 1) -> None:
    """Before a CUDA run: the simulated peak against the GPU's free memory; stop early if it cannot fit.

    An out-of-memory error an hour into loading an 8B model is the usual way QLoRA
    users learn their settings do not fit; the plan (`qlora-kit plan`) says so first.
    Per GPU under DDP; FSDP shards the weights, so there the plan is an upper bound.
    """
    from . import memory_plan

    plan = memory_plan.preflight(run)
    if plan is None:
        return
    r = plan.report
    log.info("memory plan (simulated): %.2f GiB per GPU of %.2f GiB free%s", r.total_bytes / 2**30,
             plan.gpu_bytes / 2**30, " (an upper bound under FSDP)" if processes > 1 and uses_fsdp(run.train) else "")
    if plan.fits or run.train.ignore_memory_plan:
        return
    raise QLoRAKitError(
        plan.render() + "\nThe training step is predicted not to fit the free GPU memory. Try a shorter "
        f"data.max_seq_len (now {run.data.max_seq_len}), train.batch_size=1 with more "
        "train.gradient_accumulation_steps, train.activation_offloading=true, or (long sequences) "
        "train.mlp_chunk_tokens=4096; `qlora-kit plan RECIPE` shows "
        "what fits. To train anyway: train.ignore_memory_plan=true")


def set_cpu_threads(requested: int | None, processes: int) -> int:
    """Choose torch's CPU threads deliberately, and say so.

    Oversubscribed cores are the worst case on a CPU: measured on a loaded 2-core
    machine, 2 threads ran at 1-5 tokens/s where 1 thread ran at 36-39 (idle: 127 vs
    83). So each process gets its share of the cores it may run on, and a busy
    machine is pointed out with the setting that helps.
    """
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        requested = torch.get_num_threads()  # the user chose through the environment
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested or max(1, available // processes)
    torch.set_num_threads(threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    log.info("CPU threads: %d per process (%d cores available; train.cpu_threads or OMP_NUM_THREADS to change)",
             threads, available)
    if requested is None and load > available:
        log.warning("the machine is busy (load average %.1f on %d cores): threads will compete; "
                    "train.cpu_threads=1 is often much faster then", load, available)
    return threads


def _compile(model, fsdp: bool) -> None:
    """train.compile: each decoder layer compiled once (qlora_kit/compilation.py), or a warning why not."""
    if fsdp:  # FSDP2 swaps parameters for DTensors per layer; compiling over that is untested here
        log.warning("train.compile is not applied with FSDP; training without compilation")
        return
    compiled = compile_layers(model)
    if compiled:
        log.info("train.compile: %d decoder layers compiled (the first step includes compiling)", compiled)


def prepare_layers(model, cfg: TrainConfig, device, pin_memory: bool | None = None) -> None:
    """What training changes in the model's layers once LoRA is on: checkpointing, the norms'
    backward, tiled MLPs, activation offloading. The memory plan and the benchmark call this too,
    so they measure the step that training runs."""
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    fast_norms(model)  # the same forward, a shorter backward (qlora_kit/norms.py)
    if cfg.mlp_chunk_tokens:
        tile_mlps(model, cfg.mlp_chunk_tokens)
    if cfg.activation_offloading:
        enable_activation_offloading(model, device, pin_memory=pin_memory)  # a logged no-op on the CPU
    model.config.use_cache = False


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
    # transformers 5 also makes the embedding output require grad, a workaround only reentrant
    # checkpointing needs: it would keep a (batch, seq, hidden) leaf on the GPU through backward
    # (activation offloading cannot move it) and compute its unused gradient.
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
        model.disable_input_require_grads()


def _non_finite(out: Path, what: str, value: float, step: int) -> QLoRAKitError:
    last = list_checkpoints(out / "checkpoints")
    return QLoRAKitError(
        f"the {what} became {value} at step {step}; training stopped before applying it. "
        f"Last good checkpoint: {last[-1] if last else 'none'}. Lower train.learning_rate, "
        "keep train.max_grad_norm > 0, or check the data for extreme examples"
    )


# ---------------------------------------------------------------- several processes


def _is_main_process() -> bool:
    """Whether this is the main process; readable before the processes have connected."""
    return int(os.environ.get("RANK", "0")) == 0  # set by torchrun and accelerate launch


def _stop(error: QLoRAKitError):
    """End every process for a problem every one of them found: the main process raises it.

    The others leave with the same exit status, after giving the launcher time to end
    them once the main process has printed the message and exited: one message, and
    no process left waiting at a collective the others will never reach.
    """
    if _is_main_process():
        raise error
    time.sleep(QUIET_EXIT_WAIT_S)
    raise SystemExit(EXIT_USER_ERROR)


def _checked(fn):
    """`fn()`, which finds the same problems on every process (same config, same files): reported once."""
    try:
        return fn()
    except QLoRAKitError as exc:
        _stop(exc)


def _on_main(accelerator, fn):
    """`fn()` run by the main process alone (e.g. on the run folder), its result given to every process.

    A QLoRAKitError it raises stops every process, reported once, by the main process.
    """
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except QLoRAKitError as exc:
            error = exc
    if accelerator.num_processes > 1:
        result, failed = broadcast_object_list([result, error is not None])
        if failed and error is None:
            _stop(QLoRAKitError("stopped by the main process"))  # not the main process: leaves quietly
    if error is not None:
        raise error
    return result


def uses_fsdp(cfg: TrainConfig) -> bool:
    """Whether the run shards its model: `train.distributed=fsdp`, or auto under `accelerate launch --use_fsdp`."""
    launched_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if cfg.distributed == "ddp" and launched_fsdp:
        raise QLoRAKitError("train.distributed=ddp, but the run was launched with `accelerate launch --use_fsdp`: "
                            "drop one of them")
    return cfg.distributed == "fsdp" or (cfg.distributed == "auto" and launched_fsdp)


def _fsdp_plugin(offload: bool):
    """Accelerate's FSDP2 plugin; what is not set here comes from `accelerate launch --fsdp_*` flags.

    Each decoder layer is one FSDP unit. No mixed-precision policy: parameters keep their
    dtypes (fp32 adapters, the 4-bit base in bf16 containers) and the forward runs under
    the same autocast as DDP and one process do, so all three compute the same numbers.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy=None if "FSDP_AUTO_WRAP_POLICY" in os.environ else "transformer_based_wrap",
        # None: as `accelerate launch --fsdp_offload_params` says; never on the CPU (nothing to offload to).
        cpu_offload=True if offload else (None if torch.cuda.is_available() else False),
        mixed_precision_policy=MixedPrecisionPolicy(),
    )


def _check_fsdp(run: RunConfig) -> None:
    if run.quant.quant_storage == "uint8":
        raise QLoRAKitError(
            "FSDP shards floating-point parameters only: 4-bit weights packed in uint8 would stay whole on "
            "every GPU. Set quant.quant_storage=bfloat16 (the same packed weights, in bfloat16 containers)"
        )
    if run.train.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        raise QLoRAKitError(
            f"train.optimizer={run.train.optimizer} cannot run under FSDP: bitsandbytes' 8-bit optimizer "
            "kernels have no rule for FSDP's sharded (DTensor) parameters. Use train.optimizer=adamw (or auto)"
        )


def _check_processes(data: PreparedData, world: int) -> None:
    if len(data.train) < world:
        raise QLoRAKitError(
            f"{world} processes but only {len(data.train)} training example(s): every process needs at least "
            f"one example per step. Launch at most {len(data.train)} processes, or give more data"
        )


def _fsdp_units(accelerator, model) -> None:
    """Make each decoder layer an FSDP unit (the layer classes transformers never splits)."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:
        names = list(getattr(model, "_no_split_modules", None) or [])
        if not names:
            log.warning("%s names no decoder-layer class: FSDP gathers the whole model at once", type(model).__name__)
        plugin.transformer_cls_names_to_wrap = names


def _after_fsdp_prepare(accelerator, model, loss_fn) -> None:
    """What Accelerate's FSDP2 path leaves to us: autocast, and the 4-bit constants on the GPU.

    Sharding turns each 4-bit weight into a plain (sharded) tensor; bitsandbytes then
    finds its quantization constants on the layer (`Linear4bit.quant_state`), which
    stay whole on every process and must be where the layer computes.
    """
    forward = loss_fn.forward

    def autocast_forward(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

    loss_fn.forward = autocast_forward
    quantization.quant_states_to(model, accelerator.device)


def make_accelerator(cfg: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    precision = resolve_mixed_precision(cfg.mixed_precision, cuda)
    fsdp = uses_fsdp(cfg)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by torchrun and accelerate launch
    offload = fsdp and cfg.fsdp_cpu_offload and cuda and several  # on the CPU the shards are in host RAM already
    if offload:
        # What `accelerate launch --use_fsdp --fsdp_offload_params true` sets: Accelerate then adds
        # a gloo backend for CPU tensors, which gathering offloaded shards (adapter, optimizer) needs.
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_OFFLOAD_PARAMS"] = "true"
    plugin = _fsdp_plugin(offload) if fsdp else None
    # A previous train() in this process (a notebook, a sweep) leaves its precision in
    # Accelerate's global state; reset it, keeping the distributed setup (PartialState).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=not cuda,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
        fsdp_plugin=plugin,
        # A process whose partners died or hang fails after this long instead of waiting forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed_timeout_s))],
    )
    if fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate turns FSDP on for GPUs (and other accelerators) only; on the CPU, where
        # the multi-process tests run, the same FSDP2 path (over gloo) is switched on here,
        # in both of its shared states, as Accelerate does it for a GPU.
        from accelerate.state import PartialState

        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    elif fsdp and not accelerator.is_fsdp2:
        log.warning("train.distributed=fsdp has no effect on a single process: training without sharding")
    return accelerator


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device, sharded: bool = False):
    """The optimizer `train.optimizer` names; `sharded`: FSDP's parameters, which 8-bit optimizers cannot update."""
    name = cfg.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" and not sharded else "adamw"
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
    A process whose slice of a short last batch is empty gets one example without
    targets: it adds no loss and no tokens, but runs the forward and backward in
    which DDP and FSDP exchange gradients and weights with the other processes.
    """
    group = []
    world, rank = accelerator.num_processes, accelerator.process_index
    for _ in range(cfg.gradient_accumulation_steps):
        if state.batch_in_epoch >= per_epoch:
            state.epoch += 1
            state.batch_in_epoch = 0
        order = batch_indices(len(data.train), cfg.batch_size * world, cfg.seed, state.epoch)
        global_batch = order[state.batch_in_epoch]
        mine = [data.train[i] for i in global_batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]]
        group.append(mine or [_without_targets(data.train[global_batch[0]])])
        state.batch_in_epoch += 1
    return group


def _without_targets(example: dict) -> dict:
    """The example with every label ignored: a forward pass that contributes nothing."""
    return {**example, "labels": [IGNORE_INDEX] * len(example["labels"])}


def _accumulate(loss_fn, group, pad_id, mask_dtype, accelerator) -> tuple[float, int]:
    """Forward/backward every micro-batch of one optimizer step.

    Each micro-batch's summed loss is divided by the supervised tokens of the whole
    group (across processes too), so the step's gradient is that of one big batch
    with every token weighted equally, not a mean of micro-batch means.
    """
    batches = [collate(examples, pad_id, mask_dtype) for examples in group]
    local_tokens = sum(count_supervised_tokens(b) for b in batches)
    total_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
    scale = accelerator.num_processes / max(total_tokens, 1)  # DDP and FSDP average gradients over processes
    loss_total = 0.0
    for i, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = i == len(batches) - 1
        with nullcontext() if sync else accelerator.no_sync(loss_fn):
            loss_sum, _ = loss_fn(batch)
            accelerator.backward(loss_sum * scale)
        loss_total += float(loss_sum.detach())
    reduced = float(accelerator.reduce(torch.tensor(loss_total, dtype=torch.float64, device=accelerator.device), "sum"))
    return reduced, total_tokens


def _clip(accelerator, module, max_norm: float) -> float | None:
    if max_norm <= 0:
        return None
    norm = accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], max_norm)
    return round(float(norm), 6)


def _eval_message(record: dict) -> str:
    if "eval_accuracy" in record:
        return f"eval loss {record['eval_loss']:.4f}, accuracy {record['eval_accuracy']:.4f}"
    return f"eval loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.2f}"


def evaluate(loss_fn, data: PreparedData, cfg: TrainConfig, accelerator) -> dict:
    """Token-weighted mean loss and perplexity on the held-out set (empty dict if there is none).

    A classifier's loss is per example (one target each), and its accuracy is added.

    Under several processes each evaluates its share of the batches and the sums are
    added up: the same numbers as one process, in 1/N of the time.
    """
    if not data.eval:
        return {}
    examples = data.eval if cfg.eval_batches is None else data.eval[: cfg.eval_batches * cfg.batch_size]
    world = accelerator.num_processes
    mine = _eval_share(examples, cfg.batch_size, world, accelerator.process_index)
    tally = getattr(accelerator.unwrap_model(loss_fn), "tally", None)  # a classifier's (correct, rows)
    if tally is not None:
        tally[:] = [0, 0]
    total, count = token_loss(loss_fn, mine, data.pad_id, batch_size=cfg.batch_size, device=accelerator.device)
    correct = tally[0] if tally is not None else 0
    if world > 1:
        sums = accelerator.reduce(torch.tensor([total, count, correct], dtype=torch.float64,
                                               device=accelerator.device), "sum")
        total, count, correct = float(sums[0]), int(sums[1]), int(sums[2])
    loss = total / max(count, 1)
    result = {"eval_loss": round(loss, 6), "eval_ppl": round(perplexity(loss), 4)}
    if tally is not None:
        result["eval_accuracy"] = round(correct / max(count, 1), 6)
    return result


def _eval_share(examples: list[dict], batch_size: int, world: int, rank: int) -> list[dict]:
    """This process's held-out examples: batch j of the shortest-first order goes to process j % world.

    Every process gets as many batches as the others (an example without targets
    makes up a missing one): under FSDP each forward gathers weights from all of them.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    share = [examples[i] for batch in mine for i in batch]
    if world > 1 and len(mine) < math.ceil(len(batches) / world):
        share.append(_without_targets(examples[order[0]]))
    return share


def generate_samples(model, tokenizer, data: PreparedData, cfg: TrainConfig, *, device: torch.device | None = None,
                     synced: bool = False) -> list[str]:
    """Greedy continuations of the first held-out prompts.

    `synced`: every process generates (FSDP), each forward step in step with the
    others until all are done, as transformers' `synced_gpus` does.
    """
    if not cfg.sample_prompts:
        return []
    was_training = model.training
    model.eval()
    device = device or next(p for p in model.parameters()).device
    answers = []
    prompts = data.eval_prompt_ids[: cfg.sample_prompts]
    for ids in tqdm(prompts, desc="sample generations", unit="prompt", disable=None, leave=False):
        prompt = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=cfg.sample_max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=data.pad_id, **({"synced_gpus": True} if synced else {}))
        answers.append(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return answers


def _samples(model, tokenizer, data, cfg, accelerator, loss_fn) -> list[str]:
    """`generate_samples` on the main process (the others get []).

    Under FSDP every process generates, in step (each layer's forward gathers its
    shards from all of them), with the root unit's weights (embeddings, final norm,
    head) gathered for the duration: generation does not enter through the root's forward.
    """
    if not accelerator.is_fsdp2:
        main = accelerator.is_main_process
        return generate_samples(model, tokenizer, data, cfg, device=accelerator.device) if main else []
    if not cfg.sample_prompts or not data.eval_prompt_ids:
        return []
    # FSDP sets itself up on the first forward through its root, which generation bypasses:
    # one forward of the first prompt (no targets) through the root makes sure it has run.
    ids = torch.tensor(data.eval_prompt_ids[:1], device=accelerator.device)
    was_training = loss_fn.training
    loss_fn.eval()
    with torch.no_grad():
        loss_fn({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX)})
    loss_fn.train(was_training)
    loss_fn.unshard()
    try:
        return generate_samples(model, tokenizer, data, cfg, device=accelerator.device, synced=True)
    finally:
        loss_fn.reshard()


def _samples_before(out: Path, model, samples, fresh: bool, main: bool) -> list[str]:
    """Base-model generations (`samples()`), computed once per run and kept across resumes."""
    path = out / "samples_before.json"
    if not fresh and path.is_file():
        # Every process reads it: whether to generate again must be decided alike (FSDP generates together).
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(kept, list) and all(isinstance(s, str) for s in kept)):
                raise ValueError("not a list of strings")
            return kept if main else []
        except ValueError as exc:  # a truncated or damaged file (UnicodeDecodeError is a ValueError)
            log.warning("%s is damaged (%s): generating the base model's samples again", path, exc)
    set_adapters_enabled(model, False)
    answers = samples()
    set_adapters_enabled(model, True)
    if main:
        atomic.write_json(path, answers)
    return answers


def _finish(run, out, model, base, data, state, metrics, before, accelerator, counts, samples) -> dict:
    """Write the final adapter, samples, loss curve and summary; every process calls it, the main one writes."""
    main = accelerator.is_main_process
    with gathered_adapter(model, main):  # under FSDP: the whole adapter, on the main process
        if main:
            save_adapter(model, out / RUN_ADAPTER_DIR, base=base, extra={"step": state.step})
    after = samples()
    if not main:
        return {}
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
        **({"first_eval_accuracy": evals[0]["eval_accuracy"], "final_eval_accuracy": evals[-1]["eval_accuracy"]}
           if evals and "eval_accuracy" in evals[0] else {}),
        "final_train_loss": next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None),
        "peak_memory_mb": _peak_memory_mb(accelerator.device),
        "parameters": counts,
        "processes": accelerator.num_processes,
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


def _prepare_output_dir(out: Path, resume: bool, overwrite: bool = False) -> Path | None:
    """Return the checkpoint to resume from (None: start at step 0), after checking `out` may hold the run.

    train writes only into a new or empty folder or one of its own run folders
    (marked by `RUN_MARKER`, written here first), and nothing outside it; `overwrite`
    first deletes what any other folder holds. A run is refused when it would mix
    with or silently replace an earlier one: a new run into a used run folder, or a
    resume of a finished run that has no checkpoint left to continue from.
    """
    _check_output_dir(out)
    if resume and overwrite:
        raise QLoRAKitError("train.resume and train.overwrite contradict each other: resume continues the run in "
                            "train.output_dir, overwrite deletes it first. Pass only one of them")
    if out.exists() and not out.is_dir():
        raise QLoRAKitError(f"train.output_dir {out} is a file, not a folder; name a folder for the run")
    used = out.is_dir() and any(out.iterdir())
    if used and overwrite:
        log.warning("train.overwrite: deleting everything in %s to start a new run there", out)
        _empty_folder(out)
    elif used and not is_run_folder(out):
        raise QLoRAKitError(
            f"{out} is not empty and is not a qlora_kit run folder (it has no {RUN_MARKER}): train writes only "
            "into a new or empty folder, or one of its own runs, so that it never mixes with or deletes other "
            "files. Choose another train.output_dir, or pass --overwrite (train.overwrite=true) to delete "
            f"what {out} holds and train there"
        )
    elif used:
        atomic.remove_stale(out)  # what a run killed while writing left, e.g. a half-saved final adapter
        remove_partial_checkpoints(out / "checkpoints")  # first, as it may put one back
        checkpoints = list_checkpoints(out / "checkpoints")
        finished = (out / "summary.json").is_file() or (out / RUN_ADAPTER_DIR).is_dir()
        if resume and checkpoints:
            write_run_marker(out)  # a run from before the marker gets one
            return newest_intact_checkpoint(out / "checkpoints")
        if resume and finished:
            raise QLoRAKitError(
                f"{out} holds a finished run (summary.json, {RUN_ADAPTER_DIR}/) and no checkpoint to continue "
                "from, so there is nothing to resume: resuming would train it again from step 0 and replace its "
                "adapter. Keep it and train into a new train.output_dir, or start it over with --overwrite "
                "(train.overwrite=true) instead of --resume"
            )
        if not resume and ((out / METRICS_FILE).exists() or checkpoints or finished):
            raise QLoRAKitError(
                f"{out} already holds a run. Continue it from its last checkpoint with --resume "
                "(qlora-kit train CONFIG --resume, or train.resume=true), start it over with --overwrite "
                "(train.overwrite=true), or choose a new train.output_dir"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_run_marker(out)
    return None


def _check_output_dir(out: Path) -> None:
    """Refuse an output folder that is not a folder of its own: '', '.', the home folder, '/', or above them."""
    if str(out).strip() in ("", "."):
        raise QLoRAKitError("train.output_dir is empty or '.': name a folder of its own for the run, "
                            "e.g. train.output_dir=runs/my-run")
    target = out.expanduser().resolve()
    places = {Path(target.anchor): "the filesystem root", Path.cwd().resolve(): "the current folder"}
    try:
        places[Path.home().resolve()] = "your home folder"
    except RuntimeError:
        pass  # no home folder known
    exact = [what for place, what in places.items() if target == place]
    above = [f"a folder holding {what}" for place, what in places.items() if target in place.parents]
    if exact or above:
        raise QLoRAKitError(
            f"train.output_dir {out} is {(exact or above)[0]}: a run needs a folder of its own (train fills it, "
            "and --overwrite would empty it). Name one, e.g. train.output_dir=runs/my-run"
        )


def _empty_folder(folder: Path) -> None:
    """Delete what `folder` holds (the run marker first: a half-emptied folder is not taken for a run)."""
    entries = sorted(folder.iterdir(), key=lambda p: p.name != RUN_MARKER)
    for path in entries:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


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
