"""LoRA adapters: the `LoRALinear` layer, choosing which linears get one, and freezing the rest.

    y = base(x) + scaling · B(A(dropout(x)))      scaling = alpha / rank  (rsLoRA: alpha / sqrt(rank))

A is Kaiming-uniform and B is zero, so a freshly wrapped model computes exactly
what its base does. Only A and B are trainable.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Iterator

import torch
from torch import nn

from . import quantization
from .config import from_dict, to_dict
from .errors import QLoRAKitError
from .settings import ALL_LINEAR, LoRAConfig


def adapter_dtype(cfg: LoRAConfig) -> torch.dtype:
    """The adapter weights' dtype: fp32 unless asked otherwise (mixed precision keeps fp32 masters)."""
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


class LoRALinear(nn.Module):
    """A frozen linear (`Linear4bit` or `nn.Linear`) plus a trainable low-rank update.

    The layer keeps the `LoRAConfig` it was built from (`config`): rank, alpha and
    scaling are read from it, and saving an adapter reads it back from the layers.
    """

    def __init__(self, base: nn.Module, config: LoRAConfig):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.config = dataclasses.replace(config, target_modules=list(config.target_modules))
        self.rank = config.rank
        self.scaling = config.scaling
        device, dtype = _device_of(base), adapter_dtype(config)
        self.lora_A = nn.Linear(self.in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.disabled = False  # True: compute the base alone (e.g. for before/after comparisons)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same initialisation as nn.Linear and PEFT: A Kaiming-uniform, B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.disabled:
            return out
        if not torch.is_autocast_enabled(x.device.type):
            # Without autocast, run the adapter in its own (usually fp32) precision. Under
            # autocast the matmuls cast for themselves; an fp32 copy of x would be wasted.
            x = x.to(self.lora_A.weight.dtype)
        # Scale the rank-r intermediate, not the (..., out) result: the same product,
        # up to out_features / rank times less work in forward and backward.
        update = self.lora_B(self.lora_A(self.dropout(x)) * self.scaling)  # (..., out)
        return out + update.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A in fp32, shaped like the base weight (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # Linear4bit subclasses nn.Linear


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers LoRA may wrap: every linear except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules() if is_linear(m) and m is not head]


def select_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Resolve target patterns to module names, or say which pattern matched nothing."""
    candidates = linear_names(model)
    if ALL_LINEAR in patterns:
        return candidates
    unmatched = [p for p in patterns if not any(matches(n, p) for n in candidates)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise QLoRAKitError(
            f"lora.target_modules {unmatched} match no linear layer of this model. "
            f"Linear layers here: {', '.join(leaves)} (or use '{ALL_LINEAR}')"
        )
    return [n for n in candidates if any(matches(n, p) for p in patterns)]


def matches(name: str, pattern: str) -> bool:
    """A module pattern: its leaf name ('q_proj'), its full name, or a glob over full names."""
    return name.rsplit(".", 1)[-1] == pattern or name == pattern or fnmatch.fnmatchcase(name, pattern)


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None, targets: list[str] | None = None) -> nn.Module:
    """Freeze `model` and wrap each target linear in a `LoRALinear`, in place.

    `targets` (exact module names) overrides `cfg.target_modules`; loading an
    adapter uses it to recreate exactly the layers that were saved.
    """
    cfg = from_dict(LoRAConfig, to_dict(cfg or LoRAConfig()), path_prefix="lora")  # the same checks as a recipe
    if any(True for _ in lora_layers(model)):
        raise QLoRAKitError("this model already has LoRA adapters; load a fresh base to apply new ones")
    names = targets if targets is not None else select_targets(model, cfg.target_modules)
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        if not is_linear(base):
            raise QLoRAKitError(f"{name} is a {type(base).__name__}, not a linear layer; LoRA wraps linear layers")
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(base, cfg)
        layer.train(model.training)  # new modules start in train mode; keep an eval model's dropout off
        setattr(parent, leaf, layer)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_config(model: nn.Module) -> LoRAConfig:
    """The `LoRAConfig` of the model's adapters, read from its layers (every layer shares one)."""
    layers = dict(lora_layers(model))
    if not layers:
        raise QLoRAKitError("the model has no LoRA adapters; call apply_lora (or load_adapter) first")
    return next(iter(layers.values())).config


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, keyed `<module>.lora_A.weight` / `<module>.lora_B.weight`."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight
    return state


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable adapter parameters vs. all parameters, counting 4-bit weights by value."""
    trainable = sum(p.numel() for p in trainable_parameters(model))
    total, seen = 0, set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:  # tied embeddings count once
                continue
            seen.add(id(p))
            packed = quantization.is_4bit_linear(module) and p is module.weight
            total += module.weight.quant_state.shape.numel() if packed else p.numel()
    return {"trainable": trainable, "total": total}


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for _, layer in lora_layers(model):
        layer.disabled = not enabled
