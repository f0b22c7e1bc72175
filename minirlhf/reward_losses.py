"""Losses for training a reward model on preference pairs, and readouts of a rating head.

Legend: B batch (preference pairs), K rating classes (the distributional head predicts a rating 1..K).

Scalar head, Bradley-Terry (Bradley & Terry 1952; as in Ouyang et al. 2022, Eq. 1, and Llama 2's margin variant):

    P(chosen > rejected) = sigmoid(r_c - r_r),    loss = -log sigmoid(r_c - r_r - margin)

Distributional head (the SmolLM2 + HelpSteer2 setup): each response gets a distribution p = softmax(logits) over
ratings i = 1..K, and the probability that the chosen one is preferred mixes a soft comparison of every pair of
ratings:

    P(chosen > rejected) = sum_i sum_j p_c(i) p_r(j) sigmoid(alpha * (i - j)),    loss = -log P

computed entirely in log space (log_softmax + logsigmoid + logsumexp), so it stays finite for any logits.
"""
import torch
import torch.nn.functional as F

from minirlhf.ops import entropy_from_logits


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None):
    """-log sigmoid(r_c - r_r - margin) per pair. rewards (B,), margin None, a float or (B,) -> losses (B,)."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"bradley_terry_loss: reward shapes differ: {tuple(chosen_rewards.shape)} vs "
                         f"{tuple(rejected_rewards.shape)}")
    logits = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def distributional_loss(chosen_logits, rejected_logits, alpha=0.2):
    """-log sum_i sum_j p_c(i) p_r(j) sigmoid(alpha (i - j)). logits (B, K) -> losses (B,)."""
    if chosen_logits.shape != rejected_logits.shape or chosen_logits.dim() < 1:
        raise ValueError(f"distributional_loss: logits must share one (B, K) shape, got "
                         f"{tuple(chosen_logits.shape)} vs {tuple(rejected_logits.shape)}")
    if not alpha > 0:
        raise ValueError(f"distributional_loss: alpha must be > 0, got {alpha}")
    K = chosen_logits.shape[-1]
    ratings = torch.arange(1, K + 1, dtype=chosen_logits.dtype, device=chosen_logits.device)  # (K,)
    log_win = F.logsigmoid(alpha * (ratings[:, None] - ratings[None, :]))  # (K, K): log sigmoid(alpha (i - j))
    log_p_chosen = F.log_softmax(chosen_logits, dim=-1)  # (B, K)
    log_p_rejected = F.log_softmax(rejected_logits, dim=-1)  # (B, K)
    log_terms = log_p_chosen[..., :, None] + log_p_rejected[..., None, :] + log_win  # (B, K, K)
    return -torch.logsumexp(log_terms.flatten(-2), dim=-1)  # (B,)


def expected_rating(logits, ratings=None):
    """E_p[rating] = sum_i p(i) * rating_i, with ratings 1..K by default. logits (..., K) -> (...)."""
    K = logits.shape[-1]
    if ratings is None:
        ratings = torch.arange(1, K + 1, dtype=logits.dtype, device=logits.device)  # (K,)
    elif ratings.shape != (K,):
        raise ValueError(f"expected_rating: ratings must have shape ({K},), got {tuple(ratings.shape)}")
    return F.softmax(logits, dim=-1) @ ratings.to(logits.dtype)  # (...)


def rating_entropy(logits):
    """Entropy of the predicted rating distribution, in nats (0 = certain, log K = uniform). (..., K) -> (...)."""
    return entropy_from_logits(logits)
