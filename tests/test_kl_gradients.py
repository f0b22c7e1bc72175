"""What the KL estimators' GRADIENTS are, where the code puts them: in the reward (PPO, REINFORCE) or the loss (GRPO).

Exact enumeration in float64: a categorical policy pi = softmax(theta) over V tokens, a fixed pi_ref. An expectation
over sampled tokens is a sum over all V tokens weighted by the probability of sampling each, so the expected gradient
of what the code backpropagates is computed exactly, without Monte Carlo noise, and compared with autograd of the
closed forms KL(pi || pi_ref) and KL(pi_ref || pi) (torch.distributions):

    in the reward  E_{x~pi}[ sg(k(x)) grad log pi(x) ]   token_rewards -> gae -> ppo.policy_loss, or
                                                          per_token_kl -> reinforce.reinforce_loss (score function)
    in the loss    E_{x~sg(pi)}[ grad k(x; theta) ]       kl.k1 / k2 / k3 backpropagated; grpo.grpo_loss (pathwise)

The table these tests check, one row each (docs/kl.md), with grad KL = grad KL(pi || pi_ref):

    k1 in the reward  grad KL                              k1 in the loss  0
    k2 in the reward  grad E_pi[k2] - grad KL (biased)     k2 in the loss  grad KL (on-policy)
    k3 in the reward  grad KL - grad KL(pi_ref || pi)      k3 in the loss  grad KL(pi_ref || pi) (GRPO)

Then: samples from pi_old != pi (a second epoch), GRPO's --kl-loss choices (k3, k2, k3+) with and without the
off-policy weight sg(pi / pi_old), a top-k sampler, and responses of two tokens.
"""
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from minirlhf.gae import gae
from minirlhf.grpo import KL_LOSSES, grpo_loss
from minirlhf.kl import k1, k2, k3
from minirlhf.ppo import policy_loss
from minirlhf.reinforce import reinforce_loss
from minirlhf.sampling import SamplingSettings, sampling_logits
from minirlhf.token_rewards import per_token_kl, token_rewards

D = torch.float64
V = 7  # vocabulary of the one-token policy
SEEDS = (0, 1, 2, 3)
FAR, NEAR = 2.0, 1e-2  # theta = ref_logits + step * direction: KL 0.33 to 0.59 nats (FAR), ~1e-5 (NEAR)
EXACT = 1e-12  # relative error where the table says "equal"
ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def policy(seed, step):
    """(theta, ref_logits, direction) with theta = ref_logits + step * direction, all (V,)."""
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(V, generator=g, dtype=D)
    direction = torch.randn(V, generator=g, dtype=D)
    return ref_logits + step * direction, ref_logits, direction


def grad(fn, theta):
    """grad_theta fn(theta), float64 autograd."""
    theta = theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fn(theta), theta)[0]


def kl(p_logits, q_logits):
    """KL(softmax(p_logits) || softmax(q_logits)) over the last dim (torch.distributions, not minirlhf)."""
    return kl_divergence(Categorical(logits=p_logits), Categorical(logits=q_logits)).sum()


def rel(g, target):
    return ((g - target).norm() / target.norm()).item()


def cos(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


def grad_kl(theta, ref_logits):
    """grad KL(pi || pi_ref): what the penalty -beta KL(pi || pi_ref) of RLHF asks for."""
    return grad(lambda t: kl(t, ref_logits), theta)


def grad_kl_other_way(theta, ref_logits):
    """grad KL(pi_ref || pi): the other direction."""
    return grad(lambda t: kl(ref_logits, t), theta)


def grad_expected(estimator, theta, ref_logits):
    """grad E_{x~pi}[k(x)], the gradient of the estimator's expected VALUE (sampling distribution included)."""
    def expected(t):
        logp, ref_logp = torch.log_softmax(t, -1), torch.log_softmax(ref_logits, -1)
        return (logp.exp() * ESTIMATORS[estimator](logp, ref_logp)).sum()
    return grad(expected, theta)


def tokens(logits):
    """(V, 1): log pi(x) of every token x, one single-token response per row (the code's (B, R) log-prob tensors)."""
    return torch.log_softmax(logits, -1)[:, None]


ONE = torch.ones(V, 1, dtype=torch.bool)  # every row: one real response token


# ---- the two placements, through the project's code ------------------------------------------------------------------

def in_reward_ppo(estimator, ref_logits, old_logits=None, clip_eps=0.2):
    """PPO: the estimator, computed at rollout time from the SAMPLING policy's log-probs (no grad), becomes the reward
    -k (token_rewards, score 0, kl_coef 1), GAE (gamma = lam = 1, V = 0: A = r) and ppo.policy_loss on each sampled
    token, weighted by the probability that the sampling policy (pi itself, or old_logits') draws it."""
    def surrogate(theta):
        logprobs = tokens(theta)
        old = logprobs.detach() if old_logits is None else tokens(old_logits)
        rewards, _ = token_rewards(torch.zeros(V, dtype=D), old, tokens(ref_logits), ONE, 1.0, estimator)
        advantages, _ = gae(rewards, torch.zeros_like(rewards), ONE, 1.0, 1.0)
        weights = old.exp()[:, 0]
        return sum(weights[x] * policy_loss(logprobs[x:x + 1], old[x:x + 1], advantages[x:x + 1], ONE[x:x + 1],
                                            clip_eps)[0] for x in range(V))
    return surrogate


def in_reward_reinforce(estimator, ref_logits):
    """REINFORCE: R = score - kl_coef * sum_t per_token_kl (score 0, kl_coef 1), loss -R log pi(y) (reinforce_loss),
    weighted by pi(y)."""
    def surrogate(theta):
        logprobs = tokens(theta)
        returns = -per_token_kl(logprobs.detach(), tokens(ref_logits), ONE, estimator).sum(-1)  # (V,)
        return (logprobs.detach().exp()[:, 0] * reinforce_loss(logprobs, returns, ONE)).sum()
    return surrogate


def in_loss(estimator, ref_logits, old_logits=None, ratio=None):
    """The estimator backpropagated on the sampled tokens (kl.k1 / k2 / k3 as a loss term), in expectation over the
    sampling policy sg(pi) or pi_old. ratio: None (as GRPO does), "detached" (times sg(pi / pi_old)) or "with grad"
    (times pi / pi_old, its gradient kept)."""
    def surrogate(theta):
        logprobs = tokens(theta)
        old = logprobs.detach() if old_logits is None else tokens(old_logits)
        weights = old.exp()
        if ratio is not None:
            rho = torch.exp(logprobs - old)
            weights = weights * (rho.detach() if ratio == "detached" else rho)
        return (weights * ESTIMATORS[estimator](logprobs, tokens(ref_logits))).sum()
    return surrogate


def in_loss_grpo(ref_logits, old_logits=None, detached_ratio=False, kl_loss="k3", off_policy_weight=False):
    """grpo.grpo_loss (beta 1, advantages 0: its KL term alone) on each sampled token, weighted by the sampling
    policy; old_logits: the log-probs it is handed as old_logprobs too (a second epoch). detached_ratio: times
    sg(pi / pi_old) here, outside grpo_loss; kl_loss, off_policy_weight: grpo_loss's own (--kl-loss,
    --kl-off-policy-weight)."""
    def surrogate(theta):
        logprobs = tokens(theta)
        old = logprobs.detach() if old_logits is None else tokens(old_logits)
        weights = old.exp()[:, 0] * (torch.exp(logprobs - old).detach()[:, 0] if detached_ratio else 1)
        zero = torch.zeros(1, 1, dtype=D)
        return sum(weights[x] * grpo_loss(logprobs[x:x + 1], old[x:x + 1], tokens(ref_logits)[x:x + 1], zero,
                                          ONE[x:x + 1], beta=1.0, kl_loss=kl_loss,
                                          off_policy_weight=off_policy_weight)[0] for x in range(V))
    return surrogate


# ---- values (Schulman 2020): k1 and k3 unbiased, k2 biased -----------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_values_k1_k3_unbiased_k2_biased(seed):
    theta, ref_logits, _ = policy(seed, FAR)
    logp, ref_logp = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
    exact = kl(theta, ref_logits).item()
    expected = {name: (logp.exp() * k(logp, ref_logp)).sum().item() for name, k in ESTIMATORS.items()}
    assert expected["k1"] == pytest.approx(exact, rel=EXACT) and expected["k3"] == pytest.approx(exact, rel=EXACT)
    assert abs(expected["k2"] - exact) > 0.01 * exact


# ---- in the reward (score function): PPO and REINFORCE ---------------------------------------------------------------

@pytest.mark.parametrize("step", [FAR, NEAR])
@pytest.mark.parametrize("seed", SEEDS)
def test_k1_in_the_reward_is_the_kl_gradient(seed, step):
    theta, ref_logits, _ = policy(seed, step)
    target = grad_kl(theta, ref_logits)
    assert target.norm() > 1e-3
    for surrogate in (in_reward_ppo("k1", ref_logits), in_reward_reinforce("k1", ref_logits)):
        assert rel(grad(surrogate, theta), target) < EXACT


@pytest.mark.parametrize("seed", SEEDS)
def test_k2_in_the_reward_is_biased_and_vanishes_near_the_reference(seed):
    """E[k2 grad log pi] = grad E[k2] - grad KL: since k2 ~ KL to second order, it is O(step^2) near pi_ref while
    grad KL is O(step): a penalty that barely acts where it should start acting."""
    theta, ref_logits, _ = policy(seed, FAR)
    g = grad(in_reward_ppo("k2", ref_logits), theta)
    assert rel(g, grad(in_reward_reinforce("k2", ref_logits), theta)) < EXACT  # the two scripts agree
    assert rel(g, grad_expected("k2", theta, ref_logits) - grad_kl(theta, ref_logits)) < EXACT  # what it is
    assert rel(g, grad_kl(theta, ref_logits)) > 0.5  # biased
    theta, ref_logits, _ = policy(seed, NEAR)
    assert grad(in_reward_ppo("k2", ref_logits), theta).norm() < 0.02 * grad_kl(theta, ref_logits).norm()


@pytest.mark.parametrize("seed", SEEDS)
def test_k3_in_the_reward_is_grad_kl_minus_the_other_direction_and_has_wrong_signs(seed):
    theta, ref_logits, _ = policy(seed, FAR)
    g, target = grad(in_reward_ppo("k3", ref_logits), theta), grad_kl(theta, ref_logits)
    assert rel(g, grad(in_reward_reinforce("k3", ref_logits), theta)) < EXACT  # the two scripts agree
    assert rel(g, target - grad_kl_other_way(theta, ref_logits)) < EXACT  # what it is
    assert rel(g, target) > 0.5 and cos(g, target) < 0.5
    wrong = (g * target < 0) & (g.abs() > 0.01 * g.norm())  # components pushed the wrong way, not by rounding
    assert wrong.any()
    # vanishes to FIRST order near the reference: |g| / |grad KL| shrinks in proportion to the step
    ratios = []
    for step in (NEAR, NEAR / 10):
        theta, ref_logits, _ = policy(seed, step)
        ratios.append((grad(in_reward_ppo("k3", ref_logits), theta).norm() / grad_kl(theta, ref_logits).norm()).item())
    assert ratios[0] < 0.02 and 5 < ratios[0] / ratios[1] < 20


# ---- in the loss (pathwise): what autograd gives when the estimate of sampled tokens is backpropagated ---------------

@pytest.mark.parametrize("step", [FAR, NEAR])
@pytest.mark.parametrize("seed", SEEDS)
def test_k1_in_the_loss_has_no_gradient(seed, step):
    """E_pi[grad log pi] = 0: k1 as a loss term moves nothing, in expectation."""
    theta, ref_logits, _ = policy(seed, step)
    target = grad_kl(theta, ref_logits)
    assert grad(in_loss("k1", ref_logits), theta).norm() < EXACT * target.norm() and target.norm() > 1e-3


@pytest.mark.parametrize("step", [FAR, NEAR])
@pytest.mark.parametrize("seed", SEEDS)
def test_k2_in_the_loss_is_the_kl_gradient_on_policy(seed, step):
    theta, ref_logits, _ = policy(seed, step)
    assert rel(grad(in_loss("k2", ref_logits), theta), grad_kl(theta, ref_logits)) < EXACT


@pytest.mark.parametrize("seed", SEEDS)
def test_k3_in_the_loss_grpo_is_the_other_directions_gradient(seed):
    """GRPO's beta * k3 (DeepSeekMath Eq. 4, as a loss) differentiates to grad KL(pi_ref || pi): the other direction.
    The two directions agree to first order at pi_ref, not beyond."""
    theta, ref_logits, _ = policy(seed, FAR)
    g = grad(in_loss_grpo(ref_logits), theta)
    assert rel(g, grad(in_loss("k3", ref_logits), theta)) < EXACT  # grpo_loss's KL term is k3 in the loss
    assert rel(g, grad_kl_other_way(theta, ref_logits)) < EXACT
    assert rel(g, grad_kl(theta, ref_logits)) > 0.2
    theta, ref_logits, _ = policy(seed, NEAR)
    g = grad(in_loss_grpo(ref_logits), theta)
    assert rel(g, grad_kl_other_way(theta, ref_logits)) < EXACT and rel(g, grad_kl(theta, ref_logits)) < 0.05


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("seed", SEEDS)
def test_reward_part_plus_loss_part_is_the_gradient_of_the_expected_value(seed, estimator):
    """grad E_pi[k] = E[k grad log pi] + E[grad k]: each placement is one half of the product rule. Unbiased values
    (k1, k3) make the sum grad KL; neither half alone is, except k1's reward half."""
    theta, ref_logits, _ = policy(seed, FAR)
    both = grad(in_reward_ppo(estimator, ref_logits), theta) + grad(in_loss(estimator, ref_logits), theta)
    assert rel(both, grad_expected(estimator, theta, ref_logits)) < EXACT
    assert (rel(both, grad_kl(theta, ref_logits)) < EXACT) == (estimator != "k2")


# ---- off-policy: samples from pi_old != pi (ppo_epochs > 1, train_ppo.py's and train_grpo.py's default is 2) ------

def off_policy(seed):
    """(theta, ref_logits, old_logits): the policy moved away from the one that sampled (pi_old) after an update."""
    theta, ref_logits, _ = policy(seed, FAR)
    g = torch.Generator().manual_seed(100 + seed)
    return theta, ref_logits, theta - 0.7 * torch.randn(V, generator=g, dtype=D)


@pytest.mark.parametrize("seed", SEEDS)
def test_off_policy_k2_in_the_loss_needs_the_importance_ratio(seed):
    theta, ref_logits, old_logits = off_policy(seed)
    target = grad_kl(theta, ref_logits)
    assert rel(grad(in_loss("k2", ref_logits, old_logits), theta), target) > 0.1  # samples of pi_old: biased
    assert rel(grad(in_loss("k2", ref_logits, old_logits, ratio="detached"), theta), target) < EXACT  # x sg(rho)


@pytest.mark.parametrize("seed", SEEDS)
def test_off_policy_grpo_loss_is_neither_directions_gradient(seed):
    """grpo_loss backpropagates k3 of tokens sampled by pi_old with no ratio on the KL term: E_old[grad k3], neither
    grad KL(pi_ref || pi) (what it gives on-policy) nor grad KL(pi || pi_ref); times sg(pi / pi_old), the former."""
    theta, ref_logits, old_logits = off_policy(seed)
    g = grad(in_loss_grpo(ref_logits, old_logits), theta)
    assert rel(g, grad(in_loss("k3", ref_logits, old_logits), theta)) < EXACT
    assert rel(g, grad_kl_other_way(theta, ref_logits)) > 0.1 and rel(g, grad_kl(theta, ref_logits)) > 0.1
    corrected = grad(in_loss_grpo(ref_logits, old_logits, detached_ratio=True), theta)
    assert rel(corrected, grad_kl_other_way(theta, ref_logits)) < EXACT


# ---- GRPO's choices of KL term (grpo_loss kl_loss: --kl-loss) and its off-policy weight (--kl-off-policy-weight) --

CLAIMED = {"k3": grad_kl_other_way, "k2": grad_kl, "k3+": grad_kl}  # the expected gradient each choice claims
OTHER = {"k3": grad_kl, "k2": grad_kl_other_way, "k3+": grad_kl_other_way}


@pytest.mark.parametrize("kl_loss", KL_LOSSES)
@pytest.mark.parametrize("step", [FAR, NEAR])
@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_kl_loss_choices_give_the_gradient_they_claim_on_policy(seed, step, kl_loss):
    """k3: grad KL(pi_ref || pi); k2 and k3+: grad KL(pi || pi_ref). With or without the off-policy weight: on-policy
    it is exactly 1. Far from pi_ref the two directions differ, so the test tells them apart."""
    theta, ref_logits, _ = policy(seed, step)
    target = CLAIMED[kl_loss](theta, ref_logits)
    for weight in (False, True):
        g = grad(in_loss_grpo(ref_logits, kl_loss=kl_loss, off_policy_weight=weight), theta)
        assert rel(g, target) < EXACT
        if step == FAR:
            assert rel(g, OTHER[kl_loss](theta, ref_logits)) > 0.2


@pytest.mark.parametrize("kl_loss", KL_LOSSES)
@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_kl_loss_choices_off_policy_need_the_weight(seed, kl_loss):
    """Tokens of pi_old (a second epoch): without the weight no choice gives the gradient it claims; with
    off_policy_weight (sg(pi / pi_old) inside grpo_loss) each does again, as the weight applied outside it does."""
    theta, ref_logits, old_logits = off_policy(seed)
    target = CLAIMED[kl_loss](theta, ref_logits)
    assert rel(grad(in_loss_grpo(ref_logits, old_logits, kl_loss=kl_loss), theta), target) > 0.1
    g = grad(in_loss_grpo(ref_logits, old_logits, kl_loss=kl_loss, off_policy_weight=True), theta)
    assert rel(g, target) < EXACT
    assert rel(g, grad(in_loss_grpo(ref_logits, old_logits, detached_ratio=True, kl_loss=kl_loss), theta)) < EXACT


@pytest.mark.parametrize("off", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_kl_loss_values_k3_plus_logs_k3s_unbiased_value(seed, off):
    """The logged loss/kl: k3+'s value is k3's bit for bit; its expectation (times the off-policy weight on pi_old's
    tokens) is KL(pi || pi_ref), which k2's is not."""
    theta, ref_logits, old_logits = off_policy(seed)
    logprobs = tokens(theta)
    old = tokens(old_logits) if off else logprobs
    weights = old.exp()[:, 0]

    def logged(kl_loss):  # (V,) grpo_loss's stats["kl"] of each token
        zero = torch.zeros(1, 1, dtype=D)
        return torch.stack([grpo_loss(logprobs[x:x + 1], old[x:x + 1], tokens(ref_logits)[x:x + 1], zero,
                                      ONE[x:x + 1], beta=1.0, kl_loss=kl_loss, off_policy_weight=True)[1]["kl"]
                            for x in range(V)])
    assert torch.equal(logged("k3+"), logged("k3"))
    exact = kl(theta, ref_logits).item()
    assert (weights * logged("k3+")).sum().item() == pytest.approx(exact, rel=EXACT)
    assert abs((weights * logged("k2")).sum().item() - exact) > 0.01 * exact


@pytest.mark.parametrize("off", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_ratio_times_estimator_with_its_gradient_is_the_gradient_of_the_expected_value(seed, off):
    """rho * k with rho = pi / pi_old KEEPING its gradient (on-policy rho = 1, its gradient grad log pi): the product
    rule's two halves at once, so grad E_pi[k]: grad KL for k1 and k3 (unbiased values), not for k2."""
    theta, ref_logits, old_logits = off_policy(seed)
    old_logits = old_logits if off else None
    target = grad_kl(theta, ref_logits)
    for estimator in ("k1", "k3"):
        assert rel(grad(in_loss(estimator, ref_logits, old_logits, ratio="with grad"), theta), target) < EXACT
    g = grad(in_loss("k2", ref_logits, old_logits, ratio="with grad"), theta)
    assert rel(g, grad_expected("k2", theta, ref_logits)) < EXACT and rel(g, target) > 0.01


@pytest.mark.parametrize("seed", SEEDS)
def test_off_policy_k1_in_the_reward_is_frozen_at_the_rollout(seed):
    """PPO's second epoch: the reward -k1 was computed with pi_old's log-probs, the ratio of the unclipped PPO loss
    re-weights the samples to pi: grad KL(pi || pi_ref) - grad KL(pi || pi_old), exact again at the first epoch."""
    theta, ref_logits, old_logits = off_policy(seed)
    g = grad(in_reward_ppo("k1", ref_logits, old_logits, clip_eps=1e6), theta)
    target = grad_kl(theta, ref_logits)
    assert rel(g, target - grad_kl(theta, old_logits)) < EXACT and rel(g, target) > 0.1


# ---- a top-k sampler: the KL of the filtered distribution q, and what k3 reads of it ---------------------------------

@pytest.mark.parametrize("step", [0.0, FAR])  # 0: the untrained policy (pi = pi_ref) under the filter
@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_k3_under_reads_the_filtered_kl_by_the_reference_mass_cut(seed, step):
    """Sampled from q = top-k of pi (scored under q, as minirlhf does), pi_ref its plain softmax: k1 is unbiased for
    KL(q || pi_ref), but E_q[k3] = KL(q || pi_ref) - (1 - pi_ref(kept)), since E_q[pi_ref / q] = pi_ref(kept), not 1."""
    theta, ref_logits, _ = policy(seed, step)
    q_logits = sampling_logits(theta, SamplingSettings(top_k=3), 0)  # (V,), -inf off the kept set
    kept = torch.isfinite(q_logits)
    logq, ref_logp = torch.log_softmax(q_logits, -1)[kept], torch.log_softmax(ref_logits, -1)[kept]
    exact = kl(q_logits, ref_logits).item()
    cut = 1 - ref_logp.exp().sum().item()  # the reference's mass outside the kept set
    assert kept.sum() == 3 and cut > 0.05 and exact > 0.05
    assert (logq.exp() * k1(logq, ref_logp)).sum().item() == pytest.approx(exact, rel=EXACT)
    assert (logq.exp() * k3(logq, ref_logp)).sum().item() == pytest.approx(exact - cut, rel=EXACT, abs=EXACT)
    if step == 0:  # q = pi_ref cut and renormalised: KL = -log pi_ref(kept)
        assert exact == pytest.approx(-torch.log1p(torch.tensor(-cut, dtype=D)).item(), rel=EXACT)

    def filtered(t):  # (3,) log q of the kept tokens, q a function of theta through sampling_logits
        return torch.log_softmax(sampling_logits(t, SamplingSettings(top_k=3), 0), -1)[kept]

    def k1_in_the_reward(t):
        logq_t = filtered(t)
        return (logq_t.detach().exp() * k1(logq_t.detach(), ref_logp) * logq_t).sum()

    def filtered_kl(t):  # KL(q || pi_ref), summed over the kept set (q is 0 elsewhere)
        return (filtered(t).exp() * (filtered(t) - ref_logp)).sum()
    if step > 0:  # (at step 0, q is pi_ref cut and renormalised: the minimum of KL(q || pi_ref), gradient 0)
        assert rel(grad(k1_in_the_reward, theta), grad(filtered_kl, theta)) < EXACT


# ---- responses of two tokens: the sequence KL and the per-token penalties -------------------------------------------

W = 3  # vocabulary of the two-token policy: W * W responses


def tabular(seed):
    """(theta, ref): (1 + W, W) logits of a tabular autoregressive policy, row 0 the first token's, row 1 + a the
    second token's after a."""
    g = torch.Generator().manual_seed(200 + seed)
    ref = torch.randn(1 + W, W, generator=g, dtype=D)
    return ref + 1.5 * torch.randn(1 + W, W, generator=g, dtype=D), ref


def responses(logits):
    """(W * W, 2): per-token log-probs of every response (a, b), row a * W + b: the code's (B, R) tensor."""
    a, b = torch.arange(W).repeat_interleave(W), torch.arange(W).repeat(W)
    first, second = torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1:], -1)
    return torch.stack([first[a], second[a, b]], -1)


def response_kl(p_logits, q_logits):
    """KL between the two policies' distributions over whole responses: sum_y p(y) log p(y) / q(y)."""
    p, q = responses(p_logits).sum(-1), responses(q_logits).sum(-1)
    return (p.exp() * (p - q)).sum()


def per_position_kl(p_logits, q_logits, theta_is_p):
    """sum_t E_{prefix ~ sg(pi)}[KL_t(prefix)]: the per-token KLs with the prefix distribution held fixed (the sampled
    prefixes give no gradient). theta_is_p: KL(pi || pi_ref) per position, else KL(pi_ref || pi)."""
    pi = p_logits if theta_is_p else q_logits
    prefix = torch.softmax(pi[0], -1).detach()  # (W,)
    return kl(p_logits[0], q_logits[0]) + (prefix * kl_divergence(Categorical(logits=p_logits[1:]),
                                                                   Categorical(logits=q_logits[1:]))).sum()


@pytest.mark.parametrize("seed", SEEDS)
def test_two_tokens_reward_placement_is_the_sequence_kl_gradient(seed):
    """k1 per token in the reward, summed over the response (REINFORCE) or as per-token rewards through GAE with
    gamma = lam = 1 (PPO): the gradient of the sequence KL(pi || pi_ref)."""
    theta, ref = tabular(seed)
    mask = torch.ones(W * W, 2, dtype=torch.bool)
    target = grad(lambda t: response_kl(t, ref), theta)

    def reinforce(t):
        logprobs = responses(t)
        returns = -per_token_kl(logprobs.detach(), responses(ref), mask, "k1").sum(-1)
        return (logprobs.detach().sum(-1).exp() * reinforce_loss(logprobs, returns, mask)).sum()

    def ppo(t):
        logprobs = responses(t)
        rewards, _ = token_rewards(torch.zeros(W * W, dtype=D), logprobs.detach(), responses(ref), mask, 1.0, "k1")
        advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)  # reward-to-go
        weights = logprobs.detach().sum(-1).exp()
        return sum(weights[i] * policy_loss(logprobs[i:i + 1], logprobs.detach()[i:i + 1], advantages[i:i + 1],
                                            mask[i:i + 1], n_tokens=1)[0] for i in range(W * W))
    assert rel(grad(reinforce, theta), target) < EXACT and rel(grad(ppo, theta), target) < EXACT


@pytest.mark.parametrize("seed", SEEDS)
def test_two_tokens_loss_placement_is_a_partial_gradient(seed):
    """Backpropagating per-token k2 (or GRPO's k3) misses how the first token changes the second token's KL: the
    gradient of the per-position KLs with the prefixes' probabilities held fixed (Tang & Munos 2025). GRPO's is not
    the sequence KL(pi_ref || pi)'s either: that weighs the second position by pi_ref(a), GRPO by pi(a)."""
    theta, ref = tabular(seed)
    mask = torch.ones(W * W, 2, dtype=torch.bool)

    def k2_loss(t):
        logprobs = responses(t)
        return (logprobs.detach().sum(-1).exp()[:, None] * k2(logprobs, responses(ref))).sum()

    def grpo(t):
        logprobs, zero = responses(t), torch.zeros(1, 2, dtype=D)
        weights = logprobs.detach().sum(-1).exp()
        return sum(weights[i] * grpo_loss(logprobs[i:i + 1], logprobs.detach()[i:i + 1], responses(ref)[i:i + 1],
                                          zero, mask[i:i + 1], beta=1.0, n=1)[0] for i in range(W * W))
    def missed(t):  # the score-function half of the first token's effect: sum_a grad pi(a) * KL_2(a)
        second = kl_divergence(Categorical(logits=t[1:]), Categorical(logits=ref[1:])).detach()  # (W,) KL after a
        return (torch.softmax(t[0], -1) * second).sum()
    g, target = grad(k2_loss, theta), grad(lambda t: response_kl(t, ref), theta)
    assert rel(g, grad(lambda t: per_position_kl(t, ref, True), theta)) < EXACT
    assert rel(g + grad(missed, theta), target) < EXACT and rel(g, target) > 0.03
    g = grad(grpo, theta)
    assert rel(g, grad(lambda t: per_position_kl(ref, t, False), theta)) < EXACT
    assert rel(g, grad(lambda t: response_kl(ref, t), theta)) > 0.1
    assert rel(g, grad(lambda t: response_kl(t, ref), theta)) > 0.1


# ---- evaluation.sequence_kl, the x-axis of every table, against every response of a tiny model ----------------------

def test_sequence_kl_against_every_response_of_a_tiny_model():
    """A float64 tiny Llama over 3 tokens (EOS = 2) with a random policy adapter; two prompts (left-padded) and every
    response of at most 3 tokens (ended by EOS, or cut at 3; right-padded): 15 per prompt, 30 rows in one batch.
    Per row, sequence_kl is sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)) over the response's real tokens (compared
    with the model's own full logits, each row run alone, unpadded); averaged with weights pi(y|x) over all responses,
    it is the KL of the two distributions over whole responses, sum_y pi(y|x) log pi(y|x) / pi_ref(y|x)."""
    from conftest import make_tiny_llama
    from minirlhf import lora
    from minirlhf.evaluation import sequence_kl as evaluation_sequence_kl

    model = make_tiny_llama(dtype=D, vocab_size=3)
    lora.add_lora(model, "all-linear", r=2, alpha=4, adapter="policy")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in lora.lora_layers(model, "policy"):  # fresh adapters have B = 0: make the policy differ
            m.lora_B["policy"].weight.copy_(0.5 * torch.randn(m.lora_B["policy"].weight.shape, generator=g, dtype=D))
    eos, pad, longest = 2, 0, 3
    prompts = [[1], [1, 0, 1]]
    answers = [[eos]] + [[a, eos] for a in (0, 1)] + [[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1, 2)]
    rows = [(p, y) for p in prompts for y in answers]
    P = max(len(p) for p in prompts)
    ids, attention, response = (torch.zeros(len(rows), P + longest, dtype=torch.long) for _ in range(3))
    for i, (p, y) in enumerate(rows):  # prompt left-padded, response right-padded
        ids[i, P - len(p):P], ids[i, P:P + len(y)] = torch.tensor(p), torch.tensor(y)
        ids[i, P + len(y):] = pad
        attention[i, P - len(p):P + len(y)] = 1
        response[i, P:P + len(y)] = 1

    def conditionals(p, y):  # (len(y), 3) log pi(.|x, y_<t) at each response step, the row run alone
        logits = model(input_ids=torch.tensor([p + y])).logits[0, len(p) - 1:-1]
        return torch.log_softmax(logits.to(D), -1)

    with torch.no_grad():
        measured = evaluation_sequence_kl(model, ids, attention, response)  # (30,)
        per_row, logprob, ref_logprob = [], [], []
        for p, y in rows:
            logp = conditionals(p, y)
            with lora.adapters_disabled(model):
                ref_logp = conditionals(p, y)
            per_row.append((logp.exp() * (logp - ref_logp)).sum())
            logprob.append(logp[range(len(y)), y].sum())
            ref_logprob.append(ref_logp[range(len(y)), y].sum())
    per_row, logprob, ref_logprob = torch.stack(per_row), torch.stack(logprob), torch.stack(ref_logprob)
    # sequence_kl takes its logits in fp32 (`.float()`) even for a float64 model: agreement to fp32 rounding
    torch.testing.assert_close(measured.to(D), per_row, rtol=1e-5, atol=1e-6)
    for i in range(len(prompts)):
        rows_i = slice(i * len(answers), (i + 1) * len(answers))
        pi = logprob[rows_i].exp()
        assert pi.sum().item() == pytest.approx(1.0, abs=1e-12)  # every response enumerated
        whole = (pi * (logprob[rows_i] - ref_logprob[rows_i])).sum().item()  # KL over whole responses
        assert whole > 0.05 and (pi * per_row[rows_i]).sum().item() == pytest.approx(whole, rel=1e-12)  # chain rule
        assert (pi * measured[rows_i].to(D)).sum().item() == pytest.approx(whole, rel=1e-5)
