"""On-policy distillation: at every token of a response the STUDENT sampled, a divergence between the teacher's and
the student's next-token distributions over the whole vocabulary (GKD: Agarwal et al. 2024, "On-Policy Distillation
of Language Models: Learning from Self-Generated Mistakes", arXiv 2306.13649, Sec. 2 "divergences" and Sec. 3).

Legend: B batch, T positions, V vocab; s = softmax(student_logits), t = softmax(teacher_logits), per position.

    reverse-kl   KL(s ‖ t) = Σ_v s log(s / t)               mode-seeking: the student may drop some of the teacher's
                                                            tokens, never put mass where the teacher puts none
    forward-kl   KL(t ‖ s) = Σ_v t log(t / s)               mode-covering: the student must cover every token the
                                                            teacher likes (infinite where s = 0 and t > 0)
    jsd          JSD_β = β KL(t ‖ m) + (1 - β) KL(s ‖ m),   the paper's generalized JSD, with its convention: β weighs
                 m = β t + (1 - β) s                        the teacher (β = 0.5: the symmetric JSD); JSD_β / β ->
                                                            forward KL as β -> 0, JSD_β / (1 - β) -> reverse KL as
                                                            β -> 1 (JSD_β itself -> 0 at both ends)

On-policy + reverse KL is what is now called "on-policy distillation". The teacher is a fixed target: its logits are
detached, the gradient reaches the student only, and only through its distributions at the sampled positions (GKD does
not backpropagate through the student's sampling of the responses either, Sec. 3). A token with student probability 0
(a filtered-out token: -inf logit) adds 0 to KL(s ‖ ·); t may not be 0 where s is not (the caller's teacher is
unfiltered).
"""
import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("reverse-kl", "forward-kl", "jsd")


def _kl(logp, logq):
    """KL(p ‖ q) = Σ_v p (log p - log q) from normalised log-probabilities, (..., V) -> (...). p = 0 adds 0 (log p is
    clamped to the most negative finite float, as ops.entropy_from_logits: 0 * (-inf) would be nan, in the gradient
    too). The log p inside is detached: its gradient term Σ_v p ∇log p = ∇Σ_v p = 0 in exact arithmetic, but in
    floats it is the rounding of Σ_v p = 1, about 1e-8 where p = q, which Adam would scale up to steps of the size of
    the learning rate; without it a student equal to its teacher gets a gradient of exactly 0 (reverse KL)."""
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return (logp.exp() * (logp.detach() - logq)).sum(-1)


def token_divergence(student_logits, teacher_logits, mask, kind="reverse-kl", beta=0.5):
    """(B, T, V) student and teacher logits, (B, T) mask -> (B, T) divergence per position, 0 where mask is 0.

    kind: reverse-kl KL(s ‖ t) | forward-kl KL(t ‖ s) | jsd (β KL(t ‖ m) + (1 - β) KL(s ‖ m), m = β t + (1 - β) s,
    0 < beta < 1). The logits are those of the distributions compared (already divided by a temperature, already
    filtered: -inf for a token with probability 0). The teacher's are detached: the gradient flows to the student
    only. Any leading dims work: (..., V) logits with a (...) mask -> (...)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"kind must be one of {DIVERGENCES}, got {kind!r}")
    log_s = F.log_softmax(student_logits, dim=-1)  # (B, T, V)
    log_t = F.log_softmax(teacher_logits.detach(), dim=-1)  # (B, T, V), a constant
    if kind == "reverse-kl":
        div = _kl(log_s, log_t)
    elif kind == "forward-kl":
        div = _kl(log_t, log_s)
    else:
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1 (its limits are forward-kl and reverse-kl), got {beta}")
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log(1 - beta))  # log(β t + (1 - β) s)
        div = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    return torch.where(mask.bool(), div, torch.zeros_like(div))  # (B, T)
