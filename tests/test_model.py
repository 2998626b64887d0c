import pytest
import torch

from sllm.config import ModelConfig
from sllm.model import build_model, count_parameters


def _model(**overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=32, block_size=24, **overrides)
    return build_model(cfg).eval()


@pytest.mark.parametrize("options", [{}, {"pos": "sinusoidal"}, {"arch": "ffn", "ffn_window": 4}])
def test_changing_a_token_leaves_earlier_logits_unchanged(options):
    model = _model(**options)
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert torch.equal(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_ffn_baseline_sees_only_its_window():
    model = _model(arch="ffn", ffn_window=4)
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 97
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert not torch.allclose(before[:, 5:9], after[:, 5:9])
    assert torch.equal(before[:, 9:], after[:, 9:])


def test_parameter_count_matches_formula():
    vocab, layers, width, context = 97, 2, 32, 24
    model = _model()
    per_block = 12 * width**2 + 13 * width  # qkv, proj, fc, proj weights + biases + 2 norms
    expected = vocab * width + context * width + layers * per_block + 2 * width
    assert count_parameters(model) == expected
    no_bias = build_model(
        ModelConfig(vocab_size=vocab, n_layer=layers, n_head=4, n_embd=width, block_size=context, bias=False)
    )
    assert (
        count_parameters(no_bias)
        == vocab * width + context * width + layers * (12 * width**2 + 2 * width) + width
    )


def test_lm_head_is_tied_to_the_embedding():
    model = _model()
    names = [name for name, _ in model.named_parameters()]
    assert not any("head" in name for name in names)
    with torch.no_grad():
        model.wte.weight[5].zero_()
        logits = model(torch.randint(0, 97, (1, 4)))
    assert torch.all(logits[..., 5] == 0)


def test_residual_projections_use_scaled_init():
    model = build_model(ModelConfig(vocab_size=50, n_layer=8, n_head=4, n_embd=128, block_size=16))
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    fc_std = model.blocks[0].mlp.fc.weight.std().item()
    assert abs(fc_std - 0.02) < 0.002
    assert abs(proj_std - 0.02 / 4) < 0.001
