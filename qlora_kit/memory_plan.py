"""Predict a training run's peak GPU memory, and what fits, without a GPU.

`simulate_step(run)` builds the run's real model from its config alone (no
weights: every tensor is a fake, shape-only tensor), with its 4-bit linears as
bitsandbytes lays them out, wraps LoRA, and runs real training steps of the
training loop's code path (`qlora_kit.training`): SupervisedLoss forward with every
token supervised, backward with gradient checkpointing as configured, gradient
clipping and the configured optimizer, under autocast. A dispatch-level tracker
counts every tensor the step keeps alive, rounded as PyTorch's CUDA caching
allocator rounds (512 bytes), and records the peak and what was alive at that
moment. How the GPU is simulated, and what that cannot see, is in
`qlora_kit.gpu_sim`; the simulation of a GPU runs in a worker process.

The peak is the analogue of `torch.cuda.max_memory_allocated()`. The GPU also
holds the CUDA context, cuBLAS/cuDNN workspaces and allocator slack, which are not
simulated: `CUDA_OVERHEAD_BYTES` is an assumed allowance for them, added for
"does it fit" decisions and shown as its own line.

    report = simulate_step(run)                       # one (batch, seq) point
    longest_sequence(run, parse_gpu_memory("24GiB"))  # bisection over simulated peaks
    print(plan(run, "24GiB").render())
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from .errors import QLoRAKitError
from .settings import DataConfig, LoRAConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig

log = logging.getLogger(__name__)

GiB = 2**30
# Assumed, not simulated: the CUDA context (~0.3-0.5 GiB on recent drivers with lazy
# module loading), cuBLAS/cuBLASLt and cuDNN workspaces, bitsandbytes' own context, and
# some caching-allocator slack (reserved but not allocated). Not fitted to any measurement.
CUDA_OVERHEAD_BYTES = 768 * 2**20
ALLOCATOR_ROUNDING = 512  # PyTorch's CUDA caching allocator rounds every block up to 512 bytes
SEQ_GRANULARITY = 64  # longest_sequence searches multiples of this
MAX_SEARCH_TOKENS = 1 << 20

# Tracker categories, in the order a plan shows them.
CATEGORIES = {
    "weights_4bit": "4-bit base weights (packed + absmax + nested state)",
    "weights_16bit": "16-bit weights and buffers (embeddings, head, norms)",
    "lora_weights": "LoRA weights",
    "lora_grads": "LoRA gradients",
    "optimizer": "optimizer state",
    "batch": "batch tensors (ids, labels, masks)",
    "forward": "activations kept from forward (checkpointed layer inputs)",
    "loss": "loss: logits chunk + hidden-state gradient",
    "backward": "backward: recomputed layer + activation gradients",
    "dequant": "dequantized 4-bit weight (transient)",
    "setup": "other (made while building)",
}
OVERHEAD_LABEL = "CUDA context + workspaces (assumed, not simulated)"

_IN_WORKER = False


# ---------------------------------------------------------------- sizes


def parse_gpu_memory(size: int | str) -> int:
    """Bytes from '24GiB', '80GB', '16000MB' or a number of bytes (GB = 10^9, GiB = 2^30)."""
    from .checkpoint_writer import parse_size

    try:
        value = parse_size(size)
    except QLoRAKitError:
        raise QLoRAKitError(f"invalid GPU memory '{size}': give bytes or a size such as 24GiB, 80GB, 16000MB") from None
    return value


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


# ---------------------------------------------------------------- the model's config


def bundled_configs_dir() -> Path:
    """recipes/configs of a source checkout: public config.json copies of the recipes' bases."""
    return Path(__file__).resolve().parent.parent / "recipes" / "configs"


def _bundled_config(base: str) -> Optional[Path]:
    folder = bundled_configs_dir()
    if not folder.is_dir():
        return None
    name = base.rstrip("/").rsplit("/", 1)[-1].lower()
    for candidate in (name, f"{name}-instruct", f"{name}-it"):
        path = folder / f"{candidate}.json"
        if path.is_file():
            return path
    return None


def model_config(model: ModelConfig):
    """The transformers config of `model.base`, without its weights.

    A local folder (its config.json), a config.json file, a .gguf file, the packaged
    SmolLM2, a Hub id whose public config ships in recipes/configs (by its last path
    component, e.g. Llama-3.1-8B-Instruct), else transformers' Hub lookup (its cache
    works offline).
    """
    from transformers import AutoConfig

    from .packaged import SMOLLM2_NAME, gguf_to_hf_folder, smollm2_path

    base = model.base
    path = Path(base).expanduser()
    try:
        if base == SMOLLM2_NAME:
            return AutoConfig.from_pretrained(smollm2_path())
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise QLoRAKitError(f"{path} has no config.json: it is not a Hugging Face model folder")
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
            _check_model_type(model_type, str(path / "config.json"), model.trust_remote_code)
            try:
                return AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
            except Exception as exc:  # noqa: BLE001 - transformers' config validation raises several types
                raise QLoRAKitError(f"the config in {path} cannot be built: {_first_line(exc)}") from None
        if path.suffix == ".json" and path.is_file():
            return _config_from_dict(json.loads(path.read_text()), str(path))
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(gguf_to_hf_folder(path))
        bundled = _bundled_config(base)
        if bundled is not None:
            return _config_from_dict(json.loads(bundled.read_text()), str(bundled))
    except (OSError, json.JSONDecodeError) as exc:
        raise QLoRAKitError(f"cannot read the config of '{base}': {exc}") from exc
    try:
        return AutoConfig.from_pretrained(base, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure means: no config to plan with
        shipped = sorted(p.stem for p in bundled_configs_dir().glob("*.json")) if bundled_configs_dir().is_dir() else []
        raise QLoRAKitError(
            f"no config for model '{base}': not a local folder or config.json, not among the bundled shapes "
            f"({', '.join(shipped) or 'none'}), and the Hub lookup failed ({type(exc).__name__}). "
            "Give a local model folder or the model's config.json as model.base"
        ) from None


def _check_model_type(model_type, source: str, trust_remote_code: bool = False) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not model_type:
        raise QLoRAKitError(f"{source} has no model_type: not a transformers config")
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise QLoRAKitError(f"{source}: unknown model type '{model_type}' (this transformers does not know it; "
                            "a model with its own code needs model.trust_remote_code=true)")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _config_from_dict(data: dict, source: str):
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    _check_model_type(model_type, source)
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # noqa: BLE001 - transformers' config validation raises several types
        raise QLoRAKitError(f"the config in {source} cannot be built: {_first_line(exc)}") from None


def check_shapes(config) -> None:
    """Refuse configs whose shapes cannot make a decoder, with every problem at once."""
    problems = []
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        value = getattr(config, key, None)
        if value is not None and (not isinstance(value, int) or value <= 0):
            problems.append(f"{key} must be a positive integer, got {value!r}")
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if isinstance(heads, int) and heads > 0:
        if isinstance(kv, int) and (kv <= 0 or heads % kv):
            problems.append(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
        if (getattr(config, "head_dim", None) is None and isinstance(hidden, int) and hidden > 0
                and hidden % heads):
            problems.append(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
    if problems:
        raise QLoRAKitError(f"the {config.model_type} config cannot be built: " + "; ".join(problems))


# ---------------------------------------------------------------- the tracker


class MemoryTracker:
    """Counts the bytes of live storages on one device type, by category, and the peak.

    A TorchDispatchMode (see `mode()`): every op's output storages are recorded with
    the current phase as category, and a weak reference on each storage subtracts it
    when it is freed. Storages are rounded up to `rounding` bytes as the CUDA caching
    allocator rounds blocks.
    """

    def __init__(self, device_type: str, rounding: int = ALLOCATOR_ROUNDING, count_flops: bool = False):
        from torch.utils.weak import WeakIdKeyDictionary

        self.device_type = device_type
        # FLOPs by torch.utils.flop_counter's formulas (FlopCounterMode itself keeps module
        # outputs alive for its per-module report, which would distort the memory count).
        self.count_flops = count_flops
        self.flops = 0
        self.rounding = max(1, rounding)
        self.live = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        self.by_category: dict[str, int] = defaultdict(int)
        self.current = 0
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_phase = "setup"
        self.phase = "setup"

    def mode(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        from torch.utils.flop_counter import flop_registry

        from . import quantization  # noqa: F401  (registers the bitsandbytes ops)

        tracker = self
        dequant = {torch.ops.bitsandbytes.dequantize_4bit.default,
                   torch.ops.bitsandbytes.dequantize_blockwise.default}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if tracker.count_flops:
                    if func._overloadpacket in flop_registry:
                        tracker.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
                    elif func in (torch.ops.aten.linear.default, torch.ops.aten.matmul.default):
                        # Composite ops that can reach the modes whole (e.g. from a kernel emulation).
                        tracker.flops += 2 * out.numel() * args[0].shape[-1]
                category = "dequant" if func in dequant else None
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.track(t, category)
                return out

        return _Mode()

    def track(self, t, category: Optional[str] = None) -> None:
        if t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        record = self.live.get(storage)
        if record is not None:
            if category is not None and record[1] != category:
                self.by_category[record[1]] -= record[0]
                record[1] = category
                self.by_category[category] += record[0]
            return
        nbytes = -(-storage.nbytes() // self.rounding) * self.rounding
        record = [nbytes, category or self.phase]
        self.live[storage] = record
        key = id(record)
        self._refs[key] = weakref.ref(storage, partial(self._freed, record, key))
        self.by_category[record[1]] += nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_breakdown = dict(self.by_category)
            self.peak_phase = self.phase

    def _freed(self, record: list, key: int, _ref) -> None:
        self.by_category[record[1]] -= record[0]
        self.current -= record[0]
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_breakdown = dict(self.by_category)
        self.peak_phase = self.phase

    def bytes_of(self, category: str) -> int:
        return self.by_category.get(category, 0)


# ---------------------------------------------------------------- the report


@dataclass
class MemoryReport:
    """What one simulated (or measured) training step needs. Bytes throughout."""

    model: str
    device: str  # the device planned for: 'cuda' (simulated) or 'cpu'
    simulated: bool
    batch_size: int
    seq_len: int
    steps: int
    peak_bytes: int  # tensors alive at the peak: the analogue of torch.cuda.max_memory_allocated()
    peak_phase: str  # forward / loss / backward / optimizer
    breakdown: dict  # category -> bytes alive at the peak
    sizes: dict  # exact sizes of the persistent pieces, whenever they are alive
    overhead_bytes: int  # CUDA_OVERHEAD_BYTES on CUDA, 0 on the CPU
    tokens_per_step: int
    flops_per_step: Optional[int] = None  # counted matmul/attention FLOPs, recompute included
    model_flops_per_step: Optional[int] = None  # 4 x (weights in matmuls) x tokens: forward + input-gradient backward
    settings: dict = field(default_factory=dict)
    audit: dict = field(default_factory=dict)  # where parameters, gradients and optimizer states live, and dtypes
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.overhead_bytes

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["total_bytes"] = self.total_bytes
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryReport":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def render(self) -> str:
        label = "simulated" if self.simulated else "measured"
        lines = [f"{self.model}: batch {self.batch_size} x {self.seq_len} tokens on {self.device} ({label})",
                 _settings_line(self.settings)]
        lines += _breakdown_lines(self)
        return "\n".join(lines)


def _settings_line(s: dict) -> str:
    if not s:
        return ""
    on = lambda key: "on" if s.get(key) else "off"  # noqa: E731
    return (f"{s.get('mixed_precision')} autocast, gradient checkpointing {on('gradient_checkpointing')}, "
            f"activation offloading {on('activation_offloading')}, "
            + (f"tiled MLP ({s['mlp_chunk_tokens']} tokens), " if s.get("mlp_chunk_tokens") else "")
            + f"{s.get('optimizer')}, "
            f"LoRA r={s.get('lora_rank')} on {s.get('lora_layers')} layers, "
            f"loss chunk {s.get('loss_chunk_tokens')} rows" + (", packed rows (4D mask)" if s.get("packing") else ""))


def _breakdown_lines(report: MemoryReport) -> list[str]:
    label = "simulated" if report.simulated else "measured"
    width = 58
    lines = [f"  {'at the peak (' + report.peak_phase + ')':<{width}} {label:>12}"]
    for key, name in CATEGORIES.items():
        value = report.breakdown.get(key, 0)
        if value or key not in ("setup",):
            lines.append(f"  {name:<{width}} {_gib(value):>12}")
    lines.append(f"  {'-' * (width + 13)}")
    lines.append(f"  {'peak of live tensors':<{width}} {_gib(report.peak_bytes):>12}")
    if report.overhead_bytes:
        lines.append(f"  {OVERHEAD_LABEL:<{width}} {_gib(report.overhead_bytes):>12}")
        lines.append(f"  {'total':<{width}} {_gib(report.total_bytes):>12}")
    return lines


# ---------------------------------------------------------------- the simulated model


def _packed_elements(n_values: int, storage) -> int:
    import torch

    item = torch.empty((), dtype=storage).element_size()
    return (n_values + 1) // (2 * item)


def _simulated_4bit_layout(net, quant: QuantConfig) -> list:
    """Swap each empty Params4bit (meta, full shape) for the packed tensor bitsandbytes stores."""
    import torch
    from torch import nn

    from . import quantization
    from .precision import torch_dtype

    storage = torch_dtype(quant.quant_storage)
    layers = []
    for module in net.modules():
        if quantization.is_4bit_linear(module):
            n = module.in_features * module.out_features
            module.weight = nn.Parameter(torch.empty((_packed_elements(n, storage), 1), dtype=storage, device="meta"),
                                         requires_grad=False)
            layers.append(module)
    return layers


def _attach_quant_states(layers: list, quant: QuantConfig, device) -> None:
    """The quantization constants quantize_4bit makes for each layer, as fake tensors on `device`."""
    import torch
    from bitsandbytes.functional import QuantState

    from .precision import torch_dtype
    from .quantization import BLOCKSIZE, NESTED_BLOCKSIZE

    compute = torch_dtype(quant.compute_dtype)
    for module in layers:
        shape = torch.Size([module.out_features, module.in_features])
        blocks = math.ceil(shape.numel() / BLOCKSIZE)
        code = torch.empty(16, dtype=torch.float32, device=device)  # get_4bit_type: one per layer
        if quant.double_quant:
            state2 = QuantState(absmax=torch.empty(math.ceil(blocks / NESTED_BLOCKSIZE), dtype=torch.float32,
                                                   device=device),
                                code=torch.empty(256, dtype=torch.float32, device=device),  # a copy per layer
                               blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
            state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, device=device), shape=shape,
                               code=code, blocksize=BLOCKSIZE, quant_type=quant.quant_type, dtype=compute,
                               offset=torch.empty((), dtype=torch.float32, device=device), state2=state2)
        else:
            state = QuantState(absmax=torch.empty(blocks, dtype=torch.float32, device=device), shape=shape,
                               code=code, blocksize=BLOCKSIZE, quant_type=quant.quant_type, dtype=compute)
        weight = module.weight
        weight.quant_state = state
        weight.quant_type = quant.quant_type
        weight.blocksize = BLOCKSIZE
        weight.compress_statistics = quant.double_quant
        weight.quant_storage = weight.dtype
        weight.bnb_quantized = True
        module.quant_state = state


def simulated_base(hf_config, quant: QuantConfig, model: ModelConfig) -> Callable:
    """Build the model on the meta device now (outside fake mode); return `materialize(device)`,
    which gives the model `load_base` would return, as fake tensors on `device` (call it
    inside `simulated_device`)."""
    from .loading import build_skeleton

    check_shapes(hf_config)
    try:
        net = build_skeleton(hf_config, quant, model)
    except QLoRAKitError:
        raise
    except (ValueError, RuntimeError, TypeError, AssertionError, AttributeError) as exc:
        raise QLoRAKitError(f"cannot build a {hf_config.model_type} model from its config: {exc}") from exc
    layers = _simulated_4bit_layout(net, quant)
    return partial(_materialize, net, layers, quant)


def _materialize(net, layers, quant: QuantConfig, device):
    from . import quantization

    net.to_empty(device=device)
    net.tie_weights()
    _attach_quant_states(layers, quant, device)
    net.requires_grad_(False)
    net.eval()
    quantization.guard_cpu_gradients(net)
    return net


def quant_tensors(module) -> list:
    """The tensors of a 4-bit linear: packed weight and every quantization constant."""
    state = module.weight.quant_state
    tensors = [module.weight, state.absmax, state.code]
    if getattr(state, "offset", None) is not None:
        tensors.append(state.offset)
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return tensors


def categorize_model(tracker: MemoryTracker, model) -> dict:
    """File the model's tensors under their categories; return their exact (unrounded) sizes."""
    import torch

    from . import quantization

    sizes: dict[str, int] = defaultdict(int)
    seen: set[int] = set()

    def add(t, category):
        tracker.track(t, category)
        storage = t.untyped_storage()
        if id(storage) not in seen and t.device.type == tracker.device_type:
            seen.add(id(storage))
            sizes[category] += storage.nbytes()

    for module in model.modules():
        if quantization.is_4bit_linear(module):
            for t in quant_tensors(module):
                add(t, "weights_4bit")
            if module.bias is not None:
                add(module.bias, "weights_16bit")
            continue
        for p in module.parameters(recurse=False):
            add(p, "lora_weights" if p.requires_grad else "weights_16bit")
        for b in module.buffers(recurse=False):
            if isinstance(b, torch.Tensor):
                add(b, "weights_16bit")
    sizes = dict(sizes)
    sizes["lora_grads"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sizes


def matmul_weights(model) -> int:
    """Values of every weight that multiplies activations (all linears incl. the head; not the embedding)."""
    from torch import nn

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not {"lora_A", "lora_B"} & set(name.split(".")):
            total += module.in_features * module.out_features
    return total


# ---------------------------------------------------------------- one measured step


def make_batch(device, batch_size: int, seq_len: int, vocab: int, *, packed: bool, mask_dtype, real: bool) -> dict:
    """A batch shaped as `qlora_kit.data.collate` makes it: every token supervised, no padding.

    Unpacked: input_ids, labels, a 2D attention mask of ones. Packed: position_ids
    and the 4D additive (batch, 1, T, T) block-causal mask in `mask_dtype` (one
    sample per row, so the mask is plain causal).
    """
    import torch

    if real:
        ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
    else:
        ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device=device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if not packed:
        batch["attention_mask"] = torch.ones((batch_size, seq_len), dtype=torch.long, device=device)
        return batch
    batch["position_ids"] = torch.arange(seq_len, device=device).expand(batch_size, -1).contiguous()
    mask = torch.zeros((batch_size, 1, seq_len, seq_len), dtype=mask_dtype, device=device)
    if real:
        causal = torch.ones((seq_len, seq_len), dtype=torch.bool, device=device).tril()
        mask.masked_fill_(~causal, torch.finfo(mask_dtype).min)
    batch["attention_mask"] = mask
    return batch


@dataclass
class StepSetup:
    """What `run_steps` drives: a forward returning the loss to backpropagate, and its optimizer."""

    model: object  # the causal LM (its backbone's forward marks the end of the "forward" phase)
    forward: Callable  # batch -> scalar loss tensor
    params: list
    optimizer: object
    entry: object  # the module whose forward starts a step (pre-hook sets the "forward" phase)


def run_steps(setup: StepSetup, tracker: MemoryTracker, *, device, batch_size: int, seq_len: int, steps: int,
              micro_batches: int, precision: str, max_grad_norm: float, packed: bool, mask_dtype, real: bool,
              audit: Optional[dict] = None) -> None:
    """Run `steps` optimizer steps as the training loop does (forward, backward, clip, step, zero_grad).

    Every step starts from the steady state of a long run: the optimizer's state
    already exists (created by a first step on zero gradients) and, when gradients are
    accumulated over several micro-batches (`micro_batches` > 1), the gradients of the
    earlier micro-batches exist, so one simulated micro-batch is the worst one.
    """
    import torch

    from .offload import backbone_of

    model = setup.model
    hooks = [
        setup.entry.register_forward_pre_hook(lambda *_: setattr(tracker, "phase", "forward")),
        backbone_of(model).register_forward_hook(lambda *_: setattr(tracker, "phase", "loss")),
    ]
    hooks += [p.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, "lora_grads"))
              for p in setup.params]
    device_type = torch.device(device).type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") \
        else model.config.vocab_size
    try:
        # The optimizer's state exists from the first step on: create it first (a step on zero
        # gradients), so that a single simulated step sees what every later step sees.
        tracker.phase = "optimizer"
        for p in setup.params:
            p.grad = torch.zeros_like(p)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
        for step in range(steps):
            if micro_batches > 1:
                # Later micro-batches of an accumulated step backpropagate into existing gradients.
                tracker.phase = "backward"
                for p in setup.params:
                    p.grad = torch.zeros_like(p)
                    tracker.track(p.grad, "lora_grads")
            tracker.phase = "batch"
            batch = make_batch(device, batch_size, seq_len, vocab, packed=packed, mask_dtype=mask_dtype, real=real)
            with autocast():
                loss = setup.forward(batch)
            tracker.phase = "backward"
            (scaler.scale(loss) if scaler is not None else loss).backward()
            del batch, loss
            tracker.phase = "optimizer"
            if max_grad_norm > 0:
                if scaler is not None:
                    scaler.unscale_(setup.optimizer)
                torch.nn.utils.clip_grad_norm_(setup.params, max_grad_norm)
            if audit is not None and step == steps - 1:
                audit["gradients"] = _audit_tensors([(p.grad, p.dtype) for p in setup.params], device_type)
            if scaler is not None:
                scaler.step(setup.optimizer)
                scaler.update()
            else:
                setup.optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
        tracker.phase = "done"


def _audit_tensors(pairs, device_type: str) -> dict:
    """{'device:dtype': count}, plus the problems: missing tensors, wrong device, unexpected dtype."""
    counts: dict[str, int] = defaultdict(int)
    problems = []
    for t, expected in pairs:
        if t is None:
            problems.append("missing (None)")
            continue
        counts[f"{t.device.type}:{str(t.dtype).removeprefix('torch.')}"] += 1
        if t.device.type != device_type:
            problems.append(f"on {t.device.type}, not {device_type}")
        if expected is not None and t.dtype != expected:
            problems.append(f"dtype {t.dtype}, expected {expected}")
    return {"counts": dict(counts), "problems": sorted(set(problems))}


def _audit_model(model, optimizer, device_type: str, lora: LoRAConfig) -> dict:
    import torch

    from . import quantization
    from .lora import adapter_dtype

    lora_dtype = adapter_dtype(lora)
    params, frozen_4bit = [], []
    for module in model.modules():
        if quantization.is_4bit_linear(module):
            frozen_4bit += [(t, None) for t in quant_tensors(module)]
    trainable = [(p, lora_dtype) for p in model.parameters() if p.requires_grad]
    params = [(p, None) for p in model.parameters() if not p.requires_grad]
    states = []
    for state in optimizer.state.values():
        states += [(v, None) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "lora_weights": _audit_tensors(trainable, device_type),
        "frozen_weights": _audit_tensors(params + frozen_4bit, device_type),
        "optimizer_state": _audit_tensors(states, device_type),
    }


def _precision(setting: str, device_type: str) -> str:
    from .precision import resolve_mixed_precision

    if device_type == "cpu":
        return resolve_mixed_precision(setting, cuda=False)
    return "bf16" if setting == "auto" else setting  # auto on an Ampere-or-newer GPU


def _optimizer_name(cfg: TrainConfig, device_type: str) -> str:
    if cfg.optimizer != "auto":
        return cfg.optimizer
    return "adamw" if device_type == "cpu" else "paged_adamw_8bit"


def _qlora_kit_setup(model, run: RunConfig, device, planned: str, pin_memory: Optional[bool] = None) -> StepSetup:
    """The training loop's setup (qlora_kit.training._train): LoRA, checkpointing, offloading, optimizer, loss."""
    import torch

    from .losses import SupervisedLoss
    from .lora import apply_lora, trainable_parameters
    from .training import make_optimizer, prepare_layers

    cfg = run.train
    apply_lora(model, run.lora)
    prepare_layers(model, cfg, device, pin_memory=pin_memory)
    params = trainable_parameters(model)
    # The optimizer the training loop picks for the planned device (make_optimizer reads its type).
    optimizer = make_optimizer(cfg, params, torch.device("cuda" if planned == "cuda" else "cpu"))
    loss_fn = SupervisedLoss(model, cfg.loss_chunk_tokens)
    loss_fn.train()
    tokens = {}

    def forward(batch):
        loss_sum, n = loss_fn(batch)
        tokens["n"] = n
        return loss_sum / max(n, 1)  # _accumulate scales by the step's supervised tokens

    return StepSetup(model=model, forward=forward, params=params, optimizer=optimizer, entry=loss_fn)


def measure(build: Callable, run: RunConfig, *, planned: str, device, tracker: MemoryTracker, batch_size: int,
            seq_len: int, steps: int, flops: bool, simulated: bool, setup_fn: Callable = None,
            label: str = None, env: Callable = None) -> MemoryReport:
    """Build the model (`build(device)`), set up the step, run it under `tracker`; return the report.

    `env(modes)` is the context to run in (the simulated device, or nothing for a real
    run); `setup_fn(model, run, device, planned)` returns the StepSetup (default:
    qlora_kit's training loop).
    """
    import torch

    started = time.perf_counter()
    setup_fn = setup_fn or _qlora_kit_setup
    tracker.count_flops = flops
    modes = (tracker.mode(),)
    env = env or (lambda modes: _real_env(modes))
    device_type = torch.device(device).type
    cfg = run.train
    if simulated:
        precision = _precision(cfg.mixed_precision, "cpu" if planned == "cpu" else "cuda")
    else:
        from .precision import resolve_mixed_precision

        precision = resolve_mixed_precision(cfg.mixed_precision, planned == "cuda")
    audit: dict = {}
    with env(modes):
        model = build(device)
        setup = setup_fn(model, run, device, planned)
        sizes = categorize_model(tracker, setup.model)
        tracker.reset_peak()
        weights_in_matmuls = matmul_weights(setup.model)
        from .precision import torch_dtype

        run_steps(setup, tracker, device=device, batch_size=batch_size, seq_len=seq_len, steps=steps,
                  micro_batches=min(cfg.gradient_accumulation_steps, 2), precision=precision,
                  max_grad_norm=cfg.max_grad_norm, packed=run.data.packing,
                  mask_dtype=torch_dtype(run.quant.compute_dtype), real=not simulated, audit=audit)
        sizes["optimizer"] = tracker.bytes_of("optimizer")
        audit.update(_audit_model(setup.model, setup.optimizer, device_type, run.lora))
        lora_layers = sum(1 for p in setup.params) // 2
        del setup, model
    tokens = batch_size * seq_len  # per micro-batch; FLOPs are per micro-batch too
    settings = {
        "mixed_precision": precision,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "activation_offloading": cfg.activation_offloading,
        "mlp_chunk_tokens": cfg.mlp_chunk_tokens,
        "optimizer": _optimizer_name(cfg, "cpu" if planned == "cpu" else "cuda"),
        "lora_rank": run.lora.rank,
        "lora_layers": lora_layers,
        "loss_chunk_tokens": cfg.loss_chunk_tokens,
        "packing": run.data.packing,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "attn_implementation": run.model.attn_implementation,
        "compute_dtype": run.quant.compute_dtype,
    }
    return MemoryReport(
        model=label or run.model.base,
        device=planned,
        simulated=simulated,
        batch_size=batch_size,
        seq_len=seq_len,
        steps=steps,
        peak_bytes=tracker.peak,
        peak_phase=tracker.peak_phase,
        breakdown={k: v for k, v in tracker.peak_breakdown.items() if v},
        sizes=sizes,
        overhead_bytes=CUDA_OVERHEAD_BYTES if planned == "cuda" else 0,
        tokens_per_step=tokens,
        flops_per_step=int(tracker.flops // steps) if flops else None,
        model_flops_per_step=4 * weights_in_matmuls * tokens,
        settings=settings,
        audit=_with_labels(audit, device_type, planned),
        seconds=round(time.perf_counter() - started, 2),
    )


def _with_labels(audit: dict, device_type: str, planned: str) -> dict:
    """Report the simulated GPU's device type as the one planned for ('cuda')."""
    if device_type == planned:
        return audit
    text = json.dumps(audit).replace(f'"{device_type}:', f'"{planned}:').replace(f"not {device_type}", f"not {planned}")
    return json.loads(text)


@contextlib.contextmanager
def _real_env(modes):
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield


# ---------------------------------------------------------------- public API


def simulate_step(run: RunConfig, *, device: str = "cuda", batch_size: Optional[int] = None,
                  seq_len: Optional[int] = None, steps: int = 1, flops: bool = True) -> MemoryReport:
    """Simulate `steps` training steps of `run` and report the peak memory and its breakdown.

    `device='cuda'` plans for a GPU (simulated in a worker process); `device='cpu'`
    runs the CPU path on fake tensors (for checking the simulation against a real CPU
    run). Defaults: the run's train.batch_size and data.max_seq_len.
    """
    if device not in ("cuda", "cpu"):
        raise QLoRAKitError(f"simulate_step plans for device 'cuda' or 'cpu', not '{device}'")
    kwargs = dict(device=device, batch_size=batch_size, seq_len=seq_len, steps=steps, flops=flops)
    if device == "cuda" and not _IN_WORKER:
        return MemoryReport.from_dict(_in_worker("simulate_step", run, kwargs))
    return _simulate_step(run, **kwargs)


def _simulate_step(run: RunConfig, *, device: str, batch_size, seq_len, steps: int, flops: bool,
                   hf_config=None) -> MemoryReport:
    from .gpu_sim import install_simulated_gpu, simulated_device

    batch_size = batch_size or run.train.batch_size
    seq_len = seq_len or run.data.max_seq_len
    if batch_size < 1 or seq_len < 2:
        raise QLoRAKitError(f"batch size must be >= 1 and sequence length >= 2, got {batch_size} x {seq_len}")
    hf_config = hf_config or model_config(run.model)
    sim_device = install_simulated_gpu() if device == "cuda" else "cpu"
    tracker = MemoryTracker(sim_device, ALLOCATOR_ROUNDING if device == "cuda" else 1)
    return measure(simulated_base(hf_config, run.quant, run.model), run, planned=device,
                   device=sim_device, tracker=tracker, batch_size=batch_size, seq_len=seq_len, steps=steps,
                   flops=flops, simulated=True, env=lambda modes: simulated_device(sim_device, modes))


def measure_step(run: RunConfig, *, batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                 steps: int = 1, flops: bool = False) -> MemoryReport:
    """The same step for real on this machine's device (run.model.device), with the same tracker.

    Loads the base's real weights. On a GPU its report can be set against
    `simulate_step` and `torch.cuda.max_memory_allocated()` (returned in settings).
    """
    import torch

    from .loading import default_device, load_base

    device = torch.device(run.model.device) if run.model.device else default_device()
    batch_size = batch_size or run.train.batch_size
    seq_len = seq_len or run.data.max_seq_len
    tracker = MemoryTracker(device.type, ALLOCATOR_ROUNDING if device.type == "cuda" else 1)
    holder = {}

    def build(dev):
        model, _, _ = load_base(dataclasses.replace(run.model, device=str(dev)), run.quant)
        holder["model"] = model
        return model

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report = measure(build, run, planned=device.type, device=device, tracker=tracker, batch_size=batch_size,
                     seq_len=seq_len, steps=steps, flops=flops, simulated=False)
    if device.type == "cuda":
        report.settings["torch_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    return report


def _layer_period(config) -> int:
    """The period of the decoder's layer pattern (2 for Gemma-2's sliding/full alternation)."""
    types = list(getattr(config, "layer_types", None) or [])
    for period in range(1, len(types) + 1):
        if all(types[i] == types[i % period] for i in range(len(types))):
            return period
    return 1


def _with_layers(config, layers: int):
    import copy

    short = copy.deepcopy(config)
    short.num_hidden_layers = layers
    if getattr(short, "layer_types", None):
        short.layer_types = list(short.layer_types[:layers])
    return short


def extrapolated_total(total_bytes: Callable, hf_config) -> int:
    """Simulated total bytes (peak + overhead) of the full model, from two short copies of it.

    Every decoder layer adds the same bytes wherever the peak falls (its weights, and
    the input it keeps for backward are alive in the loss and in the backward alike),
    so the peak is linear in the number of layers: simulate a and 2a layers (a whole
    number of layer-pattern periods) and extrapolate. Searches use this (seconds per
    point instead of a minute) and confirm their answer with a full simulation.
    `total_bytes(config)` simulates the step of a model built from `config`.
    """
    layers = hf_config.num_hidden_layers
    period = _layer_period(hf_config)
    a = period * max(1, math.ceil(2 / period))
    if layers <= 2 * a:
        return total_bytes(hf_config)
    short = [total_bytes(_with_layers(hf_config, n)) for n in (a, 2 * a)]
    per_layer = (short[1] - short[0]) / a
    return int(round(short[0] + per_layer * (layers - a)))


def estimate_total(run: RunConfig, batch_size: int, seq_len: int, hf_config) -> int:
    """`extrapolated_total` of qlora_kit's training step."""
    return extrapolated_total(lambda config: _simulate_step(run, device="cuda", batch_size=batch_size, seq_len=seq_len,
                                                            steps=1, flops=False, hf_config=config).total_bytes,
                              hf_config)


def _fits(run: RunConfig, gpu_bytes: int, batch_size: int, seq_len: int, hf_config, cache: dict) -> bool:
    key = (batch_size, seq_len)
    if key not in cache:
        cache[key] = estimate_total(run, batch_size, seq_len, hf_config)
        log.info("simulated %d x %d: %s", batch_size, seq_len, _gib(cache[key]))
    return cache[key] <= gpu_bytes


def _confirmed(run: RunConfig, gpu_bytes: int, batch_size: int, seq_len: int, hf_config) -> bool:
    """A full simulation (every layer) of the search's answer."""
    report = _simulate_step(run, device="cuda", batch_size=batch_size, seq_len=seq_len, steps=1, flops=False,
                            hf_config=hf_config)
    return report.total_bytes <= gpu_bytes


def longest_sequence(run: RunConfig, gpu_bytes: int | str, *, batch_size: int = 1) -> int:
    """The longest sequence (a multiple of 64 tokens) whose simulated step fits `gpu_bytes`; 0 if none.

    Bisection over simulated peaks (each includes CUDA_OVERHEAD_BYTES), capped by the
    model's max_position_embeddings.
    """
    if not _IN_WORKER:
        return _in_worker("longest_sequence", run, {"gpu_bytes": gpu_bytes, "batch_size": batch_size})
    gpu_bytes = parse_gpu_memory(gpu_bytes)
    hf_config = model_config(run.model)
    cache: dict = {}
    return longest_fitting(lambda t: _fits(run, gpu_bytes, batch_size, t, hf_config, cache),
                           lambda t: _confirmed(run, gpu_bytes, batch_size, t, hf_config), sequence_cap(hf_config))


def sequence_cap(hf_config) -> int:
    """The longest sequence a search tries: the model's max_position_embeddings (a multiple of SEQ_GRANULARITY)."""
    cap = min(getattr(hf_config, "max_position_embeddings", None) or MAX_SEARCH_TOKENS, MAX_SEARCH_TOKENS)
    return cap // SEQ_GRANULARITY * SEQ_GRANULARITY


def longest_fitting(fits: Callable[[int], bool], confirmed: Callable[[int], bool], cap: int) -> int:
    """The longest multiple of SEQ_GRANULARITY up to `cap` that fits; 0 if none.

    `fits` is the cheap test the bisection uses (an extrapolated estimate), `confirmed`
    the full simulation its answer must pass (stepping down until one does).
    """
    step = SEQ_GRANULARITY
    lo = step
    if not fits(lo):
        return 0
    hi = min(2048, cap)
    while hi < cap and fits(hi):
        lo, hi = hi, min(hi * 2, cap)
    if hi >= cap and fits(cap) and confirmed(cap):
        return cap
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    while lo > 0 and not confirmed(lo):
        lo -= step
    return lo


def largest_batch(run: RunConfig, gpu_bytes: int | str, *, seq_len: Optional[int] = None,
                  limit: int = 1024) -> int:
    """The largest micro-batch whose simulated step at `seq_len` (default data.max_seq_len) fits; 0 if none."""
    if not _IN_WORKER:
        return _in_worker("largest_batch", run, {"gpu_bytes": gpu_bytes, "seq_len": seq_len, "limit": limit})
    gpu_bytes = parse_gpu_memory(gpu_bytes)
    seq_len = seq_len or run.data.max_seq_len
    hf_config = model_config(run.model)
    cache: dict = {}
    fits = lambda b: _fits(run, gpu_bytes, b, seq_len, hf_config, cache)  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi <= limit:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    while lo > 0 and not _confirmed(run, gpu_bytes, lo, seq_len, hf_config):
        lo -= 1
    return lo


@dataclass
class Plan:
    """`plan()`'s answer: the simulated step at the run's shape on a GPU of `gpu_bytes`, and the limits."""

    gpu_bytes: int
    report: MemoryReport
    longest_sequence: Optional[int] = None  # at batch 1
    largest_batch: Optional[int] = None  # at the run's sequence length

    @property
    def fits(self) -> bool:
        return self.report.total_bytes <= self.gpu_bytes

    def as_dict(self) -> dict:
        return {"gpu_bytes": self.gpu_bytes, "fits": self.fits, "report": self.report.as_dict(),
                "longest_sequence": self.longest_sequence, "largest_batch": self.largest_batch}

    def render(self) -> str:
        r = self.report
        lines = [f"qlora-kit plan: {r.model}, batch {r.batch_size} x {r.seq_len} tokens, on a "
                 f"{_gib(self.gpu_bytes)} GPU (simulated: no GPU was used)",
                 "  " + _settings_line(r.settings), ""]
        lines += _breakdown_lines(r)
        headroom = self.gpu_bytes - r.total_bytes
        verdict = (f"fits, {_gib(headroom)} to spare" if self.fits
                   else f"does NOT fit: {_gib(-headroom)} over")
        lines.append(f"  {'GPU memory':<58} {_gib(self.gpu_bytes):>12}   {verdict}")
        lines.append("")
        if self.longest_sequence is not None:
            lines.append(f"  longest sequence that fits at batch 1 (simulated): {self.longest_sequence:,} tokens")
        if self.largest_batch is not None:
            lines.append(f"  largest batch that fits at {r.seq_len} tokens (simulated): {self.largest_batch}")
        if r.flops_per_step:
            lines.append(f"  FLOPs per step (simulated, recompute included): {r.flops_per_step / 1e12:.1f} TFLOP "
                         f"({r.flops_per_step / r.tokens_per_step / 1e9:.1f} GFLOP/token; model 4N: "
                         f"{r.model_flops_per_step / r.tokens_per_step / 1e9:.1f} GFLOP/token)")
        lines.append(f"  peak reached during {r.peak_phase}; assumes no padding and every token supervised; "
                     f"the CUDA context line is an assumed allowance")
        return "\n".join(lines)


def plan(run: RunConfig, gpu_memory: int | str = "24GiB", *, batch_size: Optional[int] = None,
         seq_len: Optional[int] = None, search: bool = True) -> Plan:
    """Simulate the run's step on a GPU of `gpu_memory`; with `search`, also the longest
    sequence (batch 1) and the largest batch (at the run's sequence length) that fit."""
    gpu_bytes = parse_gpu_memory(gpu_memory)
    if not _IN_WORKER:
        data = _in_worker("plan", run, {"gpu_memory": gpu_bytes, "batch_size": batch_size, "seq_len": seq_len,
                                        "search": search})
        return Plan(gpu_bytes=data["gpu_bytes"], report=MemoryReport.from_dict(data["report"]),
                    longest_sequence=data["longest_sequence"], largest_batch=data["largest_batch"])
    report = _simulate_step(run, device="cuda", batch_size=batch_size, seq_len=seq_len, steps=1, flops=True)
    result = Plan(gpu_bytes=gpu_bytes, report=report)
    if search:
        result.longest_sequence = longest_sequence(run, gpu_bytes, batch_size=1)
        result.largest_batch = largest_batch(run, gpu_bytes, seq_len=report.seq_len)
    return result


def preflight(run: RunConfig, device: Optional[str] = None) -> Optional[Plan]:
    """Before training on a GPU: the plan of `run` against the GPU's free memory (None off CUDA).

    One simulation (no searches): about a minute for an 8B model on a laptop CPU,
    seconds for small ones. The caller decides what to do when `not plan.fits`.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.device(device or run.model.device or "cuda").index or 0
    free, _total = torch.cuda.mem_get_info(index)
    return plan(run, free, search=False)


# ---------------------------------------------------------------- the worker process


def run_config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from `to_dict(run)` without the recipe checks (planning needs no data path)."""
    sections = {"model": ModelConfig, "quant": QuantConfig, "lora": LoRAConfig, "data": DataConfig,
                "train": TrainConfig}
    return RunConfig(**{name: cls(**data.get(name, {})) for name, cls in sections.items()})


WORKER_FUNCTIONS = ("simulate_step", "longest_sequence", "largest_batch", "plan")


def run_batch(calls: list[tuple[str, RunConfig, dict]]) -> list:
    """Run several `(function, run, kwargs)` calls in one worker process (one interpreter start).

    `function` is one of WORKER_FUNCTIONS. Returns, per call, its result (reports and
    plans as dicts) or the exception it raised (QLoRAKitError for the user's mistakes).
    """
    from .config import to_dict

    for function, _, _ in calls:
        if function not in WORKER_FUNCTIONS:
            raise ValueError(f"not a worker function: {function}")
    request = {"calls": [{"function": f, "run": to_dict(r), "kwargs": k} for f, r, k in calls]}
    return [_reply_value(reply) for reply in _worker_request(request)]


def _reply_value(reply: dict):
    if "error" not in reply:
        return reply["result"]
    error = reply["error"]
    if error["type"] == "QLoRAKitError":
        return QLoRAKitError(error["message"])
    return RuntimeError(f"the memory simulation failed: {error['type']}: {error['message']}\n{error['traceback']}")


def _in_worker(function: str, run: RunConfig, kwargs: dict):
    """Call `function(run, **kwargs)` in a fresh interpreter (the simulated GPU cannot be uninstalled)."""
    value = run_batch([(function, run, kwargs)])[0]
    if isinstance(value, Exception):
        raise value
    return value


def _worker_request(request: dict) -> list[dict]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "qlora_kit.memory_plan", "--worker"], input=json.dumps(request),
                          capture_output=True, text=True, env=env)
    marker = "\n@@qlora_kit.memory_plan@@\n"
    if marker not in proc.stdout:
        raise RuntimeError(f"the memory simulation worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.rsplit(marker, 1)[1])["replies"]


def _worker_main() -> int:
    import traceback

    global _IN_WORKER
    _IN_WORKER = True
    logging.basicConfig(level=logging.WARNING)
    request = json.loads(sys.stdin.read())
    replies = []
    for call in request["calls"]:
        try:
            run = run_config_from_dict(call["run"])
            result = globals()[call["function"]](run, **call["kwargs"])
            if hasattr(result, "as_dict"):
                result = result.as_dict()
            replies.append({"result": result})
        except Exception as exc:  # noqa: BLE001 - reported to the parent process
            replies.append({"error": {"type": type(exc).__name__, "message": str(exc),
                                      "traceback": traceback.format_exc()}})
    sys.stdout.write("\n@@qlora_kit.memory_plan@@\n" + json.dumps({"replies": replies}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        # Run the functions of the imported package module, so their globals (_IN_WORKER) are the ones set.
        from qlora_kit import memory_plan as _module

        sys.exit(_module._worker_main())
    print("usage: python -m qlora_kit.memory_plan --worker  (internal; use `qlora-kit plan`)", file=sys.stderr)
    sys.exit(2)
