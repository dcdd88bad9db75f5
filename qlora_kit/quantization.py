"""Every bitsandbytes call in qlora_kit: 4-bit settings, quantizing, dequantizing, guards.

Keeping bitsandbytes behind this one module means its quirks (FP4 as the default
quant type, the CPU inference repack that silently stops gradients) are handled
once, here, and nobody else has to know them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import nn

# NF4 block size for the weights and for the second-level (double-quant) constants.
# These match QLoRA (arXiv 2305.14314) and transformers' BitsAndBytesConfig.
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


@dataclass
class QuantConfig:
    """How the frozen base is stored and computed."""

    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit data type; NF4 suits normally distributed weights
    double_quant: bool = True  # quantize the per-block constants too (~0.37 bits/param saved)
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # dtype of matmuls and unquantized modules
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"  # container dtype; bfloat16 for FSDP
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])  # linears kept unquantized, in compute_dtype

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    @property
    def torch_quant_storage(self) -> torch.dtype:
        return DTYPES[self.quant_storage]

    def describe(self) -> dict:
        """What an adapter manifest records about the base's quantization."""
        return {
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "blocksize": BLOCKSIZE,
            "nested_blocksize": NESTED_BLOCKSIZE if self.double_quant else None,
            "compute_dtype": self.compute_dtype,
            "quant_storage": self.quant_storage,
        }


def bitsandbytes_version() -> str:
    return bnb.__version__


def is_4bit_linear(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit)


def empty_linear4bit(linear: nn.Linear, cfg: QuantConfig) -> nn.Module:
    """A `Linear4bit` on the meta device with the shape of `linear`, to be filled by `quantize_into`."""
    return bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=cfg.torch_compute_dtype,
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        quant_storage=cfg.torch_quant_storage,
        device="meta",
    )


def quantize_into(module: nn.Module, weight: torch.Tensor, device: torch.device) -> None:
    """Quantize a 16/32-bit `weight` (out, in) into `module.weight` on `device`.

    `Params4bit` quantizes when it moves to a real device; this is the same call
    transformers makes, so the packed bytes and constants are bit-identical to its
    `BitsAndBytesConfig(load_in_4bit=True, ...)`.
    """
    old = module.weight
    module.weight = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        quant_type=old.quant_type,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_storage=old.quant_storage,
        module=module,
    ).to(device)
    module.quant_state = module.weight.quant_state


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) floating-point weight that a `Linear4bit` computes with."""
    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # An inference-repacked weight: undo the CPU layout before dequantizing.
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        return bnbF.dequantize_4bit(data, state)
    return bnbF.dequantize_4bit(weight.data, state)


def guard_cpu_gradients(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first eval-mode no-grad forward through a
    `Linear4bit` (e.g. `generate()`) repacks its weight into an inference layout;
    afterwards no gradient flows through that layer and nothing warns, so LoRA
    adapters silently stop learning. Turning the repack off costs some CPU
    inference speed and keeps training correct. Returns how many layers it touched.
    """
    count = 0
    for module in model.modules():
        if is_4bit_linear(module):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by 4-bit weights and their quantization constants."""
    total = 0
    for module in model.modules():
        if is_4bit_linear(module):
            total += module.weight.data.numel() * module.weight.data.element_size()
            for tensor in module.weight.quant_state.as_dict(packed=True).values():
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
    return total
