"""Run the real training code on a simulated GPU: fake tensors, no data, no GPU.

`qlora_kit.memory_plan` runs one or two real training steps of a full-size model
under PyTorch's `FakeTensorMode` (tensors with shape, dtype and device but no
data) and counts every allocation. This module supplies the simulated device.

Why not fake tensors on device "cuda"? In a CPU-only PyTorch build (the one this
project tests with) the autograd engine cannot run backward on CUDA tensors, fake
or not: it asks the CUDA runtime for streams (`at::accelerator::getCurrentStream`
fails with "Cannot access accelerator device when none is available"). So the
simulated GPU is PyTorch's PrivateUse1 backend, registered from Python under the
name "gpu" with a no-op device guard (the same setup PyTorch's own tests use for
Python backends). The training code sees tensors on device "gpu", not "cuda":

- where a CUDA-only choice matters, the simulation makes it explicitly, as the
  CUDA path would: the optimizer (`train.optimizer=auto` -> paged 8-bit AdamW),
  mixed precision (`auto` -> bf16: an Ampere-or-newer GPU is assumed), and
  activation offloading (on). In the code the step runs through (bitsandbytes'
  Linear4bit/MatMul4Bit/8-bit optimizers, transformers' Llama/Qwen2/Mistral/Gemma-2
  modelling, masking and SDPA code, torch's checkpointing) no other branch tests for
  "cuda" (checked for bitsandbytes 0.50, transformers 5.23, torch 2.13);
- autocast on "gpu" applies CUDA's autocast policy (the op lists of ATen's
  autocast_mode.h, registered here as Python kernels; without the weight-cast
  cache, so a parameter used twice in one region is cast twice);
- everything else is the real code: transformers' modelling code, qlora_kit's LoRA
  layers, loss and offloading hooks, bitsandbytes' autograd function and 8-bit
  optimizers, torch's checkpointing; a tensor left on the CPU by mistake meets a
  "gpu" tensor and fails the step, as on a real GPU.

What a data-less run cannot compute is supplied here, each piece documented where
it is done:

- Kernel choice: SDPA is called as the fused kernel an Ampere-or-newer GPU picks
  (flash attention: no mask, fp16/bf16, head_dim <= 256; otherwise
  memory-efficient attention); bitsandbytes' `gemm_4bit` is replaced by its CUDA
  backend's dequantize + F.linear fallback (which it takes for more than 1536 rows,
  and on several GPU architectures below that): the dequantized weight is a real,
  counted transient. The fused custom kernel it uses for few rows has none, so for
  small batches this is an upper bound by one dequantized weight.
- Data-dependent values: the simulated batch has every token supervised and no
  padding, so every boolean mask that reaches `nonzero`, mask indexing or `.item()`
  is all-True: `nonzero` and mask indexing select every position, a boolean scalar
  is True, the sum of a boolean tensor is its size, GradScaler's found-inf flag is 0,
  any other float scalar (an optimizer's step count, a loss value) is 1. Reading an
  integer tensor's value otherwise raises.
- Random initialisation (`uniform_`, `normal_`, ...) is a no-op: values do not matter.
- bitsandbytes' paged optimizer buffers (cudaMallocManaged) become ordinary device
  tensors, counted as GPU memory: an upper bound, since the driver can page them
  out to host memory under pressure. `torch.cuda.synchronize` is a no-op.

`install_simulated_gpu` changes process-wide state that cannot be undone (the
PrivateUse1 backend's name): `qlora_kit.memory_plan` therefore simulates in a
worker process, never in the caller's.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakIdKeyDictionary

from .errors import QLoRAKitError

aten = torch.ops.aten

SIM_DEVICE = "gpu"  # the device type of the simulated GPU's tensors
_installed = False
_keep_alive: list = []


# ---------------------------------------------------------------- the backend


class _DeviceModule:
    """`torch.gpu`: what torch asks of a backend module (availability, amp dtypes)."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def _lazy_init() -> None:
        pass

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def get_amp_supported_dtype() -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]


def install_simulated_gpu() -> str:
    """Register the simulated GPU backend in this process (once); returns its device type.

    Irreversible: PyTorch allows one PrivateUse1 backend name per process.
    """
    global _installed
    if _installed:
        return SIM_DEVICE
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    current = torch._C._get_privateuse1_backend_name()
    if current not in ("privateuseone", SIM_DEVICE):
        raise QLoRAKitError(f"cannot simulate a GPU: this process already has a PrivateUse1 backend '{current}'")
    if current != SIM_DEVICE:
        _setup_privateuseone_for_python_backend(SIM_DEVICE, backend_module=_DeviceModule())
    _register_autocast()
    _installed = True
    return SIM_DEVICE


# ATen's CUDA autocast policy (aten/src/ATen/autocast_mode.h), applied to the simulated GPU.
LOWER_PRECISION_OPS = [
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
]
FP32_OPS = [
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
    "logsumexp",
]
FP32_SET_OPT_DTYPE_OPS = [
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
]
PROMOTE_OPS = ["addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
               "tensordot", "scatter_add"]


def _overload(name: str):
    base, _, overload = name.partition(".")
    packet = getattr(aten, base)
    return getattr(packet, overload or "default")


def _eligible(t) -> bool:
    return (isinstance(t, torch.Tensor) and t.device.type == SIM_DEVICE and t.is_floating_point()
            and t.dtype != torch.float64)


def _register_autocast() -> None:
    key = "AutocastPrivateUse1"
    fallthrough = torch.library.Library("_", "IMPL")
    fallthrough.fallback(torch.library.fallthrough_kernel, key)
    lib = torch.library.Library("aten", "IMPL")
    _keep_alive.extend([fallthrough, lib])
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)

    def make(op, policy: str):
        dtype_index = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)
        dtype_kwarg_only = dtype_index is not None and op._schema.arguments[dtype_index].kwarg_only

        def kernel(*args, **kwargs):
            if policy == "lower":
                target = torch.get_autocast_dtype(SIM_DEVICE)
            elif policy == "fp32":
                target = torch.float32
            elif policy == "promote":
                eligible = [a for a in list(args) + list(kwargs.values()) if _eligible(a)]
                target = torch.float32 if any(a.dtype == torch.float32 for a in eligible) \
                    else torch.get_autocast_dtype(SIM_DEVICE)
            else:  # fp32_set_opt_dtype: run in fp32 unless the caller chose a dtype
                target = None
                given = kwargs.get("dtype") if dtype_kwarg_only else (
                    args[dtype_index] if dtype_index is not None and len(args) > dtype_index else kwargs.get("dtype"))
                if given is None and args and _eligible(args[0]):
                    if dtype_kwarg_only or len(args) <= dtype_index:
                        kwargs = {**kwargs, "dtype": torch.float32}
                    else:
                        args = args[:dtype_index] + (torch.float32,) + args[dtype_index + 1:]
            if target is not None:
                cast = lambda t: t.to(target) if _eligible(t) and t.dtype != target else t  # noqa: E731
                args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*args, **kwargs)

        return kernel

    for names, policy in ((LOWER_PRECISION_OPS, "lower"), (FP32_OPS, "fp32"),
                          (FP32_SET_OPT_DTYPE_OPS, "set_opt_dtype"), (PROMOTE_OPS, "promote")):
        for name in names:
            lib.impl(name, make(_overload(name), policy), key)


# ---------------------------------------------------------------- attention kernel choice

_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _gpu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The fused kernel an Ampere+ GPU's SDPA dispatch picks for these inputs."""
    if query.device.type != SIM_DEVICE:
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
    if torch.is_autocast_enabled(SIM_DEVICE):  # SDPA is on autocast's lower-precision list
        dtype = torch.get_autocast_dtype(SIM_DEVICE)
        query, key, value = (t.to(dtype) if _eligible(t) else t for t in (query, key, value))
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise RuntimeError("SDPA: query and key head counts differ but enable_gqa is False")
    head_dim = query.shape[-1]
    flash = (attn_mask is None and query.dtype in (torch.float16, torch.bfloat16)
             and head_dim <= 256 and head_dim % 8 == 0)
    with torch.autocast(SIM_DEVICE, enabled=False):
        if flash:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
        if query.shape[1] != key.shape[1]:
            rep = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(rep, dim=1)
            value = value.repeat_interleave(rep, dim=1)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # SDPA turns a boolean mask into an additive one in the query's dtype.
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                attn_mask.logical_not(), float("-inf"))
        if attn_mask is not None:
            attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        needs_lse = query.requires_grad or key.requires_grad or value.requires_grad
        return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, needs_lse, dropout_p,
                                                             is_causal, scale=scale)[0]


# ---------------------------------------------------------------- data-dependent ops, kernels, init


def _is_mask(i) -> bool:
    return isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)


def _expand_bool_indices(indices) -> list:
    """All-True boolean masks -> the integer indices they select (every position)."""
    out = []
    for i in indices:
        if _is_mask(i):
            out.extend(torch.zeros((i.numel(),), dtype=torch.long, device=i.device) for _ in range(i.dim()))
        else:
            out.append(i)
    return out


def _gemm_4bit_fallback(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                        absmax_code=None, absmax_offset=None):
    """bitsandbytes' CUDA `_dequant_linear_fallback`, with the same tensors (fake kernels)."""
    if absmax_8bit is not None:
        absmax_dq = torch.ops.bitsandbytes.dequantize_blockwise(absmax_8bit, absmax, absmax_code, 256, torch.float32)
        absmax = absmax_dq + absmax_offset
    B_dq = torch.ops.bitsandbytes.dequantize_4bit(B, absmax, blocksize, quant_type, list(shapeB), A.dtype)
    return F.linear(A, B_dq, bias)


class _Emulator(TorchDispatchMode):
    """Answers what a data-less run cannot compute; stands in for GPU kernels (see the module doc)."""

    RANDOM = {aten.uniform_.default, aten.normal_.default, aten.bernoulli_.float, aten.random_.default,
              getattr(aten.random_, "from"), aten.random_.to, aten.exponential_.default}
    INDEX_PUT = {aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}

    def __init__(self, gpu_kernels: bool):
        super().__init__()
        self.gpu_kernels = gpu_kernels
        self.bool_sums = WeakIdKeyDictionary()  # sum(bool mask) -> its size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.RANDOM:
            return args[0]
        if func is aten.nonzero.default:
            x = args[0]
            return torch.zeros((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        if func is aten.index.Tensor and any(_is_mask(i) for i in args[1]):
            return func(args[0], _expand_bool_indices(args[1]))
        if func in self.INDEX_PUT and any(_is_mask(i) for i in args[1]):
            return func(args[0], _expand_bool_indices(args[1]), *args[2:], **kwargs)
        if func is aten._local_scalar_dense.default:
            return self._scalar(args[0])
        if self.gpu_kernels and func is torch.ops.bitsandbytes.gemm_4bit.default:
            return _gemm_4bit_fallback(*args, **kwargs)
        out = func(*args, **kwargs)
        if func in (aten.sum.default, aten.sum.dim_IntList) and args[0].dtype == torch.bool:
            if func is aten.sum.default or not args[1]:
                self.bool_sums[out] = args[0].numel()
        elif func is aten._amp_foreach_non_finite_check_and_unscale_.default:
            self.bool_sums[args[1]] = 0.0  # GradScaler's found-inf flag: no inf/NaN found
        return out

    def _scalar(self, t: torch.Tensor):
        if t.dtype == torch.bool:
            return True
        if t in self.bool_sums:
            return self.bool_sums[t]
        if t.is_floating_point():
            return 1.0  # e.g. an optimizer's step count (>= 1 wherever it is read), a loss value
        raise QLoRAKitError(
            "the memory simulation met a value it cannot know without data (an integer read with .item()); "
            "this code path is not simulated")


# ---------------------------------------------------------------- the environment


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


_PAGED: "weakref.WeakSet" = weakref.WeakSet()


def _paged_as_device_tensor(*shape, dtype=torch.float32, device=None):
    t = torch.zeros(shape, dtype=dtype, device=device)
    _PAGED.add(t.untyped_storage())
    return t


def is_paged(t: torch.Tensor) -> bool:
    """Whether `t` stands for a bitsandbytes paged (cudaMallocManaged) buffer in a simulation."""
    return t.untyped_storage() in _PAGED


def is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def simulated_device(device_type: str, modes: tuple = ()) -> Iterator[FakeTensorMode]:
    """Fake tensors, the patches above, then `modes` (e.g. a memory tracker), then the emulator.

    `device_type` is SIM_DEVICE (after `install_simulated_gpu`) or "cpu" (a fake run of
    the CPU path, used to validate the simulation against a real CPU run). The patches
    are process-wide while the context is open (not thread-safe).
    """
    gpu = device_type == SIM_DEVICE
    if gpu and not _installed:
        raise QLoRAKitError("install_simulated_gpu() first (in a worker process: it cannot be undone)")
    if device_type not in (SIM_DEVICE, "cpu"):
        raise QLoRAKitError(f"cannot simulate device '{device_type}'")
    import bitsandbytes.functional as bnbF
    from transformers import masking_utils
    from transformers.utils import import_utils

    original_is_tracing = import_utils.is_tracing
    original_autocast_enabled = torch.is_autocast_enabled
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as stack:
        if gpu:
            stack.enter_context(_patched(F, "scaled_dot_product_attention", _gpu_sdpa))
            stack.enter_context(_patched(torch.cuda, "synchronize", lambda *a, **k: None))
            stack.enter_context(_patched(bnbF, "get_paged", _paged_as_device_tensor))
            stack.enter_context(_patched(bnbF, "fill", lambda A, value, device=None, prefetch=True: A.fill_(value)))
            # `torch.is_autocast_enabled()` without a device means CUDA; here the GPU is SIM_DEVICE.
            stack.enter_context(_patched(torch, "is_autocast_enabled",
                                         lambda device_type=None: original_autocast_enabled(device_type or SIM_DEVICE)))
        # transformers treats fake tensors as "tracing" and then never skips the causal mask;
        # a real run does skip it (and uses flash attention) when there is no padding.
        stack.enter_context(_patched(masking_utils, "is_tracing", lambda tensor=None: original_is_tracing(None)))
        # torch.tensor(data, device=...) must build its data on the CPU and lift it into fake mode.
        stack.callback(torch._C._set_only_lift_cpu_tensors, torch._C._only_lift_cpu_tensors())
        torch._C._set_only_lift_cpu_tensors(True)
        # Module.to() swaps fake parameters in place, which refuses tensors that fake mode's
        # converter memo (a WeakValueDictionary) references; the memo only saves re-conversions.
        original_swap = torch.utils.swap_tensors

        def swap_tensors(t1, t2):
            if weakref.getweakrefcount(t1) or weakref.getweakrefcount(t2):
                fake.fake_tensor_converter.meta_converter.tensor_memo.clear()
            return original_swap(t1, t2)

        stack.enter_context(_patched(torch.utils, "swap_tensors", swap_tensors))
        stack.enter_context(fake)
        for mode in modes:
            stack.enter_context(mode)
        stack.enter_context(_Emulator(gpu_kernels=gpu))
        yield fake
