"""REINFORCE for a language model: the whole response is one action, weighted by its advantage.

Legend: B responses, T response tokens. Williams 1992, "Simple statistical gradient-following algorithms", Eq. 1
(the likelihood-ratio gradient), with a baseline b that does not depend on the action (baselines.py):

    loss(x, y) = -(log pi(y | x)) * A,    log pi(y | x) = sum_t log pi(y_t | x, y_<t),    A = R(x, y) - b

so grad loss = -A * sum_t grad log pi(y_t | ...): every token of a response is pushed up (A > 0) or down (A < 0) by
the same amount. One on-policy pass per rollout: there is no ratio to correct for re-using samples (that is PPO).

With one advantage per TOKEN (B, T) (REINFORCE++, reinforce_pp.py), each token is pushed by its own:

    loss(x, y) = -sum_t A_t * log pi(y_t | x, y_<t)

PPO's clipped surrogate, which REINFORCE++ uses, is this at the first epoch on fresh samples (ratio 1: no clip acts).
"""
from minirlhf.token_rewards import sequence_logprobs


def reinforce_loss(logprobs, advantages, mask, weights=None):
    """Per-response losses (B,): -(sum of the real tokens' log-probs) * advantages. logprobs (B, T) of the sampled
    tokens under the current policy (with grad); advantages (B,) one per response, or (B, T) one per token,
    -(sum_t A_t log pi(y_t)) (treated as constants); mask (B, T).
    weights: (B, T) detached per-token weights, -(sum_t w_t log pi(y_t)) * A (mismatch.tis_weights: truncated
    importance sampling of the sampler's tokens); None: none."""
    if (logprobs.dim() != 2 or mask.shape != logprobs.shape
            or advantages.shape not in (logprobs.shape[:1], logprobs.shape)):
        raise ValueError(f"reinforce_loss: logprobs and mask (B, T), advantages (B,) or (B, T); got "
                         f"{tuple(logprobs.shape)}, {tuple(mask.shape)}, {tuple(advantages.shape)}")
    if weights is not None:
        logprobs = weights.detach() * logprobs
    if advantages.dim() == 2:  # one per token: sum_t A_t log pi(y_t), padding masked out whatever it holds
        return -sequence_logprobs(logprobs * advantages.detach(), mask)  # (B, T) -> (B,)
    return -sequence_logprobs(logprobs, mask) * advantages.detach()  # (B, T) -> (B,): log π(y|x), then x A
