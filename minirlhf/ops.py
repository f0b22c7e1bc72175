"""Small shared tensor helpers used by every loss: masked statistics, log-prob gathering, entropy.

Legend: B batch, T tokens, V vocab. A `mask` is 1.0 (or True) on real tokens and 0 on padding; padding values,
whatever they are, never change a result.
"""
import torch
import torch.nn.functional as F


def masked_sum(x, mask, dim=None):
    """Sum of x over positions where mask is set. Padding values (even inf/nan) never leak in."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is set (all positions, or along `dim`). Empty rows give 0."""
    mask = mask.to(x.dtype)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x, mask, unbiased=True):
    """Variance of the masked entries of x (Bessel-corrected by default, as TRL/OpenAI's lm-human-preferences)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # inf/nan padding would give nan gradients below
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the masked entries; padding positions are returned as 0.

    shift_mean=False keeps the mean (used when whitening rewards so their sign is kept)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # inf/nan padding would give nan gradients below
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def gather_logprobs(logits, labels):
    """log softmax(logits)[label] for every position.  logits (..., V), labels (...) -> (...).

    Uses logsumexp so the (..., V) log-softmax tensor is never kept for the backward pass twice."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits):
    """Entropy H = -Σ p log p of the categorical softmax(logits), per position.  (..., V) -> (...).

    -inf logits (filtered tokens) have p = 0 and add 0: log p is clamped to the most negative finite float so that
    0 * log 0 is 0, not nan (as torch.distributions.Categorical does)."""
    logp = F.log_softmax(logits, dim=-1).clamp(min=torch.finfo(logits.dtype).min)  # (..., V)
    return -(logp.exp() * logp).sum(-1)
