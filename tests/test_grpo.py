"""grpo.py: a token-by-token float64 reference (1e-12), -mean(A) at ratio 1 with beta = 0, zero gradient where the
clip binds, and the KL term's gradient against its closed form."""
import math

import pytest
import torch

from minirlhf.grpo import grpo_loss


def _batch(seed, B=7, T=13):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    logprobs = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()  # one A per response
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)
    return logprobs, old, ref, advantages, mask


def reference(logprobs, old, ref, advantages, mask, eps, beta):
    """DeepSeekMath Eq. 3-4 as a loss, with Python floats: mean over real tokens of the clipped term + beta k3."""
    pg, kl = [], []
    for lp, o, r, a, m in zip(*(t.flatten().tolist() for t in (logprobs, old, ref, advantages, mask))):
        if m:
            ratio = math.exp(lp - o)
            pg.append(-min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a))
            kl.append(math.exp(r - lp) - (r - lp) - 1)
    return sum(pg) / len(pg) + beta * sum(kl) / len(kl)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
def test_matches_float64_reference(seed, beta):
    batch = _batch(seed)
    loss, stats = grpo_loss(*batch, clip_eps=0.2, beta=beta)
    assert abs(loss.item() - reference(*batch, 0.2, beta)) < 1e-12
    assert stats["kl"] >= 0 and set(stats) >= {"clipfrac", "approx_kl", "kl", "pg_loss"}


def test_ratio_one_and_no_kl_gives_minus_mean_advantage():
    logprobs, _, _, advantages, mask = _batch(3)
    loss, stats = grpo_loss(logprobs, logprobs.clone(), logprobs.clone(), advantages, mask, beta=0.5)
    expected = -(advantages * mask).sum() / mask.sum()  # pi = pi_old = pi_ref: ratio 1, k3 = 0
    assert abs(loss.item() - expected.item()) < 1e-12
    assert stats["kl"] == 0 and stats["clipfrac"] == 0


def test_gradient_zero_where_clipped_and_kl_gradient_closed_form():
    logprobs, old, ref, advantages, mask = _batch(4)
    logprobs.requires_grad_(True)
    beta, eps = 0.3, 0.2
    grpo_loss(logprobs, old, ref, advantages, mask, clip_eps=eps, beta=beta)[0].backward()
    ratio = torch.exp(logprobs.detach() - old)
    binds = ((advantages > 0) & (ratio > 1 + eps)) | ((advantages < 0) & (ratio < 1 - eps))
    n = mask.sum()
    # d/dlogp [beta k3] = beta (1 - exp(ref - logp)) / n on real tokens; the clipped term adds -A ratio / n where the
    # clip does not bind and nothing where it does
    kl_grad = beta * (1 - torch.exp(ref - logprobs.detach())) / n
    pg_grad = torch.where(binds, torch.zeros_like(ratio), -advantages * ratio / n)
    expected = torch.where(mask, pg_grad + kl_grad, torch.zeros_like(ratio))
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=1e-12)
    assert binds[mask].any() and (~binds[mask]).any()  # both cases occur in this batch
