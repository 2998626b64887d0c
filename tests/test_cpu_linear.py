"""The oneDNN linear layer: the same numbers and gradients as `F.linear`, taken only where it
applies, chosen by instruction set or `SLLM_CPU_MATMUL`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sllm.config import ModelConfig
from sllm.errors import UserError
from sllm.infer.cpu_layout import use_column_major_weights
from sllm.model import build_model, cpu_linear
from sllm.model.cpu_linear import linear, matmul_transposed, onednn_chosen

needs_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="this torch has no oneDNN linear",
)


@pytest.fixture
def matmul_choice(monkeypatch):
    """Sets SLLM_CPU_MATMUL for one test (None: unset)."""

    def choose(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("SLLM_CPU_MATMUL", raising=False)
        else:
            monkeypatch.setenv("SLLM_CPU_MATMUL", value)

    return choose


def took_onednn(output: torch.Tensor) -> bool:
    """Whether the output's autograd node (under the reshape back to the input's shape) is ours."""
    node = output.grad_fn
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__ == "_OneDnnLinearBackward"


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 48), (3, 29, 48)])
def test_onednn_linear_equals_f_linear_with_gradients(matmul_choice, with_bias, shape):
    matmul_choice("onednn")
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(80, 48, requires_grad=True)
    bias = torch.randn(80, requires_grad=True) if with_bias else None
    upstream = torch.randn(*shape[:-1], 80)

    ours = linear(x, weight, bias)
    assert took_onednn(ours)
    ours.backward(upstream)
    ours_grads = [t.grad.clone() for t in (x, weight, bias) if t is not None]
    for t in (x, weight, bias):
        if t is not None:
            t.grad = None
    reference = F.linear(x, weight, bias)
    reference.backward(upstream)

    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(ours_grads, [t.grad for t in (x, weight, bias) if t is not None], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_onednn_linear_reads_strided_inputs(matmul_choice):
    matmul_choice("onednn")
    torch.manual_seed(0)
    hidden = torch.randn(4, 9, 32)
    weight = torch.randn(40, 32, requires_grad=True)
    last = hidden[:, -1:]  # rows 9·32 apart, as generation asks for the last position
    transposed = torch.randn(32, 6).t()
    for x in (last, transposed):
        ours = linear(x, weight)
        assert took_onednn(ours)
        torch.testing.assert_close(ours, F.linear(x, weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            matmul_transposed(x.reshape(-1, 32), weight), x.reshape(-1, 32) @ weight.t()
        )


@needs_onednn
def test_weight_gradient_when_the_input_needs_none(matmul_choice):
    matmul_choice("onednn")
    x, weight = torch.randn(5, 8), torch.randn(6, 8, requires_grad=True)
    out = linear(x, weight)
    assert took_onednn(out)
    out.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(5, 6).t() @ x)


@needs_onednn
def test_other_dtypes_autocast_and_decoding_layouts_keep_f_linear(matmul_choice):
    matmul_choice("onednn")
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(24, 16, requires_grad=True)
    assert took_onednn(linear(x, weight))
    assert not took_onednn(linear(x.bfloat16(), weight.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not took_onednn(linear(x, weight))
    column_major = weight.detach().t().contiguous().t().requires_grad_()
    assert not took_onednn(linear(x, column_major))
    matmul_choice("mkl")
    assert not took_onednn(linear(x, weight))


@needs_onednn
def test_choice_follows_the_instruction_set_unless_set(matmul_choice, monkeypatch):
    matmul_choice(None)
    for capability, expected in (("AVX512", True), ("AVX2", False), ("DEFAULT", False)):
        monkeypatch.setattr(
            torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability
        )
        cpu_linear._onednn_by_instruction_set.cache_clear()
        assert onednn_chosen() is expected
    cpu_linear._onednn_by_instruction_set.cache_clear()
    matmul_choice("onednn")
    assert onednn_chosen()
    matmul_choice(" MKL ")
    assert not onednn_chosen()


def test_an_unknown_choice_is_one_line_before_any_model_exists(matmul_choice):
    matmul_choice("fast")
    message = r"SLLM_CPU_MATMUL='fast' is not a choice: use onednn or mkl"
    with pytest.raises(UserError, match=message):
        onednn_chosen()
    with pytest.raises(UserError, match=message):
        build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))


@needs_onednn
def test_outputs_may_be_changed_in_place_and_double_backward_is_refused(matmul_choice):
    matmul_choice("onednn")
    x = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    grads = []
    for product in (linear, F.linear):
        out = product(x, weight)
        F.relu(out, inplace=True)
        grads.append(torch.autograd.grad(out.sum(), (x, weight)))
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference)
    (grad_x,) = torch.autograd.grad(linear(x, weight).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


@needs_onednn
def test_a_strided_bias_keeps_f_linear(matmul_choice):
    matmul_choice("onednn")
    x, weight, bias = torch.randn(5, 8), torch.randn(3, 8, requires_grad=True), torch.arange(6.0)[::2]
    ours = linear(x, weight, bias)
    assert not took_onednn(ours)
    torch.testing.assert_close(ours, F.linear(x, weight, bias))
    torch.testing.assert_close(matmul_transposed(x, weight, bias), F.linear(x, weight, bias))


@needs_onednn
def test_training_steps_match_between_onednn_and_mkl(matmul_choice):
    """The same three AdamW steps of a small GPT with either kernel: losses and weights agree to
    rounding, so the choice changes speed, not training."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
    batches = [torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results = {}
    for choice in ("onednn", "mkl"):
        matmul_choice(choice)
        torch.manual_seed(0)
        model = build_model(cfg)
        assert took_onednn(model.blocks[0].mlp.fc(torch.randn(1, 2, 32))) == (choice == "onednn")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for batch in batches:
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        results[choice] = losses, model.state_dict()
    assert results["onednn"][0] == pytest.approx(results["mkl"][0], abs=1e-5)
    for name, tensor in results["onednn"][1].items():
        torch.testing.assert_close(tensor, results["mkl"][1][name], rtol=1e-4, atol=1e-5)


@needs_onednn
def test_generation_layout_switches_the_model_back_to_f_linear(matmul_choice):
    matmul_choice("onednn")
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(2, 3, 32)
    assert isinstance(qkv, cpu_linear.Linear) and took_onednn(qkv(x))
    use_column_major_weights(model)
    assert not took_onednn(qkv(x))
