"""GRPO's per-token objective: PPO's clipped ratio on group-normalised advantages, plus a k3 KL penalty in the loss.

Legend: B responses (G per prompt, groups contiguous), T response tokens. Inputs are (B, T); `mask` is 1 on real
response tokens. Shao et al. 2024, "DeepSeekMath", Eq. 3 (objective) and Eq. 4 (the KL estimate), as a loss:

    ratio_t = pi(o_t) / pi_old(o_t)
    loss_t  = max(-A * ratio_t, -A * clip(ratio_t, 1 - clip_eps, 1 + clip_eps))  +  beta * k3_t
    k3_t    = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1          (>= 0, kl.k3)

A is one number per response (baselines.group_advantages: its score against its group's mean and std), copied to
every token. Unlike PPO in RLHF, the KL to the reference is not subtracted from the reward: it is a term of the loss,
differentiated directly (its gradient pulls pi toward pi_ref on the sampled tokens). Both terms are masked means over
all real tokens of the minibatch (DeepSeekMath averages per sequence first; the token mean weights long responses
more, as DAPO does).
"""
from minirlhf.kl import k3
from minirlhf.ppo import policy_loss, token_mean


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps=0.2, beta=0.04, n_tokens=None):
    """Scalar GRPO loss = PPO-clip policy loss + beta * masked mean of k3(pi, pi_ref); and detached stats
    (clipfrac, approx_kl of ppo.policy_loss, plus `kl`: the masked mean k3 to the reference, and `pg_loss`).
    n_tokens: the loss of a micro-batch of a minibatch of n_tokens real tokens (ppo.token_mean)."""
    pg_loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, n_tokens)  # (B, T) -> scalar
    kl = token_mean(k3(logprobs, ref_logprobs), mask, n_tokens)  # scalar; gradient flows through logprobs
    stats = {**stats, "kl": kl.detach(), "pg_loss": pg_loss.detach()}
    return pg_loss + beta * kl, stats
