"""reward_losses.py against brute-force loops with Python floats and torch.distributions (float64, tol 1e-12)."""
import math

import pytest
import torch
from torch.distributions import Categorical

from minirlhf.reward_losses import bradley_terry_loss, distributional_loss, expected_rating, rating_entropy

TOL = dict(rtol=1e-12, atol=1e-12)


def _rewards(seed, B=13):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(B, generator=g, dtype=torch.float64), 3 * torch.randn(B, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bradley_terry_closed_form_and_shift_invariance(seed):
    chosen, rejected = _rewards(seed)
    expected = [math.log1p(math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())]
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected, dtype=torch.float64),
                               **TOL)
    for shift in (-7.3, 100.0):
        torch.testing.assert_close(bradley_terry_loss(chosen + shift, rejected + shift),
                                   bradley_terry_loss(chosen, rejected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_bradley_terry_margin(seed):
    chosen, rejected = _rewards(seed)
    margin = torch.rand(13, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for m in (margin, 0.5):
        torch.testing.assert_close(bradley_terry_loss(chosen, rejected, m), bradley_terry_loss(chosen - m, rejected),
                                   **TOL)
    assert (bradley_terry_loss(chosen, rejected, margin) > bradley_terry_loss(chosen, rejected)).all()
    chosen.requires_grad_(True)
    (grad,) = torch.autograd.grad(bradley_terry_loss(chosen, rejected).sum(), chosen)
    assert (grad < 0).all()  # descent raises the chosen reward


def brute_force_distributional(chosen_logits, rejected_logits, alpha):
    """-log sum_i sum_j p_c(i) p_r(j) sigmoid(alpha (i - j)), i, j = 1..K, with Python floats."""
    losses = []
    for lc, lr in zip(chosen_logits.tolist(), rejected_logits.tolist()):
        zc, zr = sum(math.exp(v) for v in lc), sum(math.exp(v) for v in lr)
        pc, pr = [math.exp(v) / zc for v in lc], [math.exp(v) / zr for v in lr]
        total = 0.0
        for i in range(1, len(lc) + 1):
            for j in range(1, len(lr) + 1):
                total += pc[i - 1] * pr[j - 1] / (1 + math.exp(-alpha * (i - j)))
        losses.append(-math.log(total))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("K,alpha", [(10, 0.2), (7, 1.0), (2, 3.0)])
def test_distributional_matches_brute_force(seed, K, alpha):
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = (2 * torch.randn(5, K, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(distributional_loss(chosen, rejected, alpha),
                               brute_force_distributional(chosen, rejected, alpha), **TOL)
    # the two orders are complementary events: P(c > r) + P(r > c) = 1, since sig(a) + sig(-a) = 1
    total = torch.exp(-distributional_loss(chosen, rejected, alpha)) + torch.exp(-distributional_loss(rejected, chosen,
                                                                                                       alpha))
    torch.testing.assert_close(total, torch.ones(5, dtype=torch.float64), **TOL)


def test_distributional_one_hot_reduces_to_logsigmoid_of_rating_gap():
    K, alpha = 10, 0.2
    i, j = torch.tensor([10, 3, 5, 1]), torch.tensor([1, 7, 5, 2])  # ratings 1..K
    chosen = 1e4 * torch.nn.functional.one_hot(i - 1, K).double()
    rejected = 1e4 * torch.nn.functional.one_hot(j - 1, K).double()
    expected = -torch.nn.functional.logsigmoid(alpha * (i - j).double())
    torch.testing.assert_close(distributional_loss(chosen, rejected, alpha), expected, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distributional_stable_for_huge_logits(dtype):
    chosen = torch.tensor([[1e30, -1e30, 0.0], [5e3, 0.0, -5e3], [-1e30, 0.0, 1e30]], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([[-1e30, 0.0, 1e30], [0.0, 1e4, 0.0], [float("-inf"), 0.0, 0.0]], dtype=dtype)
    losses = distributional_loss(chosen, rejected, alpha=1.0)
    (grad,) = torch.autograd.grad(losses.sum(), chosen)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    expected_first = -torch.nn.functional.logsigmoid(torch.tensor(1.0 * (1 - 3), dtype=dtype))  # one-hot i=1, j=3
    torch.testing.assert_close(losses[0], expected_first)


def test_distributional_gradcheck():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = (torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda c, r: distributional_loss(c, r, 0.7), (chosen, rejected))


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_rating_and_entropy(seed):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(7, 10, generator=g, dtype=torch.float64)
    expected = []
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        expected.append(sum(math.exp(v) / z * (i + 1) for i, v in enumerate(row)))
    torch.testing.assert_close(expected_rating(logits), torch.tensor(expected, dtype=torch.float64), **TOL)
    ratings = torch.linspace(-1, 1, 10, dtype=torch.float64)
    torch.testing.assert_close(expected_rating(logits, ratings), torch.softmax(logits, -1) @ ratings, **TOL)
    torch.testing.assert_close(rating_entropy(logits), Categorical(logits=logits).entropy(), **TOL)
    uniform = torch.zeros(10, dtype=torch.float64)
    assert expected_rating(uniform).item() == pytest.approx(5.5, abs=1e-12)
    assert rating_entropy(uniform).item() == pytest.approx(math.log(10), abs=1e-12)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="share one"):
        distributional_loss(torch.zeros(3, 10), torch.zeros(3, 9))
    with pytest.raises(ValueError, match="alpha"):
        distributional_loss(torch.zeros(3, 10), torch.zeros(3, 10), alpha=0.0)
    with pytest.raises(ValueError, match="ratings"):
        expected_rating(torch.zeros(3, 10), torch.arange(5.0))
