"""sllm: build a small GPT-style language model from scratch, Korean first and English too.

Raw text → own BPE tokenizer → memory-mapped token data → GPT decoder → pre-training →
evaluation → generation. Each stage is a plain function; `sllm.cli` only parses arguments.
`from sllm import TextGenerator, Evaluator` works, but loads torch only when a name is first
used, so `import sllm` (and `sllm --help`) stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Evaluator", "TextGenerator"]

if TYPE_CHECKING:
    from sllm.evaluate import Evaluator
    from sllm.infer.engine import TextGenerator


_LAZY = {"TextGenerator": "sllm.infer.engine", "Evaluator": "sllm.evaluate"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sllm' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
