"""Regional compilation: `torch.compile` applied to each decoder layer, as torchtune does.

A decoder is one block repeated N times, so compiling each block (not the whole model)
compiles its code once and reuses it for every layer, keeps gradient checkpointing
(which wraps each layer's call) and LoRA layers intact, and keeps state dicts unchanged
(`nn.Module.compile` compiles in place; no `_orig_mod.` prefixes). bitsandbytes' 4-bit
dequantize stays its own custom op inside the compiled graph. The same call applies on
CUDA, where inductor needs no C++ compiler.
"""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn

from . import quantization

log = logging.getLogger(__name__)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: the longest `nn.ModuleList` whose members all share one class."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def compiler_problem(device: torch.device) -> str | None:
    """Why inductor cannot compile here (no C++ compiler on the CPU, or a failing trial compile), or None."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("cc")):
        return "no C++ compiler found (inductor needs one on the CPU: install g++, e.g. `apt-get install g++`)"
    try:  # a tiny trial: a missing header or a broken toolchain shows here, not in the first training step
        probe = torch.compile(lambda t: torch.nn.functional.silu(t) * 2, dynamic=False)
        probe(torch.ones(8, device=device))
    except Exception as error:  # any inductor/toolchain failure means: run eagerly
        return f"torch.compile failed a trial compile ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None


def compile_layers(model: nn.Module) -> int:
    """Compile each decoder layer in place; returns how many (0, with one warning, when compiling cannot work)."""
    blocks = repeated_blocks(model)
    if not blocks:
        log.warning("train.compile: no repeated decoder layers found; training without compilation")
        return 0
    device = next(model.parameters()).device
    problem = compiler_problem(device)
    if problem:
        log.warning("train.compile: %s; training without compilation", problem)
        return 0
    for module in model.modules():  # the kept absmax exists before tracing (see quantization.cached_absmax)
        if quantization.is_4bit_linear(module):
            quantization.cached_absmax(module)
    for block in blocks:
        block.compile(dynamic=None)
    return len(blocks)
