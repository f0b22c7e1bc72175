"""Direct preference losses: DPO (with the conservative/label-smoothed variant) and IPO.

Legend: B batch (preference pairs). Every input is (B,): the log-probability of a whole response under the policy
or the frozen reference (summed over its tokens, or length-averaged: the caller decides).

Both losses see the policy only through the implicit reward margin

    x = (log pi(y_c|p) - log pi_ref(y_c|p)) - (log pi(y_r|p) - log pi_ref(y_r|p)),

and return (losses (B,), chosen_rewards (B,), rejected_rewards (B,)) with the implicit rewards
beta * (logps - ref_logps) detached, for logging (reward accuracy = mean(chosen_rewards > rejected_rewards)).

Both see only a difference of log-ratios, so DPO can lower the chosen response's likelihood as long as the rejected
one falls faster (Pal et al. 2024, "Smaug"; Razin et al. 2024, "likelihood displacement"). rpo_nll is the term RPO
adds to hold the chosen likelihood up.
"""
import torch.nn.functional as F


def _margin(name, beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """x (B,) and the two detached implicit rewards, after checking the arguments."""
    shapes = {tuple(t.shape) for t in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"{name}: the four log-prob tensors must share one shape, got {sorted(shapes)}")
    if not beta > 0:
        raise ValueError(f"{name}: beta must be > 0, got {beta}")
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    x = chosen_logratios - rejected_logratios  # (B,)
    return x, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, label_smoothing=0.0):
    """DPO, Rafailov et al. 2023, Eq. 7: loss = -log sigmoid(beta * x).

    label_smoothing = eps > 0 gives conservative DPO (cDPO, Mitchell 2023): the label is taken to be flipped with
    probability eps, loss = -(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x). F.logsigmoid keeps both terms
    finite for any x."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    x, chosen_rewards, rejected_rewards = _margin(
        "dpo_loss", beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * x) - label_smoothing * F.logsigmoid(-beta * x)  # (B,)
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """IPO, Azar et al. 2023, Eq. 17 with tau = beta: loss = (x - 1 / (2 beta))^2.

    A squared loss regresses the margin to a finite target instead of pushing it to infinity as DPO can on
    deterministic preferences. Azar et al. average log-probs over tokens; pass length-averaged logps to match."""
    x, chosen_rewards, rejected_rewards = _margin(
        "ipo_loss", beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (x - 1.0 / (2.0 * beta)) ** 2  # (B,)
    return losses, chosen_rewards, rejected_rewards


def rpo_nll(chosen_logps, chosen_lengths):
    """RPO's extra term (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1): the negative
    log-likelihood of the chosen response per token, -log pi(y_c|p) / |y_c|. The paper's loss is
    dpo_loss + alpha * rpo_nll (their y_c is a chain of thought plus its answer, divided by its whole length).

    chosen_logps (B,): log pi(y_c|p) SUMMED over the response tokens (with grad); chosen_lengths (B,): |y_c|, the
    number of response tokens (>= 1). Returns (B,); the caller reduces. Its gradient with respect to chosen_logps
    is -1 / |y_c| < 0: a descent step always raises the chosen log-prob, which DPO's margin alone does not.
    (TRL's rpo_alpha takes the token mean over the whole batch instead: the same up to how pairs are weighted.)"""
    if chosen_logps.shape != chosen_lengths.shape:
        raise ValueError(f"rpo_nll: chosen_logps {tuple(chosen_logps.shape)} and chosen_lengths "
                         f"{tuple(chosen_lengths.shape)} must share one shape")
    if not (chosen_lengths >= 1).all():
        raise ValueError("rpo_nll: every chosen response needs at least one token (chosen_lengths >= 1)")
    return -chosen_logps / chosen_lengths  # (B,)
