"""Numeric precision: dtype names to torch dtypes, and which mixed precision a device gets."""

from __future__ import annotations

import torch

from .errors import QLoRAKitError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def torch_dtype(name: str) -> torch.dtype:
    """`'bfloat16'` -> `torch.bfloat16`; the names are those the settings use."""
    try:
        return DTYPES[name]
    except KeyError:
        raise QLoRAKitError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `'bfloat16'`."""
    return str(dtype).removeprefix("torch.")


def bf16_supported() -> bool:
    """Whether the GPU computes bf16 natively (compute capability >= 8.0).

    `torch.cuda.is_bf16_supported()` also says True on T4/V100 through slow
    emulation; fp16 with loss scaling is the right choice there.
    """
    if not torch.cuda.is_available():
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_mixed_precision(setting: str, cuda: bool) -> str:
    """The Accelerate mixed-precision mode for `train.mixed_precision` on this machine."""
    if setting == "auto":
        return "bf16" if (not cuda or bf16_supported()) else "fp16"
    if setting == "fp16" and not cuda:
        raise QLoRAKitError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    return setting
