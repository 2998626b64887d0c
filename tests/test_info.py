import torch

from sllm.config import ModelConfig, save_config
from sllm.data.inspect import describe_data
from sllm.model import build_model, count_parameters
from sllm.model.stats import (
    gpu_peak_flops,
    kv_cache_bytes_per_token,
    parameters_by_component,
    training_flops_per_token,
    training_memory,
)
from sllm.run import read_run_config
from sllm.train.plan import RunPlan

from .test_cli import sllm


def test_component_counts_add_up_and_flops_follow_the_formula():
    cfg = ModelConfig(vocab_size=2048, n_layer=4, n_head=4, n_embd=128, block_size=128)
    model = build_model(cfg)
    groups = parameters_by_component(model)
    assert sum(groups.values()) == count_parameters(model)
    assert groups["embedding"] == 2048 * 128 + 128 * 128
    assert groups["attention"] == 4 * (4 * 128 * 128 + 4 * 128)
    d, layers, vocab, context = 128, 4, 2048, 128
    assert (
        training_flops_per_token(model, cfg, context)
        == 6 * (12 * layers * d * d + vocab * d) + 12 * layers * d * context
    )
    assert kv_cache_bytes_per_token(cfg) == 2 * layers * d * 2


def test_gqa_swiglu_untied_flops_and_kv_cache_follow_the_formula():
    d, layers, vocab, context, heads, kv_heads = 128, 4, 2000, 128, 4, 2
    cfg = ModelConfig(
        vocab_size=vocab, n_layer=layers, n_head=heads, n_embd=d, block_size=context,
        n_kv_head=kv_heads, mlp="swiglu", tie_embeddings=False, vocab_pad_multiple=128,
    )  # fmt: skip
    model = build_model(cfg)
    hidden, kv_width = 384, kv_heads * d // heads  # SwiGLU: 8/3 · 128 rounded up to 64s
    attention = d * (d + 2 * kv_width) + d * d
    groups = parameters_by_component(model)
    assert groups["embedding"] == 2 * 2048 * d + context * d  # padded embedding and lm_head
    assert groups["mlp"] == layers * (3 * d * hidden + 2 * hidden + d)
    assert (
        training_flops_per_token(model, cfg, context)
        == 6 * (layers * (attention + 3 * d * hidden) + vocab * d) + 12 * layers * d * context
    )
    assert kv_cache_bytes_per_token(cfg) == 2 * layers * kv_width * 2


def test_activation_checkpointing_estimate_is_smaller():
    cfg = ModelConfig(vocab_size=100, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    with torch.device("meta"):
        model = build_model(cfg)
    plain = training_memory(model, cfg, 16, 1024, checkpointing=False)
    checkpointed = training_memory(model, cfg, 16, 1024, checkpointing=True)
    assert checkpointed.activations_bytes < plain.activations_bytes / 5
    assert plain.optimizer_bytes == 2 * plain.weights_bytes


def test_known_and_unknown_gpus():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA H100 NVL") == gpu_peak_flops("NVIDIA H200 NVL") == 835e12
    assert gpu_peak_flops("Some Future GPU") is None


def test_info_command_for_a_run_and_a_config(trained_run):
    result = sllm("info", "--run", trained_run)
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "KV cache per token" in result.stdout
    result = sllm("info", "--config", "demo", "model.vocab_size=2048")
    assert "1,071,872 parameters" in result.stdout
    result = sllm("info", "--config", "demo", "data.dir=nowhere")
    assert result.returncode == 2 and "set model.vocab_size" in result.stderr


def test_info_on_a_run_with_auto_micro_batch_uses_the_micro_batch_its_plan_settled(tmp_path, trained_run):
    cfg = read_run_config(trained_run)
    cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.batch_size = "auto", 1, 16
    save_config(cfg, tmp_path / "config.yaml")
    result = sllm("info", "--run", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "micro-batch 16 × " in result.stdout  # no plan.json: the whole batch, as for a config
    RunPlan("lm", 1, 16, 4, 4, 32, 16 * 32, 10_000, 20).write(tmp_path)
    result = sllm("info", "--run", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "micro-batch 4 × " in result.stdout and "micro-batch 16" not in result.stdout


def test_data_info_describes_splits_and_decodes_windows(prepared_dir, tokenizer):
    text = describe_data(prepared_dir, show_samples=2, window_tokens=20)
    assert "train" in text and "bytes/token" in text and "constitution.jsonl" in text
    assert text.count("--- train window") == 2
