"""ppo.py: closed forms, the clip's gradient pattern, and an element-by-element float64 reference (tolerance 1e-12),
for the losses and for the per-token clipped surrogate they (and grpo.py's loss) reduce."""
import math

import pytest
import torch

from minirlhf.ppo import clipped_surrogate, policy_loss, token_mean, value_loss

TOL = dict(rtol=1e-12, atol=1e-12)


def _batch(seed, B=7, T=13, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old_logprobs = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    logprobs = old_logprobs + spread * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios on both sides
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    return logprobs, old_logprobs, advantages, mask


def reference_policy_loss(logprobs, old_logprobs, advantages, mask, eps):
    """Eq. 7, token by token with Python floats: mean over real tokens of -min(r A, clip(r) A)."""
    terms = []
    for lp, olp, a, m in zip(logprobs.flatten().tolist(), old_logprobs.flatten().tolist(),
                             advantages.flatten().tolist(), mask.flatten().tolist()):
        if m:
            r = math.exp(lp - olp)
            terms.append(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("weighted", [False, True])
def test_clipped_surrogate_matches_a_loop_over_tokens(seed, eps_high, weighted):
    logprobs, old_logprobs, advantages, mask = _batch(seed)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    eps = 0.2
    loss, clipped, ratio = clipped_surrogate(logprobs, old_logprobs, advantages, mask, eps, eps_high,
                                             weights if weighted else None)
    assert loss.shape == clipped.shape == ratio.shape == mask.shape and clipped.dtype == torch.bool
    high = eps if eps_high is None else eps_high
    for i, j in zip(*torch.where(mask)):  # Eq. 7 per real token, Python floats
        lp, olp, a, w = (t[i, j].item() for t in (logprobs, old_logprobs, advantages, weights))
        r = math.exp(lp - olp)
        unclipped, clipped_term = -a * r, -a * min(max(r, 1 - eps), 1 + high)
        assert abs(ratio[i, j].item() - r) < 1e-12
        assert abs(loss[i, j].item() - (w if weighted else 1) * max(unclipped, clipped_term)) < 1e-12
        assert clipped[i, j].item() == (clipped_term > unclipped)
    assert (ratio[~mask] == 1).all()  # padding: ratio 1
    assert clipped[mask].any() and not clipped[mask].all()  # both branches exercised


def test_policy_loss_is_the_token_mean_of_the_clipped_surrogate():
    logprobs, old_logprobs, advantages, mask = _batch(5)
    per_token, clipped, _ = clipped_surrogate(logprobs, old_logprobs, advantages, mask, 0.2)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    assert loss.item() == token_mean(per_token, mask).item()  # bit for bit
    assert stats["clipfrac"].item() == token_mean(clipped.double(), mask).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("clip_eps", [0.1, 0.2])
def test_policy_loss_matches_reference_and_stats(seed, clip_eps):
    logprobs, old_logprobs, advantages, mask = _batch(seed)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
    assert abs(loss.item() - reference_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)) < 1e-12
    ratio = torch.exp(logprobs - old_logprobs)
    binds = ((advantages > 0) & (ratio > 1 + clip_eps)) | ((advantages < 0) & (ratio < 1 - clip_eps))
    torch.testing.assert_close(stats["clipfrac"], binds[mask].double().mean(), **TOL)
    torch.testing.assert_close(stats["approx_kl"], ((ratio - 1) - torch.log(ratio))[mask].mean(), **TOL)
    assert 0 < stats["clipfrac"] < 1  # the test data really exercises both branches
    assert all(s.dim() == 0 and not s.requires_grad for s in stats.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_at_ratio_one_loss_is_minus_mean_advantage(seed):
    _, old_logprobs, advantages, mask = _batch(seed)
    logprobs = old_logprobs.clone().requires_grad_(True)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask)
    torch.testing.assert_close(loss, -advantages[mask].mean(), **TOL)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, -advantages * mask / mask.sum(), **TOL)  # the vanilla policy gradient
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gradient_is_zero_exactly_where_the_clip_binds(seed):
    logprobs, old_logprobs, advantages, mask = _batch(seed)
    logprobs.requires_grad_(True)
    clip_eps = 0.2
    loss, _ = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
    (grad,) = torch.autograd.grad(loss, logprobs)
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    binds = ((advantages > 0) & (ratio > 1 + clip_eps)) | ((advantages < 0) & (ratio < 1 - clip_eps))
    assert (binds & mask).any() and (~binds & mask).any()
    assert (grad[binds & mask] == 0).all()
    free = ~binds & mask
    assert (grad[free] != 0).all()
    torch.testing.assert_close(grad[free], (-advantages * ratio / mask.sum())[free], **TOL)  # d(-A r)/dlogp = -A r
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("seed", range(20))
def test_clipped_policy_loss_never_below_unclipped(seed):
    logprobs, old_logprobs, advantages, mask = _batch(seed, spread=1.0)
    loss, _ = policy_loss(logprobs, old_logprobs, advantages, mask)
    unclipped = (-advantages * torch.exp(logprobs - old_logprobs))[mask].mean()
    assert loss >= unclipped


def test_policy_loss_gradcheck():
    logprobs, old_logprobs, advantages, mask = _batch(7, B=3, T=5)
    logprobs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: policy_loss(lp, old_logprobs, advantages, mask)[0], (logprobs,))


@pytest.mark.parametrize("garbage", [1e9, float("inf"), float("nan")])
def test_padding_never_changes_policy_loss_or_gradient(garbage):
    logprobs, old_logprobs, advantages, mask = _batch(8)
    pad = ~mask
    clean_lp, dirty_lp = logprobs.clone().requires_grad_(True), logprobs.masked_fill(pad, garbage).requires_grad_(True)
    clean, clean_stats = policy_loss(clean_lp, old_logprobs, advantages, mask)
    dirty, dirty_stats = policy_loss(dirty_lp, old_logprobs.masked_fill(pad, -garbage),
                                     advantages.masked_fill(pad, garbage), mask)
    assert dirty.item() == clean.item()
    assert all(dirty_stats[k].item() == clean_stats[k].item() for k in clean_stats)
    (g_clean,), (g_dirty,) = torch.autograd.grad(clean, clean_lp), torch.autograd.grad(dirty, dirty_lp)
    torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=0)


def _value_batch(seed, B=7, T=13):
    g = torch.Generator().manual_seed(seed)
    old_values = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = old_values + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)
    return values, old_values, returns, mask


@pytest.mark.parametrize("seed", range(10))
def test_value_loss_matches_reference_and_never_below_unclipped(seed):
    values, old_values, returns, mask = _value_batch(seed)
    eps = 0.2
    loss, stats = value_loss(values, old_values, returns, mask, eps)
    terms, clipped = [], []
    for v, ov, r, m in zip(values.flatten().tolist(), old_values.flatten().tolist(), returns.flatten().tolist(),
                           mask.flatten().tolist()):
        if m:
            v_clip = min(max(v, ov - eps), ov + eps)
            terms.append(0.5 * max((v - r) ** 2, (v_clip - r) ** 2))
            clipped.append((v_clip - r) ** 2 > (v - r) ** 2)
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-12
    assert abs(stats["clipfrac"].item() - sum(clipped) / len(clipped)) < 1e-12
    assert loss >= 0.5 * ((values - returns) ** 2)[mask].mean()


def test_value_loss_unclipped_inside_band_and_zero_gradient_where_clip_binds():
    values, old_values, returns, mask = _value_batch(3)
    inside = old_values + 0.1 * torch.tanh(values - old_values)  # |v - v_old| < 0.2 everywhere
    loss, stats = value_loss(inside, old_values, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, 0.5 * ((inside - returns) ** 2)[mask].mean(), **TOL)
    assert stats["clipfrac"] == 0
    values.requires_grad_(True)
    loss, _ = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, values)
    v = values.detach()
    v_clip = old_values + (v - old_values).clamp(-0.2, 0.2)
    binds = ((v_clip - returns) ** 2 > (v - returns) ** 2) & mask
    assert binds.any() and (grad[binds] == 0).all()
    torch.testing.assert_close(grad[mask & ~binds], ((v - returns) / mask.sum())[mask & ~binds], **TOL)
    assert (grad[~mask] == 0).all()


def test_padding_never_changes_value_loss_or_gradient():
    values, old_values, returns, mask = _value_batch(4)
    clean_v, dirty_v = values.clone().requires_grad_(True), values.masked_fill(~mask, float("nan")).requires_grad_(True)
    clean, clean_stats = value_loss(clean_v, old_values, returns, mask)
    dirty, dirty_stats = value_loss(dirty_v, old_values.masked_fill(~mask, 1e9), returns.masked_fill(~mask, -1e9),
                                    mask)
    assert dirty.item() == clean.item() and dirty_stats["clipfrac"].item() == clean_stats["clipfrac"].item()
    (g_clean,), (g_dirty,) = torch.autograd.grad(clean, clean_v), torch.autograd.grad(dirty, dirty_v)
    torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=0)


def test_bad_input_raises():
    logprobs, old_logprobs, advantages, mask = _batch(0)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(logprobs[:, :-1], old_logprobs, advantages, mask)
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.0)
    with pytest.raises(ValueError, match="clip_eps"):
        value_loss(logprobs, old_logprobs, advantages, mask, clip_eps=-1.0)
