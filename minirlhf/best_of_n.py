"""Best-of-N: sample n responses from the base policy, keep the one the reward model scores highest.

    python -m minirlhf.best_of_n --n 1 2 4 8 16 32 64      # a table on the built-in world (embedded reward model)
    python -m minirlhf.best_of_n --model DIR --reward-model RUN/reward_model   # another base, a reward model on it
    python -m minirlhf.best_of_n --reward-model A B C --reward-ensemble min    # an ensemble as the proxy

Legend: B prompts, N = max(ns) samples per prompt, n <= N the samples one selection sees.
The baseline every RLHF paper compares to (Stiennon et al. 2020; Nakano et al. 2021; Gao et al. 2023): no training,
and n is its KL knob. The best-of-n policy π_n (draw n samples of π, return the proxy's favourite) is at most

    KL(π_n ‖ π) <= log n - (n - 1) / n   nats                 best_of_n_kl_bound

from π (Stiennon et al. 2020, Appendix; Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
policy", prove it is an upper bound). The formula treats every sample as distinct; when likely responses repeat, as
short answers do on the built-in world, the true KL is smaller (not measured here). With the gold reward known,
best-of-n shows how far a reward model can be trusted as n grows (Gao et al. 2023: the proxy keeps rising, gold may
peak and fall).
"""
import math
import os
import types
from dataclasses import dataclass, field
from typing import Optional

import torch

from .assets import ASSETS_DIR, TINY_LLAMA
from .cli import run_script
from .evaluation import generate
from .sampling import eval_mode

NS = (1, 2, 4, 8, 16, 32, 64)


def best_of_n_kl_bound(n):
    """log n - (n - 1) / n: the KL in nats of best-of-n from its sampling policy, an upper bound (module docstring).
    0 at n = 1 (the policy itself), increasing, about log n - 1 for large n."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best_of_n_kl_bound: n must be an integer >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def select_best(scores, n):
    """scores (B·n,): n contiguous samples per prompt -> (B,) position in [0, n) of each prompt's highest score
    (the first of equal scores: torch.argmax's documented rule). Row b's winner is scores[b·n + index[b]]."""
    if scores.dim() != 1 or n < 1 or scores.numel() % n:
        raise ValueError(f"select_best: need a 1-D tensor of B·n scores for n = {n}, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("select_best: a score is NaN (argmax would pick it)")
    return scores.view(-1, n).argmax(1)  # (B, n) -> (B,)


@torch.no_grad()
def best_of_n_evaluation(model, tokenizer, prompts, prompt_ids, *, reward_fn, gold_fn=None, ns=NS, seed=0,
                         device="cpu", forward_batch_size=64, max_new_tokens=24, temperature=1.0):
    """Best-of-n of the active adapter (the base policy) on B held-out prompts, for every n in ns.

    prompts: B message lists, prompt_ids: their token ids (evaluation.held_out_prompts with samples=1).
    reward_fn(batch) -> (b,) proxy scores of an evaluation.generate batch that also holds "prompts" (its messages: so
    roles.Reward's score works as is); gold_fn(messages, text) -> float, or None off the built-in world.

    The estimator: N = max(ns) responses per prompt are sampled ONCE, and best-of-n selects among the first n of them.
    Each prefix is n independent samples of π, so every n's estimate is unbiased, as with a fresh draw per n; but one
    draw costs N samples per prompt instead of sum(ns), and since the n's share their samples (common random numbers)
    the differences between them are less noisy. With gold as the proxy, mean gold is exactly non-decreasing in n.
    Rows are sampled forward_batch_size at a time, prompt by prompt (its N samples in a row), from one generator
    seeded with `seed`: with ns = (1,) the samples are evaluation.evaluate_policy's for the same seed and batch_size.

    Returns one dict per n: n, kl_bound (nats), reward (mean proxy score of the selected responses), length (their
    mean tokens) and, with gold_fn, gold (their mean gold score) and win_rate (how often the selection's gold beats
    the first sample's, the n = 1 choice; ties count half)."""
    if not ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in ns):
        raise ValueError(f"best_of_n_evaluation: ns must be integers >= 1, got {ns!r}")
    B, N = len(prompt_ids), max(ns)
    messages = [p for p in prompts for _ in range(N)]  # B·N rows, prompt by prompt
    ids = [p for p in prompt_ids for _ in range(N)]
    g = torch.Generator(device=device).manual_seed(seed)
    proxy, lengths, gold = [], [], []
    with eval_mode(model):
        for i in range(0, B * N, forward_batch_size):
            batch = generate(model, tokenizer, ids[i:i + forward_batch_size], max_new_tokens=max_new_tokens,
                             temperature=temperature, generator=g, device=device)
            batch["prompts"] = messages[i:i + forward_batch_size]
            proxy.append(reward_fn(batch).float().cpu())  # (b,)
            lengths.append(batch["response_mask"].sum(1).float().cpu())  # (b,)
            gold += [gold_fn(p, t) for p, t in zip(batch["prompts"], batch["texts"])] if gold_fn else []
    proxy, lengths = torch.cat(proxy).view(B, N), torch.cat(lengths).view(B, N)  # (B, N)
    gold = torch.tensor(gold, dtype=torch.float64).view(B, N) if gold_fn else None  # (B, N)
    rows, b = [], torch.arange(B)
    for n in ns:
        best = select_best(proxy[:, :n].reshape(-1), n)  # (B,): the selection among the first n samples
        row = {"n": n, "kl_bound": best_of_n_kl_bound(n), "reward": proxy[b, best].mean().item(),
               "length": lengths[b, best].mean().item()}
        if gold is not None:
            chosen, first = gold[b, best], gold[:, 0]  # (B,) each
            row.update(gold=chosen.mean().item(),
                       win_rate=((chosen > first).double() + 0.5 * (chosen == first).double()).mean().item())
        rows.append(row)
    return rows


@dataclass
class Args:
    """Best-of-n of a base policy on the built-in world's held-out prompts: proxy and gold reward against n."""
    model: str = TINY_LLAMA
    """the base policy: a Hugging Face folder or Hub id (default: the embedded tiny Llama); --reward-model must be
    trained on it"""
    template: Optional[str] = None
    """prompt format when the tokenizer has no chat template: question-answer | qa | llama3"""
    system_prompt: Optional[str] = None
    """a system message put before every prompt (chat templates and --template llama3 render it)"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU) | float32 | bfloat16 |
    float16"""
    quantization: str = "none"
    """base precision: none | 8bit | 4bit (NF4)"""
    device: str = "auto"
    """auto (CUDA if present, else CPU) | cpu | cuda"""
    n: list[int] = field(default_factory=lambda: list(NS))
    """the n of best-of-n (one row each); max(n) responses are sampled per prompt"""
    reward_model: list[str] = field(default_factory=lambda: [os.path.join(ASSETS_DIR, "reward-model")])
    """the proxy: a reward_model/ folder of train_reward.py (default: the embedded one), several (an ensemble,
    combined by --reward-ensemble) or 'gold'"""
    reward_ensemble: str = "mean"
    """how the scores of several --reward-model folders combine: mean | min | mean-minus-var | mean-minus-std
    (minirlhf/reward_ensemble.py)"""
    reward_ensemble_lambda: float = 1.0
    """λ of mean-minus-var and mean-minus-std"""
    reward_ensemble_normalize: bool = False
    """before they combine, standardise each --reward-model's scores by its mean and std over a fixed reference set
    (the built-in world's first 512 training pairs, chosen and rejected) and put all on the members' average offset
    and scale, so that the members' arbitrary Bradley-Terry offsets and scales do not pass for disagreement
    (reward_ensemble.py); off: the raw scores"""
    prompts: int = 120
    """held-out prompts of the built-in world's test split"""
    max_new_tokens: int = 24
    """response tokens sampled at most"""
    max_prompt_length: Optional[int] = None
    """prompt tokens kept (from the end); default: derived from the data (the longest prompt after the template, at
    most 1024), so that no prompt is cut"""
    temperature: float = 1.0
    """sampling temperature"""
    forward_batch_size: int = 64
    """responses sampled and scored per forward pass (the samples depend on it, their distribution does not)"""
    seed: int = 0
    """sampler seed"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""


def main(args):
    """The table on the built-in world's held-out prompts: base = --model, proxy = --reward-model."""
    from .data import world
    from .devices import get_device
    from .errors import InputError
    from .evaluation import held_out_prompts
    from .models import load_model, load_tokenizer
    from .reward_ensemble import ENSEMBLES
    from .roles import Reward
    from .validation import check_choice, check_common, check_ensemble_normalize, check_reward_models
    check_common(args, {"prompts": ">= 1", "reward_ensemble_lambda": ">= 0"})  # ranges, --quantization, --dtype, ...
    if min(args.n) < 1:
        raise InputError(f"--n must be integers >= 1, got {args.n}")
    check_choice("--reward-ensemble", args.reward_ensemble, ENSEMBLES)
    gold = args.reward_model == ["gold"]
    if "gold" in args.reward_model and not gold:
        raise InputError(f"--reward-model: gold is the proxy on its own, not an ensemble member, got "
                         f"{args.reward_model}")
    if not gold:
        check_reward_models(args.reward_model)  # before anything is loaded
    if args.reward_ensemble_normalize:
        check_ensemble_normalize("gold" if gold else "model", "builtin")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    device = get_device(args.device)
    model = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                       tokenizer=tokenizer)
    reward = Reward(model, types.SimpleNamespace(  # the RL scripts' reward, with the settings it reads
        reward="gold" if gold else "model", reward_model=args.reward_model, reward_ensemble=args.reward_ensemble,
        reward_ensemble_lambda=args.reward_ensemble_lambda, reward_ensemble_normalize=args.reward_ensemble_normalize,
        reward_transform="expected", reward_entropy_coef=0.0, forward_batch_size=args.forward_batch_size,
        dataset="builtin", template=args.template, system_prompt=args.system_prompt), tokenizer)
    prompts, ids = held_out_prompts("builtin", "test", None, tokenizer, args.prompts, 1, args.max_prompt_length,
                                    args.template, system_prompt=args.system_prompt)
    rows = best_of_n_evaluation(model, tokenizer, prompts, ids, reward_fn=reward.score, gold_fn=world.gold_score,
                                ns=tuple(args.n), seed=args.seed, forward_batch_size=args.forward_batch_size,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, device=device)
    print(f"best-of-n on {len(ids)} held-out prompts, proxy = {reward.describe}, gold max {world.GOLD_MAX}")
    print("| n | KL bound (nats) | proxy | gold | win rate vs n=1 | length |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['kl_bound']:.3f} | {r['reward']:+.3f} | {r['gold']:.3f} | {r['win_rate']:.3f} | "
              f"{r['length']:.1f} |")
    return rows


if __name__ == "__main__":
    run_script(main, Args, prog="python -m minirlhf.best_of_n")
