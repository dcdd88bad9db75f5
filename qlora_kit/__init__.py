"""qlora_kit: fine-tune large language models on one GPU with QLoRA.

    from qlora_kit import load_base, apply_lora, LoRAConfig, save_adapter, load_adapter

    model, tokenizer = load_base("smollm2-135m-instruct")      # NF4 + double quant, streamed
    apply_lora(model, LoRAConfig(rank=16, alpha=32))             # our LoRALinear on every linear
    save_adapter(model, "out/adapter")                           # PEFT format + qlora_kit.json
    load_adapter(load_base("smollm2-135m-instruct")[0], "out/adapter")
"""

__version__ = "0.1.0"

from .adapter_io import load_adapter, save_adapter  # noqa: E402
from .errors import QLoRAKitError  # noqa: E402
from .loading import ModelConfig, load_base  # noqa: E402
from .lora import LoRAConfig, LoRALinear, apply_lora  # noqa: E402
from .quantization import QuantConfig  # noqa: E402

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "ModelConfig",
    "QLoRAKitError",
    "QuantConfig",
    "apply_lora",
    "load_adapter",
    "load_base",
    "save_adapter",
]
