"""PPO's clipped surrogate losses: one for the policy, one for the value head.

Legend: B batch, T response tokens. Every input is (B, T); `mask` is 1 on real response tokens, 0 on padding.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", Eq. 7, written as a loss to minimise per token:

    ratio   = pi(a|s) / pi_old(a|s) = exp(logprobs - old_logprobs)
    pg_loss = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps))

The max (of negatives = min of the objectives) makes the clip one-sided: once the ratio has moved past 1 +- clip_eps
in the direction the advantage asks for, that token's gradient is exactly zero, so the policy cannot be pushed far
from the one that collected the data. The value loss clips the same way around the old value predictions.
clipped_surrogate is that per-token term, the one GRPO's loss (grpo.py) uses too.
"""
import torch

from minirlhf.kl import k3
from minirlhf.ops import masked_mean, masked_sum


def _check(name, mask, clip_eps, *tensors):
    if any(t.shape != mask.shape for t in tensors):
        raise ValueError(f"{name}: all inputs must share the mask's shape {tuple(mask.shape)}, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    if not clip_eps > 0:
        raise ValueError(f"{name}: clip_eps must be > 0, got {clip_eps}")


def token_mean(x, mask, n_tokens=None):
    """masked_mean(x, mask): the mean over the real tokens; with n_tokens, their sum / n_tokens instead. A minibatch
    split into micro-batches (to bound memory) passes ITS count of real tokens to each micro-batch's loss: the
    micro-batches' losses, gradients and stats then add up to the minibatch's mean exactly."""
    return masked_mean(x, mask) if n_tokens is None else masked_sum(x, mask) / n_tokens


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high=None, weights=None):
    """The clipped surrogate per token, Schulman et al. 2017 Eq. 7 as a loss (the module's docstring):

        ratio = exp(logprobs - old_logprobs)                                          (B, T); 1 on padding
        loss  = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))   (B, T)

    Returns (loss, clipped, ratio), each (B, T): loss the per-token term (times `weights` if given), not reduced;
    clipped (bool) where the clipped term is the larger one, the tokens whose gradient the clip zeroes; ratio with
    its gradient. clip_eps_high: the upper bound's eps (grpo.py: DAPO's clip-higher); None: clip_eps, symmetric.
    weights: (B, T) per-token weights of the term, detached (mismatch.tis_weights); None: none (not a multiplication
    by 1). Padding (mask 0) gets ratio 1 and a finite loss there, for the caller's masked reduction to drop. The
    callers (policy_loss, grpo.grpo_loss) check the shapes and the clip range."""
    mask = mask.bool()
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T); padding: ratio 1
    ratio = torch.exp(logratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped_term = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)  # (B, T)
    loss = torch.max(unclipped, clipped_term)  # (B, T)
    if weights is not None:
        loss = weights.detach() * loss
    return loss, clipped_term > unclipped, ratio


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, n_tokens=None, weights=None):
    """PPO-clip policy loss, a scalar masked mean over real tokens, and detached scalar stats:

    clipfrac:  fraction of tokens where the clipped term is the larger one (the clip binds: zero gradient there).
    approx_kl: masked mean of k3 = (ratio - 1) - log ratio, an unbiased, non-negative estimate of KL(pi_old || pi)
               from tokens sampled by pi_old (see kl.py).
    n_tokens: the loss of a micro-batch of a minibatch of n_tokens real tokens (token_mean): sums / n_tokens.
    weights: (B, T) detached per-token weights of the clipped term (mismatch.tis_weights: truncated importance
    sampling of the sampler's tokens); None: none (not a multiplication by 1: the default's numbers stay bit for bit).
    """
    _check("policy_loss", mask, clip_eps, logprobs, old_logprobs, advantages)
    mask = mask.bool()
    per_token, clipped, _ = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_eps,
                                              weights=weights)  # (B, T) each
    loss = token_mean(per_token, mask, n_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": token_mean(clipped.to(logprobs.dtype), mask, n_tokens),
            "approx_kl": token_mean(k3(old_logprobs.detach(), logprobs.detach()), mask, n_tokens),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_eps=0.2, n_tokens=None):
    """Clipped value loss 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old +- clip_eps) - R)^2)), a scalar.

    clip_eps here is in the value's own units (TRL's `cliprange_value`). stats: clipfrac, the fraction of tokens
    where the clipped error is the larger one. n_tokens: as policy_loss's (token_mean)."""
    _check("value_loss", mask, clip_eps, values, old_values, returns)
    mask = mask.bool()
    values = torch.where(mask, values, torch.zeros_like(values))  # padding: no inf/nan gradients
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.max(vf_losses, vf_losses_clipped), mask, n_tokens)
    with torch.no_grad():
        stats = {"clipfrac": token_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask, n_tokens)}
    return loss, stats
