"""kl.py: Monte Carlo against the exact KL of two categoricals, torch.distributions, closed forms (float64)."""
import json

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from minirlhf.kl import AdaptiveKLController, exact_kl, k1, k2, k3


@pytest.mark.parametrize("seed", [0, 1])
def test_k1_and_k3_sample_means_converge_to_exact_kl(seed):
    """200k samples from pi; tolerance = 5 standard errors of each estimator's sample mean (and at most 0.01)."""
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(7, generator=g, dtype=torch.float64)
    ref_logits = 1.5 * torch.randn(7, generator=g, dtype=torch.float64)
    logp, ref_logp = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    exact = (logp.exp() * (logp - ref_logp)).sum().item()
    x = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)  # tokens sampled from pi
    # k2 is biased: its expectation is E_pi[logr^2 / 2], not the KL
    k2_expectation = (logp.exp() * 0.5 * (logp - ref_logp) ** 2).sum().item()
    for estimator, target in ((k1, exact), (k3, exact), (k2, k2_expectation)):
        est = estimator(logp[x], ref_logp[x])
        tol = 5 * est.std().item() / len(x) ** 0.5
        assert tol < 0.02 < abs(k2_expectation - exact)  # tight enough to tell a biased estimator apart
        assert abs(est.mean().item() - target) < tol, estimator.__name__
    assert (k1(logp[x], ref_logp[x]) < 0).any()  # k1 is negative on some tokens yet unbiased: the "negative KL"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k2_k3_non_negative_and_zero_exactly_when_equal(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = -5 * torch.rand(7, 13, generator=g, dtype=torch.float64)
    scale = torch.logspace(-12, 1, 13, dtype=torch.float64)  # differences from 1e-12 up to 10
    ref_logprobs = logprobs + scale * torch.randn(7, 13, generator=g, dtype=torch.float64)
    logprobs, ref_logprobs = logprobs.to(dtype), ref_logprobs.to(dtype)
    for estimator in (k2, k3):
        assert (estimator(logprobs, ref_logprobs) >= 0).all()
        assert (estimator(logprobs, logprobs) == 0).all()
    different = (logprobs - ref_logprobs).abs() > 1e-6
    assert (k3(logprobs, ref_logprobs)[different] > 0).all() and (k2(logprobs, ref_logprobs)[different] > 0).all()


def test_estimators_closed_forms():
    logprobs, ref_logprobs = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64), torch.tensor(
        [-1.5, -1.0, -0.5], dtype=torch.float64)
    logr = ref_logprobs - logprobs  # [-0.5, 1.0, 0.0]
    torch.testing.assert_close(k1(logprobs, ref_logprobs), torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(k2(logprobs, ref_logprobs), torch.tensor([0.125, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(k3(logprobs, ref_logprobs), torch.exp(logr) - 1 - logr, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_kl_matches_torch_distributions(seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(3, 7, 13, generator=g, dtype=torch.float64)
    ref_logits = 3 * torch.randn(3, 7, 13, generator=g, dtype=torch.float64)
    expected = kl_divergence(Categorical(logits=logits), Categorical(logits=ref_logits))  # (3, 7)
    torch.testing.assert_close(exact_kl(logits, ref_logits), expected, rtol=1e-12, atol=1e-12)
    assert (exact_kl(logits, logits + 4.2).abs() < 1e-12).all()  # logits are shift invariant: KL(pi || pi) = 0


def test_exact_kl_gradcheck():
    logits = torch.randn(2, 11, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(2, 11, dtype=torch.float64)
    assert torch.autograd.gradcheck(exact_kl, (logits, ref_logits))


def test_adaptive_controller_closed_form():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    assert ctl.update(6.6, n_steps=256) == pytest.approx(0.2 * (1 + 0.1 * 256 / 10_000), rel=1e-14)  # above: up
    v = ctl.value
    assert ctl.update(3.0, n_steps=256) == pytest.approx(v * (1 - 0.2 * 256 / 10_000), rel=1e-14)  # below: down
    assert ctl.value < v


@pytest.mark.parametrize("far, near", [(100.0, 7.2), (0.0, 4.8)])
def test_adaptive_controller_error_is_clipped(far, near):
    """KL = 100 and KL = 7.2 both give error +0.2 against target 6; KL = 0 and 4.8 both give -0.2."""
    a, b = AdaptiveKLController(0.1, 6.0, 1000), AdaptiveKLController(0.1, 6.0, 1000)
    a.update(far, 100), b.update(near, 100)
    sign = 1 if far > 6 else -1
    assert a.value == b.value == pytest.approx(0.1 * (1 + sign * 0.2 * 0.1), rel=1e-14)


def test_adaptive_controller_state_round_trip():
    ctl = AdaptiveKLController(0.05, 3.0, 500)
    for kl in (1.0, 5.0, 3.3):
        ctl.update(torch.tensor(kl), 64)  # a 0-dim tensor is accepted
    resumed = AdaptiveKLController(1.0, 1.0, 1.0)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))  # survives a JSON checkpoint
    for kl in (0.2, 8.0, 2.9):
        assert ctl.update(kl, 64) == resumed.update(kl, 64)  # bit-identical continuation


def test_bad_input_raises():
    with pytest.raises(ValueError, match="must be > 0"):
        AdaptiveKLController(0.0, 6.0, 1000)
    ctl = AdaptiveKLController(0.1, 6.0, 1000)
    with pytest.raises(ValueError, match="finite KL"):
        ctl.update(float("nan"), 10)
    with pytest.raises(ValueError, match="too large"):
        ctl.update(0.0, 10_000)
    with pytest.raises(ValueError, match="shapes differ"):
        k3(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="shapes differ"):
        exact_kl(torch.zeros(2, 5), torch.zeros(2, 6))
