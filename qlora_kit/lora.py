"""LoRA adapters: the `LoRALinear` layer, choosing which linears get one, and freezing the rest.

    y = base(x) + scaling · B(A(dropout(x)))      scaling = alpha / rank  (rsLoRA: alpha / sqrt(rank))

A is Kaiming-uniform and B is zero, so a freshly wrapped model computes exactly
what its base does. Only A and B are trainable.

DoRA (`use_dora`, arXiv 2402.09353, as PEFT computes it) also trains a magnitude m
per output row: the layer computes with m · (W + s·BA) / ‖W + s·BA‖ (row norms,
treated as constants in backward, as the paper suggests). m starts at ‖W‖, so a
fresh DoRA layer too computes what its base does.

One base can hold several named adapters (`load_adapter(..., adapter_name=...)`):
each `LoRALinear` keeps one `LoRAUpdate` per adapter and adds the active one;
`set_active_adapter` switches without touching the base, `set_adapters_enabled`
turns them all off, and `model(..., adapter_names=[...])` gives each row of a
batch its own adapter.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from . import classification, fused, layers, quantization
from .config import from_dict, to_dict
from .errors import QLoRAKitError
from .settings import ALL_LINEAR, LoRAConfig


def adapter_dtype(cfg: LoRAConfig) -> torch.dtype:
    """The adapter weights' dtype: fp32 unless asked otherwise (mixed precision keeps fp32 masters)."""
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


DEFAULT_ADAPTER = "default"  # the name an adapter gets when none is given (PEFT's too)
BASE_ONLY = "__base__"  # in `adapter_names=`, a row computed by the base alone (PEFT's spelling; None works too)


class LoRAUpdate(nn.Module):
    """One adapter's low-rank update on one layer: scaling · B(A(dropout(x))).

    Keeps the `LoRAConfig` it was built from (`config`); rank, scaling and dropout are
    derived from it whenever it is set (`set_config`), so they always agree with it.
    """

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, device: torch.device):
        super().__init__()
        dtype = adapter_dtype(config)
        self.lora_A = nn.Linear(in_features, config.rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.rank, out_features, bias=False, device=device, dtype=dtype)
        self.trained_on: str | None = None  # fingerprint of the base it was trained on, when loaded from a folder
        # DoRA's magnitude per output row; set from the base weight's row norms by `init_magnitude`.
        self.lora_magnitude_vector = (nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
                                      if config.use_dora else None)
        self.set_config(config)
        self.reset_parameters()

    def set_config(self, config: LoRAConfig) -> None:
        """Adopt `config` (same rank, same kind): scaling and dropout follow it."""
        if config.rank != self.lora_A.out_features:
            raise QLoRAKitError(f"an adapter of rank {config.rank} cannot replace one of rank {self.lora_A.out_features}")
        if config.use_dora != (self.lora_magnitude_vector is not None):
            raise QLoRAKitError("a DoRA adapter and a plain LoRA adapter cannot replace each other in place")
        self.config = dataclasses.replace(config, target_modules=list(config.target_modules))
        self.rank = config.rank
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.dropout.train(self.training)

    def reset_parameters(self) -> None:
        # The same initialisation as nn.Linear and PEFT: A Kaiming-uniform, B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, base: nn.Module | None = None, base_out: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The (..., out) update, in the adapter's precision (or autocast's).

        DoRA needs the base layer and its output `base_out` (to rescale it); plain LoRA ignores them.
        """
        if not torch.is_autocast_enabled(x.device.type):
            # Without autocast, run the adapter in its own (usually fp32) precision. Under
            # autocast the matmuls cast for themselves; an fp32 copy of x would be wasted.
            x = x.to(self.lora_A.weight.dtype)
        dropped = self.dropout(x)
        # Scale the rank-r intermediate, not the (..., out) result: the same product,
        # up to out_features / rank times less work in forward and backward.
        update = self.lora_B(self.lora_A(dropped) * self.scaling)
        if self.lora_magnitude_vector is None:
            return update
        return self._dora(dropped, update, base, base_out)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """out + self(x) for the base's output `out`, in out's dtype.

        Plain LoRA under autocast (training) adds B's product into `out` inside the matmul
        (addmm): the (..., out) update is never written on its own, one full-width pass
        less each way. Otherwise (DoRA, fp32 inference) the update is computed, cast, added.
        """
        device_type = x.device.type
        if (self.lora_magnitude_vector is not None or not torch.is_autocast_enabled(device_type)
                or out.dtype != torch.get_autocast_dtype(device_type)):
            return out + self(x, base, out).to(out.dtype)
        h = self.lora_A(self.dropout(x))  # (..., r)
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.weight.t(),
                            alpha=self.scaling)  # out + scaling · h Bᵀ
        return fused.view(out.shape)

    def _dora(self, dropped: torch.Tensor, update: torch.Tensor, base: nn.Module, base_out: torch.Tensor):
        """(m / ‖W + s·BA‖ - 1) · W x + m / ‖W + s·BA‖ · s·BA x: added to base(x), gives m · V x / ‖V‖."""
        weight = base_weight(base)  # (out, in), fp32
        with torch.no_grad():  # the norm is a constant in backward (DoRA, section 4.3)
            norm = torch.linalg.vector_norm(weight + self.delta_weight(), dim=1)
        scale = self.lora_magnitude_vector / norm  # (out,), differentiable in m
        if isinstance(self.dropout, nn.Identity):
            bias = getattr(base, "bias", None)
            plain = base_out if bias is None else base_out - bias  # W x: the base output less its bias
        else:
            plain = torch.nn.functional.linear(dropped.to(weight.dtype), weight)  # W applied to the dropped x
        return (scale - 1) * plain.to(update.dtype) + scale * update

    def init_magnitude(self, base: nn.Module) -> None:
        """DoRA's start: m = ‖W‖ per row, so that the layer computes what its base does."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(torch.linalg.vector_norm(base_weight(base), dim=1))

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A in fp32, shaped (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


class LoRALinear(nn.Module):
    """A frozen linear (`Linear4bit`, `nn.Linear` or `Conv1D`) plus the low-rank updates of its adapters.

    `adapters` maps each loaded adapter's name to its `LoRAUpdate`; forward adds the
    one named `active` (None: this layer lacks the model's active adapter and computes
    its base alone). `lora_A`, `lora_B`, `config`, `rank` and `scaling` are the active
    adapter's, so a single-adapter layer reads as it always did.
    """

    def __init__(self, base: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = layers.features(base)
        self.adapters = nn.ModuleDict()
        self.add(adapter_name, config)
        self.active: str | None = adapter_name
        self.disabled = False  # True: compute the base alone (e.g. for before/after comparisons)
        self.rows: list[tuple[str, torch.Tensor]] | None = None  # a mixed batch's routing (`adapter_names=`)

    def add(self, name: str, config: LoRAConfig) -> LoRAUpdate:
        """A new, freshly initialised adapter `name` on this layer (not made active)."""
        update = LoRAUpdate(self.in_features, self.out_features, config, _device_of(self.base))
        if config.use_dora:
            update.init_magnitude(self.base)
        update.train(self.training)
        self.adapters[name] = update
        return update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.disabled and self.rows is None and self.active is not None:
            update = self.adapters[self.active]
            if fused.applies(self.base, update):  # one dequantize each way (qlora_kit/fused.py)
                return fused.lora_linear_4bit(x, self.base, update)
        out = self.base(x)
        if self.disabled:
            return out
        if self.rows is not None:
            return self._forward_rows(x, out)
        if self.active is None:
            return out
        return self.adapters[self.active].add_to(out, x, self.base)

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each row of the batch with its own adapter: exactly what that row computes alone."""
        batch = sum(len(rows) for _, rows in self.rows)
        if x.shape[0] != batch:
            raise QLoRAKitError(
                f"adapter_names gives {batch} rows but a LoRA layer received {x.shape[0]}: this model reshapes "
                "its batch inside the layers, so rows cannot be routed to adapters"
            )
        for name, rows in self.rows:
            if name in self.adapters:
                update = self.adapters[name](x.index_select(0, rows), self.base, out.index_select(0, rows))
                out = out.index_add(0, rows, update.to(out.dtype))
        return out

    # The active adapter's parts.
    lora_A = property(lambda self: self.adapters[self.active].lora_A)
    lora_B = property(lambda self: self.adapters[self.active].lora_B)
    lora_magnitude_vector = property(lambda self: self.adapters[self.active].lora_magnitude_vector)
    config = property(lambda self: self.adapters[self.active].config)
    rank = property(lambda self: self.adapters[self.active].rank)
    scaling = property(lambda self: self.adapters[self.active].scaling)

    def delta_weight(self) -> torch.Tensor:
        """The active adapter's scaling · B @ A in fp32, shaped like the base weight ((in, out) for a Conv1D)."""
        delta = self.adapters[self.active].delta_weight()
        return delta.T if layers.holds_transposed(self.base) else delta

    def extra_repr(self) -> str:
        return f"active={self.active!r}" + (", disabled" if self.disabled else "")


def base_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) fp32 weight a frozen linear computes with: dequantized if 4-bit, untransposed if Conv1D."""
    if quantization.is_4bit_linear(base):
        weight = quantization.dequantize_weight(base)
    else:
        weight = base.weight.T if layers.holds_transposed(base) else base.weight
    return weight.detach().float()


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


is_linear = layers.is_linear  # nn.Linear (Linear4bit included) or transformers' Conv1D


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers LoRA may wrap: every linear except the output head.

    A classifier's head (`score`, `classifier`) is trained fully instead, as PEFT's
    `modules_to_save` does, so LoRA never wraps it, not even under 'all-linear'.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside_lora = {id(m) for layer in model.modules() if isinstance(layer, LoRALinear) for m in layer.modules()}
    heads = classification.head_names(model)
    return [name for name, m in model.named_modules() if is_linear(m) and m is not head
            and id(m) not in inside_lora and not classification.in_head(name, heads)]


def select_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Resolve target patterns to module names, or say which pattern matched nothing."""
    candidates = linear_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if not candidates:
        raise QLoRAKitError(f"this {model_type} model has no linear layers (nn.Linear or Conv1D) for LoRA to wrap")
    if ALL_LINEAR in patterns:
        _refuse_uncovered_experts(model, model_type)
        return candidates
    unmatched = [p for p in patterns if not any(matches(n, p) for n in candidates)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise QLoRAKitError(
            f"lora.target_modules {unmatched} match no linear layer of this model. "
            f"Linear layers here: {', '.join(leaves)} (or use '{ALL_LINEAR}')"
        )
    return [n for n in candidates if any(matches(n, p) for p in patterns)]


def _refuse_uncovered_experts(model: nn.Module, model_type: str) -> None:
    """'all-linear' promises every matmul weight; fused MoE experts are no linear layer, so say so.

    transformers 5 keeps a mixture-of-experts layer's experts as stacked 3-D parameters
    (`experts.gate_up_proj`, `experts.down_proj`), not linear layers. PEFT adapts them
    through `target_parameters`; qlora_kit's LoRA wraps linear layers only, and would
    silently leave most of the model's weights untrained.
    """
    experts = [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.ndim == 3]
    if experts:
        shown = ", ".join(f"{name} {shape}" for name, shape in experts[:2])
        raise QLoRAKitError(
            f"lora.target_modules=['{ALL_LINEAR}'] cannot cover this {model_type} model: its mixture-of-experts "
            f"weights are stacked parameters, not linear layers ({len(experts)} of them, e.g. {shown}), and "
            "qlora_kit's LoRA wraps linear layers only (PEFT adapts experts through target_parameters). Name "
            "the linear layers to adapt instead, e.g. lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"
        )


def matches(name: str, pattern: str) -> bool:
    """A module pattern: its leaf name ('q_proj'), its full name, or a glob over full names."""
    return name.rsplit(".", 1)[-1] == pattern or name == pattern or fnmatch.fnmatchcase(name, pattern)


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None, targets: list[str] | None = None,
               adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Freeze `model` and wrap each target linear in a `LoRALinear`, in place.

    `targets` (exact module names) overrides `cfg.target_modules`; loading an
    adapter uses it to recreate exactly the layers that were saved. The adapter is
    named `adapter_name` and active; `load_adapter(..., adapter_name=...)` adds more.
    Afterwards `model(..., adapter_names=[...])` runs each row of a batch with the
    adapter named for it (None or '__base__': the base alone), as PEFT's models do.
    """
    cfg = from_dict(LoRAConfig, to_dict(cfg or LoRAConfig()), path_prefix="lora")  # the same checks as a recipe
    _check_adapter_name(adapter_name)
    if any(True for _ in wrapped_layers(model)):
        raise QLoRAKitError("this model already has LoRA adapters; load a fresh base to apply new ones")
    names = targets if targets is not None else select_targets(model, cfg.target_modules)
    model.requires_grad_(False)
    for name in names:
        _wrap(model, name, cfg, adapter_name)
    classification.make_heads_trainable(model, adapter_dtype(cfg))  # a classifier's head: modules_to_save
    _AdapterRouter.install(model)
    return model


def _wrap(model: nn.Module, name: str, cfg: LoRAConfig, adapter_name: str) -> LoRALinear:
    base = model.get_submodule(name)
    if not is_linear(base):
        raise QLoRAKitError(f"{name} is a {type(base).__name__}, not a linear layer; LoRA wraps linear layers")
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = LoRALinear(base, cfg, adapter_name)
    layer.train(model.training)  # new modules start in train mode; keep an eval model's dropout off
    setattr(parent, leaf, layer)
    return layer


def add_adapter(model: nn.Module, adapter_name: str, cfg: LoRAConfig, targets: list[str]) -> dict[str, LoRAUpdate]:
    """Add a freshly initialised adapter `adapter_name` on `targets` of a model that already has LoRA layers.

    The active adapter stays active. Returns the new updates by module name, for
    `load_adapter` to fill.
    """
    _check_adapter_name(adapter_name)
    loaded = adapter_names(model)
    if adapter_name in loaded:
        raise QLoRAKitError(f"an adapter named '{adapter_name}' is already loaded ({', '.join(loaded)}); "
                            "give the new one another adapter_name")
    updates = {}
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            updates[name] = module.add(adapter_name, cfg)
        else:
            layer = _wrap(model, name, cfg, adapter_name)
            layer.active = None  # the model's active adapter does not touch this layer
            updates[name] = layer.adapters[adapter_name]
    return updates


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_ONLY:
        raise QLoRAKitError(f"adapter_name {name!r} is not usable: give a non-empty name without '.'")


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every `LoRALinear`, whichever adapters it holds."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """The layers of the model's active adapter (with one adapter: every `LoRALinear`)."""
    for name, layer in wrapped_layers(model):
        if layer.active is not None:
            yield name, layer


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters loaded on the model, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in wrapped_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter the model computes with (set_active_adapter), or None."""
    return next((layer.active for _, layer in lora_layers(model)), None)


def set_active_adapter(model: nn.Module, adapter_name: str) -> None:
    """Compute with adapter `adapter_name` from now on; the base and the other adapters stay loaded."""
    loaded = adapter_names(model)
    if adapter_name not in loaded:
        raise QLoRAKitError(f"no adapter named '{adapter_name}' is loaded; loaded: {', '.join(loaded) or 'none'}")
    for _, layer in wrapped_layers(model):
        layer.active = adapter_name if adapter_name in layer.adapters else None


def adapter_config(model: nn.Module) -> LoRAConfig:
    """The `LoRAConfig` of the model's active adapter, read from its layers (every layer shares one)."""
    layer = next(lora_layers(model), (None, None))[1]
    if layer is None:
        raise QLoRAKitError("the model has no LoRA adapters; call apply_lora (or load_adapter) first")
    return layer.config


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's weights only, keyed `<module>.lora_A.weight` / `<module>.lora_B.weight`
    (and `<module>.lora_magnitude_vector` for DoRA, as PEFT keys it)."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight
        magnitude = layer.adapters[layer.active].lora_magnitude_vector
        if magnitude is not None:
            state[f"{name}.lora_magnitude_vector"] = magnitude  # PEFT's key for DoRA's magnitude
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
    """Disable (compute the base alone) or re-enable every adapter, without unloading any."""
    for _, layer in wrapped_layers(model):
        layer.disabled = not enabled


@contextmanager
def adapters_per_row(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Inside, row i of every batch runs with adapter `names[i]` (None or '__base__': the base alone).

    For inference (`model.eval()`), e.g. around `model.generate(...)` (greedy or
    sampling; beam search changes the rows). `model(..., adapter_names=names)` does
    the same for one forward call, as PEFT's models do.
    """
    if model.training:
        raise QLoRAKitError("adapters per row are for inference: call model.eval() first")
    loaded = adapter_names(model)
    unknown = sorted({n for n in names if n is not None and n != BASE_ONLY and n not in loaded})
    if unknown:
        raise QLoRAKitError(f"adapter_names names adapter(s) not loaded: {', '.join(map(str, unknown))}; "
                            f"loaded: {', '.join(loaded)} (or None / '{BASE_ONLY}' for the base alone)")
    device = next(model.parameters()).device
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(BASE_ONLY if name is None else name, []).append(row)
    rows = [(name, torch.tensor(index, device=device)) for name, index in groups.items()]
    routed = [layer for _, layer in wrapped_layers(model)]
    for layer in routed:
        layer.rows = rows
    try:
        yield
    finally:
        for layer in routed:
            layer.rows = None


class _AdapterRouter:
    """Takes `adapter_names=` off a model's forward and runs the call inside `adapters_per_row`.

    Installed on the model by `apply_lora` as a forward pre-hook that enters the
    routing and a forward hook that leaves it, also when the forward fails.
    """

    def __init__(self):
        self.routing = None

    @classmethod
    def install(cls, model: nn.Module) -> None:
        router = cls()
        model.register_forward_pre_hook(router.before, with_kwargs=True)
        model.register_forward_hook(router.after, always_call=True)

    def before(self, model: nn.Module, args: tuple, kwargs: dict):
        names = kwargs.pop("adapter_names", None)
        if names is not None:
            self.routing = adapters_per_row(model, names)
            self.routing.__enter__()
        return args, kwargs

    def after(self, model: nn.Module, args: tuple, output):
        if self.routing is not None:
            routing, self.routing = self.routing, None
            routing.__exit__(None, None, None)
