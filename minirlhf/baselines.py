"""Baselines that turn scalar sequence rewards into advantages, for critic-free policy gradients.

Legend: B batch (one reward per sampled response), G group size (responses sampled per prompt).

- REINFORCE with a moving-average baseline (the SmolLM2 + HelpSteer2 setup): A_i = r_i - b_i, where b_i is the
  mean of EVERY reward seen so far, including r_i itself. Since r_n - b_n = (1 - 1/n) (r_n - b_{n-1}), this is the
  textbook baseline b_{n-1} (independent of the n-th action, so the gradient stays unbiased) with the advantage scaled
  by (1 - 1/n) -> 1; the very first reward gets advantage 0.
- GRPO (Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2, outcome supervision): sample G responses per prompt and
  normalise each reward within its group, A_i = (r_i - mean(group)) / (std(group) + eps).
"""
import torch


class MovingAverageBaseline:
    """Running mean over every reward ever seen, updated one reward at a time (b_n = b_{n-1} + (r_n - b_{n-1}) / n)."""

    def __init__(self):
        self.mean, self.count = 0.0, 0

    def advantages(self, rewards):
        """Update with each reward in batch order; its advantage uses the mean AFTER its own update. (B,) -> (B,)."""
        if rewards.dim() != 1:
            raise ValueError(f"MovingAverageBaseline.advantages: rewards must be 1-D (B,), got {tuple(rewards.shape)}")
        advantages = []
        for r in rewards.detach().double().tolist():  # the running mean is kept in float64
            self.count += 1
            self.mean += (r - self.mean) / self.count
            advantages.append(r - self.mean)
        return torch.tensor(advantages, dtype=rewards.dtype, device=rewards.device)  # (B,)

    def state_dict(self):
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state):
        self.mean, self.count = float(state["mean"]), int(state["count"])


def group_advantages(rewards, group_size, eps=1e-4):
    """GRPO advantages. rewards (B,) laid out group-contiguous, B = n_groups * G -> advantages (B,).

    The std is the unbiased (Bessel-corrected) one, as in TRL's GRPOTrainer. A group whose rewards are all equal
    carries no signal: its advantages are exactly 0 (also when G = 1), never NaN."""
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_advantages: batch size {rewards.shape[0]} is not a multiple of group_size "
                         f"{group_size}")
    if not eps >= 0:
        raise ValueError(f"group_advantages: eps must be >= 0, got {eps}")
    grouped = rewards.view(-1, group_size)  # (n_groups, G)
    mean = grouped.mean(dim=1, keepdim=True)  # (n_groups, 1)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # (n_groups, 1), unbiased
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (n_groups, 1): exactly equal rewards
    advantages = torch.where(constant, torch.zeros_like(grouped), (grouped - mean) / (std + eps))  # (n_groups, G)
    return advantages.reshape(-1)  # (B,)
