"""Which modules are linear layers, and how each one stores its weight.

Most models compute `x @ W.T` with an `nn.Linear` whose weight is (out, in). GPT-2
and its relatives use transformers' `Conv1D`, which computes `x @ W` with the weight
stored transposed, (in, out). Both layouts are handled here and nowhere else:

- loading quantizes a `Conv1D` as transformers does: its weight is transposed to
  (out, in) into a `Linear4bit`, which records the class it replaced as `source_cls`
  (transformers' own attribute, so 4-bit models loaded by transformers carry it too);
- LoRA wraps either kind, with A (r, in) and B (out, r) in both cases, and PEFT's
  config says `fan_in_fan_out: true` for them, as PEFT writes it;
- merging adds the update to a checkpoint weight in the checkpoint's own layout.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D


def is_linear(module: nn.Module) -> bool:
    """An `nn.Linear` (including bitsandbytes' `Linear4bit`) or a transformers `Conv1D`."""
    return isinstance(module, (nn.Linear, Conv1D))


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer of either layout."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def stores_transposed(module: nn.Module) -> bool:
    """Whether the layer's checkpoint weight is (in, out): a `Conv1D`, or a 4-bit layer quantized from one."""
    return isinstance(module, Conv1D) or issubclass(getattr(module, "source_cls", nn.Linear), Conv1D)


def holds_transposed(module: nn.Module) -> bool:
    """Whether the module's own weight is (in, out): a `Conv1D` (a 4-bit layer quantized from one holds (out, in))."""
    return isinstance(module, Conv1D)
