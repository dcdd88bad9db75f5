"""Tiled MLP: each decoder layer's MLP computed a slice of the sequence at a time.

At long context the largest activation left in training (after the fused loss took
the logits away and checkpointing took the other layers' activations away) is the
MLP of the one layer being recomputed in backward: gate, up, their product and the
LoRA intermediates, each tokens x intermediate_size (3.5x the hidden size for
Llama-3.1-8B), plus the dequantized weights. They grow with the sequence and, at
30k tokens, hold the peak.

An MLP is position-wise, so its output for a slice of tokens needs only those
tokens. `tile_mlps` makes each layer's MLP run over slices of `tokens` tokens, each
slice checkpointed: backward keeps only the slices' inputs and recomputes one
slice's intermediates at a time. The cost is one more forward of the MLPs per step
(about a sixth more compute with gradient checkpointing on); the result is the same
computation, slice by slice (tested against the untiled MLP, dropout included:
checkpointing replays the random state).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import QLoRAKitError

log = logging.getLogger(__name__)


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """The `mlp` of every decoder layer (Llama, Mistral, Qwen, Gemma, Phi-3, GPT-2, ... name it so)."""
    return [module.mlp for name, module in model.named_modules()
            if isinstance(getattr(module, "mlp", None), nn.Module) and name.rpartition(".")[2].isdigit()]


def tile_mlps(model: nn.Module, tokens: int) -> int:
    """Compute every decoder layer's MLP `tokens` tokens at a time in training; returns how many were tiled."""
    mlps = decoder_mlps(model)
    for mlp in mlps:
        if not isinstance(mlp.forward, partial):  # not tiled twice
            mlp.forward = partial(_tiled_forward, mlp.forward, tokens)
    if mlps:
        log.info("tiled MLP: %d layers compute their MLP %d tokens at a time", len(mlps), tokens)
    else:
        log.warning("tiled MLP: this model has no decoder layers with an `mlp`; nothing was tiled")
    return len(mlps)


def _tiled_forward(forward, tokens: int, x: torch.Tensor, *args, **kwargs):
    """The MLP over slices of the sequence (dim -2), each slice recomputed in backward; untiled in inference."""
    if args or kwargs or not torch.is_grad_enabled() or x.dim() < 2 or x.shape[-2] <= tokens:
        return forward(x, *args, **kwargs)
    outputs = [checkpoint(forward, part, use_reentrant=False) for part in x.split(tokens, dim=-2)]
    if not all(isinstance(out, torch.Tensor) for out in outputs):
        raise QLoRAKitError(f"tiled MLP: {type(forward.__self__).__name__} returns {type(outputs[0]).__name__}, "
                        "not a tensor; set train.mlp_chunk_tokens=0 for this model")
    return torch.cat(outputs, dim=-2)
