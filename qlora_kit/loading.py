"""Loading a base model in 4-bit: meta skeleton, then shard-by-shard quantization.

The model is first built on the meta device (no memory), its target linear layers
swapped for empty `Linear4bit` layers; then tensors are read from the safetensors
shards one at a time (plain file reads, not a memory map: `Checkpoint.iter_tensors`)
and quantized on the target device as they arrive. Host RAM therefore peaks near the
largest tensor plus the finished 4-bit model, never a whole shard or the 16-bit checkpoint.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel)

from . import classification, layers, memory, quantization
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
    With `task='sequence_classification'` it is the family's `...ForSequenceClassification`
    with `labels` as its classes, the head in compute dtype (initialised, and logged,
    when the checkpoint has none).
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
    if cfg.labels:
        classification.configure_labels(config, cfg.labels)
    if cfg.task != classification.TASK and classification.checkpoint_task(checkpoint.folder) == classification.TASK:
        raise QLoRAKitError(f"{checkpoint.source} is a sequence classifier ({', '.join(config.architectures)}), "
                            "not a causal LM: load it with model.task=sequence_classification")
    net = build_skeleton(config, quant, cfg)
    fill_from_checkpoint(net, checkpoint, quant, device)
    net.requires_grad_(False)
    net.eval()  # as from_pretrained returns it; training code switches to train mode itself
    quantization.guard_cpu_gradients(net)
    tokenizer = load_tokenizer(checkpoint, cfg.trust_remote_code)
    if cfg.task == classification.TASK:
        classification.set_pad_token(net, tokenizer)
    info = BaseInfo(
        source=checkpoint.source,
        folder=str(checkpoint.folder),
        fingerprint=checkpoint.fingerprint(),
        model_type=config.model_type,
        quant=quantization.quant_record(quant),
    )
    return LoadedBase(net, tokenizer, info)


def load_tokenizer(checkpoint: Checkpoint, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_skeleton(config, quant: QuantConfig, cfg: ModelConfig = ModelConfig()) -> PreTrainedModel:
    """The model on the meta device, target linears replaced by empty `Linear4bit`s.

    Buffers (e.g. rotary frequencies) are created for real, since they are computed
    from the config rather than read from the checkpoint. A classifier's head stays
    unquantized: it is trained fully.
    """
    classifier = cfg.task == classification.TASK
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        try:
            net = auto.from_config(
                config,
                dtype=torch_dtype(quant.compute_dtype),
                attn_implementation=attention_for(config, cfg.attn_implementation),
                trust_remote_code=cfg.trust_remote_code,
            )
        except ValueError as exc:
            what = "sequence classifier (...ForSequenceClassification)" if classifier else "causal LM"
            raise QLoRAKitError(f"cannot build a {what} for model_type '{config.model_type}': transformers has no "
                                f"such class for it ({str(exc).splitlines()[0]})") from exc
    heads = classification.head_names(net)
    for name, module in list(net.named_modules()):
        if classification.in_head(name, heads):
            continue
        if layers.is_linear(module) and not any(matches(name, p) for p in quant.skip_modules):
            _set_submodule(net, name, quantization.empty_linear4bit(module, quant))
    return net


# The attention kernels a model class may lack, and the class attribute that says it has one.
_ATTENTION_SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}


def attention_for(config, requested: str) -> str:
    """`requested`, or a kernel the model class supports when it lacks that one (logged).

    Some classes refuse SDPA (Gemma-2 needs eager attention for its logit soft-capping),
    so the default setting would make them unloadable. They fall back to SDPA when
    supported, else eager, as transformers' own default choice would; remote-code
    models are left to decide for themselves.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return requested
    flag = _ATTENTION_SUPPORT.get(requested)
    if flag is None or getattr(cls, flag, False):
        return requested
    fallback = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    log.info("%s does not support attn_implementation='%s'; using '%s'", cls.__name__, requested, fallback)
    return fallback


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def fill_from_checkpoint(net: PreTrainedModel, checkpoint: Checkpoint, quant: QuantConfig, device) -> None:
    """Stream every checkpoint tensor into the skeleton, quantizing 4-bit targets on `device`.

    Checkpoint names become model names by transformers' own rules (`CheckpointKeys`);
    tensors that transformers fuses into one parameter (a MoE layer's experts) are held
    until the last of them arrives, then fused as transformers fuses them.
    """
    expected = dict(net.named_parameters(remove_duplicate=False))
    keys = CheckpointKeys(net)
    parts_of = keys.fused_parts(checkpoint.tensor_names())
    pending: dict[str, list] = {}
    ignorable = list(getattr(net, "_keys_to_ignore_on_load_unexpected", None) or [])
    # A classifier built from a causal LM or a pretraining checkpoint: that checkpoint's own
    # head (lm_head, cls.predictions) lies outside the base model and is not used, as in transformers.
    other_head = (lambda key: not key.startswith(net.base_model_prefix + ".")) if classification.is_classifier(net) \
        else (lambda key: False)
    ignored = []
    unexpected = []
    sizes = [shard.stat().st_size for shard in checkpoint.shards]
    total = sum(sizes)
    # Trimmed once per shard's worth of tensors, not per tensor: on the CPU the weights are
    # quantized a block of rows at a time (`_fill`), so the quantizer's temporaries are a few
    # MB that the heap reuses, and trimming after each tensor only cost page faults (+22%).
    freed = memory.FreedMemory(every_bytes=max(sizes, default=0) or 2**20)
    # disable=None: a bar on a terminal, nothing in logs and pipes.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading in 4-bit", disable=None, leave=False)
    for name, tensor in checkpoint.iter_tensors():
        freed.processed(tensor.numel() * tensor.element_size())
        bar.update(tensor.numel() * tensor.element_size())
        key, pattern = keys.target(name)
        if key not in expected:
            if other_head(key):
                ignored.append(name)
            elif not any(re.search(p, name) for p in ignorable):
                unexpected.append(name)
            continue
        if pattern is None:
            if classification.other_classes(net, key, tensor, expected):
                continue  # left empty: initialised below with the rest of a missing head
            _fill(net, key, tensor, expected, quant, device, f"tensor {name} in {checkpoint.folder}")
            continue
        parts = pending.setdefault(key, [])
        parts.append((name, pattern, tensor))
        if len(parts) == parts_of[key]:
            for fused_key, value in keys.fuse(net, key, pending.pop(key)).items():
                _fill(net, fused_key, value, expected, quant, device,
                      f"{fused_key} fused from {checkpoint.folder}")
    bar.close()
    if unexpected:
        raise QLoRAKitError(
            f"{checkpoint.folder} holds {len(unexpected)} tensor(s) this model does not have, e.g. "
            f"{', '.join(unexpected[:3])}: the checkpoint's layout does not match its config.json"
        )
    if ignored:
        log.info("not used by %s: %s (the checkpoint's own head)", type(net).__name__, ", ".join(ignored[:4]))
    memory.release()
    net.tie_weights()
    missing = [name for name, p in net.named_parameters() if p.device.type == "meta"]
    missing = classification.initialise_missing_head(net, missing, device)
    if missing:
        raise QLoRAKitError(
            f"{checkpoint.folder} is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}: "
            "the checkpoint is incomplete or belongs to another architecture"
        )


def _fill(net: PreTrainedModel, key: str, tensor: torch.Tensor, expected: dict, quant: QuantConfig, device,
          what: str) -> None:
    """Put one checkpoint tensor into parameter `key`: quantized into a 4-bit layer, else as it is."""
    module_name, _, leaf = key.rpartition(".")
    module = net.get_submodule(module_name)
    packed = quantization.is_4bit_linear(module) and leaf == "weight"
    if packed and layers.stores_transposed(module):
        tensor = tensor.T  # a Conv1D's (in, out) weight, quantized as (out, in) as transformers does
    if tuple(tensor.shape) != tuple(expected[key].shape):
        raise QLoRAKitError(
            f"{what} has shape {tuple(tensor.shape)} but the model's config "
            f"expects {tuple(expected[key].shape)}: config.json and the weights disagree"
        )
    if packed and torch.device(device).type == "cpu":
        # Row blocks: bit-identical to quantize_into, with temporaries of a few MB, not 7x the weight.
        quantization.linear4bit_from(module, tensor.to(torch_dtype(quant.compute_dtype)))
    elif packed:
        quantization.quantize_into(module, tensor.to(torch_dtype(quant.compute_dtype)), device)
    else:
        value = tensor.to(device=device, dtype=_keep_dtype(tensor, quant))  # the read buffer itself, if it can be
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))
    del expected[key]


class CheckpointKeys:
    """Checkpoint tensor names mapped to this model's parameter names, by transformers' own rules.

    transformers renames some checkpoints' tensors when it loads them (GPT-NeoX's
    `embed_out` is the model's `lm_head`) and fuses others (Mixtral's per-expert
    `w1`/`w3`/`w2` become stacked `experts.gate_up_proj`/`down_proj`). The rules are
    transformers' (`get_model_conversion_mapping`, the list `from_pretrained` applies),
    used unchanged, so a checkpoint loads here as it loads there.
    """

    def __init__(self, net: PreTrainedModel):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        conversions = get_model_conversion_mapping(net)
        self._renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self._converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self._converter_of = {p: c for c in self._converters for p in c.source_patterns}
        self._prefix = net.base_model_prefix
        # transformers looks names up with `.get(...) is not None`
        self._names = {name: True for name, _ in net.named_parameters(remove_duplicate=False)}

    def target(self, name: str) -> tuple[str, str | None]:
        """(model parameter, None) for a tensor loaded as it is or renamed; (fused parameter,
        the converter's source pattern) for one of several tensors fused into one parameter."""
        from transformers.core_model_loading import rename_source_key

        key, pattern = rename_source_key(name, self._renamings, self._converters, self._prefix, self._names)
        if key not in self._names and name in self._names:  # as transformers: a rule misfired, keep the name
            key, pattern = rename_source_key(name, [], [], self._prefix, self._names)
        return key, pattern

    def fused_parts(self, names) -> dict[str, int]:
        """How many checkpoint tensors each fused parameter is made of."""
        counts: dict[str, int] = {}
        for name in names:
            key, pattern = self.target(name)
            if pattern is not None:
                counts[key] = counts.get(key, 0) + 1
        return counts

    def fuse(self, net: PreTrainedModel, key: str, parts: list[tuple[str, str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Fuse the (name, pattern, tensor) parts of `key` with transformers' converter, in its order."""
        from transformers.core_model_loading import dot_natural_key

        converter = copy.deepcopy(self._converter_of[parts[0][1]])
        for name, pattern, tensor in sorted(parts, key=lambda part: dot_natural_key(part[0])):
            converter.add_tensor(key, name, pattern, tensor)
        fused = converter.convert(key, model=net, config=net.config)
        return {k: v[0] if isinstance(v, list) else v for k, v in fused.items()}


def _keep_dtype(tensor: torch.Tensor, quant: QuantConfig) -> torch.dtype:
    """Unquantized floating tensors go to the compute dtype; integer tensors stay as they are."""
    return torch_dtype(quant.compute_dtype) if tensor.is_floating_point() else tensor.dtype


@dataclass
class WeightLayout:
    """How a checkpoint's weights meet the model `load_base` builds from it, known without loading it.

    Merging streams the checkpoint tensor by tensor and needs, for each, what loading
    did with it: which model parameter it became, whether it was held in 4-bit, and
    whether its checkpoint layout is transposed (a `Conv1D`'s (in, out)).
    """

    keys: CheckpointKeys
    quantized: set[str]  # model weight names held in 4-bit
    transposed: set[str]  # model weight names whose checkpoint tensor is (in, out)


def weight_layout(checkpoint: Checkpoint, quant: QuantConfig, cfg: ModelConfig = ModelConfig()) -> WeightLayout:
    """The `WeightLayout` of `checkpoint` loaded with `quant` and the model settings `cfg`, from a meta skeleton."""
    config = AutoConfig.from_pretrained(checkpoint.folder, trust_remote_code=cfg.trust_remote_code)
    if cfg.labels:
        classification.configure_labels(config, cfg.labels)
    skeleton = build_skeleton(config, quant, cfg)
    modules = dict(skeleton.named_modules())
    return WeightLayout(
        keys=CheckpointKeys(skeleton),
        quantized={f"{name}.weight" for name, m in modules.items() if quantization.is_4bit_linear(m)},
        transposed={f"{name}.weight" for name, m in modules.items() if layers.is_linear(m) and layers.stores_transposed(m)},
    )
