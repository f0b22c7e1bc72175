"""The negative-KL experiment: the k1 KL estimate of a rollout when the policy's log-probs come from the
distribution actually sampled from, and when they come from the plain softmax (the StackLLaMA write-up's warning;
docs/negative_kl.md).

    python bench/negative_kl.py --threads 1                   # ~5 minutes on one CPU core
    python bench/negative_kl.py --threads 1 --iterations 0    # step 0 only (the untrained policy), ~1 minute

For each sampler setting, the held-out prompts of the built-in world are sampled from the policy (--prompts x
--samples responses) and every response y gets, summed over its tokens t (π at the sampling temperature T, q_t the
distribution the sampler drew from: π_t cut by top-k / top-p / min-new-tokens and renormalised by its kept mass Z_t):
  k1 sampled     Σ log q_t(y_t) - log π_ref(y_t)   (rollout.rollout_logprobs with the SamplingSettings: minirlhf's RL
                                                  scripts); E = KL(q ‖ π_ref) >= 0
  k1 unfiltered  Σ log π_t(y_t) - log π_ref(y_t)   (the plain softmax, as TRL-era PPO code scored its samples)
                 = k1 sampled - Σ (-log Z_t): E = KL(q ‖ π_ref) - E[Σ -log Z_t], the filtered-out mass is missing
  exact          Σ KL(q_t ‖ π_ref,t) along the sampled path: what k1 sampled estimates, without the token noise
  -log Z         Σ -log Z_t: the gap between the two k1's
  eval/kl        evaluation.sequence_kl: Σ KL(π_t ‖ π_ref,t) of the unfiltered distributions at temperature 1
π_ref is always the base's unfiltered softmax at T. Measured at step 0 (the policy IS the base) and, with
--iterations N > 0, after train_ppo.py --iterations N sampling with the same setting, trained two ways: as minirlhf
trains (old and new log-probs of q) and TRL-era (train_ppo.py run in this process with rollout_logprobs /
policy_logprobs patched to the plain softmax at T: the ratio, the KL penalty and the loss all use π, not q).
A benchmark, never run as a test.
"""
import argparse
import contextlib
import json
import os
import sys
import time
from unittest import mock

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from minirlhf import lora, rollout  # noqa: E402
from minirlhf.assets import TINY_LLAMA  # noqa: E402
from minirlhf.cli import parse_args  # noqa: E402
from minirlhf.evaluation import generate, held_out_prompts, sequence_kl  # noqa: E402
from minirlhf.formats import load_adapter  # noqa: E402
from minirlhf.heads import final_hidden, lm_logits, predicting_states, to_token_grid  # noqa: E402
from minirlhf.models import load_model, load_tokenizer, reference  # noqa: E402
from minirlhf.rollout import reference_logprobs, rollout_logprobs  # noqa: E402
from minirlhf.sampling import SamplingSettings, sampling_logits  # noqa: E402

# name -> train_ppo.py flags of the sampler; the first is the control (no filter: both k1's are the same number)
SETTINGS = {
    "T 1 (no filter)": [],
    "top-k 5": ["--top-k", "5"],
    "top-p 0.7, T 0.7": ["--top-p", "0.7", "--temperature", "0.7"],
    "min-new-tokens 8": ["--min-new-tokens", "8"],
}


def settings_from_flags(flags, eos_token_id):
    """The SamplingSettings a train_ppo.py command line with these flags samples with."""
    import train_ppo
    return SamplingSettings.from_args(parse_args(train_ppo.Args, flags), eos_token_id)


@torch.no_grad()
def exact_sampled_kl(model, batch, settings):
    """(B,) Σ_t KL(q_t ‖ π_ref,t) and (B,) Σ_t -log Z_t along each sampled response: q_t the filtered distribution,
    π_ref,t the reference's plain softmax at the temperature, Z_t the mass of π_t the filter kept."""
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]  # (B, T)
    states = predicting_states(final_hidden(model, ids, attention), mask)[mask.bool()]  # (N, H)
    logits = lm_logits(model, states)  # (N, V)
    with reference(model):
        ref_states = predicting_states(final_hidden(model, ids, attention), mask)[mask.bool()]
        ref_logits = lm_logits(model, ref_states)  # (N, V)
    steps = (mask.long().cumsum(-1) - 1)[mask.bool()]  # (N,) response step of each token
    q_logp = torch.log_softmax(sampling_logits(logits, settings, steps), -1)  # (N, V), -inf outside the filter
    p_logp = torch.log_softmax(logits / settings.temperature, -1)
    ref_logp = torch.log_softmax(ref_logits / settings.temperature, -1)
    kept = torch.isfinite(q_logp)
    kl = torch.where(kept, q_logp.exp() * (q_logp - ref_logp), torch.zeros_like(q_logp)).sum(-1)  # (N,)
    minus_log_z = -torch.where(kept, p_logp, torch.full_like(p_logp, float("-inf"))).logsumexp(-1)  # (N,)
    return to_token_grid(kl, mask).sum(-1), to_token_grid(minus_log_z, mask).sum(-1)  # (B,) each


def measure(model, tokenizer, settings, prompt_ids, args):
    """Sample every held-out prompt with `settings` and return the per-sequence numbers of the module docstring."""
    g = torch.Generator().manual_seed(args.seed)
    rows = {k: [] for k in ("k1 sampled", "k1 unfiltered", "exact", "-log Z", "eval/kl", "length")}
    for i in range(0, len(prompt_ids), args.batch_size):
        batch = generate(model, tokenizer, prompt_ids[i:i + args.batch_size], max_new_tokens=args.max_new_tokens,
                         temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                         min_new_tokens=settings.min_new_tokens, generator=g)
        batch["P"] = batch["input_ids"].shape[1] - batch["response_ids"].shape[1]
        mask = batch["response_mask"][:, batch["P"]:].bool()  # (B, R)
        ref = reference_logprobs(model, batch, settings.temperature, args.batch_size)  # (B, R)
        sampled = rollout_logprobs(model, batch, settings, args.batch_size)[0]  # the fix: q's log-probs
        plain = rollout_logprobs(model, batch, settings.temperature, args.batch_size)[0]  # the plain softmax at T
        rows["k1 sampled"].append(((sampled - ref) * mask).sum(-1))
        rows["k1 unfiltered"].append(((plain - ref) * mask).sum(-1))
        exact, minus_log_z = exact_sampled_kl(model, batch, settings)
        rows["exact"].append(exact)
        rows["-log Z"].append(minus_log_z)
        rows["eval/kl"].append(sequence_kl(model, batch["input_ids"], batch["attention_mask"],
                                           batch["response_mask"]))
        rows["length"].append(mask.sum(-1).float())
    return {k: torch.cat(v).double() for k, v in rows.items()}


def summarise(values):
    """mean, standard error of the mean, share of sequences < 0 (below -1e-6: rounding is not a sign)."""
    return {"mean": values.mean().item(), "sem": (values.std() / len(values) ** 0.5).item(),
            "negative": (values < -1e-6).double().mean().item()}


def unfiltered(fn):
    """fn (rollout_logprobs or policy_logprobs) scoring with the plain softmax at the sampler's temperature."""
    return lambda model, batch, sampling, *rest: fn(model, batch, sampling.temperature, *rest)


def train(name, flags, variant, args):
    """train_ppo.py --iterations N with the sampler's flags, in this process -> (run folder, its summary, the
    objective/kl it logged per iteration). variant "q": as minirlhf trains; "unfiltered": TRL-era log-probs."""
    import train_ppo
    out = os.path.join(args.runs_dir, f"{name}_{variant}".replace(" ", "_").replace(",", "").replace(".", ""))
    argv = ["--iterations", str(args.iterations), "--eval-every", "0", "--threads", str(args.threads), "--seed",
            str(args.seed), "--out", out, "--overwrite", *flags]
    patches = [mock.patch.object(train_ppo, "rollout_logprobs", unfiltered(rollout.rollout_logprobs)),
               mock.patch.object(train_ppo, "policy_logprobs", unfiltered(rollout.policy_logprobs))]
    with open(out + ".log", "w") as log, contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(log))
        stack.enter_context(contextlib.redirect_stderr(log))
        for patch in patches if variant == "unfiltered" else []:
            stack.enter_context(patch)
        summary = train_ppo.main(parse_args(train_ppo.Args, argv))
    logged = [json.loads(line)["objective/kl"] for line in open(os.path.join(out, "metrics.jsonl"))]
    return out, summary, logged


def table(results):
    """A markdown table: one row per (policy, sampler)."""
    lines = ["| policy | sampler | k1 sampled (the fix) | negative | k1 unfiltered (TRL-era) | negative | "
             "exact KL(q‖π_ref) | Σ -log Z | eval/kl | length |", "|" + " --- |" * 10]
    for (policy, name), r in results.items():
        s = {k: summarise(v) for k, v in r.items()}
        r3 = lambda x: round(x, 3) + 0.0  # noqa: E731  (no "-0.000")
        f = lambda k: f"{r3(s[k]['mean']):+.3f} ± {s[k]['sem']:.3f}"  # noqa: E731
        lines.append(f"| {policy} | {name} | {f('k1 sampled')} | {s['k1 sampled']['negative']:.0%} | "
                     f"{f('k1 unfiltered')} | {s['k1 unfiltered']['negative']:.0%} | {f('exact')} | "
                     f"{r3(s['-log Z']['mean']):.3f} | {r3(s['eval/kl']['mean']):.3f} | {s['length']['mean']:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=5, help="PPO iterations per sampler (0: step 0 only)")
    p.add_argument("--prompts", type=int, default=120, help="held-out prompts (the built-in world has 120)")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64, help="rows per sampling / scoring pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-dir", default="runs/negative_kl", help="where the PPO runs go")
    p.add_argument("--json", default=None, help="also write every per-sequence summary here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.runs_dir, exist_ok=True)
    start = time.time()
    tokenizer = load_tokenizer(TINY_LLAMA)
    model = load_model(TINY_LLAMA, dtype="float32", device="cpu", tokenizer=tokenizer)
    _, prompt_ids = held_out_prompts("builtin", "test", None, tokenizer, args.prompts, args.samples, 32)
    results, runs = {}, []
    for name, flags in SETTINGS.items():
        settings = settings_from_flags(flags, tokenizer.eos_token_id)
        results[("step 0 (base)", name)] = measure(model, tokenizer, settings, prompt_ids, args)
        print(f"step 0, {name}: done ({time.time() - start:.0f}s)", flush=True)
        variants = [] if args.iterations == 0 else ["q", "unfiltered"] if flags else ["q"]  # control: one way
        for variant in variants:
            out, summary, logged = train(name, flags, variant, args)
            adapter = f"ppo{len(results)}"
            load_adapter(model, os.path.join(out, "policy"), adapter=adapter)
            lora.set_active_adapter(model, None)  # the first adapter loaded becomes active: the base stays step 0's
            policy = f"PPO {args.iterations} it., " + ("log-probs of q" if variant == "q" else "TRL-era")
            with lora.use_adapter(model, adapter):
                results[(policy, name)] = measure(model, tokenizer, settings, prompt_ids, args)
            runs.append(f"| {policy} | {name} | {' '.join(f'{x:+.2f}' for x in logged)} | "
                        f"{summary['eval/gold_before']:.3f} -> {summary['eval/gold_after']:.3f} |")
            print(f"{policy}, {name}: done ({time.time() - start:.0f}s)", flush=True)
    print(f"\n{len(prompt_ids)} held-out responses per row (mean ± standard error over sequences), seed {args.seed}, "
          f"{time.time() - start:.0f}s\n")
    print(table(results))
    if runs:
        print("\n| PPO run | sampler | objective/kl it logged, per iteration | eval/gold before -> after |\n"
              "| --- | --- | --- | --- |\n" + "\n".join(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{a} | {b}": {k: summarise(v) for k, v in r.items()} for (a, b), r in results.items()}, f,
                      indent=1)


if __name__ == "__main__":
    main()
