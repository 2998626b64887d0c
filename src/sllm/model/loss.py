"""Next-token loss fused with the LM head, computed chunk by chunk.

The plain way materialises the (tokens × vocab) logits, then their softmax and its gradient:
three tensors of that size (800 MB in fp32 for a GPT-2 batch of 16 × 1024 tokens), each
streamed through memory several times. Here the tokens are split into chunks; for each
chunk the logits are computed in fp32, turned into the loss and, right away, into the
gradients of the hidden states and of the head weight (the softmax minus the one-hot
targets, times the inputs). Nothing of vocabulary size outlives its chunk, and backward
only scales the stored gradients, so the matmul FLOPs equal the plain way's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        count = hidden.size(0)
        needs_grad = hidden.requires_grad or weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        weight_f = weight.float()
        for start in range(0, count, chunk):
            h = hidden[start : start + chunk].float()
            y = targets[start : start + chunk]
            logits = h @ weight_f.t()
            log_z = torch.logsumexp(logits, dim=-1)
            total += (log_z - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if needs_grad:
                grad_logits = torch.exp(logits - log_z[:, None])  # softmax, in place of the logits
                grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
                grad_logits /= count
                grad_hidden[start : start + chunk] = (grad_logits @ weight_f).to(hidden.dtype)
                grad_weight.addmm_(grad_logits.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if needs_grad else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, without full logits.

    `hidden` is (..., d), `weight` (vocab, d), `targets` (...) of token ids."""
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), chunk_tokens
    )


def reference_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The plain computation the fused one must equal (used by tests and benchmarks)."""
    return F.cross_entropy((hidden @ weight.t()).float().flatten(0, -2), targets.flatten())
