"""Next-token loss fused with the LM head, computed chunk by chunk.

The plain way materialises the (tokens × vocab) logits, their softmax and its gradient (800 MB
in fp32 for a GPT-2 batch of 16 × 1024). Here each chunk of tokens gets its fp32 logits, the
loss and, right away, the gradients of the hidden states and the head weight; nothing of
vocabulary size outlives its chunk, and backward only scales the stored gradients (same matmul
FLOPs). Each chunk's one logits tensor is rewritten in place (log-softmax, then softmax), so it
stays in cache: on a CPU faster than the plain way, not only smaller (docs/benchmarks.md).
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
            log_probs = torch.log_softmax(F.linear(h, weight_f), dim=-1)
            total -= log_probs.gather(1, y[:, None]).sum()
            if needs_grad:
                grad_logits = log_probs.exp_()  # softmax, in place: no second chunk-sized tensor
                grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
                grad_hidden[start : start + chunk] = (grad_logits @ weight_f).to(hidden.dtype)
                grad_weight.addmm_(grad_logits.t(), h)
        ctx.count = count
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if needs_grad else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        """Gradients of the summed loss, the mean's 1/count applied to the two results, not every chunk."""
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.count
        return grad_hidden * scale, grad_weight * scale, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden` (..., d) @ `weight`.T (vocab, d) against `targets`, no full logits."""
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), chunk_tokens
    )
