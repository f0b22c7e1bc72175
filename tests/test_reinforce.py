"""reinforce.py: the loss and its gradient against the score-function formula A * grad log pi, with grad log softmax
written out by hand (onehot - softmax), float64, tolerance 1e-12."""
import pytest
import torch

from minirlhf.reinforce import reinforce_loss


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_is_advantage_times_grad_log_pi(seed):
    B, T, V = 5, 7, 11
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(V, (B, T), generator=g)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)  # right-padded responses
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
    losses = reinforce_loss(logprobs, advantages, mask)
    expected_losses = torch.stack([-advantages[b] * logprobs[b][mask[b]].sum() for b in range(B)])
    torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=1e-12)
    losses.sum().backward()
    # d(-A log softmax(z)_y)/dz = -A (onehot(y) - softmax(z)) at real tokens; padding gets no gradient
    onehot = torch.nn.functional.one_hot(tokens, V).double()
    expected = -advantages[:, None, None] * (onehot - torch.softmax(logits.detach(), -1)) * mask[..., None]
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-12)


def test_advantages_are_constants_and_padding_values_never_leak():
    logprobs = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("inf"), 0.0]], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    losses = reinforce_loss(logprobs, advantages, mask)
    torch.testing.assert_close(losses, torch.tensor([6.0, -0.5]))
    losses.sum().backward()
    assert advantages.grad is None  # the baseline-corrected return is a weight, not something to optimise
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 0.0, 0.0]]))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="advantages"):
        reinforce_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))  # (B,) or (B, T) only
