"""qlora_kit: fine-tune large language models on one GPU with QLoRA.

    from qlora_kit import load_base, apply_lora, LoRAConfig, save_adapter, load_adapter

    model, tokenizer, base = load_base("smollm2-135m-instruct")    # NF4 + double quant, streamed
    apply_lora(model, LoRAConfig(rank=16, alpha=32))               # our LoRALinear on every linear
    save_adapter(model, "out/adapter", base=base)                  # PEFT format + qlora_kit.json
    fresh, _, base = load_base("smollm2-135m-instruct")
    load_adapter(fresh, "out/adapter", base=base)                  # checks it is the same base

The names below are imported on first use, so `import qlora_kit` (and the
command line's `--help`) does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that owns it
_EXPORTS = {
    "load_adapter": "adapter_io",
    "save_adapter": "adapter_io",
    "QLoRAKitError": "errors",
    "load_base": "loading",
    "LoRALinear": "lora",
    "apply_lora": "lora",
    "LoRAConfig": "settings",
    "ModelConfig": "settings",
    "QuantConfig": "settings",
    "DataConfig": "settings",
    "TrainConfig": "settings",
    "RunConfig": "settings",
    "load_recipe": "settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qlora_kit' has no attribute {name!r}")
