"""Every bitsandbytes call in qlora_kit: 4-bit settings, quantizing, dequantizing, guards.

Keeping bitsandbytes behind this one module means its quirks (FP4 as the default
quant type, the CPU inference repack that silently stops gradients) are handled
once, here, and nobody else has to know them.
"""

from __future__ import annotations

import functools
import logging

import torch

# bitsandbytes warns at import when an optional accelerated CPU kernel package is
# absent; it is harmless and would greet every command, so quiet it for the import.
_bnb_log = logging.getLogger("bitsandbytes")
_bnb_level = _bnb_log.level
_bnb_log.setLevel(logging.ERROR)
try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
finally:
    _bnb_log.setLevel(_bnb_level)
import torch.nn.functional as F
from torch import nn

from . import layers
from .precision import torch_dtype
from .settings import QuantConfig

# NF4 block size for the weights and for the second-level (double-quant) constants.
# These match QLoRA (arXiv 2305.14314) and transformers' BitsAndBytesConfig.
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def quant_record(cfg: QuantConfig) -> dict:
    """What an adapter manifest records about the base's quantization (block sizes included)."""
    return {
        "quant_type": cfg.quant_type,
        "double_quant": cfg.double_quant,
        "blocksize": BLOCKSIZE,
        "nested_blocksize": NESTED_BLOCKSIZE if cfg.double_quant else None,
        "compute_dtype": cfg.compute_dtype,
        "quant_storage": cfg.quant_storage,
        "skip_modules": list(cfg.skip_modules),
    }


def bitsandbytes_version() -> str:
    return bnb.__version__


def is_4bit_linear(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit)


def empty_linear4bit(linear: nn.Module, cfg: QuantConfig) -> nn.Module:
    """A `Linear4bit` on the meta device with the shape of `linear`, to be filled by `quantize_into`.

    `linear` is an `nn.Linear` or a transformers `Conv1D`; as transformers does, the
    new layer records the class it replaces (`source_cls`), so a `Conv1D`'s (in, out)
    checkpoint weight is transposed when it is quantized (`layers.stores_transposed`).
    """
    in_features, out_features = layers.features(linear)
    module = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=linear.bias is not None,
        compute_dtype=torch_dtype(cfg.compute_dtype),
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        quant_storage=torch_dtype(cfg.quant_storage),
        device="meta",
    )
    module.source_cls = type(linear)
    return module


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


def quant_state_of(module: nn.Module):
    """A `Linear4bit`'s `QuantState`: its weight's, or the layer's copy once FSDP has replaced the weight."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else module.quant_state


def dequantize_absmax(state) -> torch.Tensor:
    """A weight's per-block absmax in fp32, undoing the double quantization as `gemm_4bit` does.

    The same custom ops and arithmetic as bitsandbytes' own nested path
    (`dequantize_blockwise` of the 8-bit absmax, plus the offset), so the 4-bit
    weight it dequantizes with is bit-identical to bitsandbytes'.
    """
    if not state.nested:
        return state.absmax.float()
    absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
        state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32)
    return absmax + state.offset


def cached_absmax(module: nn.Module) -> torch.Tensor:
    """`dequantize_absmax` of a `Linear4bit`'s weight, computed once and kept on the module.

    On the CPU, undoing the double quantization costs as much as dequantizing the
    4-bit weight itself, and a training step needs the weight three times (forward,
    checkpointed recompute, backward). The fp32 absmax costs 4 bytes per 64 weights
    (0.5 bit per parameter, 1/8 of the packed 4-bit size: `absmax_cache_bytes`). It
    is a plain attribute, not a buffer: state dicts, saving and FSDP never see it.
    It is recomputed whenever the state's absmax is replaced (moved, reloaded).
    """
    if torch.compiler.is_compiling():
        # Filled before compiling (`compilation.compile_layers`); the identity check below
        # would make torch.compile specialise, and recompile, per layer.
        return module._absmax_fp32[1]
    state = quant_state_of(module)
    key = (id(state.absmax), state.absmax.device)
    cached = getattr(module, "_absmax_fp32", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, dequantize_absmax(state))
        module._absmax_fp32 = cached
    return cached[1]


def absmax_cache_bytes(model: nn.Module) -> int:
    """Bytes held by `cached_absmax` copies (not counted in `quantized_bytes`: no part of the packed model)."""
    return sum(m._absmax_fp32[1].numel() * 4 for m in model.modules()
               if is_4bit_linear(m) and getattr(m, "_absmax_fp32", None) is not None)


def dequantize_with(module: nn.Module, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a `Linear4bit` in `dtype`, from its packed data and an fp32 `absmax`."""
    state = quant_state_of(module)
    return dequantize_packed(module.weight, absmax, state.blocksize, state.quant_type, tuple(state.shape), dtype)


def dequantize_packed(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                      shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit` custom op, called as its `gemm_4bit` calls it (tensors and constants only)."""
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed.view(-1, 1), absmax, blocksize, quant_type,
                                                          shape, dtype)


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


def quant_states_to(model: nn.Module, device: torch.device) -> int:
    """Move every `Linear4bit`'s quantization constants (kept on the layer) to `device`; returns how many.

    FSDP replaces each 4-bit weight by a sharded plain tensor, losing the constants
    it carried; bitsandbytes then takes them from the layer (`Linear4bit.quant_state`),
    so they must be where the layer computes, whole on every process.
    """
    count = 0
    for module in model.modules():
        if is_4bit_linear(module) and getattr(module, "quant_state", None) is not None:
            module.quant_state.to(device)
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


# ---------------------------------------------------------------------------
# Single-tensor helpers for exporting (qlora_kit.export, qlora_kit.verify).
# They reuse the exact bitsandbytes calls above so an export reproduces, bit for
# bit, the weights a loaded 4-bit model computes with.
# ---------------------------------------------------------------------------


# Rows are quantized a block of about QUANTIZE_CHUNK_ELEMENTS at a time: bitsandbytes'
# CPU quantizer makes ~7 fp32-sized temporaries of its whole input (227 MB for a 32 MB
# bf16 weight), which for a 70B model's 235M-parameter MLP weights would be several GB;
# blocks of 2^18 elements keep them near 7 MB. Dequantized weights are multiplied a
# block of CHUNK_ELEMENTS at a time (bigger: matrix products want wide blocks).
QUANTIZE_CHUNK_ELEMENTS = 2**18
CHUNK_ELEMENTS = 2**20


def _row_step(in_features: int, blocksize: int, elements: int | None = None) -> int | None:
    """Rows per chunk, or None when rows do not start on block boundaries (then: one chunk)."""
    if in_features % blocksize:
        return None
    return max(1, (elements or CHUNK_ELEMENTS) // in_features)


def quantize_4bit(weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = BLOCKSIZE,
                  double_quant: bool = True, quant_storage: torch.dtype = torch.uint8):
    """`bitsandbytes.functional.quantize_4bit` of a 2-D weight, a block of rows at a time: (packed, QuantState).

    Bit-identical to quantizing the whole weight at once (as `Params4bit` does when it
    moves to a device): 4-bit blocks never straddle rows when in_features is a multiple
    of the block size, and the double-quant statistics (the mean of all absmax values
    and their 8-bit blockwise quantization) are computed once from every chunk's
    absmax, exactly as bitsandbytes computes them from the whole tensor. NF4 on the CPU
    takes `_nf4_codes` in place of bitsandbytes' `bucketize` (the same bytes, faster).
    """
    step = _row_step(weight.shape[-1], blocksize, QUANTIZE_CHUNK_ELEMENTS) if weight.ndim == 2 else None
    if step is None or (step >= weight.shape[0] and not _fast_nf4(weight, quant_type)):
        return bnbF.quantize_4bit(weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type=quant_type, quant_storage=quant_storage)
    packed, absmax = [], []
    for start in range(0, weight.shape[0], step):
        part, part_absmax = _quantize_rows(weight[start:start + step].contiguous(), blocksize, quant_type,
                                           quant_storage)
        packed.append(part)
        absmax.append(part_absmax)
    packed, absmax = torch.cat(packed), torch.cat(absmax)
    code = bnbF.get_4bit_type(quant_type, device=weight.device)
    if not double_quant:
        return packed, bnbF.QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                                       code=code, quant_type=quant_type)
    offset = absmax.mean()
    qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return packed, bnbF.QuantState(absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                                   code=code, quant_type=quant_type, offset=offset, state2=state2)


def _quantize_rows(rows: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    """(packed, absmax) of whole rows, as bitsandbytes' `quantize_4bit` op returns them."""
    if not _fast_nf4(rows, quant_type):
        return torch.ops.bitsandbytes.quantize_4bit.default(rows, blocksize, quant_type, quant_storage)
    # bitsandbytes' CPU arithmetic, op for op (backends/default/ops.py), so `scaled` is the same.
    blocks = rows.reshape(-1, blocksize).float()  # rows start on block boundaries (_row_step)
    absmax = blocks.abs().max(dim=-1)[0]
    if not torch.isfinite(absmax).all():  # NaN/inf weights: let bitsandbytes decide what they become
        return torch.ops.bitsandbytes.quantize_4bit.default(rows, blocksize, quant_type, quant_storage)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    codes = _nf4_codes(scaled)
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)  # numel is even: whole blocks
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


def _fast_nf4(weight: torch.Tensor, quant_type: str) -> bool:
    return quant_type == "nf4" and weight.device.type == "cpu" and _nf4_tables() is not None


# The 4-bit code of x in [-1, 1] is the number of decision boundaries below it (what
# bitsandbytes computes with torch.bucketize: ~12 ns per value on the CPU). The
# boundaries are at least 0.07 apart, so on a grid of 2/8192-wide bins each bin,
# widened by a margin far above the rounding of the bin index, holds at most one of
# them: code = below[bin] + (x > edge[bin]), with edge = +inf where a bin holds none.
_NF4_BINS = 8192


@functools.cache
def _nf4_tables():
    """(below, edge) over _NF4_BINS + 1 bins, from bitsandbytes' own NF4 boundaries; None if they cannot be read."""
    try:
        from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

        bounds, _ = _get_4bit_quantize_bounds("nf4", torch.device("cpu"))
    except (ImportError, AttributeError, TypeError):  # another bitsandbytes: use its own quantizer
        return None
    bounds = bounds.double()
    width, margin = 2.0 / _NF4_BINS, 1e-5
    lows = torch.arange(_NF4_BINS + 1, dtype=torch.float64) * width - 1  # bin j covers [lows[j], lows[j] + width)
    below = (bounds[None, :] < (lows - margin)[:, None]).sum(dim=1)
    inside = (bounds[None, :] >= (lows - margin)[:, None]) & (bounds[None, :] <= (lows + width + margin)[:, None])
    if int(inside.sum(dim=1).max()) > 1:  # boundaries closer than a bin: the table cannot decide
        return None
    edge = torch.where(inside, bounds[None, :], torch.inf).min(dim=1).values
    return below.to(torch.uint8), edge.to(torch.float32)  # bounds are fp32 values: exact in fp32


def _nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """uint8 NF4 codes of `scaled` (fp32 in [-1, 1]): equal to bucketize(scaled, bitsandbytes' bounds)."""
    below, edge = _nf4_tables()
    bins = torch.add(_NF4_BINS / 2, scaled, alpha=_NF4_BINS / 2).to(torch.int32)  # in [0, _NF4_BINS]
    # index_select: about twice as fast as advanced indexing for a 1-D table lookup
    return below.index_select(0, bins).add_(torch.gt(scaled, edge.index_select(0, bins)))


def _quant_args(quant: dict) -> dict:
    return {"quant_type": quant.get("quant_type", "nf4"), "blocksize": int(quant.get("blocksize") or BLOCKSIZE),
            "double_quant": bool(quant.get("double_quant", True)),
            "quant_storage": torch_dtype(quant.get("quant_storage", "uint8"))}


def quantize_roundtrip(weight: torch.Tensor, quant: dict) -> torch.Tensor:
    """What a `Linear4bit` filled from `weight` computes with: quantize on the CPU, then dequantize.

    `weight` must already be in the compute dtype (loading quantizes `tensor.to(compute_dtype)`);
    `quant` is an adapter manifest's quantization dict (`quant_record`). The result is
    bit-identical to `dequantize_weight` of the module `quantize_into` fills from the same tensor;
    the quantizer's temporaries stay near `CHUNK_ELEMENTS` whatever the weight's size.
    """
    packed, state = quantize_4bit(weight, **_quant_args(quant))
    return bnbF.dequantize_4bit(packed, state)


def linear4bit_from(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """Fill an empty (meta) `Linear4bit` on the CPU from a weight in its compute dtype, by row chunks.

    The packed data and quantization state are bit-identical to those `quantize_into`
    gives on the CPU; only the quantizer's temporaries are smaller.
    """
    old = module.weight
    packed, state = quantize_4bit(weight, quant_type=old.quant_type, blocksize=old.blocksize,
                                  double_quant=old.compress_statistics, quant_storage=old.quant_storage)
    module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=old.blocksize,
                                      compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                      quant_storage=old.quant_storage, module=module, bnb_quantized=True)
    module.quant_state = state
    return module


def dequantize_saved(packed: torch.Tensor, components: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dequantize a 4-bit weight as transformers saves it: packed data plus its state tensors.

    `components` maps the suffixes after `<module>.weight.` (`absmax`, `quant_map`,
    `nested_absmax`, `nested_quant_map`, `quant_state.bitsandbytes__nf4`) to tensors.
    """
    state = bnbF.QuantState.from_dict(dict(components), device=torch.device("cpu"))
    return bnbF.dequantize_4bit(packed, state)


# The suffixes transformers gives a 4-bit weight's state tensors in a saved checkpoint.
SAVED_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                        "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")


def compute_with_dequantized_weights(model: nn.Module, dtype: torch.dtype | None = torch.float32) -> int:
    """Make every `Linear4bit` compute `F.linear(x, dequantized weight)` in `dtype`; returns how many.

    `dtype` None computes in each input's own dtype.

    Setting a `Linear4bit`'s compute dtype to fp32 is not enough for exact fp32 results:
    without gradients, bitsandbytes' fused CPU kernel (gemm_4bit) rounds activations
    to bf16 internally (errors ~1e-1 on a 576-wide layer, vs ~1e-5 in fp32). This
    computes with exactly the values `dequantize_weight` returns, so the result is
    what the 4-bit model computes, in `dtype` arithmetic. The 4-bit storage is kept;
    each call dequantizes its layer afresh (slower, meant for checks, not serving).
    """
    count = 0
    for module in model.modules():
        if is_4bit_linear(module):
            module.forward = functools.partial(_dequantized_forward, module, dtype)
            count += 1
    return count


def _dequantized_forward(module: nn.Module, dtype: torch.dtype | None, x: torch.Tensor) -> torch.Tensor:
    """F.linear(x, dequantized weight) in `dtype` (None: x's dtype), a block of output rows at a time.

    Each block's weight rows are dequantized, cast and multiplied, then dropped: no
    full-size copy of the weight in the compute dtype is ever held.
    """
    dtype = dtype or x.dtype
    state = module.weight.quant_state
    rows, cols = state.shape
    step = _row_step(cols, state.blocksize)
    if step is None or step >= rows or getattr(state, "packing_format_for_cpu", False):
        bias = module.bias.to(dtype) if module.bias is not None else None
        return F.linear(x.to(dtype), dequantize_weight(module).to(dtype), bias).to(x.dtype)
    absmax = state.absmax
    if state.nested:  # as bitsandbytes.functional.dequantize_4bit does it
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    absmax = absmax.float()
    packed = module.weight.data.reshape(-1).view(torch.uint8)
    inputs = x.to(dtype)
    out = torch.empty(*x.shape[:-1], rows, dtype=dtype, device=x.device)
    per_row = cols // state.blocksize
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        rows_state = bnbF.QuantState(absmax=absmax[start * per_row: stop * per_row], shape=(stop - start, cols),
                                     dtype=state.dtype, blocksize=state.blocksize, code=state.code,
                                     quant_type=state.quant_type)
        weight = bnbF.dequantize_4bit(packed[start * cols // 2: stop * cols // 2].unsqueeze(1), rows_state)
        bias = module.bias[start:stop].to(dtype) if module.bias is not None else None
        out[..., start:stop] = F.linear(inputs, weight.to(dtype), bias)
        del weight
    return out.to(x.dtype)


def quant_config_from_record(described: dict | None) -> QuantConfig:
    """The `QuantConfig` an adapter manifest's quantization record (`quant_record`) describes.

    Manifests written before `skip_modules` was recorded get the default (lm_head).
    """
    described = described or {}
    cfg = QuantConfig()
    for key in ("quant_type", "double_quant", "compute_dtype", "quant_storage", "skip_modules"):
        if described.get(key) is not None:
            setattr(cfg, key, described[key])
    return cfg


def eight_bit_optimizer(name: str, params, lr: float, weight_decay: float):
    """bitsandbytes' 8-bit AdamW; `paged_` pages its states to host memory under GPU pressure."""
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)
