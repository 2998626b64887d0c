"""sllm: build a small GPT-style language model from scratch, Korean first and English too.

Raw text → own BPE tokenizer → memory-mapped token data → GPT decoder → pre-training →
evaluation → generation. Each stage is a plain function; `sllm.cli` only parses arguments.
"""

__version__ = "0.1.0"
