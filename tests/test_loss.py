import pytest
import torch
import torch.nn.functional as F

from sllm.model.loss import linear_cross_entropy


def reference_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The plain computation the fused one must equal."""
    return F.cross_entropy((hidden @ weight.t()).float().flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_fused_loss_and_gradients_equal_the_plain_computation(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 21, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 21))

    fused = linear_cross_entropy(hidden, weight, targets, chunk)
    (fused * 2.5).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = reference_cross_entropy(hidden, weight, targets)
    (plain * 2.5).backward()

    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_fused_loss_without_gradients_keeps_nothing():
    hidden, weight = torch.randn(10, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (10,))
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, targets, 3), reference_cross_entropy(hidden, weight, targets)
        )
