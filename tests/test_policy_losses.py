"""policy_losses.py through grpo.grpo_loss (policy_loss "gspo" and "cispo"): a response-by-response float64 reference
with Python floats (1e-12) for every aggregation, with and without TIS weights and the KL term; the gradients against
their closed forms (GSPO: -A_i s_i / |y_i| per token where the clip does not bind, 0 for all of a response's tokens
where it does; CISPO: -w_t A_t on every token, where PPO's clip gives 0 to some); ratio 1 gives -mean(A); clipfrac
as the fraction of responses (GSPO) / of tokens (CISPO) clipped; a hand-made response on which GSPO and PPO differ;
micro-batches that add up to the minibatch exactly; and train_grpo.py's --policy-loss checks. Micro-batches through
train_grpo.minibatch_gradient: tests/test_memory.py."""
import math
import os

import pytest
import torch

from minirlhf.cli import parse_args
from minirlhf.errors import InputError
from minirlhf.grpo import AGGREGATIONS, grpo_loss
from test_grpo import aggregate_rows, assert_micro_batches_add_up

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(seed, B=7, T=13, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    logprobs = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()  # one A per response
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)
    tis = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    return logprobs, old, ref, advantages, mask, tis


def clip(x, low, high):
    return min(max(x, low), high)


def reference(logprobs, old, ref, advantages, mask, policy_loss, eps, eps_high, beta, aggregation, L, tis=None):
    """Each response's per-token values with Python floats, reduced by hand (token: sum / #tokens; sequence: mean of
    the rows' means; constant: sum / (#rows * L)). GSPO: the response's loss max(-A s, -A clip(s)) on each token,
    s = exp(mean of its log ratios); CISPO: -clip(r_t) A log pi_t per token; each times its TIS weight; + beta k3."""
    tis = torch.ones_like(logprobs) if tis is None else tis
    rows = []
    for lp_r, o_r, r_r, a_r, m_r, w_r in zip(*(t.tolist() for t in (logprobs, old, ref, advantages, mask, tis))):
        real = [j for j, m in enumerate(m_r) if m]
        s = math.exp(sum(lp_r[j] - o_r[j] for j in real) / len(real))
        row = []
        for j in real:
            lp, o, r, a, w = lp_r[j], o_r[j], r_r[j], a_r[j], w_r[j]
            if policy_loss == "gspo":
                pg = -min(s * a, clip(s, 1 - eps, 1 + eps_high) * a)
            else:
                pg = -clip(math.exp(lp - o), 1 - eps, 1 + eps_high) * a * lp
            row.append(w * pg + beta * (math.exp(r - lp) - (r - lp) - 1))
        rows.append(row)
    return aggregate_rows(rows, aggregation, L)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("policy_loss,eps,eps_high", [("gspo", 0.05, 0.08), ("gspo", 3e-4, 4e-4),
                                                      ("cispo", 0.2, 0.28), ("cispo", 1.0, 0.28)])
@pytest.mark.parametrize("beta,with_tis", [(0.0, False), (0.1, True)])
def test_matches_float64_reference(seed, aggregation, policy_loss, eps, eps_high, beta, with_tis):
    logprobs, old, ref, advantages, mask, tis = _batch(seed, spread=0.1 if eps < 1e-3 else 0.5)
    tis = tis if with_tis else None
    loss, stats = grpo_loss(logprobs, old, ref, advantages, mask, clip_eps=eps, beta=beta, aggregation=aggregation,
                            max_len=17, clip_eps_high=eps_high, tis_weights=tis, policy_loss=policy_loss)
    expected = reference(logprobs, old, ref, advantages, mask, policy_loss, eps, eps_high, beta, aggregation, 17, tis)
    assert abs(loss.item() - expected) < 1e-12
    assert set(stats) == {"clipfrac", "approx_kl", "kl", "pg_loss"}


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_gradient_is_the_closed_form(aggregation, seed):
    """d loss / d log pi_t = -A_i s_i / |y_i| / B ("sequence") or -A_i s_i / Σ|y| ("token") on every token of an
    unclipped response, 0 on every token of a response whose clip binds in its advantage's direction; clipfrac under
    "sequence" is the fraction of responses clipped."""
    logprobs, old, ref, advantages, mask, _ = _batch(seed)
    eps, eps_high = 0.05, 0.08
    logprobs.requires_grad_(True)
    loss, stats = grpo_loss(logprobs, old, ref, advantages, mask, clip_eps=eps, beta=0.0, aggregation=aggregation,
                            clip_eps_high=eps_high, policy_loss="gspo")
    loss.backward()
    expected = torch.zeros_like(old)
    n_clipped, B, N = 0, mask.shape[0], int(mask.sum())
    for i in range(B):
        real = [j for j in range(mask.shape[1]) if mask[i, j]]
        s = math.exp(sum(logprobs[i, j].item() - old[i, j].item() for j in real) / len(real))
        a = advantages[i, 0].item()
        if (a > 0 and s > 1 + eps_high) or (a < 0 and s < 1 - eps):
            n_clipped += 1  # the whole response: gradient 0
            continue
        for j in real:
            expected[i, j] = -a * s / (len(real) * B if aggregation == "sequence" else N)
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=1e-14)
    assert 0 < n_clipped < B  # both cases occur in this batch
    if aggregation == "sequence":
        assert abs(stats["clipfrac"].item() - n_clipped / B) < 1e-12


def test_cispo_gradient_is_minus_weight_times_advantage_on_every_token():
    """d loss / d log pi_t = -clip(r_t) A_t / #tokens exactly ("token"), nonzero on every real token, the tokens
    where PPO's clip gives 0 included; clipfrac is the fraction of tokens whose r_t is outside the bounds."""
    logprobs, old, ref, advantages, mask, _ = _batch(5)
    eps, eps_high = 0.2, 0.28
    grads = {}
    for policy_loss in ("cispo", "ppo"):
        lp = logprobs.clone().requires_grad_(True)
        loss, stats = grpo_loss(lp, old, ref, advantages, mask, clip_eps=eps, beta=0.0, clip_eps_high=eps_high,
                                policy_loss=policy_loss)
        loss.backward()
        grads[policy_loss] = (lp.grad, stats)
    expected, outside = torch.zeros_like(old), 0
    N = int(mask.sum())
    for i, j in mask.nonzero().tolist():
        r = math.exp(logprobs[i, j].item() - old[i, j].item())
        outside += not (1 - eps <= r <= 1 + eps_high)
        expected[i, j] = -clip(r, 1 - eps, 1 + eps_high) * advantages[i, j].item() / N
    grad, stats = grads["cispo"]
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    assert (grad[mask] != 0).all()
    assert (grads["ppo"][0][mask] == 0).any()  # PPO drops some of these tokens; CISPO none
    assert outside > 0 and abs(stats["clipfrac"].item() - outside / N) < 1e-12


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_ratio_one_gives_minus_mean_advantage(aggregation):
    """pi = pi_old = pi_ref: GSPO's loss is -A aggregated (s = 1, no clip); CISPO's gradient is REINFORCE's, -A."""
    logprobs, _, _, advantages, mask, _ = _batch(3)
    loss, stats = grpo_loss(logprobs, logprobs.clone(), logprobs.clone(), advantages, mask, beta=0.5,
                            aggregation=aggregation, policy_loss="gspo")
    a, lengths = advantages[:, 0], mask.sum(1)
    expected = -a.mean() if aggregation == "sequence" else -(a * lengths).sum() / lengths.sum()
    assert abs(loss.item() - expected.item()) < 1e-12 and stats["clipfrac"] == 0 and stats["kl"] == 0
    lp = logprobs.clone().requires_grad_(True)
    grpo_loss(lp, logprobs.clone(), logprobs.clone(), advantages, mask, beta=0.0, policy_loss="cispo")[0].backward()
    torch.testing.assert_close(lp.grad, torch.where(mask, -advantages / mask.sum(), 0.0), rtol=1e-12, atol=0)


def test_gspo_and_ppo_on_a_hand_made_response():
    """One response, A = 1, log ratios +0.5 and -0.5, clip 0.2. PPO: token 1 (ratio e^0.5 = 1.65) is clipped, loss
    -1.2, gradient 0; token 2 (e^-0.5) unclipped, gradient -e^-0.5. GSPO: s = e^0 = 1, loss -1, gradient -1/2 each."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask, a = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.float64)
    for policy_loss, loss_, grad_ in [("ppo", -(1.2 + math.exp(-0.5)) / 2, [0.0, -math.exp(-0.5) / 2]),
                                      ("gspo", -1.0, [-0.5, -0.5])]:
        lp = torch.tensor([[0.5, -0.5]], dtype=torch.float64, requires_grad=True)
        loss, stats = grpo_loss(lp, old, lp.detach(), a, mask, beta=0.0, aggregation="sequence",
                                policy_loss=policy_loss)
        loss.backward()
        assert abs(loss.item() - loss_) < 1e-12 and torch.allclose(lp.grad, torch.tensor([grad_], dtype=torch.float64))
        assert stats["clipfrac"].item() == (0.5 if policy_loss == "ppo" else 0.0)


@pytest.mark.parametrize("policy_loss", ["gspo", "cispo"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_add_up_to_the_minibatch_exactly(policy_loss, aggregation):
    """7 rows in one piece vs 3 + 1 + 3 rows, each given the minibatch's aggregation_count n (train_grpo.py's): the
    losses, stats and gradients add up (float64, 1e-12); with TIS weights and the KL term's off-policy weight."""
    logprobs, old, ref, advantages, mask, tis = _batch(6)
    kwargs = dict(clip_eps=0.05, beta=0.3, aggregation=aggregation, max_len=13, clip_eps_high=0.08,
                  off_policy_weight=True, policy_loss=policy_loss)
    stats, _ = assert_micro_batches_add_up(logprobs, old, ref, advantages, mask, tis, **kwargs)  # test_grpo.py's
    assert 0 < stats["clipfrac"] < 1


def test_unknown_policy_loss_is_refused():
    logprobs, old, ref, advantages, mask, _ = _batch(0)
    with pytest.raises(ValueError, match="policy_loss"):
        grpo_loss(logprobs, old, ref, advantages, mask, policy_loss="dapo")


def test_train_grpo_checks_policy_loss_and_lets_cispo_drop_the_lower_clip(monkeypatch):
    """--policy-loss is one of ppo | gspo | cispo (default ppo); --clip-high below --clip-eps is refused but for
    cispo, whose two bounds are independent (MiniMax-M1: --clip-eps 1 --clip-high 0.28, no lower bound)."""
    monkeypatch.syspath_prepend(REPO)
    module = __import__("train_grpo")
    assert parse_args(module.Args, []).policy_loss == "ppo"
    with pytest.raises(InputError, match=r"--policy-loss must be one of \('ppo', 'gspo', 'cispo'\), got 'dapo'"):
        module.check_args(parse_args(module.Args, ["--policy-loss", "dapo"]))
    no_lower = ["--clip-eps", "1", "--clip-high", "0.28"]
    module.check_args(parse_args(module.Args, ["--policy-loss", "cispo", *no_lower]))
    for policy_loss in ("ppo", "gspo"):
        with pytest.raises(InputError, match="--clip-high 0.28 is below --clip-eps 1"):
            module.check_args(parse_args(module.Args, ["--policy-loss", policy_loss, *no_lower]))
    module.check_args(parse_args(module.Args, ["--policy-loss", "gspo", "--clip-eps", "3e-4", "--clip-high", "4e-4"]))
