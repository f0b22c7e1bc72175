"""GRPO's per-token objective: PPO's clipped ratio on group-normalised advantages, plus a KL penalty in the loss (k3).

Legend: B responses (G per prompt, groups contiguous), T response tokens, L the most response tokens a rollout may
sample (--max-new-tokens). Inputs are (B, T); `mask` is 1 on real response tokens. Shao et al. 2024, "DeepSeekMath",
Eq. 3 (objective) and Eq. 4 (the KL estimate), as a loss per token:

    ratio_t = pi(o_t) / pi_old(o_t)
    loss_t  = max(-A * ratio_t, -A * clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high))  +  beta * k3_t
    k3_t    = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1          (>= 0, kl.k3; its gradient: below)

The first term is PPO's clipped surrogate, ppo.clipped_surrogate, with an upper bound of its own (clip_eps_high).
policy_loss replaces it (policy_losses.py): "gspo" clips one length-normalised ratio per response (GSPO), "cispo"
clips each token's ratio as a detached weight of its log-prob (CISPO); "ppo", the default, is the term above.
A is one number per response (baselines.group_advantages), copied to every token. Unlike PPO in RLHF, the KL to the
reference is not subtracted from the reward: it is a term of the loss, differentiated directly. k3's VALUE is an
unbiased estimate of KL(pi || pi_ref), but its expected GRADIENT on tokens sampled from pi is grad KL(pi_ref || pi), the
other direction (the "forward" KL, where RLHF's KL(pi || pi_ref) is the "reverse" one): beta * k3 in the loss
regularises toward pi_ref by KL(pi_ref || pi), as in DeepSeekMath (the two directions' gradients agree to first order
near pi_ref only). With ppo_epochs > 1 the tokens come from pi_old and the KL term carries no ratio: E_old[grad k3] is
neither direction's gradient (times sg(pi / pi_old) it would be KL(pi_ref || pi)'s). On whole responses the per-token
term also misses how earlier tokens change later tokens' KL. kl.py's table has every estimator and placement;
tests/test_kl_gradients.py checks them by exact enumeration (Tang & Munos 2025, "On a few pitfalls in KL divergence
gradient estimation for RL").

What the KL term is (kl_loss; its expected gradient on tokens sampled from pi, grad KL = grad KL(pi || pi_ref)):

    k3    k3_t                                   grad KL(pi_ref || pi)   DeepSeekMath's, the default
    k2    (log pi - log pi_ref)^2 / 2            grad KL                 the KL's own gradient, a biased logged value
    k3+   sg(k3_t) + k2_t - sg(k2_t)             grad KL                 k3's value (unbiased), k2's gradient

off_policy_weight multiplies the term by sg(pi / pi_old), the ratio of the clipped term, detached: on tokens of an
older policy (the epochs after the first) each choice then keeps the gradient it has on-policy; at the first epoch
pi = pi_old and the weight is exactly 1 (Zhang et al. 2025, "On the design of KL-regularized policy gradient
algorithms for LLM reasoning", the importance weight of each KL term). Off by default: DeepSeekMath's loss.

clip_eps_high: DAPO's "clip-higher" (Yu et al. 2025, "DAPO", Sec. 3.1). PPO's clip is symmetric (clip_eps_high =
clip_eps, the default): with A > 0 a token may gain at most a factor 1 + clip_eps per rollout, so a token at p = 0.01
can reach 0.012 while one at p = 0.9 can reach 1; the unlikely tokens never catch up and the policy's entropy
collapses. A larger upper bound (DAPO: 0.28 against 0.2) lets them grow; the lower bound stays 1 - clip_eps.

How the per-token losses become one number, the choice DeepSeekMath, DAPO and Dr. GRPO make differently (aggregate):

    sequence  1/B Σ_i 1/|o_i| Σ_t loss_it   each response's mean, then the mean of those (DeepSeekMath Eq. 3)
    token     1/Σ_i |o_i| Σ_i Σ_t loss_it   one mean of all tokens (DAPO Sec. 3.3, token-level policy-gradient loss)
    constant  1/(B L) Σ_i Σ_t loss_it       a constant normaliser (Dr. GRPO: Liu et al. 2025, "Understanding
                                            R1-Zero-Like Training: A Critical Perspective", Sec. 3.1)

Under "sequence" a token of a long response weighs 1/|o_i|: a long wrong answer is penalised less per token than a
short one, so wrong answers drift longer. "token" weighs every token of the minibatch alike; "constant" does too, and
its weight no longer depends on how long the minibatch's responses happen to be. minirlhf's default is "token" (what
it always did: DAPO's).
"""
import torch

from minirlhf.kl import k2, k3
from minirlhf.ops import masked_sum
from minirlhf.policy_losses import cispo_surrogate, gspo_surrogate
from minirlhf.ppo import clipped_surrogate, token_mean

AGGREGATIONS = ("token", "sequence", "constant")
KL_LOSSES = ("k3", "k2", "k3+")
SURROGATES = {"ppo": clipped_surrogate, "gspo": gspo_surrogate, "cispo": cispo_surrogate}  # (B, T) -> per-token
POLICY_LOSSES = tuple(SURROGATES)  # loss, clipped, ratio: ppo.py, policy_losses.py


def kl_term(logprobs, ref_logprobs, kl_loss="k3"):
    """The per-token KL term of the loss, (B, T) -> (B, T), by `kl_loss` (the table in the module's docstring): k3
    (gradient grad KL(pi_ref || pi)), k2 (grad KL(pi || pi_ref)) or k3+ (k3's value, k2's gradient: the straight-through
    sum sg(k3) + (k2 - sg(k2)), whose value is k3's bit for bit since k2 - sg(k2) is exactly 0)."""
    if kl_loss == "k3":
        return k3(logprobs, ref_logprobs)
    if kl_loss == "k2":
        return k2(logprobs, ref_logprobs)
    if kl_loss == "k3+":
        forward = k2(logprobs, ref_logprobs)
        return k3(logprobs, ref_logprobs).detach() + (forward - forward.detach())
    raise ValueError(f"kl_term: kl_loss must be one of {KL_LOSSES}, got {kl_loss!r}")


def aggregation_count(mask, aggregation):
    """What a minibatch's loss divides by, before constants: its real tokens ("token") or its responses (rows). mask
    (B, T) -> a number. A script computes it once per minibatch and passes it as n to each micro-batch's aggregate."""
    return mask.sum().clamp(min=1) if aggregation == "token" else mask.shape[0]  # (>= 1: a minibatch whose
    # responses --mismatch-mask-threshold all dropped has no token, and its loss is 0, not 0 / 0)


def aggregate(x, mask, aggregation="token", n=None, max_len=None):
    """Per-token values x (B, T) -> a scalar, by `aggregation` (the table in the module's docstring).

    n: x is one micro-batch of a minibatch whose aggregation_count is n; the micro-batches' results (and gradients)
    then add up to the minibatch's exactly (ppo.token_mean's convention). None: x is the whole minibatch.
    max_len: L of "constant" (--max-new-tokens)."""
    if aggregation == "token":
        return token_mean(x, mask, n)  # sum over the real tokens / their count
    n = mask.shape[0] if n is None else n  # the minibatch's responses
    if aggregation == "sequence":
        lengths = mask.sum(dim=1).clamp(min=1)  # (B,) |o_i|
        return (masked_sum(x, mask, dim=1) / lengths).sum() / n  # (B, T) -> (B,) per-response means -> scalar
    if aggregation == "constant":
        if max_len is None or not max_len > 0:
            raise ValueError(f"aggregate: 'constant' needs max_len > 0 (L), got {max_len}")
        return masked_sum(x, mask) / (n * max_len)
    raise ValueError(f"aggregate: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps=0.2, beta=0.04, n=None,
              aggregation="token", max_len=None, clip_eps_high=None, kl_loss="k3", off_policy_weight=False,
              tis_weights=None, policy_loss="ppo"):
    """Scalar GRPO loss = clipped policy loss + beta * the KL term to the reference, each reduced by `aggregation`;
    and detached stats, reduced the same way: pg_loss, kl (the KL term's value), clipfrac (where the clip binds: zero
    gradient there; under "token" the share of the tokens; for gspo / cispo: policy_losses.py) and approx_kl (k3
    between pi_old and pi, as ppo.policy_loss's).

    n: the minibatch's aggregation_count when these tensors are one micro-batch of it (aggregate). max_len: L of
    "constant". clip_eps_high: the upper clip 1 + clip_eps_high (DAPO clip-higher); None: clip_eps, symmetric.
    kl_loss: k3 | k2 | k3+ (kl_term). off_policy_weight: the KL term times sg(pi / pi_old) (module docstring).
    tis_weights: (B, T) detached weights of each token's clipped term, not of the KL term (mismatch.tis_weights:
    truncated importance sampling of the sampler's tokens, with old_logprobs the trainer's); None: none.
    policy_loss: the clipped term, ppo | gspo | cispo (POLICY_LOSSES: ppo.clipped_surrogate, or policy_losses.py's
    gspo_surrogate / cispo_surrogate, with the same clip bounds)."""
    if any(t.shape != mask.shape for t in (logprobs, old_logprobs, ref_logprobs, advantages)):
        raise ValueError(f"grpo_loss: all inputs must share the mask's shape {tuple(mask.shape)}, got "
                         f"{[tuple(t.shape) for t in (logprobs, old_logprobs, ref_logprobs, advantages)]}")
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (clip_eps > 0 and clip_eps_high > 0):
        raise ValueError(f"grpo_loss: clip_eps and clip_eps_high must be > 0, got {clip_eps}, {clip_eps_high}")
    if policy_loss not in SURROGATES:
        raise ValueError(f"grpo_loss: policy_loss must be one of {POLICY_LOSSES}, got {policy_loss!r}")
    mask = mask.bool()
    pg_per_token, clipped, ratio = SURROGATES[policy_loss](logprobs, old_logprobs, advantages, mask, clip_eps,
                                                           clip_eps_high, tis_weights)  # (B, T) each
    pg_loss = aggregate(pg_per_token, mask, aggregation, n, max_len)  # scalar
    per_token_kl = kl_term(logprobs, ref_logprobs, kl_loss)  # (B, T); its gradient flows to pi
    if off_policy_weight:
        per_token_kl = ratio.detach() * per_token_kl  # (B, T) x sg(pi / pi_old): 1 at the first epoch
    kl = aggregate(per_token_kl, mask, aggregation, n, max_len)  # scalar
    with torch.no_grad():
        stats = {
            "clipfrac": aggregate(clipped.to(logprobs.dtype), mask, aggregation, n, max_len),
            "approx_kl": aggregate(k3(old_logprobs, logprobs.detach()), mask, aggregation, n, max_len),
            "kl": kl.detach(), "pg_loss": pg_loss.detach(),
        }
    return pg_loss + beta * kl, stats
