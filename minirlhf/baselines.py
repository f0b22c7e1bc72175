"""Baselines that turn scalar sequence rewards into advantages, for critic-free policy gradients.

Legend: B batch (one reward per sampled response), G group size (responses sampled per prompt).

- REINFORCE with a running-mean baseline (the SmolLM2 + HelpSteer2 setup): A_i = r_i - b_i, where b_i is the
  mean of EVERY reward seen so far in the run, including r_i itself (a plain mean with equal weights, not an
  exponential moving average: old rewards never fade). Since r_n - b_n = (1 - 1/n) (r_n - b_{n-1}), this is the
  textbook baseline b_{n-1} (independent of the n-th action, so the gradient stays unbiased) with the advantage scaled
  by (1 - 1/n) -> 1; the very first reward gets advantage 0.
- RLOO, REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization
  for Learning from Human Feedback in LLMs", Sec. 3.3; Kool et al. 2019): sample k responses per prompt; each one's
  baseline is the mean of the OTHER k - 1, A_i = r_i - (sum_j r_j - r_i) / (k - 1) = k / (k - 1) (r_i - mean(group)).
  The baseline never sees r_i itself, so the gradient stays unbiased, with no running state.
- GRPO (Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2, outcome supervision): sample G responses per prompt and
  normalise each reward within its group, A_i = (r_i - mean(group)) / (std(group) + eps). Two variants divide by
  something else: the whole rollout's std ("batch": group mean, batch std, as TRL's scale_rewards="batch" and
  Liu et al. 2025's "Lite PPO", "Tricks or Traps? A Deep Dive into RL for LLM Reasoning"), or nothing ("none": Liu
  et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO), Sec. 3.1: dividing by the
  group std up-weights the questions that are almost always solved or almost always failed, where the std is small).
"""
import torch


class RunningMeanBaseline:
    """The mean of every reward seen so far, updated one reward at a time (b_n = b_{n-1} + (r_n - b_{n-1}) / n)."""

    def __init__(self):
        self.mean, self.count = 0.0, 0

    def advantages(self, rewards):
        """Update with each reward in batch order; its advantage uses the mean AFTER its own update. (B,) -> (B,)."""
        if rewards.dim() != 1:
            raise ValueError(f"RunningMeanBaseline.advantages: rewards must be 1-D (B,), got {tuple(rewards.shape)}")
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


def leave_one_out_advantages(rewards, k):
    """RLOO advantages. rewards (B,) laid out group-contiguous (the k responses to one prompt in a row),
    B = n_groups * k -> advantages (B,): each reward minus the mean of the other k - 1 of its group; k >= 2.

    A group whose rewards are all equal gets exactly 0 (in floats, sum - r_i need not be exactly (k - 1) r_i)."""
    if rewards.dim() != 1:
        raise ValueError(f"leave_one_out_advantages: rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if k < 2 or rewards.shape[0] % k != 0:
        raise ValueError(f"leave_one_out_advantages: needs k >= 2 dividing the batch size {rewards.shape[0]}, "
                         f"got k = {k}")
    grouped = rewards.view(-1, k)  # (n_groups, k)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # (n_groups, k): the mean of the other k - 1
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (n_groups, 1): exactly equal rewards
    return torch.where(constant, torch.zeros_like(grouped), grouped - others).reshape(-1)  # (B,)


SCALES = ("group", "batch", "none")


def group_advantages(rewards, group_size, eps=1e-4, scale="group"):
    """GRPO advantages. rewards (B,) laid out group-contiguous, B = n_groups * G -> advantages (B,).

    Each reward minus its group's mean, divided by `scale` + eps: "group" its group's std (DeepSeekMath), "batch" the
    std of all B rewards (one number for the rollout), "none" nothing (Dr. GRPO: no eps either). The stds are the
    unbiased (Bessel-corrected) ones, as in TRL's GRPOTrainer. A group whose rewards are all equal carries no signal:
    its advantages are exactly 0 (also when G = 1), never NaN, whatever the scale."""
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_advantages: batch size {rewards.shape[0]} is not a multiple of group_size "
                         f"{group_size}")
    if not eps >= 0:
        raise ValueError(f"group_advantages: eps must be >= 0, got {eps}")
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be one of {SCALES}, got {scale!r}")
    grouped = rewards.view(-1, group_size)  # (n_groups, G)
    mean = grouped.mean(dim=1, keepdim=True)  # (n_groups, 1)
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (n_groups, 1): exactly equal rewards
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # (n_groups, 1)
        advantages = (grouped - mean) / (std + eps)  # (n_groups, G)
    elif scale == "batch":
        std = rewards.std() if rewards.shape[0] > 1 else torch.zeros_like(mean)  # (): the whole rollout's std
        advantages = (grouped - mean) / (std + eps)  # (n_groups, G)
    else:
        advantages = grouped - mean  # (n_groups, G)
    return torch.where(constant, torch.zeros_like(grouped), advantages).reshape(-1)  # (B,)
