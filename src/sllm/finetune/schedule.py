"""The fine-tuning learning-rate schedule: linear warmup, then linear decay to zero.

A factor for `torch.optim.lr_scheduler.LambdaLR`, so every parameter group (the STS head
and its backbone run at different rates) follows the same shape from its own peak.
"""

from __future__ import annotations

from collections.abc import Callable


def warmup_linear_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor
