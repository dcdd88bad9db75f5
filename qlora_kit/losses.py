"""The training loss: cross-entropy on supervised tokens only, never materialising full logits.

Logits over a 50k-250k vocabulary are the largest activation of a causal LM:
(batch · seq · vocab) floats. Here the LM head is applied only at positions that
have a target (label != -100), a chunk of rows at a time, and the gradient with
respect to the hidden states is computed in the same pass (the head is frozen, so
no weight gradient is needed). Peak extra memory is one chunk of logits plus the
(N, hidden) gradient, and the head's matmul runs twice instead of three times
(no recompute), as in Liger-Kernel's fused linear cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

# Supervised tokens per LM-head chunk (train.loss_chunk_tokens' default): 128 x vocabulary fp32 logits at a time.
CHUNK_ROWS = 128


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(h_i @ W^T), y_i) with d/dh computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, softcap: float | None):
        # hidden: (N, H) in the compute dtype; weight: (V, H); targets: (N,)
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            y = targets[start:start + chunk_rows]
            rows = torch.arange(y.shape[0], device=y.device)
            logits = (h @ weight.t()).float()  # (n, V): the only logits alive at any time
            if softcap:
                logits = logits.div_(softcap).tanh_().mul_(softcap)
                # d capped / d raw = 1 - (capped / cap)^2, needed after logits become the softmax
                cap_grad = (logits / softcap).square_().neg_().add_(1) if grad_hidden is not None else None
            target_logits = logits[rows, y]
            # logsumexp in place: torch.logsumexp would allocate another (n, V) float32
            # temporary; here logits become exp(logits - max), then the softmax itself.
            maxes = logits.amax(dim=-1, keepdim=True)
            sums = logits.sub_(maxes).exp_().sum(dim=-1, keepdim=True)
            loss += (sums.log() + maxes).squeeze(-1).sub_(target_logits).sum()
            if grad_hidden is not None:
                grad = logits.div_(sums)  # softmax in place: d loss / d logits = p - onehot
                grad[rows, y] -= 1
                if softcap:
                    grad *= cap_grad
                grad_hidden[start:start + chunk_rows] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            # Drop this chunk's (n, V) tensors now: the names would keep them alive while the
            # next chunk's logits are computed, doubling the peak.
            logits = grad = cap_grad = None
        ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        grad = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        return grad, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                               chunk_rows: int = CHUNK_ROWS, softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets`, chunked. Rows are tokens."""
    if head.weight.requires_grad or getattr(head, "bias", None) is not None:
        # A trainable or biased head needs the plain path (weight gradient / bias term).
        logits = head(hidden).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, reduction="sum")
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden.to(head.weight.dtype), head.weight, targets, chunk_rows, softcap)


def supervised_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy over supervised targets, number of those targets).

    The caller divides by the number of supervised targets of the whole accumulated
    batch, so every token weighs the same whatever micro-batch it fell in.
    """
    backbone = getattr(model, model.base_model_prefix)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX
    selected = hidden[:, :-1][keep]  # (N, H): only rows that have a target
    softcap = getattr(model.config, "final_logit_softcapping", None)
    loss = fused_linear_cross_entropy(selected, model.get_output_embeddings(), targets[keep], chunk_rows, softcap)
    return loss, int(keep.sum())


def perplexity(loss: float) -> float:
    """exp(mean loss per token); inf where that overflows."""
    return math.exp(loss) if loss < 50 else float("inf")


class SupervisedLoss(nn.Module):
    """The model plus its loss as one module, so Accelerate/DDP wrap the whole forward.

    forward(batch) -> (summed loss over supervised targets, number of targets).
    """

    def __init__(self, model: nn.Module, chunk_rows: int = CHUNK_ROWS):
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return supervised_loss_sum(self.model, batch, self.chunk_rows)
