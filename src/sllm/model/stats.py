"""What a model costs: parameters by component, FLOPs per token, memory, KV-cache size.

FLOPs per trained token follow PaLM's appendix B: 6·N for the matmul weights (N = block
matrices + the LM head; a lookup is free) plus 12·L·d·T for attention (T = context). SwiGLU's
and GQA's matrices count as they are; GQA shrinks only the KV cache (n_kv_head heads).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sllm.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' data sheets;
# the first fragment found in the name wins, so the lower-clocked variants come first.
GPU_PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def gpu_peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of a known GPU; None where we don't know it (MFU is then omitted)."""
    return next((peak for fragment, peak in GPU_PEAK_BF16.items() if fragment in device_name), None)


def parameters_by_component(model: nn.Module) -> dict[str, int]:
    """Parameter counts grouped as embedding, attention, MLP and norms."""
    groups = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0}
    for name, param in model.named_parameters():
        if name.startswith(("wte", "wpe", "pad", "lm_head")):
            groups["embedding"] += param.numel()
        elif ".attn." in name:
            groups["attention"] += param.numel()
        elif "norm" in name:
            groups["norms"] += param.numel()
        else:
            groups["mlp"] += param.numel()
    return groups


def training_flops_per_token(model: nn.Module, cfg: ModelConfig, context: int) -> float:
    """The matmul weights are every block matrix plus the LM head (tied or not)."""
    blocks = (
        p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("wte", "wpe", "lm_head"))
    )
    attention = 12 * cfg.n_layer * cfg.n_embd * context if cfg.arch == "gpt" else 0
    return 6 * (sum(p.numel() for p in blocks) + cfg.vocab_size * cfg.n_embd) + attention


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes


def training_memory(
    model: nn.Module, cfg: ModelConfig, micro_batch: int, context: int, checkpointing: bool
) -> MemoryEstimate:
    """fp32 weights and gradients, AdamW's two fp32 moments, and bf16 activations: about 34·d
    bytes per block and token (Korthikanti et al. 2022, flash attention), or with checkpointing
    each block's 2·d-byte input plus one block's worth during recomputation."""
    params = sum(p.numel() for p in model.parameters())
    tokens = micro_batch * context
    per_block = 34 * cfg.n_embd * tokens
    blocks = cfg.n_layer * 2 * cfg.n_embd * tokens + per_block if checkpointing else cfg.n_layer * per_block
    logits = 4 * tokens * cfg.vocab_size
    return MemoryEstimate(4 * params, 4 * params, 8 * params, blocks + logits)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for one token (bf16 by default); GQA keeps n_kv_head heads."""
    if cfg.arch != "gpt":
        return 0
    kv_width = (cfg.n_kv_head or cfg.n_head) * (cfg.n_embd // cfg.n_head)
    return 2 * cfg.n_layer * kv_width * bytes_per_value
