"""KL divergence between the policy and the reference: per-token estimators, the exact value, the adaptive coefficient.

Legend: B batch, T tokens, V vocab.

For a token x sampled from the policy pi, with logr = log pi_ref(x) - log pi(x) and r = exp(logr)
(Schulman, "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html):

    k1 = -logr               unbiased for KL(pi || pi_ref), high variance, NEGATIVE on many tokens
    k2 = logr^2 / 2          biased, always >= 0, low variance
    k3 = (r - 1) - logr      unbiased (E_pi[r] = 1) and always >= 0, since e^x >= 1 + x

A negative per-token (or even per-batch) k1 is not a bug in the policy: it is what an unbiased, noisy estimator does.
"""
import math

import torch
import torch.nn.functional as F


def _check_same_shape(name, a, b):
    if a.shape != b.shape:
        raise ValueError(f"{name}: logprobs and ref_logprobs shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def k1(logprobs, ref_logprobs):
    """k1 = log pi(x) - log pi_ref(x), elementwise. (...) -> (...)."""
    _check_same_shape("k1", logprobs, ref_logprobs)
    return logprobs - ref_logprobs


def k2(logprobs, ref_logprobs):
    """k2 = 0.5 * (log pi(x) - log pi_ref(x))^2, elementwise. (...) -> (...)."""
    _check_same_shape("k2", logprobs, ref_logprobs)
    return 0.5 * (logprobs - ref_logprobs) ** 2


def k3(logprobs, ref_logprobs):
    """k3 = (r - 1) - log r with r = pi_ref(x) / pi(x), elementwise. (...) -> (...).

    expm1 keeps r - 1 exact for tiny logr, so k3 is never negative from cancellation and is 0 iff the inputs match."""
    _check_same_shape("k3", logprobs, ref_logprobs)
    logr = ref_logprobs - logprobs
    return torch.expm1(logr) - logr


def exact_kl(logits, ref_logits):
    """KL(pi || pi_ref) = sum_v pi(v) (log pi(v) - log pi_ref(v)) at every position. (..., V) -> (...)."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"exact_kl: logits shapes differ: {tuple(logits.shape)} vs {tuple(ref_logits.shape)}")
    logp = F.log_softmax(logits, dim=-1)  # (..., V)
    ref_logp = F.log_softmax(ref_logits, dim=-1)  # (..., V)
    return (logp.exp() * (logp - ref_logp)).sum(-1)  # (...)


class AdaptiveKLController:
    """The KL coefficient beta of the reward r - beta * KL, steered toward a target KL (Ziegler et al. 2019, Sec. 2.2):

        e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + e_t * n_steps / horizon)

    `n_steps` is how many samples (episodes) the measured KL came from, so a run's total drift does not depend on the
    batch size."""

    def __init__(self, init_kl_coef, target, horizon):
        if not (init_kl_coef > 0 and target > 0 and horizon > 0):
            raise ValueError(f"AdaptiveKLController: init_kl_coef, target and horizon must be > 0, got "
                             f"{init_kl_coef}, {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl, n_steps):
        """Move the coefficient after a batch whose mean KL was `current_kl`; returns the new value."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl) or n_steps < 0:
            raise ValueError(f"AdaptiveKLController.update: need a finite KL and n_steps >= 0, got "
                             f"{current_kl}, {n_steps}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        if mult <= 0:
            raise ValueError(f"AdaptiveKLController.update: n_steps={n_steps} is too large for horizon={self.horizon} "
                             f"(the coefficient would turn non-positive)")
        self.value *= mult
        return self.value

    def state_dict(self):
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state):
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])
