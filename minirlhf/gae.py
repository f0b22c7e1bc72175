"""Generalized advantage estimation (GAE), the advantage estimator PPO uses.

Legend: B batch, T response tokens.

Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", Eq. 16:

    delta_t = r_t + gamma * V_{t+1} - V_t                      (one-step TD error)
    A_t     = sum_{l>=0} (gamma * lam)^l * delta_{t+l}
            = delta_t + gamma * lam * A_{t+1}                  (the recursion we run, from the last token back)

and the value target is R_t = A_t + V_t. lam=0 gives A_t = delta_t; lam=1 gives the discounted return-to-go
minus V_t. In RLHF an episode is one response: the value after its last real token is 0 (terminal), so nothing leaks
across the padded tail, whatever the padding holds.
"""
import torch


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Advantages and returns for a batch of right-padded responses.

    rewards (B, T): per-token rewards (in RLHF: -kl_coef * KL on every token, plus the score on the last one).
    values  (B, T): V(s_t) from the value head (pass detached values; no gradient is meant to flow through GAE).
    mask    (B, T): 1 on real response tokens, a contiguous run from position 0 in each row, 0 on the padded tail.
    Returns (advantages, returns), both (B, T), 0 on padding; returns = advantages + values on real tokens.
    """
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"gae: rewards, values and mask must share one (B, T) shape, got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gae: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    mask = mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("gae: mask must be a contiguous run of real tokens from position 0 (right padding only)")
    zero = torch.zeros_like(values)
    values = torch.where(mask, values, zero)  # V = 0 past the end: the terminal value, whatever the padding holds

    B, T = values.shape
    next_value = values.new_zeros(B)  # V_{t+1}: 0 after the last token (terminal)
    next_advantage = values.new_zeros(B)  # A_{t+1}
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * next_advantage  # (B,)
        advantage = torch.where(mask[:, t], advantage, zero[:, t])  # padding: 0, and it stops the recursion
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = torch.where(mask, advantages + values, zero)  # (B, T)
    return advantages, returns
