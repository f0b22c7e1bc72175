"""dpo.py against closed forms written independently with Python floats (float64, tolerance 1e-12)."""
import math

import pytest
import torch

from minirlhf.dpo import dpo_loss, ipo_loss, kto_loss, kto_reference_point, preference_loss, rpo_nll


def _logps(seed, B=13):
    g = torch.Generator().manual_seed(seed)
    return [-50 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4)]  # sums of token log-probs


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def margins(c, r, rc, rr):
    return [(a - b) - (d - e) for a, d, b, e in zip(c.tolist(), r.tolist(), rc.tolist(), rr.tolist())]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_matches_closed_form(seed, beta, eps):
    c, r, rc, rr = _logps(seed)
    losses, chosen_rewards, rejected_rewards = dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x) for x in margins(c, r, rc, rr)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, beta * (c - rc), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, beta * (r - rr), rtol=1e-12, atol=1e-12)


def test_label_smoothing_zero_is_plain_dpo():
    c, r, rc, rr = _logps(3)
    assert torch.equal(dpo_loss(c, r, rc, rr, 0.2, 0.0)[0], dpo_loss(c, r, rc, rr, 0.2)[0])
    assert torch.equal(dpo_loss(c, r, rc, rr, 0.2)[0], -torch.nn.functional.logsigmoid(0.2 * ((c - rc) - (r - rr))))


@pytest.mark.parametrize("seed", [0, 1])
def test_policy_equal_to_reference_gives_log_two(seed):
    c, r, _, _ = _logps(seed)
    losses, chosen_rewards, rejected_rewards = dpo_loss(c, r, c.clone(), r.clone(), beta=0.3)
    torch.testing.assert_close(losses, torch.full_like(c, math.log(2)), rtol=0, atol=1e-15)
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_swapping_chosen_and_rejected_maps_x_to_minus_x(seed):
    c, r, rc, rr = _logps(seed)
    beta = 0.1
    swapped, sw_chosen, sw_rejected = dpo_loss(r, c, rr, rc, beta=beta)
    expected = [-log_sigmoid(-beta * x) for x in margins(c, r, rc, rr)]
    torch.testing.assert_close(swapped, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    losses, chosen_rewards, rejected_rewards = dpo_loss(c, r, rc, rr, beta=beta)
    torch.testing.assert_close(swapped - losses, beta * torch.tensor(margins(c, r, rc, rr), dtype=torch.float64))
    assert torch.equal(sw_chosen, rejected_rewards) and torch.equal(sw_rejected, chosen_rewards)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_raises_chosen_and_lowers_rejected(seed):
    c, r, rc, rr = _logps(seed)
    c.requires_grad_(True), r.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(c, r, rc, rr, beta=0.1)
    grad_c, grad_r = torch.autograd.grad(losses.sum(), (c, r))
    assert (grad_c < 0).all() and (grad_r > 0).all()  # a descent step increases chosen_logps, decreases rejected
    torch.testing.assert_close(grad_c, -grad_r)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_gradcheck():
    c, r, rc, rr = (t[:5] / 10 for t in _logps(4))
    inputs = tuple(t.clone().requires_grad_(True) for t in (c, r, rc, rr))
    assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, beta=0.5, label_smoothing=0.1)[0], inputs)
    assert torch.autograd.gradcheck(lambda *a: ipo_loss(*a, beta=0.5)[0], inputs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_matches_closed_form(seed, beta):
    c, r, rc, rr = _logps(seed)
    losses, chosen_rewards, _ = ipo_loss(c, r, rc, rr, beta=beta)
    expected = [(x - 1 / (2 * beta)) ** 2 for x in margins(c, r, rc, rr)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, beta * (c - rc))


def test_ipo_is_zero_at_its_target_margin():
    beta = 0.25  # target x = 1 / (2 beta) = 2
    c, r = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -12.0])
    losses, _, _ = ipo_loss(c, r, torch.zeros(2), torch.zeros(2), beta=beta)
    assert (losses == 0).all()


def test_extreme_margins_stay_finite():
    c, r = torch.tensor([1e4, -1e4, 0.0]), torch.tensor([-1e4, 1e4, 0.0])
    zeros = torch.zeros(3)
    losses, _, _ = dpo_loss(c, r, zeros, zeros, beta=1.0, label_smoothing=0.1)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses[:2], torch.tensor([0.1 * 2e4, 0.9 * 2e4]))


def test_bad_input_raises():
    c, r, rc, rr = _logps(0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(c, r, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        ipo_loss(c, r, rc, rr, beta=-1.0)
    for eps in (-0.1, 0.5):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(c, r, rc, rr, label_smoothing=eps)
    with pytest.raises(ValueError, match="share one shape"):
        dpo_loss(c, r[:-1], rc, rr)


def _lengths(seed, B=13):
    return torch.randint(1, 40, (B,), generator=torch.Generator().manual_seed(100 + seed)).to(torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rpo_nll_matches_closed_form(seed):
    """-log pi(y_c|p) / |y_c| per pair, against Python floats (RPO, Pang et al. 2024, Eq. 1)."""
    c, lengths = _logps(seed)[0], _lengths(seed)
    expected = [-lp / n for lp, n in zip(c.tolist(), lengths.tolist())]
    torch.testing.assert_close(rpo_nll(c, lengths), torch.tensor(expected, dtype=torch.float64), rtol=1e-12,
                               atol=1e-12)
    per_token = torch.full((13,), -0.7, dtype=torch.float64)  # a response whose every token has log-prob -0.7
    assert torch.allclose(rpo_nll(per_token * lengths, lengths), torch.full_like(lengths, 0.7), rtol=0, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_rpo_gradient_raises_the_chosen_logprob(seed):
    """d rpo_nll / d chosen_logps = -1/|y_c| < 0, so a descent step raises log pi(y_c|p). Added to DPO it makes the
    chosen gradient strictly more negative and leaves the rejected gradient as it was."""
    c, r, rc, rr = _logps(seed)
    lengths, alpha = _lengths(seed), 0.7
    c.requires_grad_(True), r.requires_grad_(True)
    (grad_nll,) = torch.autograd.grad(rpo_nll(c, lengths).sum(), c)
    torch.testing.assert_close(grad_nll, -1 / lengths, rtol=1e-12, atol=1e-12)
    assert (grad_nll < 0).all()
    dpo = dpo_loss(c, r, rc, rr, beta=0.1)[0]
    grad_c, grad_r = torch.autograd.grad(dpo.sum(), (c, r), retain_graph=True)
    grad_c_rpo, grad_r_rpo = torch.autograd.grad((dpo + alpha * rpo_nll(c, lengths)).sum(), (c, r))
    torch.testing.assert_close(grad_c_rpo, grad_c - alpha / lengths, rtol=1e-12, atol=1e-12)
    assert (grad_c_rpo < grad_c).all() and torch.equal(grad_r_rpo, grad_r)


def test_rpo_counters_a_falling_chosen_likelihood():
    """DPO's loss falls when BOTH log-probs fall, the rejected one faster (likelihood displacement): its gradient
    along that direction is negative. RPO's term rises along it, and with alpha large enough the sum does too."""
    c, r, zeros, lengths = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.zeros(1), torch.tensor([10.0])
    direction = torch.tensor([-1.0, -3.0])  # d(chosen), d(rejected): both fall, the rejected three times as fast

    def slope(alpha):
        x = torch.stack([c, r]).requires_grad_(True)
        loss = dpo_loss(x[0], x[1], zeros, zeros, beta=0.1)[0] + alpha * rpo_nll(x[0], lengths)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        return (grad.flatten() * direction).sum().item()
    assert slope(0.0) < 0 < slope(10.0)


def test_rpo_bad_input_raises():
    c = _logps(0)[0]
    with pytest.raises(ValueError, match="share one shape"):
        rpo_nll(c, _lengths(0)[:-1])
    with pytest.raises(ValueError, match="at least one token"):
        rpo_nll(c, torch.zeros_like(c))


def reference_pair_loss(pol, ref, length, loss, beta, eps, alpha, average):
    """One pair by hand in Python floats: pol, ref, length are (chosen, rejected) pairs of numbers."""
    comp = [p / n for p, n in zip(pol, length)] if average else list(pol)
    x = (comp[0] - ref[0]) - (comp[1] - ref[1])
    logsig = lambda z: -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))  # noqa: E731
    value = (x - 1 / (2 * beta)) ** 2 if loss == "ipo" else -(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x)
    return value + alpha * (-pol[0] / length[0]), beta * (comp[0] - ref[0]), beta * (comp[1] - ref[1])


@pytest.mark.parametrize("loss,eps", [("sigmoid", None), ("cdpo", None), ("cdpo", 0.25), ("ipo", None)])
@pytest.mark.parametrize("alpha,average", [(0.0, False), (0.5, False), (0.0, True), (1.0, True)])
def test_preference_loss_matches_the_loss_written_by_hand(loss, eps, alpha, average):
    """dpo.preference_loss, the script's whole per-pair loss (chosen rows first, lengths, averaging, the cdpo default
    ε = 0.1, RPO's term), against each pair computed by hand in float64."""
    g = torch.Generator().manual_seed(3)
    B, beta = 5, 0.3
    pol = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 20
    lengths = torch.randint(1, 9, (2 * B,), generator=g).double()
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 20
    ref = ref / lengths if average else ref
    losses, stats = preference_loss(pol, ref, lengths, loss, beta, eps, alpha, average)
    e = (0.1 if loss == "cdpo" else 0.0) if eps is None else eps
    for i in range(B):
        want, r_c, r_r = reference_pair_loss((pol[i].item(), pol[B + i].item()), (ref[i].item(), ref[B + i].item()),
                                             (lengths[i].item(), lengths[B + i].item()), loss, beta, e, alpha,
                                             average)
        assert losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert stats["rewards/chosen"][i].item() == pytest.approx(r_c, rel=1e-12, abs=1e-12)
        assert stats["rewards/margins"][i].item() == pytest.approx(r_c - r_r, rel=1e-12, abs=1e-12)
        assert stats["rewards/accuracies"][i].item() == float(r_c > r_r)
    assert ("nll/chosen" in stats) == (alpha > 0)
    assert list(stats)[:6] == ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                               "logps/chosen", "logps/rejected"]


def test_preference_loss_refuses_what_it_cannot_mean():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(x, x, x + 1, "sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss must be one of"):
        preference_loss(x, x, x + 1, "orpo")
    with pytest.raises(ValueError, match="z0"):
        preference_loss(x, x, x + 1, "kto")  # KTO without its reference point
    with pytest.raises(ValueError, match="z0"):
        preference_loss(x, x, x + 1, "sigmoid", z0=0.5)
    with pytest.raises(ValueError, match="z0"):
        preference_loss(x, x, x + 1, "kto", z0=0.5, average=True)
    with pytest.raises(ValueError, match=r"\(2B,\)"):
        preference_loss(torch.zeros(3), torch.zeros(3), torch.ones(3))


# ---- KTO (Ethayarajh et al. 2024, Eq. 8) ---------------------------------------------------------------------------
def kto_by_hand(pol, ref, desirable, z0, beta, lambda_d, lambda_u):
    """One example in Python floats: lambda_y - v(x, y) with v = lambda_y sigmoid(+-beta (r - z0))."""
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    r = pol - ref
    return lambda_d * (1 - sigmoid(beta * (r - z0))) if desirable else lambda_u * (1 - sigmoid(beta * (z0 - r)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta,lambda_d,lambda_u", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7)])
@pytest.mark.parametrize("z0", [0.0, 2.5, "tensor"])
def test_kto_matches_closed_form(seed, beta, lambda_d, lambda_u, z0):
    c, r, rc, rr = _logps(seed)
    pol, ref = torch.cat([c, r]).requires_grad_(), torch.cat([rc, rr])  # 26 examples
    desirable = torch.rand(26, generator=torch.Generator().manual_seed(seed + 7)) < 0.5
    z = torch.tensor(1.7, dtype=torch.float64, requires_grad=True) if z0 == "tensor" else z0
    losses, rewards = kto_loss(pol, ref, desirable, z, beta, lambda_d, lambda_u)
    z_value = 1.7 if z0 == "tensor" else z0
    expected = [kto_by_hand(p, q, d, z_value, beta, lambda_d, lambda_u)
                for p, q, d in zip(pol.tolist(), ref.tolist(), desirable.tolist())]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rewards, beta * (pol - ref).detach(), rtol=1e-12, atol=1e-12)
    assert 0 < desirable.sum() < 26 and not rewards.requires_grad
    if z0 == "tensor":
        losses.sum().backward()
        assert z.grad is None  # the reference point is a constant of the loss


def test_kto_gradient_signs_and_values():
    """A descent step raises a desirable response's log-prob and lowers an undesirable one's; the gradient is
    -/+ lambda beta s (1 - s), s = sigmoid(beta (r - z0)) for a desirable y, sigmoid(beta (z0 - r)) for an undesirable
    one, written by hand."""
    pol = torch.tensor([-3.0, -8.0, -1.0, -12.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -6.0, -2.5, -11.0], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False])
    beta, z0, lambda_d, lambda_u = 0.5, 0.8, 1.2, 0.9
    losses, _ = kto_loss(pol, ref, desirable, z0, beta, lambda_d, lambda_u)
    losses.sum().backward()
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    for i, (p, q, d) in enumerate(zip(pol.tolist(), ref.tolist(), desirable.tolist())):
        s = sigmoid(beta * ((p - q) - z0)) if d else sigmoid(beta * (z0 - (p - q)))
        want = -lambda_d * beta * s * (1 - s) if d else lambda_u * beta * s * (1 - s)
        assert pol.grad[i].item() == pytest.approx(want, rel=1e-12)
    assert (pol.grad[:2] < 0).all() and (pol.grad[2:] > 0).all()


def test_kto_at_the_reference_with_z0_zero_is_half_lambda():
    """pi = pi_ref and z0 = 0: every example sits at sigmoid(0) = 1/2, so its loss is lambda_y / 2."""
    x = torch.full((4,), -5.0)
    losses, _ = kto_loss(x, x, torch.tensor([True, False, True, False]), 0.0, 0.3, 2.0, 0.5)
    assert losses.tolist() == [1.0, 0.25, 1.0, 0.25]


def test_kto_reference_point_is_the_clamped_mean_log_ratio():
    pol = torch.tensor([-3.0, -8.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -6.0, -2.5], dtype=torch.float64)
    z0 = kto_reference_point(pol, ref)
    assert z0.item() == pytest.approx((1.0 - 2.0 + 1.5) / 3, rel=1e-12) and not z0.requires_grad
    assert kto_reference_point(ref, pol).item() == 0.0  # a negative mean log-ratio: a KL is never below 0
    with pytest.raises(ValueError):
        kto_reference_point(pol, ref[:2])


def test_kto_bad_input_raises():
    x = torch.zeros(4)
    d = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="bool"):
        kto_loss(x, x, d.float(), 0.0)
    with pytest.raises(ValueError, match="shape"):
        kto_loss(x, x[:3], d, 0.0)
    for bad in [dict(beta=0.0), dict(lambda_d=0.0), dict(lambda_u=-1.0)]:
        with pytest.raises(ValueError, match="> 0"):
            kto_loss(x, x, d, 0.0, **bad)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_preference_loss_kto_is_the_mean_of_a_desirable_and_an_undesirable_example(alpha):
    """--loss kto on pairs: the chosen response desirable, the rejected one undesirable; a pair's loss is the mean of
    the two examples' (by hand, float64), + RPO's term; kl/z0 logged last."""
    g = torch.Generator().manual_seed(5)
    B, beta, z0, lambda_d, lambda_u = 4, 0.4, 1.1, 1.3, 0.8
    pol = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 20
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 20
    lengths = torch.randint(1, 9, (2 * B,), generator=g).double()
    losses, stats = preference_loss(pol, ref, lengths, "kto", beta, rpo_alpha=alpha,
                                    z0=torch.tensor(z0, dtype=torch.float64), desirable_weight=lambda_d,
                                    undesirable_weight=lambda_u)
    for i in range(B):
        chosen = kto_by_hand(pol[i].item(), ref[i].item(), True, z0, beta, lambda_d, lambda_u)
        rejected = kto_by_hand(pol[B + i].item(), ref[B + i].item(), False, z0, beta, lambda_d, lambda_u)
        want = (chosen + rejected) / 2 + alpha * (-pol[i].item() / lengths[i].item())
        assert losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert stats["rewards/rejected"][i].item() == pytest.approx(beta * (pol[B + i] - ref[B + i]).item(), rel=1e-12)
    assert list(stats)[-1] == "kl/z0" and stats["kl/z0"].tolist() == [z0] * B
    assert ("nll/chosen" in stats) == (alpha > 0)
