"""`ServerLimits`: how much one request to `sllm serve` may ask for, and how many may wait.

Declared apart from the server, without FastAPI, so the CLI builds `sllm serve`'s flags and
their help from these fields (one declaration: default, meaning, range) on any install.
Every limit is checked before the work it bounds is done or its memory allocated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sllm.options import Range, check_range, option


@dataclass(frozen=True)
class ServerLimits:
    max_tokens_limit: int = option(1024, "largest max_tokens (or max_completion_tokens); more: 400", Range(1))
    max_batch: int = option(64, "most rows one request generates, prompts times n; more: 400", Range(1))
    max_body_bytes: int = option(
        1_000_000, "largest request body; more: 413, refused before it is read", Range(1)
    )
    max_queue: int = option(
        32, "most generations waiting for the model; more: 429 with Retry-After", Range(0)
    )

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            check_range(spec.name, getattr(self, spec.name), spec)
