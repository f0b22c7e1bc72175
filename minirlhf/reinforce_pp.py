"""REINFORCE++: every token's return to go of the KL-penalised reward, normalised over the whole rollout.

Legend: B responses, T response tokens (right-padded; mask 1 on the real ones, a contiguous run from column 0),
G group size (responses per prompt, contiguous).

Hu et al. 2025, "REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Normalization"
(arXiv:2501.03262). The reward is PPO's per-token one (token_rewards.py), the KL estimate the paper's k1:

    r_t = -beta * KL_t   (+ score on the last real token),     KL_t = log pi_old(y_t) - log pi_ref(y_t)
    G_t = sum_{s >= t} r_s = score - beta * sum_{s >= t} KL_s  (the return to go, gamma = 1)
    A_t = (G_t - mean) / std,   mean and std over EVERY real token of the rollout (global normalisation)

No critic and no per-prompt statistics: the rollout's own mean is the baseline (GRPO's, baselines.py, is its group's
mean, divided by its group's std). A token is charged only for the KL of the tokens from it on, not for the ones before
it (that is the return to go; REINFORCE charges every token the whole response's KL).

REINFORCE++-baseline (group_size G >= 2, the paper's variant for several samples per prompt): each score minus the
mean score of its group first, then the same per-token rewards, returns and global normalisation. (Some
implementations move this variant's KL out of the reward into the loss, as a k2 term; here both keep it in the reward.)

The std is the Bessel-corrected one, as PPO's advantage whitening (token_rewards.whiten_advantages).
"""
import torch

from .token_rewards import rewards_from_kl, whiten_advantages


def returns_to_go(rewards, mask):
    """G_t = sum_{s >= t} r_s over each row's real tokens (gamma = 1); 0 on padding. (B, T) -> (B, T).

    The same as gae.gae(rewards, values=0, mask, gamma=1, lam=1)'s advantages."""
    mask = mask.bool()
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))  # padding adds nothing, whatever it holds
    returns = rewards.flip(-1).cumsum(-1).flip(-1)  # (B, T): the sum from t to the end of the row
    return torch.where(mask, returns, torch.zeros_like(returns))


def reinforce_pp_advantages(scores, kl, mask, beta, group_size=None):
    """REINFORCE++ advantages and returns, both (B, T), 0 on padding.

    scores (B,) one per response; kl (B, T) per-token KL estimates of the sampling policy against the reference
    (token_rewards.per_token_kl, k1 in the paper); mask (B, T); beta the KL coefficient. group_size G: None for
    REINFORCE++; G >= 2 for REINFORCE++-baseline (each score minus its group's mean score first, groups contiguous,
    B = n_groups * G). Returns (advantages, returns): the globally normalised returns and the returns G_t."""
    if scores.dim() != 1 or kl.dim() != 2 or scores.shape[0] != kl.shape[0] or kl.shape != mask.shape:
        raise ValueError(f"reinforce_pp_advantages: scores (B,), kl and mask (B, T); got {tuple(scores.shape)}, "
                         f"{tuple(kl.shape)}, {tuple(mask.shape)}")
    if group_size is not None:
        if group_size < 2 or scores.shape[0] % group_size:
            raise ValueError(f"reinforce_pp_advantages: group_size must be >= 2 and divide the batch size "
                             f"{scores.shape[0]}, got {group_size}")
        grouped = scores.view(-1, group_size)  # (n_groups, G)
        scores = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (B,): minus the group's mean score
    rewards = rewards_from_kl(scores, kl, mask, beta)  # (B, T): -beta KL_t, + the score on the last real token
    returns = returns_to_go(rewards, mask)  # (B, T)
    return whiten_advantages(returns, mask), returns  # (B, T) each: normalised over every real token of the rollout
