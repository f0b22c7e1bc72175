"""How far each KL estimator's expected gradient is from grad KL(pi || pi_ref), where the code puts it, as the policy
moves away from the reference.

    python bench/kl_gradients.py            # ~3 s; writes docs/kl_gradients.png

A categorical policy pi = softmax(theta) over 7 tokens, theta = ref_logits + s * direction (one fixed random
direction), s from 1e-3 to 10. For each estimator k (kl.k1, k2, k3) and placement, the expected gradient is computed
exactly in float64 by summing over the 7 tokens (no sampling):

    in the reward   E_{x~pi}[ sg(k(x)) grad log pi(x) ]   (PPO / REINFORCE: token_rewards, the score function)
    in the loss     E_{x~sg(pi)}[ grad k(x; theta) ]      (the estimate of sampled tokens backpropagated; GRPO's k3)

Panels: the relative error |g - grad KL| / |grad KL| (float64 rounding where g is exact), the strength |g| / |grad KL|
(how hard the penalty pulls; 1 is right) and the cosine between g and grad KL (its direction; 1 is right). The rows
of docs/kl.md's gradient table, each checked by tests/test_kl_gradients.py.
"""
import os

import matplotlib
import torch
from torch.distributions import Categorical, kl_divergence

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from minirlhf.kl import k1, k2, k3  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}
STYLE = {"reward": "-", "loss": "--"}
COLOR = {"k1": "tab:blue", "k2": "tab:orange", "k3": "tab:green"}


def expected_gradients(theta, ref_logits):
    """{(estimator, placement): expected gradient (V,)}, plus grad KL(pi || pi_ref)."""
    theta = theta.clone().requires_grad_(True)
    logp, ref_logp = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
    p = logp.exp().detach()  # the sampling distribution, a constant
    out = {}
    for name, k in ESTIMATORS.items():
        reward = (p * k(logp.detach(), ref_logp) * logp).sum()  # sg(k) * log pi: the score-function surrogate
        loss = (p * k(logp, ref_logp)).sum()  # k backpropagated
        out[name, "reward"] = torch.autograd.grad(reward, theta, retain_graph=True)[0]
        out[name, "loss"] = torch.autograd.grad(loss, theta, retain_graph=True)[0]
    kl = kl_divergence(Categorical(logits=theta), Categorical(logits=ref_logits))
    return out, torch.autograd.grad(kl, theta)[0], kl.item()


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(7, generator=g, dtype=torch.float64)
    direction = torch.randn(7, generator=g, dtype=torch.float64)
    steps = torch.logspace(-3, 1, 60, dtype=torch.float64)
    kls, err, size, cosine = [], {}, {}, {}
    for s in steps:
        grads, target, kl = expected_gradients(ref_logits + s * direction, ref_logits)
        kls.append(kl)
        for key, v in grads.items():
            err.setdefault(key, []).append(max(((v - target).norm() / target.norm()).item(), 1e-17))
            size.setdefault(key, []).append(max((v.norm() / target.norm()).item(), 1e-17))
            zero = v.norm() < 1e-12 * target.norm()  # k1 in the loss: rounding noise, no direction
            cosine.setdefault(key, []).append(float("nan") if zero else (v @ target / v.norm() / target.norm()).item())
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = ((err, "|g − ∇KL| / |∇KL|", "relative error (0 is right)", "log"),
              (size, "|g| / |∇KL|", "strength of the pull (1 is right)", "log"),
              (cosine, "cos(g, ∇KL)", "direction (1 is right; k1 in the loss: g = 0)", "linear"))
    for ax, (values, ylabel, title, yscale) in zip(axes, panels):
        for (name, place), v in values.items():
            label = f"{name} in the {place}" + ("  (GRPO)" if (name, place) == ("k3", "loss") else "")
            ax.plot(kls, v, STYLE[place], color=COLOR[name], label=label, lw=2)
        ax.set(xscale="log", yscale=yscale, xlabel="KL(π‖π_ref) (nats)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(1e-17, 10)
    axes[0].axhspan(1e-17, 1e-12, color="0.92")
    axes[0].text(kls[0], 3e-15, "exact (float64 rounding)", fontsize=9)
    axes[1].set_ylim(1e-17, 10)
    axes[1].axhspan(1e-17, 1e-12, color="0.92")
    axes[1].text(kls[0], 1e-12 / 30, "0 (float64 rounding)", fontsize=9)
    axes[2].set_ylim(-1.05, 1.05)
    axes[2].axhline(0, color="0.6", lw=0.8)
    axes[0].legend(fontsize=9, loc="center right")
    fig.suptitle("Expected gradient of each KL estimator, in the reward (score function) or in the loss (pathwise); "
                 "7 tokens, one direction away from π_ref, float64, exact", fontsize=10)
    fig.tight_layout()
    out = os.path.join(REPO, "docs", "kl_gradients.png")
    fig.savefig(out, dpi=110)
    for i in (0, 30, 45, 59):
        print(f"KL {kls[i]:.2e}: " + ", ".join(f"{n} {p} {err[n, p][i]:.2g}" for n, p in err))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
