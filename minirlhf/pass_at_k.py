"""pass@k: the chance that at least one of k responses to a prompt is correct, estimated without bias from n >= k.

Chen et al. 2021, "Evaluating Large Language Models Trained on Code", Eq. 1. Sample n responses to a prompt, count
the c correct ones; then, over the k-subsets of the n drawn uniformly (without replacement),

    pass@k = 1 - C(n - c, k) / C(n, k)                          (the share of k-subsets holding a correct response)
           = 1 - Π_{i = n - c + 1}^{n} (1 - k / i)             (the same number, without huge binomials)

is an unbiased estimate of 1 - (1 - p)^k, p the prompt's chance of a correct sample; the benchmark number is its mean
over prompts. Drawing k samples and asking "any correct?" gives the same mean but a much noisier number. pass@1 is
c / n, the plain accuracy; pass@k for large k measures what the policy can reach at all, not what it usually says:
Yue et al. 2025 ("Does Reinforcement Learning Really Incentivize Reasoning Capacity in LLMs Beyond the Base
Model?") find RL raises pass@1 while the base model wins at large k (RL sharpens, it does not expand).
"""
import torch


def pass_at_k(n, c, k):
    """Unbiased pass@k (module docstring) of prompts with n samples of which c are correct, as float64.

    n, c: ints or integer tensors of one shape (or broadcastable), 0 <= c <= n; k: an int with 1 <= k <= n for every
    prompt. k > n is refused (ValueError), not NaN: a k-subset of n < k samples does not exist, and a mean over
    prompts would hide the NaN of one. Returns a float64 tensor of the broadcast shape (0-dim for ints); exactly 1
    where n - c < k (every k-subset holds a correct one), exactly 0 where c = 0."""
    n = torch.as_tensor(n)
    c = torch.as_tensor(c)
    if n.is_floating_point() or c.is_floating_point() or isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"pass_at_k: n, c and k must be integers, got n {n.dtype}, c {c.dtype}, k {k!r}")
    n, c = torch.broadcast_tensors(n.long(), c.long())
    if ((c < 0) | (c > n)).any():
        raise ValueError("pass_at_k: every c must lie in [0, n]")
    if k < 1 or (n < k).any():
        raise ValueError(f"pass_at_k: k must lie in [1, n], got k {k} with n as small as {n.min().item()}")
    i = torch.arange(1, int(n.max()) + 1, dtype=torch.float64)  # (N,): every i that may enter the product
    in_product = (i > (n - c).unsqueeze(-1)) & (i <= n.unsqueeze(-1))  # (..., N): n - c < i <= n
    factors = torch.where(in_product, 1 - k / i, torch.ones((), dtype=torch.float64))  # (..., N)
    return 1 - factors.prod(-1)  # (...): a factor is 0 at i = k, so n - c < k gives exactly 1
