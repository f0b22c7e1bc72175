"""The sampler is not the trainer: the gap between the log-probs a rollout was sampled with and the ones the update
recomputes, measured, and corrected by truncated importance sampling.

Legend: B responses, R response columns; every input is (B, R), `mask` True on real response tokens.
The RL scripts compute a token's log-prob twice under the same weights: the sampler (sampling.py with fast/decode.py's
forward: a KV cache, each LoRA adapter merged into its base weight, one row per real token) when it draws the token,
π_s, and the trainer (heads.py: the whole sequence in one pass, the LoRA branch unmerged) when it scores it, π_t.
They are the same function, computed in a different order, so they differ by float rounding: ~1e-5 in float32, more
in bfloat16 / float16 or over a 4-bit / 8-bit base (docs/kl.md, "The sampler is not the trainer", has the numbers).
The policy-gradient loss assumes the tokens were drawn from π_t; they were drawn from π_s. With log r = log π_t −
log π_s on tokens sampled from π_s:

    mismatch/kl         mean over response tokens of k3 = (r − 1) − log r, an unbiased estimate of KL(π_s ‖ π_t)
                        per token (E_s[r] = 1), ≥ 0 on every token
    mismatch/k1         mean of k1 = −log r = log π_s − log π_t: unbiased for the same KL, signed
    mismatch/max_ratio  max over tokens of r = π_t / π_s

Why k3 is `mismatch/kl` and k1 only its companion: both are unbiased, but a mismatch is tiny and mostly rounding
noise, |log r| ~ 1e-5..1e-2, and k1's per-token spread is |log r| itself while the KL is ~(log r)²/2: over N tokens
k1's mean has a standard error sqrt(2 KL / N), far above the KL unless N·KL >> 1 (KL 1e-6 per token over 1000
tokens: 45 times the KL), so its sign is mostly noise. k3 ≈ (log r)²/2 per token has a spread of the KL's own size.
k1's sign still says something when the gap is large: a systematically positive k1 is a trainer that gives the
sampled tokens less probability than the sampler did. Both are computed in float64 (k3 with expm1): the float32
r − 1 of a 1e-5 log ratio is rounded by 6e-8, three orders above k3's value, 5e-11.

Truncated importance sampling (TIS: F. Yao, L. Liu, D. Zhang, C. Dong, J. Shang, J. Gao 2025, "Your efficient RL
framework secretly brings you off-policy RL training"): the clipped policy-gradient term of every token is multiplied
by the detached weight

    w_t = min(π_t_old(y_t) / π_s(y_t), C)        tis_weights; C: --tis-cap (Yao et al. use 2)

where π_t_old is the trainer's log-prob of the token under the rollout's weights (before any update), and the PPO /
GRPO ratio uses π_t_old, not the sampler's: E_{y~π_s}[w · ∇ loss(y)] = E_{y~π_t_old}[∇ loss(y)] where no weight is
capped; the cap bounds the variance a rare token with a huge ratio would bring, at the price of a bias where it binds.
The weight is per token: the exact correction of a whole response would be the product of its tokens' ratios.

Sequence-level masking (mismatch_keep, --mismatch-mask-threshold T): a response whose sequence log ratio
|Σ_t (log π_t_old − log π_s)| exceeds T, i.e. whose sequence importance ratio lies outside [e^−T, e^T], is dropped
from the loss (its tokens leave the update's mask; REINFORCE sets its advantage to 0); `mismatch/masked_responses`
counts them.
"""
import torch


def _log_ratio(sampler_logprobs, trainer_logprobs, mask):
    """(B, R) float64 log π_t − log π_s on real tokens, 0 elsewhere; and the mask as bool."""
    if not sampler_logprobs.shape == trainer_logprobs.shape == mask.shape:
        raise ValueError(f"sampler_logprobs, trainer_logprobs and mask must have one shape, got "
                         f"{tuple(sampler_logprobs.shape)}, {tuple(trainer_logprobs.shape)}, {tuple(mask.shape)}")
    mask = mask.bool()
    log_ratio = trainer_logprobs.detach().double() - sampler_logprobs.detach().double()
    return torch.where(mask, log_ratio, torch.zeros_like(log_ratio)), mask


def mismatch_stats(sampler_logprobs, trainer_logprobs, mask):
    """{"mismatch/kl", "mismatch/k1", "mismatch/max_ratio"} (python floats, the module docstring's table) of the
    sampler's and the trainer's log-probs of the same tokens. Means are over the real tokens; with none, 0, 0 and 1."""
    log_ratio, mask = _log_ratio(sampler_logprobs, trainer_logprobs, mask)
    n = mask.sum().clamp(min=1)
    k3 = torch.expm1(log_ratio) - log_ratio  # (B, R) (r - 1) - log r, exactly 0 on padding
    peak = log_ratio.masked_fill(~mask, float("-inf")).max() if mask.any() else log_ratio.new_zeros(())
    return {"mismatch/kl": (k3.sum() / n).item(), "mismatch/k1": (-log_ratio.sum() / n).item(),
            "mismatch/max_ratio": peak.exp().item()}


def tis_weights(trainer_old_logprobs, sampler_logprobs, mask, cap):
    """(B, R) detached w = min(π_t_old / π_s, cap) on real tokens, 1 on padding, in trainer_old_logprobs' dtype
    (computed in float64). Yao et al. 2025's truncated importance sampling weight: the module docstring."""
    if not cap > 0:
        raise ValueError(f"tis_weights: cap must be > 0, got {cap}")
    log_ratio, mask = _log_ratio(sampler_logprobs, trainer_old_logprobs, mask)
    return log_ratio.exp().clamp(max=cap).masked_fill(~mask, 1.0).to(trainer_old_logprobs.dtype)


def sequence_log_ratio(trainer_old_logprobs, sampler_logprobs, mask):
    """(B,) float64 Σ_t (log π_t_old − log π_s) over each response's real tokens: the log of its sequence
    importance ratio π_t_old(y) / π_s(y)."""
    return _log_ratio(sampler_logprobs, trainer_old_logprobs, mask)[0].sum(-1)


def mismatch_keep(trainer_old_logprobs, sampler_logprobs, mask, threshold):
    """(B,) bool: True for the responses whose |sequence_log_ratio| is at most `threshold` (kept in the loss)."""
    if not threshold > 0:
        raise ValueError(f"mismatch_keep: threshold must be > 0, got {threshold}")
    return sequence_log_ratio(trainer_old_logprobs, sampler_logprobs, mask).abs() <= threshold


def rollout_correction(sampler_logprobs, trainer_old_logprobs, mask, tis_cap=None, mask_threshold=None):
    """What an RL script needs from one rollout's two sets of log-probs (the trainer's taken before any update):
    (TIS weights (B, R) or None without tis_cap, the update's mask (B, R) bool, metrics). The update's mask is `mask`
    itself without mask_threshold, else `mask` with the dropped responses' rows cleared. metrics: mismatch_stats,
    plus with tis_cap "mismatch/tis_capped" (the share of response tokens whose weight the cap bound) and
    "mismatch/tis_weight" (the mean weight over them), plus with mask_threshold "mismatch/masked_responses" (how many
    responses were dropped)."""
    metrics = mismatch_stats(sampler_logprobs, trainer_old_logprobs, mask)
    weights, loss_mask, real = None, mask, mask.bool()
    n = real.sum().clamp(min=1)
    if tis_cap is not None:
        weights = tis_weights(trainer_old_logprobs, sampler_logprobs, mask, tis_cap)
        log_ratio = _log_ratio(sampler_logprobs, trainer_old_logprobs, mask)[0]
        metrics["mismatch/tis_capped"] = ((log_ratio.exp() > tis_cap) & real).sum().item() / n.item()
        metrics["mismatch/tis_weight"] = (weights.double() * real).sum().item() / n.item()
    if mask_threshold is not None:
        keep = mismatch_keep(trainer_old_logprobs, sampler_logprobs, mask, mask_threshold)  # (B,)
        loss_mask = real & keep[:, None]
        metrics["mismatch/masked_responses"] = int((~keep).sum())
    return weights, loss_mask, metrics

