"""Direct preference losses: DPO (with the conservative/label-smoothed variant), IPO and KTO.

Legend: B batch (preference pairs). Every input is (B,): the log-probability of a whole response under the policy
or the frozen reference (summed over its tokens, or length-averaged: the caller decides).

Both losses see the policy only through the implicit reward margin

    x = (log pi(y_c|p) - log pi_ref(y_c|p)) - (log pi(y_r|p) - log pi_ref(y_r|p)),

and return (losses (B,), chosen_rewards (B,), rejected_rewards (B,)) with the implicit rewards
beta * (logps - ref_logps) detached, for logging (reward accuracy = mean(chosen_rewards > rejected_rewards)).

Both see only a difference of log-ratios, so DPO can lower the chosen response's likelihood as long as the rejected
one falls faster (Pal et al. 2024, "Smaug"; Razin et al. 2024, "likelihood displacement"). rpo_nll is the term RPO
adds to hold the chosen likelihood up.

KTO needs no pair: each response is desirable or undesirable on its own, judged against a reference point z0 (an
estimate of KL(pi || pi_ref)); kto_loss and kto_reference_point.
"""
import torch
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


def kto_loss(policy_logps, ref_logps, desirable, z0, beta=0.1, lambda_d=1.0, lambda_u=1.0):
    """KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8:

        r = log pi(y|x) - log pi_ref(y|x)
        desirable y:    loss = lambda_D (1 - sigmoid(beta (r - z0)))
        undesirable y:  loss = lambda_U (1 - sigmoid(beta (z0 - r)))

    (the paper's lambda_y - v(x, y)). Each response is scored alone against the reference point z0 rather than
    against a partner: a desirable response is pushed above z0, an undesirable one below it. z0 is a constant of the
    loss (no gradient flows through it; kto_reference_point estimates it).

    policy_logps, ref_logps (N,): log-probs of whole responses (summed over tokens), the policy's with grad;
    desirable (N,) bool; z0: a float or 0-dim tensor (detached here). Returns (losses (N,), rewards (N,)), the
    rewards beta * r detached, as dpo_loss's. lambda_d, lambda_u > 0: the paper advises lambda_D n_D / (lambda_U n_U)
    in [1, 4/3] (n: how many of each)."""
    if policy_logps.shape != ref_logps.shape or desirable.shape != policy_logps.shape:
        raise ValueError(f"kto_loss: policy_logps, ref_logps and desirable must share one shape, got "
                         f"{[tuple(t.shape) for t in (policy_logps, ref_logps, desirable)]}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"kto_loss: desirable must be a bool tensor, got {desirable.dtype}")
    if not beta > 0 or not lambda_d > 0 or not lambda_u > 0:
        raise ValueError(f"kto_loss: beta, lambda_d and lambda_u must be > 0, got {beta}, {lambda_d}, {lambda_u}")
    z0 = torch.as_tensor(z0, dtype=policy_logps.dtype, device=policy_logps.device).detach()  # ()
    r = policy_logps - ref_logps  # (N,)
    losses = torch.where(desirable, lambda_d * (1 - torch.sigmoid(beta * (r - z0))),
                         lambda_u * (1 - torch.sigmoid(beta * (z0 - r))))  # (N,)
    return losses, beta * r.detach()


def kto_reference_point(mismatched_policy_logps, mismatched_ref_logps):
    """KTO's reference point z0 (Ethayarajh et al. 2024, Sec. 4.1): an estimate of KL(pi || pi_ref) from MISMATCHED
    pairs, each prompt x_i of a batch with another example's response y_j (j = i + 1 mod m in the paper), so that
    z0 does not follow the responses being trained on:

        z0 = max(0, mean_i [log pi(y_j|x_i) - log pi_ref(y_j|x_i)])        detached: no gradient flows through it

    Inputs (M,): the mismatched responses' log-probs (summed over tokens) under the policy and the reference.
    Returns a 0-dim tensor >= 0. (An average of log-ratios of responses not sampled from pi is a biased estimate of
    the KL; the paper keeps it for its low cost and clamps it because a KL is never negative.)"""
    if mismatched_policy_logps.shape != mismatched_ref_logps.shape or mismatched_policy_logps.dim() != 1 \
            or not len(mismatched_policy_logps):
        raise ValueError(f"kto_reference_point: two (M,) tensors with M >= 1 expected, got "
                         f"{[tuple(t.shape) for t in (mismatched_policy_logps, mismatched_ref_logps)]}")
    return (mismatched_policy_logps - mismatched_ref_logps).mean().clamp(min=0).detach()


LOSSES = ("sigmoid", "ipo", "cdpo", "kto")


def preference_loss(policy_logps, ref_logps, lengths, loss="sigmoid", beta=0.1, label_smoothing=None, rpo_alpha=0.0,
                    average=False, z0=None, desirable_weight=1.0, undesirable_weight=1.0):
    """DPO's whole per-pair loss, from the sequence log-probs of a batch of pairs to what each pair costs and logs.

    Legend: B pairs, rows 2B with the B chosen responses first, then the B rejected ones, in the same pair order.
    policy_logps (2B,): log pi(y|p) SUMMED over each response's tokens (with grad); ref_logps (2B,): the reference's,
    already averaged over tokens when `average`; lengths (2B,): |y| (>= 1).

      1. the log-probs compared: the sums, or with `average` the per-token means log pi(y|p) / |y| (IPO always,
         SimPO's length normalisation inside DPO with --length-normalize)
      2. the preference loss of the margin x = (log-ratio of the chosen) - (log-ratio of the rejected):
         loss "sigmoid"  DPO, Rafailov et al. 2023, Eq. 7            -log sigmoid(beta x)           (dpo_loss)
              "cdpo"     conservative DPO, Mitchell 2023             label_smoothing eps, default 0.1 (dpo_loss)
              "ipo"      IPO, Azar et al. 2023, Eq. 17               (x - 1/(2 beta))^2              (ipo_loss)
              "kto"      KTO, Ethayarajh et al. 2024, Eq. 8: no margin; the chosen response is a desirable example
                         and the rejected one an undesirable one, each against the reference point z0 (kto_loss);
                         a pair's loss is the mean of its two examples' (so the mean over pairs is the mean over
                         examples); summed log-probs only
      3. + rpo_alpha x the chosen response's NLL per token (RPO, Pang et al. 2024, Eq. 1; rpo_nll)

    Returns (losses (B,), stats): stats maps the logged names to detached (B,) tensors: rewards/chosen,
    rewards/rejected (beta x log-ratio), rewards/accuracies (chosen > rejected), rewards/margins, logps/chosen,
    logps/rejected (the compared log-probs), nll/chosen with rpo_alpha > 0, and kl/z0 (z0 repeated) with "kto". The
    caller reduces (mean over pairs).
    label_smoothing: None means 0.1 under "cdpo" and 0 otherwise; only "cdpo" takes one above 0. z0 (a float or
    0-dim tensor, kto_reference_point), desirable_weight (lambda_D), undesirable_weight (lambda_U): "kto" only."""
    if loss not in LOSSES:
        raise ValueError(f"preference_loss: loss must be one of {LOSSES}, got {loss!r}")
    eps = (0.1 if loss == "cdpo" else 0.0) if label_smoothing is None else label_smoothing
    if eps and loss != "cdpo":
        raise ValueError(f"preference_loss: label_smoothing is cdpo's epsilon, got {eps} with loss {loss!r}")
    if not policy_logps.shape == ref_logps.shape == lengths.shape or policy_logps.dim() != 1 \
            or len(policy_logps) % 2:
        raise ValueError(f"preference_loss: policy_logps, ref_logps and lengths must be (2B,) each, got "
                         f"{[tuple(t.shape) for t in (policy_logps, ref_logps, lengths)]}")
    if (loss == "kto") != (z0 is not None) or (loss == "kto" and average):
        raise ValueError(f"preference_loss: z0 goes with loss 'kto' (always, on summed log-probs) and only with it; "
                         f"got loss {loss!r}, z0 {z0}, average {average}")
    b = len(policy_logps) // 2
    policy = policy_logps / lengths if average else policy_logps  # (2B,)  1.
    if loss == "kto":  # 2. each row an example of its own: the chosen ones desirable, the rejected ones not
        desirable = torch.arange(2 * b, device=policy.device) < b  # (2B,)
        examples, rewards = kto_loss(policy, ref_logps, desirable, z0, beta, desirable_weight, undesirable_weight)
        losses, r_c, r_r = (examples[:b] + examples[b:]) / 2, rewards[:b], rewards[b:]  # (B,) each
    else:
        args = (policy[:b], policy[b:], ref_logps[:b], ref_logps[b:])  # chosen, rejected; their references
        losses, r_c, r_r = ipo_loss(*args, beta=beta) if loss == "ipo" else \
            dpo_loss(*args, beta=beta, label_smoothing=eps)  # (B,) each  2.
    stats = {"rewards/chosen": r_c, "rewards/rejected": r_r, "rewards/accuracies": (r_c > r_r).to(r_c.dtype),
             "rewards/margins": r_c - r_r, "logps/chosen": policy[:b].detach(), "logps/rejected": policy[b:].detach()}
    if rpo_alpha > 0:  # 3.
        nll = rpo_nll(policy_logps[:b], lengths[:b])  # (B,): the chosen rows come first
        losses = losses + rpo_alpha * nll
        stats["nll/chosen"] = nll.detach()
    if loss == "kto":
        stats["kl/z0"] = torch.as_tensor(z0, dtype=r_c.dtype, device=r_c.device).detach().expand(b)  # (B,)
    return losses, stats
