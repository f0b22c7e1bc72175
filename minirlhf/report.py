"""What an RL or DPO run reports: the held-out evaluation (HeldOut: before, every --eval-every iterations and after
training), the one row of metrics.jsonl and one printed line per iteration, and the end of a run: the policy adapter,
the last rollout's tensors, summary.json, the samples and the result line.

    held_out = HeldOut(model, tokenizer, reward, args, device, run.clock)   # held_out() -> (metrics, samples)
    log_iteration(run, iteration, metrics, stats, batch, held_out)           # each iteration (rank 0)
    return finish(run, model, held_out, before, last)                        # the end of an RL script
    return final_summary(run, model, before, after, gold, extra)             # the end of train_dpo.py
"""
import os
import time

import torch
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from . import distributed
from .atomic import atomic_write_bytes
from .data import world
from .evaluation import (evaluate_policy, gold_summary, held_out_prompts, pass_at_k_evaluation, save_samples,
                         show_samples)
from .formats import save_adapter
from .models import resident_bytes
from .phases import format_totals
from .rollout import sampler_kwargs


class HeldOut:
    """The held-out prompts (the first --eval-prompts of --eval-split, each --eval-samples times) and how the policy
    is measured on them: evaluation.evaluate_policy scored by the reward (its gold score stands in for the reward
    model with --reward gold), and with --pass-k eval/pass@k (held_out_pass_at_k). held_out() -> (metrics,
    samples); its time is the phase "evaluation" of `clock` (run.clock: phases.py)."""

    def __init__(self, model, tokenizer, reward, args, device, clock):
        self.model, self.tokenizer, self.reward, self.args, self.device = model, tokenizer, reward, args, device
        self.clock = clock
        self.prompts, self.prompt_ids = held_out_prompts(args.dataset, args.eval_split, args.data_files, tokenizer,
                                                         args.eval_prompts, args.eval_samples, args.max_prompt_length,
                                                         args.template, args.system_prompt)

    def __call__(self):
        with self.clock.during("evaluation"):
            return self._evaluate()

    def _evaluate(self):
        reward, args = self.reward, self.args
        metrics, samples = evaluate_policy(self.model, self.tokenizer, self.prompts, self.prompt_ids,
                                           gold_fn=reward.gold, reward_fn=None if reward.gold_only else reward.score,
                                           max_new_tokens=args.max_new_tokens, **sampler_kwargs(args),
                                           batch_size=args.forward_batch_size, seed=args.seed, device=self.device)
        if reward.gold_only:  # the proxy IS the gold score
            metrics["eval/reward"] = metrics["eval/gold"]
            for s in samples:
                s["reward"] = s["gold"]
        metrics.update(held_out_pass_at_k(self.model, self.tokenizer, self.prompts, self.prompt_ids, args,
                                          self.device))
        return metrics, samples


def held_out_pass_at_k(model, tokenizer, prompts, prompt_ids, args, device):
    """--pass-k (built-in world): {"eval/pass@k": ...} of the active adapter on the held-out prompts (`prompts`,
    `prompt_ids` as held_out_prompts repeats them: each --eval-samples times), max(k) responses sampled per prompt
    with the evaluation's sampler settings (evaluation.pass_at_k_evaluation); {} without --pass-k. The RL scripts'
    HeldOut and train_dpo.py's evaluation call it."""
    if not args.pass_k:
        return {}
    every = args.eval_samples  # one of each prompt's copies
    return pass_at_k_evaluation(model, tokenizer, prompts[::every], prompt_ids[::every], ks=args.pass_k,
                                correct_fn=world.is_correct, max_new_tokens=args.max_new_tokens,
                                **sampler_kwargs(args), batch_size=args.forward_batch_size, seed=args.seed,
                                device=device)


def iteration_metrics(batch, scores, kl, rlhf_reward, world_size):
    """What every RL script logs about a rollout (B responses): objective/kl (mean per-sequence sum of the per-token
    KL estimate, averaged over processes: every rank must call this), objective/scores, objective/rlhf_reward
    (score - beta KL), rollout/length, rollout/eos_fraction. objective/kl is of the distribution the rollout was sampled
    from (filtered by --top-k / --top-p / --min-new-tokens when set) against π_ref, not of the unfiltered π."""
    return {"objective/kl": distributed.all_reduce_mean(kl.sum(-1).mean().item(), world_size),
            "objective/scores": scores.mean().item(), "objective/rlhf_reward": rlhf_reward.mean().item(),
            "rollout/length": batch["mask"].sum(-1).float().mean().item(),
            "rollout/eos_fraction": batch["ended"].float().mean().item()}


def log_iteration(run, iteration, metrics, stats, batch, held_out):
    """Rank 0: `metrics` plus the mean of each minibatch statistic in `stats`, the iteration's seconds per phase
    (time/generation, time/scoring, time/logprobs, time/update and time/evaluation: run.phase) and its rollout tokens
    per second over the whole iteration and, every --eval-every iterations, the held-out evaluation: one row of
    metrics.jsonl, one printed line."""
    if not run.is_main:
        return
    args, seconds = run.args, time.time() - run.step_started
    metrics.update({k: torch.stack([s[k].float() for s in stats]).mean().item() for k in stats[0]})
    metrics["perf/tokens_per_second"] = batch["attention_mask"].sum().item() / seconds
    if args.eval_every and iteration % args.eval_every == 0 and iteration < args.iterations:
        metrics.update(held_out()[0])
    metrics.update(run.clock.take())
    run.log(iteration, metrics)
    tqdm.write(log_line(iteration, metrics, time.time() - run.step_started))


def log_line(iteration, metrics, seconds):
    """The one line per iteration the RL scripts print (train_distill.py's with its loss/distill)."""
    return (f"iter {iteration:3d} | score {metrics['objective/scores']:+.3f} | kl {metrics['objective/kl']:6.2f} | "
            f"entropy {metrics['policy/entropy']:.3f} | len {metrics['rollout/length']:4.1f} | approx_kl "
            f"{metrics['policy/approx_kl']:.4f}"
            + (f" | distill {metrics['loss/distill']:.4f}" if "loss/distill" in metrics else "")
            + (f" | eval gold {metrics['eval/gold']:.3f} reward {metrics['eval/reward']:+.3f} kl "
               f"{metrics['eval/kl']:.2f}" if "eval/gold" in metrics else "") + f" | {seconds:.1f}s")


def save_last_rollout(out, tensors):
    """out/last_rollout.safetensors: the tensors the last update saw, to inspect by hand (and for the tests)."""
    atomic_write_bytes(os.path.join(out, "last_rollout.safetensors"), save_safetensors(
        {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
         for k, v in tensors.items()}))


def finish(run, model, held_out, before, last):
    """The end of every RL script: save the policy adapter (PEFT format) and the last rollout's tensors, evaluate the
    policy on the held-out prompts, write summary.json (the evaluations before and after, the gold verdict on the
    built-in world, memory) and print the samples and one line with the result. Returns the summary (rank 0)."""
    run.save("policy", lambda folder: save_adapter(model, folder, "policy"))
    if not run.is_main:
        return run.finish({})
    if last:
        save_last_rollout(run.args.out, last)
    after, after_samples = held_out()
    extra = {"train/iterations": run.step, "train/episodes": run.step * run.args.rollout_size}
    return final_summary(run, model, before, (after, after_samples), held_out.reward.gold is not None, extra,
                         every=run.args.eval_samples)


def final_summary(run, model, before, after, gold, extra=None, every=1):
    """The end of every RL script and of train_dpo.py (rank 0): summary.json and the printed result. `before` and
    `after` = (metrics, samples) of the held-out evaluations; gold: the built-in world's gold score was measured
    (then the gold verdict: evaluation.gold_summary); extra: the script's own final numbers; every: print every
    this many samples (one per prompt)."""
    (before, before_samples), (after, after_samples) = before, after
    final = {**(extra or {}), **{k + "_before": v for k, v in before.items()},
             **{k + "_after": v for k, v in after.items()}, "eval/kl": after["eval/kl"],
             "memory/model_bytes": resident_bytes(model), **run.clock.totals()}
    if gold:
        final.update(gold_summary(before, after, before_samples, after_samples, world.GOLD_MAX))
    summary = run.finish(final)
    save_samples(run.args.out, before_samples, after_samples)
    show_samples(after_samples, "\nsamples after training:", every=every)
    print(f"memory: model {summary['memory/model_bytes'] / 2**20:.1f} MiB resident, process peak RSS "
          f"{summary['memory/peak_rss_bytes'] / 2**20:.0f} MiB" + (
              f", CUDA peak {summary['memory/cuda_peak_bytes'] / 2**20:.0f} MiB (usage.PhaseMemory: per phase in "
              "summary.json)" if "memory/cuda_peak_bytes" in summary else ""))
    if format_totals(summary):
        print(f"time: {format_totals(summary)} (of {summary['time/total_seconds']:.0f} s; the rest: loading, "
              "logging, checkpoints)")
    proxy = "eval/reward_before" in summary  # an RL run's reward model (or gold) score; DPO has none
    print(f"done in {summary['time/total_seconds']:.0f}s: "
          + (f"reward {summary['eval/reward_before']:+.3f} -> {summary['eval/reward_after']:+.3f}, " if proxy else "")
          + (f"gold {summary['eval/gold_before']:.3f} -> {summary['eval/gold_after']:.3f} of "
             f"{summary['eval/gold_max']:.1f} (headroom closed {summary['eval/headroom_closed']:.2f}"
             + ("" if proxy else f", win rate {summary['eval/win_rate']:.2f}") + "), " if gold else "")
          + f"KL {summary['eval/kl']:.2f} nats; policy adapter in {os.path.join(run.args.out, 'policy')}")
    return summary
