"""Per-token rewards for RL on language models: from sampled responses and their scores to what GAE consumes.

Legend: B responses in a rollout, R response tokens (right-padded), G group size.
Every tensor here is a RESPONSE slice (B, R): column 0 is the first generated token, `response_mask` is 1 on the
generated tokens (up to and including EOS) and 0 on the padded tail, a contiguous run from column 0 in every row.

A response is one episode. The environment gives nothing until the episode ends, then one score (from the reward
model, or the built-in world's gold score); PPO in RLHF (Ziegler et al. 2019, Sec. 2.2; Stiennon et al. 2020, Eq. 1)
also charges the policy for every token it moves away from the reference:

    r_t = -kl_coef * KL_t                       on every real response token t
    r_T = -kl_coef * KL_T + score               on the LAST REAL token T (never a padding slot)

where KL_t is a per-token estimate of KL(pi || pi_ref) from the sampled token (kl.py: k1, k2 or k3). Summed over
the response, sum_t r_t = score - kl_coef * KL(sequence): the KL-regularised objective.
"""
import torch

from .kl import k1, k2, k3
from .ops import masked_whiten

KL_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def _check_mask(response_mask):
    mask = response_mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"response_mask must be (B, R), got shape {tuple(mask.shape)}")
    if not mask.any(-1).all():
        raise ValueError("every response needs at least one real token (a row of response_mask is all 0)")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("response_mask must be a contiguous run of real tokens from column 0 (right padding only)")
    return mask


def last_real_index(response_mask):
    """(B, R) -> (B,): the column of each response's last real token (its EOS if it has one)."""
    return _check_mask(response_mask).sum(-1) - 1  # contiguous from column 0: the count of real tokens minus one


def per_token_kl(logprobs, ref_logprobs, response_mask, estimator="k1"):
    """(B, R) estimate of KL(pi || pi_ref) at every sampled token (k1 | k2 | k3 of kl.py); 0 on padding.

    logprobs must be the log-probs of the policy that SAMPLED the tokens (the estimators assume x ~ pi): with a
    --top-k / --top-p / --min-new-tokens filter those of the filtered q, so that this estimates KL(q || pi_ref)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator must be one of {tuple(KL_ESTIMATORS)}, got {estimator!r}")
    mask = _check_mask(response_mask)
    kl = KL_ESTIMATORS[estimator](logprobs, ref_logprobs)  # (B, R)
    return torch.where(mask, kl, torch.zeros_like(kl))


def token_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef, estimator="k1"):
    """Per-token rewards (B, R): -kl_coef * KL_t on every real token, plus scores (B,) at the last real token.

    Padding slots get exactly 0. Returns (rewards, kl), both (B, R), kl being the per-token estimate used."""
    if scores.dim() != 1 or scores.shape[0] != logprobs.shape[0]:
        raise ValueError(f"scores must be (B,) with B = {logprobs.shape[0]}, got shape {tuple(scores.shape)}")
    kl = per_token_kl(logprobs, ref_logprobs, response_mask, estimator)  # (B, R)
    return rewards_from_kl(scores, kl, response_mask, kl_coef), kl


def rewards_from_kl(scores, kl, response_mask, kl_coef):
    """Per-token rewards (B, R) from a per-token KL estimate kl (B, R), 0 on padding: -kl_coef * kl on every real
    token, plus scores (B,) at the last real token (token_rewards' rewards; reinforce_pp.py's too)."""
    rewards = -kl_coef * kl  # (B, R), 0 on padding
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_real_index(response_mask)] += scores.to(rewards.dtype)  # the score lands on the last token
    return rewards


def missing_eos_penalty(scores, ended, penalty):
    """scores (B,) minus `penalty` for every response that did not end with EOS (ended (B,) bool): a response cut
    off at max_new_tokens should not be rewarded as if it were finished (TRL's missing_eos_penalty)."""
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def whiten_rewards(rewards, response_mask):
    """Rewards divided by their std over all real tokens of the rollout, mean KEPT (shift_mean=False): the scale of a
    learned reward model is arbitrary, its sign is not (Ziegler et al. 2019 normalise the reward model instead)."""
    return masked_whiten(rewards, _check_mask(response_mask), shift_mean=False)


def whiten_advantages(advantages, response_mask):
    """(advantages - mean) / std over all real tokens of the rollout; 0 on padding (PPO's advantage whitening)."""
    return masked_whiten(advantages, _check_mask(response_mask), shift_mean=True)


def sequence_logprobs(logprobs, response_mask):
    """(B, R) -> (B,): log pi(response | prompt), the sum of its real tokens' log-probs (REINFORCE's term)."""
    return torch.where(_check_mask(response_mask), logprobs, torch.zeros_like(logprobs)).sum(-1)
