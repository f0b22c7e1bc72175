"""KL divergence between the policy and the reference: per-token estimators, the exact value, the adaptive coefficient.

Legend: B batch, T tokens, V vocab.

For a token x sampled from the policy pi, with logr = log pi_ref(x) - log pi(x) and r = exp(logr), their VALUES
(Schulman, "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html):

    k1 = -logr               E_pi[k1] = KL(pi || pi_ref): unbiased, high variance, NEGATIVE on many tokens
    k2 = logr^2 / 2          biased (close to the KL only near pi_ref), always >= 0, low variance
    k3 = (r - 1) - logr      E_pi[k3] = KL(pi || pi_ref): unbiased (E_pi[r] = 1), and always >= 0 since e^x >= 1 + x

A negative per-token (or even per-batch) k1 is not a bug in the policy: it is what an unbiased, noisy estimator does.

An unbiased VALUE is not an unbiased GRADIENT. What an estimate differentiates to depends on where it is put
(expected gradients; grad KL = grad_theta KL(pi || pi_ref), the penalty RLHF asks for):

         in the REWARD: detached, times grad log pi        in the LOSS: backpropagated through k(x; theta) on the
         (score function; token_rewards: PPO, REINFORCE)   sampled tokens (pathwise; GRPO's k3)
    k1   grad KL                          right            0                             no gradient at all
    k2   grad E_pi[k2] - grad KL          biased           grad KL, on-policy            right
    k3   grad KL - grad KL(pi_ref || pi)  wrong            grad KL(pi_ref || pi)         the other direction

The two placements are the two halves of grad E_pi[k] = E_pi[k grad log pi] + E_pi[grad k]; each keeps one. k2 and k3 in
the reward vanish to first order near pi_ref (both are second-order small per token, where grad KL is first order) and
point partly the wrong way (cosines with grad KL of -0.9 to +0.8 in the tests). k3 in the loss, GRPO's (grpo.py, as in
DeepSeekMath), follows KL(pi_ref || pi), whose gradient agrees with grad KL to first order at pi_ref only. PPO's and
REINFORCE's default, --kl-estimator k1, is the right one.

Samples of an older policy pi_old (a second epoch): a loss-side estimate needs the ratio sg(pi / pi_old) (k2 then gives
grad KL again); rho * k with rho = pi / pi_old keeping its gradient gives grad E_pi[k], so grad KL for k1 and k3. On
whole responses, a per-token estimate in the loss misses how earlier tokens change later tokens' KL (a partial
gradient); k1 in the reward does not, since the return of a token carries the later tokens' KL (REINFORCE's
whole-response reward; PPO's GAE, exactly so at gamma = lam = 1).

Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL" (arXiv:2506.09477); Zhang et al.
2025, "On the design of KL-regularized policy gradient algorithms for LLM reasoning" (arXiv:2505.17508). Every entry is
checked by exact enumeration in float64 in tests/test_kl_gradients.py and explained in docs/kl.md.

Sampled from a top-k / top-p filtered q (minirlhf scores samples under q, pi_ref its plain softmax): k1 stays unbiased
for KL(q || pi_ref), but E_q[k3] = KL(q || pi_ref) - (1 - pi_ref(kept tokens)), since E_q[r] = pi_ref(kept) < 1:
per token, k3 under-reads the filtered distribution's KL by the reference's mass the filter cut.
"""
import math

import torch
import torch.nn.functional as F


def _check_same_shape(name, a, b):
    if a.shape != b.shape:
        raise ValueError(f"{name}: logprobs and ref_logprobs shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def k1(logprobs, ref_logprobs):
    """k1 = log pi(x) - log pi_ref(x), elementwise. (...) -> (...). Put it in the reward (detached): its expected
    score-function gradient is grad KL(pi || pi_ref); backpropagated as a loss its expected gradient is 0."""
    _check_same_shape("k1", logprobs, ref_logprobs)
    return logprobs - ref_logprobs


def k2(logprobs, ref_logprobs):
    """k2 = 0.5 * (log pi(x) - log pi_ref(x))^2, elementwise. (...) -> (...). Backpropagated as a loss on tokens
    sampled from pi its expected gradient is grad KL(pi || pi_ref); in the reward it is biased."""
    _check_same_shape("k2", logprobs, ref_logprobs)
    return 0.5 * (logprobs - ref_logprobs) ** 2


def k3(logprobs, ref_logprobs):
    """k3 = (r - 1) - log r with r = pi_ref(x) / pi(x), elementwise. (...) -> (...).

    expm1 keeps r - 1 exact for tiny logr, so k3 is never negative from cancellation and is 0 iff the inputs match.
    Its VALUE is unbiased for KL(pi || pi_ref); its gradient is not: backpropagated as a loss (GRPO) its expected
    gradient is grad KL(pi_ref || pi), in the reward grad KL(pi || pi_ref) - grad KL(pi_ref || pi) (module table)."""
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
