"""Activation offloading: keep what the backbone saves for backward in host memory, not on the GPU.

With gradient checkpointing, what the forward leaves on the GPU for backward is
mostly each decoder layer's input (layers x batch x seq x hidden values: 2 GiB
for Llama-3.1-8B at 4 x 2048 tokens, and it grows linearly with the sequence).
`enable_activation_offloading` wraps the backbone's forward in
`torch.autograd.graph.saved_tensors_hooks` that copy every saved GPU tensor
(above a small size) into pinned host memory with a non-blocking copy, and copy it
back (also non-blocking) when backward needs it. Inside checkpointed layers the
checkpoint's own hooks take precedence, so what moves is exactly what the
checkpoint keeps: the layer inputs (plus a few tensors saved outside the layers).
Without checkpointing every saved activation moves, which works but costs far
more PCIe traffic.

Both copies run on the current stream, as `torch.autograd.graph.save_on_cpu`'s do:
they are asynchronous with respect to the host, and stream order keeps them safe
(the GPU block is reused only after the copy out; the copy back finishes before
backward reads it). They are not overlapped with compute, so a step gets slower by
about (saved bytes x 2) / PCIe bandwidth, e.g. ~0.15 s for 2 GiB at 25 GB/s.

Host memory needed: the offloaded bytes, pinned. On the CPU there is nothing to
move: the call logs that and does nothing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Smaller saved tensors stay where they are: the copy would cost more than it saves.
MIN_OFFLOAD_BYTES = 1 << 20


class OffloadSavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks that park saved `device_type` tensors in (pinned) host memory."""

    def __init__(self, device_type: str = "cuda", pin_memory: bool | None = None,
                 min_bytes: int = MIN_OFFLOAD_BYTES):
        self.device_type = device_type
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.min_bytes = min_bytes
        self.offloaded_bytes = 0  # running total, for logs and tests
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if (tensor.device.type != self.device_type or isinstance(tensor, nn.Parameter)
                or tensor.numel() * tensor.element_size() < self.min_bytes):
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, device="cpu",
                           pin_memory=self.pin_memory)
        host.copy_(tensor, non_blocking=self.pin_memory)
        self.offloaded_bytes += host.numel() * host.element_size()
        return tensor.device, host

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=self.pin_memory)


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` for Llama-like models) whose forward is wrapped."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def enable_activation_offloading(model: nn.Module, device: torch.device | str,
                                 pin_memory: bool | None = None) -> OffloadSavedTensors | None:
    """Offload what the backbone's forward saves for backward to host memory (GPU devices only).

    Returns the hooks object (its `offloaded_bytes` counts what moved), or None on
    the CPU, where there is nothing to offload to. Idempotent per model.
    """
    device = torch.device(device)
    if device.type == "cpu":
        log.info("train.activation_offloading: nothing to do on %s (activations are already in host memory)",
                 device)
        return None
    existing = getattr(model, "_qlora_kit_offload", None)
    if existing is not None:
        return existing
    hooks = OffloadSavedTensors(device.type, pin_memory=pin_memory)
    backbone = backbone_of(model)
    active = []

    def enter(module, args, kwargs):
        if torch.is_grad_enabled():
            hooks.__enter__()
            active.append(True)
        else:
            active.append(False)

    def leave(module, args, kwargs, output):
        if active and active.pop():
            hooks.__exit__(None, None, None)

    backbone.register_forward_pre_hook(enter, with_kwargs=True)
    backbone.register_forward_hook(leave, with_kwargs=True, always_call=True)
    model._qlora_kit_offload = hooks
    log.info("train.activation_offloading: activations saved for backward go to %s host memory",
             "pinned" if hooks.pin_memory else "pageable")
    return hooks
