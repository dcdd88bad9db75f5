"""Loading a base model in 4-bit: meta skeleton, then shard-by-shard quantization.

The model is first built on the meta device (no memory), its target linear layers
swapped for empty `Linear4bit` layers; then tensors are read from the safetensors
shards one at a time and quantized on the target device as they arrive. Host RAM
therefore peaks near one shard's largest tensors plus the finished 4-bit model,
never the whole 16-bit checkpoint.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import memory, quantization
from .checkpoint import Checkpoint, resolve
from .errors import QLoRAKitError
from .lora import matches
from .precision import torch_dtype
from .settings import ModelConfig, QuantConfig

log = logging.getLogger(__name__)


@dataclass
class BaseInfo:
    """What a loaded base was built from; adapters record it in their manifest and check it on load."""

    source: str  # what the user named: folder, Hub id, .gguf file or packaged name
    folder: str  # the local folder of safetensors shards it resolved to
    fingerprint: str  # checkpoint.fingerprint(): identifies these exact weights
    model_type: str
    quant: dict = field(default_factory=dict)  # quantization.quant_record of how it was loaded


class LoadedBase(NamedTuple):
    """`load_base`'s result: `model, tokenizer, info = load_base(...)`."""

    model: PreTrainedModel
    tokenizer: object
    info: BaseInfo


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_base(
    model: ModelConfig | str = ModelConfig(),
    quant: QuantConfig | None = None,
) -> LoadedBase:
    """Load a causal LM with its linear layers in 4-bit, its tokenizer, and a record of where it came from.

    `model` is a `ModelConfig` or just the base's name. Every parameter is frozen.
    Pass the returned `BaseInfo` to `save_adapter` / `load_adapter`, which record
    and check it.
    """
    cfg = ModelConfig(base=model) if isinstance(model, str) else model
    quant = quant or QuantConfig()
    device = torch.device(cfg.device) if cfg.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QLoRAKitError(f"model.device is '{cfg.device}' but no CUDA GPU is available; leave it unset for CPU")
    checkpoint = resolve(cfg.base, revision=cfg.revision)
    config = AutoConfig.from_pretrained(checkpoint.folder, trust_remote_code=cfg.trust_remote_code)
    net = build_skeleton(config, quant, cfg)
    fill_from_checkpoint(net, checkpoint, quant, device)
    net.requires_grad_(False)
    net.eval()  # as from_pretrained returns it; training code switches to train mode itself
    quantization.guard_cpu_gradients(net)
    info = BaseInfo(
        source=checkpoint.source,
        folder=str(checkpoint.folder),
        fingerprint=checkpoint.fingerprint(),
        model_type=config.model_type,
        quant=quantization.quant_record(quant),
    )
    return LoadedBase(net, load_tokenizer(checkpoint, cfg.trust_remote_code), info)


def load_tokenizer(checkpoint: Checkpoint, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_skeleton(config, quant: QuantConfig, cfg: ModelConfig = ModelConfig()) -> PreTrainedModel:
    """The model on the meta device, target linears replaced by empty `Linear4bit`s.

    Buffers (e.g. rotary frequencies) are created for real, since they are computed
    from the config rather than read from the checkpoint.
    """
    with init_empty_weights(include_buffers=False):
        try:
            net = AutoModelForCausalLM.from_config(
                config,
                dtype=torch_dtype(quant.compute_dtype),
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
            )
        except ValueError as exc:
            raise QLoRAKitError(f"cannot build a causal LM for model_type '{config.model_type}': {exc}") from exc
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.Linear) and not any(matches(name, p) for p in quant.skip_modules):
            _set_submodule(net, name, quantization.empty_linear4bit(module, quant))
    return net


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def fill_from_checkpoint(net: PreTrainedModel, checkpoint: Checkpoint, quant: QuantConfig, device) -> None:
    """Stream every checkpoint tensor into the skeleton, quantizing 4-bit targets on `device`."""
    expected = dict(net.named_parameters(remove_duplicate=False))
    ignorable = list(getattr(net, "_keys_to_ignore_on_load_unexpected", None) or [])
    unexpected = []
    freed = memory.FreedMemory()
    total = sum(shard.stat().st_size for shard in checkpoint.shards)
    # disable=None: a bar on a terminal, nothing in logs and pipes.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading in 4-bit", disable=None, leave=False)
    for name, tensor in checkpoint.iter_tensors():
        freed.processed(tensor.numel() * tensor.element_size())
        bar.update(tensor.numel() * tensor.element_size())
        if name not in expected:
            if not any(re.search(p, name) for p in ignorable):
                unexpected.append(name)
            continue
        module_name, _, leaf = name.rpartition(".")
        module = net.get_submodule(module_name)
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise QLoRAKitError(
                f"tensor {name} in {checkpoint.folder} has shape {tuple(tensor.shape)} but the model's config "
                f"expects {tuple(expected[name].shape)}: config.json and the weights disagree"
            )
        if quantization.is_4bit_linear(module) and leaf == "weight":
            quantization.quantize_into(module, tensor.to(torch_dtype(quant.compute_dtype)), device)
        else:
            # copy=True: a view would keep the whole shard's memory map resident.
            value = tensor.to(device=device, dtype=_keep_dtype(tensor, quant), copy=True)
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
        del expected[name]
    bar.close()
    if unexpected:
        raise QLoRAKitError(
            f"{checkpoint.folder} holds {len(unexpected)} tensor(s) this model does not have, e.g. "
            f"{', '.join(unexpected[:3])}: the checkpoint's layout does not match its config.json"
        )
    memory.release()
    net.tie_weights()
    missing = [name for name, p in net.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QLoRAKitError(
            f"{checkpoint.folder} is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}: "
            "the checkpoint is incomplete or belongs to another architecture"
        )


def _keep_dtype(tensor: torch.Tensor, quant: QuantConfig) -> torch.dtype:
    """Unquantized floating tensors go to the compute dtype; integer tensors stay as they are."""
    return torch_dtype(quant.compute_dtype) if tensor.is_floating_point() else tensor.dtype

