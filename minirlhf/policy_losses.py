"""Two alternatives to PPO's clipped surrogate (ppo.clipped_surrogate) for GRPO's policy term: what the clip acts on.

Legend: B responses, T response tokens; every input is (B, T), `mask` 1 on real response tokens, A the advantage
(GRPO's: one number per response, copied to its tokens), r_t = pi(y_t) / pi_old(y_t) each token's ratio, |y_i| the
real tokens of response i. Both take and return what ppo.clipped_surrogate does, so that grpo.grpo_loss reduces
their per-token losses with the same --loss-aggregation (grpo.aggregate).

GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", Sec. 4.1-4.2): one ratio per response, the geometric
mean of its tokens' ratios, clipped as PPO clips a token's:

    s_i    = exp( 1/|y_i| Σ_t log r_it )                                        (B,)  length-normalised
    loss_i = max(-A_i s_i, -A_i clip(s_i, 1 - clip_eps, 1 + clip_eps_high))
    d loss_i / d log pi(y_it) = -A_i s_i / |y_i|   where the clip does not bind, 0 where it does (for all its tokens)

Every token of a response gets the same weight s_i / |y_i| (the paper's gradient, Sec. 4.2); a clipped response
loses its whole gradient. The per-token ratios of a long response multiply to a huge or tiny number; the length
normalisation keeps s_i near 1, so the paper's clip range is tiny: 3e-4 below and 4e-4 above (--clip-eps 3e-4
--clip-high 4e-4). As a per-token loss: loss_i is copied to each of response i's tokens. Aggregated by "sequence"
(each response's mean, then their mean) that is the paper's 1/G Σ_i loss_i; by "token" (or "constant") each
response's loss is weighted by its length, |y_i| / Σ_j |y_j|: every token of the minibatch then gets the gradient
-A_i s_i / Σ_j |y_j|, GSPO-token's with one advantage per response (Sec. 4.3). Either way a response is never split
between micro-batches, so micro-batches add up to the minibatch exactly.

CISPO (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", Sec. 3.1,
Eq. 4): clip the importance weight, not the update; the weight is a constant:

    loss_t = -sg(clip(r_t, 1 - clip_eps, 1 + clip_eps_high)) · A_t · log pi(y_t)
    d loss_t / d log pi(y_t) = -w_t A_t,   w_t = clip(r_t, ...)

Under PPO's clip a token whose ratio has moved past 1 +- eps in its advantage's direction gets gradient 0; under
CISPO it keeps -w_t A_t with w_t bounded: no token is dropped, the rare "fork" tokens whose ratio moves fastest
included. MiniMax sets no lower bound (a large eps_low: --clip-eps 1 gives a lower bound of 0, which no ratio
reaches) and tunes the upper one only (0.28 as DAPO's clip-higher, --clip-high 0.28). The loss's VALUE is not a
surrogate of the return (log pi, not a ratio): only its gradient means something; at r = 1 it is REINFORCE's
-A ∇log pi. MiniMax normalises by the batch's tokens: --loss-aggregation token.

Returned `clipped` (the stat clipfrac): GSPO, the tokens of every response whose clip binds (so, aggregated by
"sequence", the fraction of responses clipped); CISPO, the tokens whose weight was clipped (the clip of a weight never
zeroes a gradient). `ratio` is each token's r_t in both, which the KL term's off-policy weight uses (grpo.py).
"""
import torch

from minirlhf.ops import masked_sum


def gspo_surrogate(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high=None, weights=None):
    """GSPO's clipped sequence-ratio loss, copied to each of a response's tokens (the module's docstring):

        s_i    = exp(Σ_t (logprobs - old_logprobs)_it / |y_i|)                       (B,); 1 for a row with no token
        loss   = max(-A * s_i, -A * clip(s_i, 1 - clip_eps, 1 + clip_eps_high))     (B, T)

    Returns (loss, clipped, ratio), each (B, T): loss times `weights` if given (per-token detached weights,
    mismatch.tis_weights: each token's copy of its response's loss is weighted); clipped (bool) where the clipped
    term is the larger one (all of a response's tokens alike, with GRPO's one advantage per response); ratio each
    token's r_t = pi / pi_old (1 on padding), with its gradient."""
    mask = mask.bool()
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T); padding: 0
    lengths = mask.sum(dim=1).clamp(min=1)  # (B,) |y_i|
    seq_ratio = torch.exp(masked_sum(logratio, mask, dim=1) / lengths)[:, None]  # (B, 1) s_i
    unclipped = -advantages * seq_ratio  # (B, T)
    clipped_term = -advantages * torch.clamp(seq_ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)  # (B, T)
    loss = torch.max(unclipped, clipped_term)  # (B, T): loss_i on each token of response i
    if weights is not None:
        loss = weights.detach() * loss
    return loss, clipped_term > unclipped, torch.exp(logratio)


def cispo_surrogate(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high=None, weights=None):
    """CISPO's per-token loss -sg(clip(r_t, 1 - clip_eps, 1 + clip_eps_high)) · A_t · log pi(y_t) (the module's
    docstring), r_t = exp(logprobs - old_logprobs).

    Returns (loss, clipped, ratio), each (B, T): loss times `weights` if given (detached, mismatch.tis_weights);
    clipped (bool) where r_t lies outside [1 - clip_eps, 1 + clip_eps_high], whatever A's sign (its weight is the
    bound; its gradient stays); ratio r_t (1 on padding), with its gradient. Padding's loss is 0."""
    mask = mask.bool()
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
    ratio = torch.exp(logratio)  # (B, T)
    weight = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high).detach()  # (B, T) sg(clip(r_t))
    loss = -weight * advantages * torch.where(mask, logprobs, torch.zeros_like(logprobs))  # (B, T)
    if weights is not None:
        loss = weights.detach() * loss
    return loss, (ratio < 1.0 - clip_eps) | (ratio > 1.0 + clip_eps_high), ratio
