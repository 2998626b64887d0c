"""`onednn_linears`: inside it `F.linear` gives the numbers and gradients it gives outside,
through oneDNN where that applies; the model trains the same with or without it."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from sllm.config import ModelConfig
from sllm.model import build_model, cpu_linear
from sllm.model.cpu_linear import onednn_linears

CPU = torch.device("cpu")
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@pytest.fixture
def onednn(monkeypatch):
    """`onednn_linears(CPU)` takes oneDNN here, whatever this CPU's instruction set."""
    if not ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(cpu_linear, "onednn_suits_this_cpu", lambda: True)
    return lambda: onednn_linears(CPU)


def took_onednn(output: torch.Tensor) -> bool:
    """Whether the output's autograd node (under the reshape back to the input's shape) is oneDNN's."""
    node = output.grad_fn
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__ == "_OneDnnLinearBackward"


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 48), (3, 29, 48)])
def test_f_linear_inside_equals_f_linear_outside_with_gradients(onednn, with_bias, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(80, 48, requires_grad=True)
    bias = torch.randn(80, requires_grad=True) if with_bias else None
    upstream = torch.randn(*shape[:-1], 80)
    leaves = [t for t in (x, weight, bias) if t is not None]

    with onednn():
        ours = F.linear(x, weight, bias)
    assert took_onednn(ours)
    ours_grads = torch.autograd.grad(ours, leaves, upstream)
    reference = F.linear(x, weight, bias)
    reference_grads = torch.autograd.grad(reference, leaves, upstream)

    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_strided_inputs_and_no_grad(onednn):
    torch.manual_seed(0)
    hidden = torch.randn(4, 9, 32)
    weight = torch.randn(40, 32, requires_grad=True)
    last = hidden[:, -1:]  # rows 9·32 apart, as generation asks for the last position
    transposed = torch.randn(32, 6).t()
    for x in (last, transposed):
        with onednn():
            ours = F.linear(x, weight)
            with torch.no_grad():
                unrecorded = F.linear(x, weight)
        assert took_onednn(ours)
        torch.testing.assert_close(ours, F.linear(x, weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unrecorded, ours.detach())


def test_weight_gradient_when_the_input_needs_none(onednn):
    x, weight = torch.randn(5, 8), torch.randn(6, 8, requires_grad=True)
    with onednn():
        out = F.linear(x, weight)
    assert took_onednn(out)
    out.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(5, 6).t() @ x)


def test_other_dtypes_autocast_column_major_and_strided_bias_keep_f_linear(onednn):
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(24, 16, requires_grad=True)
    column_major = weight.detach().t().contiguous().t().requires_grad_()
    strided_bias = torch.arange(48.0)[::2]
    with onednn():
        assert took_onednn(F.linear(x, weight))
        assert not took_onednn(F.linear(x.bfloat16(), weight.bfloat16()))
        assert not took_onednn(F.linear(x, column_major))
        ours = F.linear(x, weight, strided_bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not took_onednn(F.linear(x, weight))
    assert not took_onednn(ours)
    torch.testing.assert_close(ours, F.linear(x, weight, strided_bias))


def test_only_a_cpu_with_avx512_gets_onednn(monkeypatch):
    x, weight = torch.randn(3, 8), torch.randn(4, 8, requires_grad=True)
    for capability in ("AVX512", "AVX2", "DEFAULT"):
        monkeypatch.setattr(
            torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability
        )
        cpu_linear.onednn_suits_this_cpu.cache_clear()
        with onednn_linears(CPU):
            took = took_onednn(F.linear(x, weight))
        assert took is (capability == "AVX512" and ONEDNN_LINEAR)
        with onednn_linears(torch.device("cuda")):  # no GPU needed: a CUDA run never enters the mode
            assert not took_onednn(F.linear(x, weight))
    cpu_linear.onednn_suits_this_cpu.cache_clear()


def test_activation_checkpointing_keeps_f_linear_and_trains(onednn):
    """Blocks recomputed in backward run outside the mode, so the forward must not use it."""
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    model.checkpoint_blocks = True
    idx = torch.randint(0, 64, (2, 8))
    with onednn_linears(CPU, activation_checkpointing=True):
        logits = model(idx)
        F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    assert not took_onednn(logits)
    assert all(p.grad is not None for p in model.parameters())


def test_outputs_may_be_changed_in_place_and_double_backward_is_refused(onednn):
    x = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    grads = []
    for mode in (onednn, nullcontext):
        with mode():
            out = F.linear(x, weight)
        F.relu(out, inplace=True)
        grads.append(torch.autograd.grad(out.sum(), (x, weight)))
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference)
    with onednn():
        out = F.linear(x, weight)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


def small_gpt_training(linears, chunked_loss: bool = False) -> tuple[list[float], dict]:
    """Three AdamW steps of a small GPT, its forward passes inside `linears()`."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
    batches = [torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for batch in batches:
        x, y = batch[:, :-1], batch[:, 1:]
        with linears():
            loss = (
                model(x, targets=y) if chunked_loss else F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.parametrize("chunked_loss", [False, True])
def test_a_gpt_trains_the_same_inside_and_outside(onednn, chunked_loss):
    """Losses and weights agree to rounding: the mode changes speed, not training."""
    ours = small_gpt_training(onednn, chunked_loss)
    reference = small_gpt_training(nullcontext, chunked_loss)
    assert ours[0] == pytest.approx(reference[0], abs=1e-5)
    for name, tensor in ours[1].items():
        torch.testing.assert_close(tensor, reference[1][name], rtol=1e-4, atol=1e-5)


def test_every_product_of_the_gpt_and_its_tied_head_goes_through_onednn(onednn, monkeypatch):
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    seen = []
    original = cpu_linear._OneDnnLinear.apply

    def counting(rows, weight, bias):
        seen.append(weight)
        return original(rows, weight, bias)

    monkeypatch.setattr(cpu_linear._OneDnnLinear, "apply", counting)
    with onednn():
        model(torch.randint(0, 64, (2, 8)))
    linear_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert {id(w) for w in seen} == {id(w) for w in [*linear_weights, model.wte.weight]}


def test_torch_compile_inside_keeps_f_linear_and_its_numbers(onednn):
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    idx = torch.randint(0, 64, (2, 8))
    compiled = torch.compile(model, backend="aot_eager")
    with onednn():
        logits = compiled(idx)
    torch.testing.assert_close(logits, model(idx), rtol=1e-5, atol=1e-5)
