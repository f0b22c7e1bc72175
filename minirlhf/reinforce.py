"""REINFORCE for a language model: the whole response is one action, weighted by its advantage.

Legend: B responses, T response tokens. Williams 1992, "Simple statistical gradient-following algorithms", Eq. 1
(the likelihood-ratio gradient), with a baseline b that does not depend on the action (baselines.py):

    loss(x, y) = -(log pi(y | x)) * A,    log pi(y | x) = sum_t log pi(y_t | x, y_<t),    A = R(x, y) - b

so grad loss = -A * sum_t grad log pi(y_t | ...): every token of a response is pushed up (A > 0) or down (A < 0) by
the same amount. One on-policy pass per rollout: there is no ratio to correct for re-using samples (that is PPO).
"""
from minirlhf.token_rewards import sequence_logprobs


def reinforce_loss(logprobs, advantages, mask, weights=None):
    """Per-response losses (B,): -(sum of the real tokens' log-probs) * advantages. logprobs (B, T) of the sampled
    tokens under the current policy (with grad); advantages (B,) (treated as constants); mask (B, T).
    weights: (B, T) detached per-token weights, -(sum_t w_t log pi(y_t)) * A (mismatch.tis_weights: truncated
    importance sampling of the sampler's tokens); None: none."""
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0] or mask.shape != logprobs.shape:
        raise ValueError(f"reinforce_loss: logprobs and mask (B, T), advantages (B,); got {tuple(logprobs.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(advantages.shape)}")
    if weights is not None:
        logprobs = weights.detach() * logprobs
    return -sequence_logprobs(logprobs, mask) * advantages.detach()  # (B, T) -> (B,): log π(y|x), then x A
