"""reinforce_pp.py: the returns to go and the global normalisation against python loops in float64 (tol 1e-12), a
hand-checked rollout, padding that never leaks, REINFORCE++-baseline against REINFORCE++ on scores less their group's
mean (a loop), and the per-token REINFORCE loss against -sum_t A_t log pi_t and its gradient written out by hand."""
import math
import statistics

import pytest
import torch

from minirlhf.gae import gae
from minirlhf.reinforce import reinforce_loss
from minirlhf.reinforce_pp import reinforce_pp_advantages, returns_to_go

EPS = 1e-8  # inside the square root, as PPO's advantage whitening (ops.masked_whiten)


def rollout(seed, B=6, T=9):
    """Random scores and per-token KL, right-padded rows of 1..T real tokens, NaN in the padding (it must not leak)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one full row
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T)
    kl = torch.randn(B, T, generator=g, dtype=torch.float64)  # k1 is negative on many tokens
    kl[~mask] = float("nan")
    scores = 2 * torch.randn(B, generator=g, dtype=torch.float64) + 1
    return scores, kl, mask, lengths.tolist()


def loop_returns(scores, kl, lengths, beta):
    """Per row: r_t = -beta KL_t, + the score on the last real token; G_t = sum of r_s for s = t .. last."""
    out = []
    for b, n in enumerate(lengths):
        r = [-beta * kl[b, t].item() for t in range(n)]
        r[n - 1] += scores[b].item()
        out.append([sum(r[t:]) for t in range(n)])
    return out


def loop_normalised(returns):
    """(G - mean) / sqrt(var + EPS), mean and Bessel var over every real token of the whole rollout."""
    flat = [g for row in returns for g in row]
    mean, var = statistics.fmean(flat), statistics.variance(flat)
    return [[(g - mean) / math.sqrt(var + EPS) for g in row] for row in returns]


def padded(rows, T):
    return torch.tensor([row + [0.0] * (T - len(row)) for row in rows], dtype=torch.float64)


def test_hand_checked():
    # beta 0.5; row 0: KL 0.5, 0.25, score 1 -> rewards -0.25, 0.875 -> returns 0.625, 0.875; row 1: KL 1, score 2
    # -> reward 1.5 -> return 1.5. Returns 0.625, 0.875, 1.5: mean 1, var (0.140625 + 0.015625 + 0.25) / 2 = 0.203125
    scores = torch.tensor([1.0, 2.0], dtype=torch.float64)
    kl = torch.tensor([[0.5, 0.25, 9.0], [1.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages, returns = reinforce_pp_advantages(scores, kl, mask, beta=0.5)
    assert returns.tolist() == [[0.625, 0.875, 0.0], [1.5, 0.0, 0.0]]
    std = math.sqrt(0.203125 + EPS)
    expected = torch.tensor([[-0.375 / std, -0.125 / std, 0.0], [0.5 / std, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_matches_loops_over_the_whole_rollout(seed, beta):
    scores, kl, mask, lengths = rollout(seed)
    advantages, returns = reinforce_pp_advantages(scores, kl, mask, beta)
    expected_returns = loop_returns(scores, kl, lengths, beta)
    T = mask.shape[1]
    torch.testing.assert_close(returns, padded(expected_returns, T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(advantages, padded(loop_normalised(expected_returns), T), rtol=1e-12, atol=1e-12)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()  # padding: exactly 0, no NaN
    real = advantages[mask]
    assert abs(real.mean().item()) < 1e-12 and abs(real.std().item() - 1) < 1e-6  # global, not per prompt


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("G", [2, 3])
def test_baseline_variant_is_reinforce_pp_of_scores_less_their_group_mean(seed, G):
    scores, kl, mask, lengths = rollout(seed, B=6)
    centred = []
    for i in range(6):  # each score minus the mean score of its group of G (contiguous), by a loop
        group = scores[i // G * G:i // G * G + G].tolist()
        centred.append(scores[i].item() - statistics.fmean(group))
    centred = torch.tensor(centred, dtype=torch.float64)
    advantages, returns = reinforce_pp_advantages(scores, kl, mask, 0.3, group_size=G)
    expected_advantages, expected_returns = reinforce_pp_advantages(centred, kl, mask, 0.3)
    torch.testing.assert_close(advantages, expected_advantages, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, expected_returns, rtol=1e-12, atol=1e-12)
    expected = loop_returns(centred, kl, lengths, 0.3)  # and against the loops directly
    torch.testing.assert_close(returns, padded(expected, mask.shape[1]), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(advantages, reinforce_pp_advantages(scores, kl, mask, 0.3)[0])  # it did something


def test_returns_to_go_equal_gae_with_no_values_at_gamma_lam_one():
    scores, kl, mask, _ = rollout(3)
    rewards = torch.where(mask, -0.2 * kl, torch.zeros_like(kl))
    expected, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns_to_go(rewards, mask), expected, rtol=1e-12, atol=1e-12)


def test_bad_input_raises():
    scores, kl, mask, _ = rollout(0, B=6)
    for G in (1, 4):  # a group of 1 has no baseline; 4 does not divide 6
        with pytest.raises(ValueError, match="group_size"):
            reinforce_pp_advantages(scores, kl, mask, 0.1, group_size=G)
    with pytest.raises(ValueError, match=r"scores \(B,\)"):
        reinforce_pp_advantages(scores[:5], kl, mask, 0.1)
    with pytest.raises(ValueError, match=r"scores \(B,\)"):
        reinforce_pp_advantages(scores, kl[:, :4], mask, 0.1)


# ------------------------------------------------------------------- the per-token loss (reinforce.py)
@pytest.mark.parametrize("seed", [0, 1])
def test_per_token_loss_and_gradient(seed):
    B, T, V = 5, 7, 11
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(V, (B, T), generator=g)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
    losses = reinforce_loss(logprobs, advantages, mask)
    expected = [-sum(advantages[b, t].item() * logprobs[b, t].item() for t in range(T) if mask[b, t]) for b in range(B)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    losses.sum().backward()
    # d(-A_t log softmax(z_t)_y)/dz_t = -A_t (onehot(y) - softmax(z_t)) at real tokens; padding gets no gradient
    onehot = torch.nn.functional.one_hot(tokens, V).double()
    expected_grad = -advantages[..., None] * (onehot - torch.softmax(logits.detach(), -1)) * mask[..., None]
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-12, atol=1e-12)
    # one advantage repeated on every token is REINFORCE's one per response
    row = advantages[:, 0]
    torch.testing.assert_close(reinforce_loss(logprobs, row[:, None].expand(B, T), mask),
                               reinforce_loss(logprobs, row, mask), rtol=1e-12, atol=1e-12)


def test_per_token_loss_padding_never_leaks():
    logprobs = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("inf"), 0.0]], requires_grad=True)
    advantages = torch.tensor([[2.0, -1.0, 0.0], [3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    losses = reinforce_loss(logprobs, advantages, mask)
    torch.testing.assert_close(losses, torch.tensor([0.0, 1.5]))  # -(2 (-1) + (-1)(-2)), -(3 (-0.5))
    losses.sum().backward()
    assert advantages.grad is None
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.0, 1.0, 0.0], [-3.0, 0.0, 0.0]]))
