"""The fused 4-bit + LoRA linear: one dequantize in forward, one in backward, both gradients together.

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ          W: the frozen 4-bit weight, dequantized

Unfused, a `LoRALinear` over a `Linear4bit` runs bitsandbytes' `MatMul4Bit` and two
`nn.Linear`s as separate autograd nodes: each dequantizes the weight's double-quantized
absmax again, and the LoRA branch keeps its own copies of x. Here one autograd
function computes the whole layer:

- forward dequantizes W once (bitsandbytes' `dequantize_4bit` custom op) from an
  absmax that was dequantized once per weight and kept (`quantization.cached_absmax`);
- backward dequantizes W once more (nothing full-size is kept between the two) and
  computes the input gradient of the base and of the LoRA branch in one
  `grad_x = g W + s·(g B) A`, and A's and B's gradients from the saved rank-r
  intermediate.

Dtypes follow the unfused path: the base computes in the layer's compute dtype, the
adapter in autocast's dtype under autocast and in its own (fp32) dtype otherwise;
gradients reach A and B in their own dtype. `LoRALinear` uses this path for a
single active plain-LoRA adapter on a 4-bit base, and the unfused one (explicitly)
for DoRA, per-row adapters and inference-repacked weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quantization

# Whether `LoRALinear` may take the fused path, and whether it uses the kept absmax
# (False: undo the double quantization on every dequantize, as bitsandbytes does).
# Off by default: on the 2-core CPU measured it was no faster than the unfused path
# (0.99x, README "Performance"), and its gradients, equal within bf16 rounding, are not
# bit-identical, so it is opt-in until a GPU measurement shows a win.
ENABLED = False
CACHE_ABSMAX = True


def applies(base: nn.Module, update: nn.Module) -> bool:
    """Whether the fused path computes `base(x) + update(x)` exactly as the unfused one would."""
    return (ENABLED and quantization.is_4bit_linear(base) and update.lora_magnitude_vector is None
            and not getattr(quantization.quant_state_of(base), "packing_format_for_cpu", False))


def lora_linear_4bit(x: torch.Tensor, base: nn.Module, update: nn.Module) -> torch.Tensor:
    """base(x) + update(x) for a `Linear4bit` base and a plain LoRA `update` (a `LoRAUpdate`)."""
    state = quantization.quant_state_of(base)
    absmax = quantization.cached_absmax(base) if CACHE_ABSMAX else quantization.dequantize_absmax(state)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        lora_dtype = torch.get_autocast_dtype(device_type)
    else:
        lora_dtype = update.lora_A.weight.dtype
    # Constants only (no modules) cross into the function, so torch.compile can trace it.
    weight = (state.blocksize, state.quant_type, tuple(state.shape), base.compute_dtype or x.dtype)
    dropped = update.dropout(x)
    shared = dropped is x  # no dropout: one input gradient for both branches
    return _Linear4bitLoRA.apply(x, None if shared else dropped, update.lora_A.weight, update.lora_B.weight,
                                 base.bias, base.weight, absmax, weight, float(update.scaling), lora_dtype)


class _Linear4bitLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dropped, lora_a, lora_b, bias, packed, absmax, weight_meta, scaling, lora_dtype):
        compute_dtype = weight_meta[-1]
        with torch.autocast(x.device.type, enabled=False):
            weight = quantization.dequantize_packed(packed, absmax, *weight_meta)  # (out, in)
            out = F.linear(x.to(compute_dtype), weight, None if bias is None else bias.to(compute_dtype))
            del weight
            lora_in = (x if dropped is None else dropped).to(lora_dtype)
            hidden = F.linear(lora_in, lora_a.to(lora_dtype)) * scaling  # (..., r)
            update = F.linear(hidden, lora_b.to(lora_dtype))  # (..., out)
            out = out.to(x.dtype) + update.to(x.dtype)
        ctx.save_for_backward(lora_in, hidden, lora_a, lora_b, packed, absmax)
        ctx.weight_meta, ctx.scaling, ctx.lora_dtype = weight_meta, scaling, lora_dtype
        ctx.x_dtype, ctx.shared = x.dtype, dropped is None
        ctx.dropped_dtype = None if dropped is None else dropped.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        lora_in, hidden, lora_a, lora_b, packed, absmax = ctx.saved_tensors
        need_x, need_dropped, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        grad_x = grad_dropped = grad_a = grad_b = grad_bias = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g_lora = grad_out.to(ctx.lora_dtype)
            a, b = lora_a.to(ctx.lora_dtype), lora_b.to(ctx.lora_dtype)
            g2 = g_lora.reshape(-1, g_lora.shape[-1])  # (tokens, out)
            if need_b:
                grad_b = (g2.T @ hidden.reshape(-1, hidden.shape[-1])).to(lora_b.dtype)  # (out, r)
            g_hidden = (g_lora @ b) * ctx.scaling  # (..., r)
            if need_a:
                grad_a = (g_hidden.reshape(-1, g_hidden.shape[-1]).T
                          @ lora_in.reshape(-1, lora_in.shape[-1])).to(lora_a.dtype)  # (r, in)
            if need_x or need_dropped:
                g_lora_in = g_hidden @ a  # (..., in), the LoRA branch's input gradient
            if need_x:
                weight = quantization.dequantize_packed(packed, absmax, *ctx.weight_meta)  # the one re-dequantize
                grad_x = grad_out.to(ctx.weight_meta[-1]) @ weight
                del weight
                if ctx.shared:
                    grad_x = grad_x.to(ctx.lora_dtype).add_(g_lora_in)
                grad_x = grad_x.to(ctx.x_dtype)
            if need_dropped and not ctx.shared:
                grad_dropped = g_lora_in.to(ctx.dropped_dtype)
            if need_bias:
                grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_dropped, grad_a, grad_b, grad_bias, None, None, None, None, None
