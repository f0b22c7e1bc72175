"""grpo.py: a token-by-token float64 reference (1e-12) for every aggregation and clip-higher, -mean(A) at ratio 1 with
beta = 0, zero gradient where the clip binds, the KL term's gradient against its closed form, each aggregation on a
hand-made tensor, micro-batches that add up to the minibatch exactly, and the default bit-identical to PPO-clip + k3;
the KL term's choices (kl_loss) and the off-policy weight against a float64 reference, the weight exactly 1 at the
first epoch. What each choice's gradient is: tests/test_kl_gradients.py."""
import math

import pytest
import torch

from minirlhf.grpo import AGGREGATIONS, KL_LOSSES, aggregate, aggregation_count, grpo_loss
from minirlhf.kl import k2, k3
from minirlhf.ppo import policy_loss, token_mean


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


def aggregate_rows(rows, aggregation, L):
    """The loss from per-token terms, a list per response (its real tokens only), by hand: token (over all real
    tokens), sequence (each response's mean, then their mean) or constant (over responses x L)."""
    if aggregation == "token":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if aggregation == "sequence":
        return sum(sum(row) / len(row) for row in rows) / len(rows)
    return sum(map(sum, rows)) / (len(rows) * L)


def reference_variants(logprobs, old, ref, advantages, mask, eps, beta, aggregation, L, eps_high):
    """The same loss per token with Python floats (upper clip 1 + eps_high), reduced by `aggregation` by hand:
    token: sum / #tokens; sequence: mean over rows of each row's mean; constant: sum / (#rows * L)."""
    rows = []
    for lp_r, o_r, r_r, a_r, m_r in zip(*(t.tolist() for t in (logprobs, old, ref, advantages, mask))):
        row = []
        for lp, o, r, a, m in zip(lp_r, o_r, r_r, a_r, m_r):
            if m:
                ratio = math.exp(lp - o)
                row.append(-min(ratio * a, min(max(ratio, 1 - eps), 1 + eps_high) * a)
                           + beta * (math.exp(r - lp) - (r - lp) - 1))
        rows.append(row)
    return aggregate_rows(rows, aggregation, L)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_aggregations_and_clip_high_match_float64_reference(seed, aggregation, eps_high):
    batch = _batch(seed)
    loss, _ = grpo_loss(*batch, clip_eps=0.2, beta=0.1, aggregation=aggregation, max_len=17, clip_eps_high=eps_high)
    expected = reference_variants(*batch, 0.2, 0.1, aggregation, 17, 0.2 if eps_high is None else eps_high)
    assert abs(loss.item() - expected) < 1e-12


def test_each_aggregation_on_a_hand_made_tensor():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]], dtype=torch.float64)  # the 9s are padding
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(x, mask, "token").item() == 10 / 4  # DAPO: (1 + 2 + 3 + 4) / 4 tokens
    assert aggregate(x, mask, "sequence").item() == (2 + 4) / 2  # DeepSeekMath: row means 2 and 4, then their mean
    assert aggregate(x, mask, "constant", max_len=5).item() == 10 / (2 * 5)  # Dr. GRPO: / (2 rows x L = 5)
    assert aggregation_count(mask, "token").item() == 4 and aggregation_count(mask, "sequence") == 2
    # through the loss at ratio 1, beta 0: -A aggregated; row 1 has A = 2 on 3 tokens, row 2 has A = -6 on 1
    lp = torch.zeros(2, 3, dtype=torch.float64)
    advantages = torch.tensor([[2.0] * 3, [-6.0] * 3], dtype=torch.float64)
    loss = {a: grpo_loss(lp, lp, lp, advantages, mask, beta=0.0, aggregation=a, max_len=4)[0].item()
            for a in AGGREGATIONS}
    assert loss == {"token": -(3 * 2 - 6) / 4, "sequence": -(2 - 6) / 2, "constant": -(3 * 2 - 6) / (2 * 4)}
    # the length bias of "sequence": a long and a short wrong answer (A = -1), per token
    long_short = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    lp4 = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    grpo_loss(lp4, lp4.detach(), lp4.detach(), -torch.ones(2, 4, dtype=torch.float64), long_short, beta=0.0,
              aggregation="sequence")[0].backward()
    assert lp4.grad[0, 0].item() == 1 / 8 and lp4.grad[1, 0].item() == 1 / 2  # the long one's tokens: 4x less push


def test_clip_high_on_single_tokens():
    """ratio 1.25 with A = 1: the symmetric clip (1.2) binds, loss -1.2, zero gradient; with clip_eps_high 0.28 it
    does not, loss -1.25 and gradient -A ratio. ratio 0.75 with A = -1: the lower clip 0.8 binds either way."""
    mask = torch.ones(1, 1)
    for ratio, a, eps_high, loss_, grad in [(1.25, 1.0, None, -1.2, 0.0), (1.25, 1.0, 0.28, -1.25, -1.25),
                                            (0.75, -1.0, None, 0.8, 0.0), (0.75, -1.0, 0.28, 0.8, 0.0)]:
        logprobs = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, 1, dtype=torch.float64)
        loss, stats = grpo_loss(logprobs, zero, logprobs.detach(), torch.full((1, 1), a, dtype=torch.float64), mask,
                                clip_eps=0.2, beta=0.0, clip_eps_high=eps_high)
        loss.backward()
        assert abs(loss.item() - loss_) < 1e-12 and abs(logprobs.grad.item() - grad) < 1e-12
        assert stats["clipfrac"].item() == (1.0 if grad == 0 else 0.0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_micro_batches_add_up_to_the_minibatch_exactly(aggregation, seed):
    """One minibatch of 7 rows vs micro-batches of 3 + 1 + 3 rows, each given the minibatch's aggregation_count:
    losses, stats and gradients add up to the one-piece ones (float64, 1e-12)."""
    logprobs, old, ref, advantages, mask = _batch(seed)
    stats, grad = assert_micro_batches_add_up(logprobs, old, ref, advantages, mask, clip_eps=0.2, beta=0.3,
                                              aggregation=aggregation, max_len=13, clip_eps_high=0.28)
    assert 0 < stats["clipfrac"] < 1 and (grad != 0).any()


def assert_micro_batches_add_up(logprobs, old, ref, advantages, mask, tis=None, **kwargs):
    """grpo_loss on 7 rows in one piece vs on 3 + 1 + 3 rows, each given the minibatch's aggregation_count (as
    train_grpo.minibatch_gradient does): losses, stats and gradients add up (float64, 1e-12). Returns the one-piece
    stats and gradient for the caller's own checks. tis: (7, T) TIS weights or None."""
    def loss_of(lp, rows, n=None):
        return grpo_loss(lp[rows], old[rows], ref[rows], advantages[rows], mask[rows], n=n,
                         tis_weights=None if tis is None else tis[rows], **kwargs)
    whole = logprobs.clone().requires_grad_(True)
    loss, stats = loss_of(whole, slice(None))
    loss.backward()
    n = aggregation_count(mask, kwargs.get("aggregation", "token"))
    pieces = logprobs.clone().requires_grad_(True)
    total_loss, total_stats = 0.0, {k: 0.0 for k in stats}
    for rows in torch.arange(7).split([3, 1, 3]):
        part, part_stats = loss_of(pieces, rows, n)
        part.backward()
        total_loss = total_loss + part.detach()
        total_stats = {k: total_stats[k] + part_stats[k] for k in stats}
    torch.testing.assert_close(total_loss, loss.detach(), rtol=1e-12, atol=1e-12)
    for k in stats:
        torch.testing.assert_close(total_stats[k], stats[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pieces.grad, whole.grad, rtol=1e-12, atol=1e-12)
    return stats, whole.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_is_bit_identical_to_ppo_clip_plus_token_mean_k3(seed):
    """The defaults (token aggregation, symmetric clip) are what grpo_loss computed before the options existed:
    ppo.policy_loss + beta * token_mean(k3), bit for bit, in one piece and as a micro-batch (n given)."""
    logprobs, old, ref, advantages, mask = (t.float() if t.is_floating_point() else t for t in _batch(seed))
    for n in (None, mask[:4].sum()):
        loss, stats = grpo_loss(logprobs[:4], old[:4], ref[:4], advantages[:4], mask[:4], 0.2, 0.04, n)
        pg, pg_stats = policy_loss(logprobs[:4], old[:4], advantages[:4], mask[:4], 0.2, n)
        kl = token_mean(k3(logprobs[:4], ref[:4]), mask[:4], n)
        assert torch.equal(loss, pg + 0.04 * kl) and torch.equal(stats["kl"], kl)
        assert torch.equal(stats["clipfrac"], pg_stats["clipfrac"]) and torch.equal(stats["approx_kl"],
                                                                                    pg_stats["approx_kl"])


def kl_reference(logprobs, old, ref, mask, kl_loss, weighted):
    """The logged KL term with Python floats: mean over real tokens of k3 (k3, k3+) or k2, times pi / pi_old."""
    terms = []
    for lp, o, r, m in zip(*(t.flatten().tolist() for t in (logprobs, old, ref, mask))):
        if m:
            term = (r - lp) ** 2 / 2 if kl_loss == "k2" else math.exp(r - lp) - (r - lp) - 1
            terms.append(term * (math.exp(lp - o) if weighted else 1.0))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kl_loss", KL_LOSSES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_loss_choices_match_float64_reference(seed, kl_loss, weighted):
    logprobs, old, ref, advantages, mask = _batch(seed)
    _, stats = grpo_loss(logprobs, old, ref, advantages, mask, beta=0.5, kl_loss=kl_loss, off_policy_weight=weighted)
    assert abs(stats["kl"].item() - kl_reference(logprobs, old, ref, mask, kl_loss, weighted)) < 1e-12


@pytest.mark.parametrize("kl_loss", KL_LOSSES)
def test_off_policy_weight_is_exactly_one_at_the_first_epoch(kl_loss):
    """pi_old = pi (the first epoch): the weighted loss and its gradient equal the unweighted ones bit for bit; on
    pi_old's tokens (later epochs) they differ. And k3+ has k3's value and k2's gradient, bit for bit."""
    logprobs, old, ref, advantages, mask = (t.float() if t.is_floating_point() else t for t in _batch(0))
    results = {}
    for first_epoch in (True, False):
        for weighted in (False, True):
            x = logprobs.clone().requires_grad_(True)
            loss, _ = grpo_loss(x, x.detach() if first_epoch else old, ref, advantages, mask, beta=0.5,
                                kl_loss=kl_loss, off_policy_weight=weighted)
            loss.backward()
            results[first_epoch, weighted] = loss.detach(), x.grad
    assert all(torch.equal(a, b) for a, b in zip(results[True, False], results[True, True]))
    assert not torch.equal(results[False, False][1], results[False, True][1])
    x = logprobs.clone().requires_grad_(True)
    loss, stats = grpo_loss(x, old, ref, torch.zeros_like(advantages), mask, beta=1.0, kl_loss="k3+")  # KL term alone
    assert torch.equal(stats["kl"], token_mean(k3(logprobs, ref), mask))
    assert torch.equal(torch.autograd.grad(loss, x)[0], torch.autograd.grad(token_mean(k2(x, ref), mask), x)[0])


def test_bad_options_raise():
    logprobs, old, ref, advantages, mask = _batch(0)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        grpo_loss(logprobs, old, ref, advantages, mask, aggregation="mean")
    with pytest.raises(ValueError, match="max_len"):
        grpo_loss(logprobs, old, ref, advantages, mask, aggregation="constant")
    with pytest.raises(ValueError, match="clip_eps_high"):
        grpo_loss(logprobs, old, ref, advantages, mask, clip_eps_high=0.0)
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(logprobs, old, ref[:, :3], advantages, mask)
    with pytest.raises(ValueError, match="kl_loss must be one of"):
        grpo_loss(logprobs, old, ref, advantages, mask, kl_loss="k1")
