"""The RL steps that do not depend on the algorithm, shared by train_ppo.py, train_grpo.py and train_reinforce.py.

Legend: B responses, P prompt columns (left-padded), R response columns (right-padded), T = P + R, H hidden size.
ONE frozen base serves every role (as in the multi-adapter PPO setup): the policy is a LoRA adapter "policy", the
reward model a second adapter "reward" + its head, the reference the base with every adapter disabled
(models.reference).

    tokenizer, model, params = load_policy(args)       # the one frozen base and the policy adapter on it
    reward = Reward(model, args)                       # the reward adapter + head (frozen), or the gold score
    held_out = HeldOut(model, tokenizer, reward, args, device, run.clock)   # before / during / after training: held_out()
    sampling = SamplingSettings.from_args(args, tokenizer.eos_token_id)   # --temperature, --top-k, --top-p, ...
    batch = sample_rollout(model, tokenizer, train_prompts.take(k), args, generator)   # prompts -> responses
    scores = reward(batch)                             # (B,) read at each response's last real token
    old_logprobs, values = rollout_logprobs(model, batch, sampling, args.forward_batch_size, value_head)
    old_logprobs, tis, update_mask, mismatch = old_logprobs_and_corrections(model, batch, sampling, args, old_logprobs)
    ref_logprobs = reference_logprobs(model, batch, args.temperature, args.forward_batch_size)   # (B, R) each
    for mb in minibatches(B, args.minibatch_size):     # the update: one optimizer step per minibatch, computed in
        for mu in mb.split(args.forward_batch_size):   # micro-batches of rows, with a backward each
            logprobs, entropy, values = policy_logprobs(model, batch, sampling, mu, value_head)  # (b, R)
        stats.append(add_up(micro_batch_stats))        # the minibatch's statistics: sums over its micro-batches
    log_iteration(run, iteration, metrics, stats, batch, held_out)   # metrics.jsonl + one printed line
    return finish(run, model, held_out, before, last)  # policy adapter, summary.json, the result
Every pass over a rollout runs on at most --forward-batch-size rows (sampling, scoring, log-probs, the update's
micro-batches): its memory is bounded by the flag, not by --rollout-size.
The policy's log-probs (old and new) are those of the distribution the rollout was sampled from (`sampling`: the
temperature and the top-k / top-p / min-new-tokens filter, heads.py); the reference's are its unfiltered softmax at
the same temperature: KL(π_sampled ‖ π_ref) is what the penalty means (docs/negative_kl.md).
The per-token reward bookkeeping (KL penalty, score on the last token, whitening) is math: token_rewards.py.
"""
import functools
import operator
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from . import distributed
from .atomic import atomic_write_bytes
from .data import describe_source, load_prompt_dataset, world
from .data.tokenize import require_pad_token, tokenize_prompt_dataset
from .errors import InputError
from .evaluation import (evaluate_policy, generate, gold_summary, held_out_prompts, save_samples,
                         show_samples)
from .formats import save_adapter
from .heads import RatingHead, in_row_chunks, response_logprobs, response_logprobs_and_states, sequence_scores
from .lora import adapter_names, use_adapter
from .mismatch import rollout_correction
from .phases import format_totals
from .models import load_model, load_reward_model, load_tokenizer, parameter_report, reference, resident_bytes
from .reward_losses import expected_rating, rating_entropy
from .sampling import as_settings
from .token_rewards import missing_eos_penalty
from .training import EpochOrder, make_trainable
from .validation import warn


def load_policy(args):
    """The tokenizer (with a pad token distinct from EOS), the one frozen base every role shares, and on it the policy:
    a fresh LoRA adapter "policy" (B = 0, so the policy starts AS the base: the reference). Returns (tokenizer,
    model, the policy's trainable parameters)."""
    tokenizer = load_tokenizer(args.model)
    require_pad_token(tokenizer)
    model = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                       tokenizer=tokenizer, gradient_checkpointing=args.gradient_checkpointing)
    params = make_trainable(model, "policy", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                            lora_targets=args.lora_targets)
    return tokenizer, model, params


def roles(model, reward, args, world_size):
    """What the run is: the parameter report, which role is what on the one base, and the batch sizes."""
    groups = f" in groups of {args.group_size}" if hasattr(args, "group_size") else ""
    return (f"{parameter_report(model)}\nroles on one base: {', '.join(adapter_names(model))} adapter(s); reward = "
            f"{reward.describe}; reference = the base with adapters disabled\n{args.iterations} iterations of "
            f"{args.rollout_size * world_size} responses ({world_size} process(es) x {args.rollout_size}){groups}, "
            f"minibatches of {args.minibatch_size} per process")


class TrainPrompts:
    """The training prompts of --split and this process's position in them (training.EpochOrder: sharded over
    processes, reshuffled every epoch; state_dict() for checkpoints). take(k, repeat) -> (messages, token ids) of
    the next k prompts, each `repeat` times in a row (GRPO's groups). Fewer prompts than a rollout takes: the rollout
    cycles through them (every prompt once before any twice), with one warning line; a rollout is always whole, so
    the samples counted in summary.json are the samples drawn. Fewer prompts than processes is one InputError line."""

    def __init__(self, args, tokenizer, dist):
        self.source = describe_source(args.dataset, args.split, args.data_files)
        data = tokenize_prompt_dataset(load_prompt_dataset(args.dataset, split=args.split, data_files=args.data_files),
                                       tokenizer, args.max_prompt_length, args.template,
                                       system_prompt=args.system_prompt, name=f"{args.dataset} [{args.split}]")
        self.messages, self.ids = data["prompt"], data["prompt_ids"]
        if len(self.ids) < dist.world_size:
            raise InputError(f"{self.source}: {len(self.ids)} prompt(s) for {dist.world_size} processes, which shard "
                             "the prompts: each needs at least one; give more prompts or run fewer processes")
        self.order = EpochOrder(len(self.ids), args.seed, dist.rank, dist.world_size)
        per_rollout = args.rollout_size // (getattr(args, "group_size", None) or getattr(args, "samples_per_prompt", 1))
        if per_rollout > self.order.epoch_length():
            warn(f"{self.source}: {len(self.ids)} prompt(s), fewer than the {per_rollout} a rollout takes"
                 + (" per process" if dist.world_size > 1 else "")
                 + ": every rollout cycles through them (each prompt once before any twice)")

    def take(self, k, repeat=1):
        idx = [i for i in self.order.take(k) for _ in range(repeat)]
        return [self.messages[i] for i in idx], [self.ids[i] for i in idx]

    def state_dict(self):
        return self.order.state_dict()

    def load_state_dict(self, state):
        self.order.load_state_dict(state)


class Reward:
    """The reward of a prompt + response: the reward model of --reward-model (its LoRA adapter "reward" and head on
    the shared base, frozen; read at the last real token; a rating head gives E[rating], optionally minus
    reward_entropy_coef x its entropy) or, with --reward gold, the built-in world's gold score (a verifiable reward)."""

    def __init__(self, model, args):
        self.model, self.gold_only = model, args.reward == "gold"
        self.transform, self.entropy_coef = args.reward_transform, args.reward_entropy_coef
        self.forward_batch_size = args.forward_batch_size  # rows per reward-model pass
        self.missing_eos_penalty = getattr(args, "missing_eos_penalty", None)
        self.gold = world.gold_score if args.dataset == "builtin" else None
        self.head = None
        if not self.gold_only:
            _, self.head = load_reward_model(model, args.reward_model)  # adapter "reward"; "policy" stays active
            self.head.requires_grad_(False)
        self.describe = (f"{type(self.head).__name__} from {args.reward_model}" if self.head is not None
                         else "gold reward")

    def __call__(self, batch):
        """(B,) rewards of a sample_rollout batch: the score, minus --missing-eos-penalty for a response cut off
        before its EOS (TRL's missing_eos_penalty)."""
        scores = self.score(batch)
        if self.missing_eos_penalty is not None:
            scores = missing_eos_penalty(scores, batch["ended"], self.missing_eos_penalty)
        return scores

    @torch.no_grad()
    def score(self, batch):
        """(B,) scores of a sample_rollout / evaluation.generate batch (--forward-batch-size rows per pass)."""
        if self.gold_only:
            return torch.tensor([self.gold(p, t) for p, t in zip(batch["prompts"], batch["texts"])],
                                device=batch["input_ids"].device)
        ids, attention = batch["input_ids"], batch["attention_mask"]  # (B, T)
        with use_adapter(self.model, "reward"):
            out = in_row_chunks(lambda rows: sequence_scores(self.model, self.head, ids[rows], attention[rows]),
                                len(ids), self.forward_batch_size)  # (B,) / (B, K)
        if not isinstance(self.head, RatingHead):
            return out
        rating = expected_rating(out)  # (B, K) -> (B,)
        if self.transform == "expected-minus-entropy":  # an unsure reward model's score counts less
            rating = rating - self.entropy_coef * rating_entropy(out)
        return rating


def sample_rollout(model, tokenizer, prompts, args, generator):
    """One response per prompt from the active adapter (the policy), at --temperature with --top-k, --top-p,
    --min-new-tokens and --stop-strings; prompts = (messages, token ids). The evaluation.generate dict, on the
    generator's device, plus "prompts" (the messages), "P" (prompt columns) and "mask" (B, R): True on response
    tokens.
    Sampled --forward-batch-size prompts at a time (merge_generated joins the chunks). The chunks draw from the
    generator one after the other, so a chunked rollout samples other (equally likely) responses than one pass over
    all prompts would: the samples depend on the flag, their distribution does not."""
    (messages, prompt_ids), device = prompts, generator.device
    size = args.forward_batch_size
    batch = merge_generated([generate(model, tokenizer, prompt_ids[i:i + size], max_new_tokens=args.max_new_tokens,
                                      **sampler_kwargs(args), generator=generator, device=device)
                             for i in range(0, len(prompt_ids), size)], tokenizer.pad_token_id)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    P = batch["input_ids"].shape[1] - batch["response_ids"].shape[1]  # prompt columns (left-padded)
    return {**batch, "prompts": messages, "P": P, "mask": batch["response_mask"][:, P:].bool()}  # mask: (B, R)


def sampler_kwargs(args):
    """generate()'s sampling keywords from a script's Args: the rollouts and the held-out evaluation sample alike."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "min_new_tokens": args.min_new_tokens, "stop_strings": tuple(args.stop_strings or ())}


def merge_generated(parts, pad_token_id):
    """One evaluation.generate batch from chunks of rows sampled separately, in their order. Each chunk has its own
    prompt width P_c and response width R_c; its rows are padded on the left to the widest prompt and on the right to
    the longest response: the layout of one generate call (prompts left-padded, responses right-padded), padding
    being pad_token_id in the token ids and 0 in the masks and log-probs."""
    if len(parts) == 1:
        return parts[0]
    R = max(part["response_ids"].shape[1] for part in parts)
    P = max(part["input_ids"].shape[1] - part["response_ids"].shape[1] for part in parts)

    def widen(part, key, value):  # (b, P_c + R_c) -> (b, P + R): pad the prompt's left and the response's right
        R_c = part["response_ids"].shape[1]
        return F.pad(part[key], (P - (part[key].shape[1] - R_c), R - R_c), value=value)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "response_mask": 0, "logprobs": 0.0}  # (B, T) each
    return {**{key: torch.cat([widen(part, key, value) for part in parts]) for key, value in pads.items()},
            "response_ids": torch.cat([F.pad(part["response_ids"], (0, R - part["response_ids"].shape[1]),
                                             value=pad_token_id) for part in parts]),  # (B, R)
            "ended": torch.cat([part["ended"] for part in parts]),  # (B,)
            "texts": [text for part in parts for text in part["texts"]]}


def policy_logprobs(model, batch, sampling, rows=slice(None), value_head=None):
    """The policy's log-probs of the sampled tokens and their entropies, (b, R) each, for the rows `rows` of a
    rollout (all by default), and with a value head the values V(s_t) of the states that predict them, (b, R) (None
    without one). With grad when called with grad (the update's micro-batches); rollout_logprobs is the pass without
    grad. sampling: the sampling.SamplingSettings the rollout was drawn with (or a plain temperature): the log-probs
    are under that filtered distribution, recomputed from this policy's logits (where it gives a sampled token
    probability 0, the rule of heads._chunk_logprobs)."""
    logprobs, entropy, states = response_logprobs_and_states(
        model, batch["input_ids"][rows], batch["attention_mask"][rows], batch["response_mask"][rows], sampling)
    P = batch["P"]
    values = value_head(states)[:, P:] if value_head is not None else None  # (b, T, H) -> (b, R)
    return logprobs[:, P:], entropy[:, P:], values  # (b, T) -> (b, R)


@torch.no_grad()
def rollout_logprobs(model, batch, sampling, forward_batch_size, value_head=None):
    """The log-probs of the sampled tokens under the policy that sampled them (the update's old log-probs), (B, R),
    and with a value head its values, (B, R) (else None): policy_logprobs without grad, forward_batch_size rows at a
    time (only the values are kept of the (b, T, H) states a value head reads). Under `sampling`'s filter they are
    the sampler's own log-probs, recomputed (tests/test_sampling_flags.py: equal to 1e-5)."""
    logprobs, _, values = in_row_chunks(
        lambda rows: policy_logprobs(model, batch, sampling, rows, value_head), len(batch["input_ids"]),
        forward_batch_size)
    return logprobs, values


def old_logprobs_and_corrections(model, batch, sampling, args, trainer_logprobs=None):
    """The update's old log-probs and what corrects the sampler / trainer mismatch (mismatch.py, docs/kl.md "The
    sampler is not the trainer"): (old log-probs (B, R), TIS weights (B, R) or None, the update's mask (B, R),
    mismatch metrics or None). batch["logprobs"] holds the sampler's log-probs; trainer_logprobs the trainer's
    (rollout_logprobs) when the script computes them anyway (PPO: they are its old log-probs).
    Without them (GRPO, REINFORCE) and with neither --tis-cap nor --mismatch-mask-threshold, the old log-probs are the
    sampler's, with no second pass, the weights None, the mask batch["mask"], and the metrics None: the script then
    measures the mismatch on its update's first minibatch, whose log-probs are the trainer's before any step. With
    either flag the trainer's are computed here (one pass without grad), and they are the old log-probs, also in the
    KL to the reference (computed by the trainer: against the sampler's log-probs, the mismatch would read as KL)."""
    sampler_logprobs, mask = batch["logprobs"][:, batch["P"]:], batch["mask"]  # (B, T) -> (B, R)
    correcting = args.tis_cap is not None or args.mismatch_mask_threshold is not None
    if trainer_logprobs is None:
        if not correcting:
            return sampler_logprobs, None, mask, None
        trainer_logprobs, _ = rollout_logprobs(model, batch, sampling, args.forward_batch_size)
    weights, loss_mask, metrics = rollout_correction(sampler_logprobs, trainer_logprobs, mask, args.tis_cap,
                                                     args.mismatch_mask_threshold)
    return trainer_logprobs, weights, loss_mask, metrics


@torch.no_grad()
def reference_logprobs(model, batch, temperature, forward_batch_size):
    """(B, R) log-probs of the sampled tokens under the reference: the base with every adapter disabled;
    forward_batch_size rows at a time. Its UNFILTERED softmax at the sampling temperature (given a SamplingSettings,
    only its temperature is used): the KL penalty compares the distribution the policy samples from with the
    reference itself, not with a filtered reference."""
    temperature = as_settings(temperature).temperature
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]  # (B, T)
    with reference(model):
        logprobs = in_row_chunks(lambda rows: response_logprobs(model, ids[rows], attention[rows], mask[rows],
                                                                temperature=temperature),
                                 len(ids), forward_batch_size)  # (B, T)
    return logprobs[:, batch["P"]:]


def add_up(parts):
    """{name: the sum over parts} of a list of dicts of scalar tensors: the statistics of a minibatch from those of
    its micro-batches (each a sum over its rows / the minibatch's count, so the sums are the minibatch's means)."""
    return {k: functools.reduce(operator.add, [part[k] for part in parts]) for k in parts[0]}


def minibatches(batch_size, minibatch_size, generator=None):
    """Shuffled index tensors covering range(batch_size) once, each of minibatch_size (the last may be smaller)."""
    if not 1 <= minibatch_size <= batch_size:
        raise ValueError(f"minibatch size must lie in [1, {batch_size}], got {minibatch_size}")
    order = torch.randperm(batch_size, generator=generator)
    return list(order.split(minibatch_size))


class HeldOut:
    """The held-out prompts (the first --eval-prompts of --eval-split, each --eval-samples times) and how the policy
    is measured on them: evaluation.evaluate_policy scored by the reward (its gold score stands in for the reward
    model with --reward gold). held_out() -> (metrics, samples); its time is the phase "evaluation" of `clock`
    (run.clock: phases.py)."""

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
        return metrics, samples


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
    """The one line per iteration the RL scripts print."""
    return (f"iter {iteration:3d} | score {metrics['objective/scores']:+.3f} | kl {metrics['objective/kl']:6.2f} | "
            f"entropy {metrics['policy/entropy']:.3f} | len {metrics['rollout/length']:4.1f} | approx_kl "
            f"{metrics['policy/approx_kl']:.4f}"
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
    return final_summary(run, model, held_out.reward, before, after, after_samples)


def final_summary(run, model, reward, before, after, after_samples):
    """summary.json (rank 0) and the printed result; `before` = (metrics, samples) of the evaluation before."""
    before, before_samples = before
    extra = {"train/iterations": run.step, "train/episodes": run.step * run.args.rollout_size, **run.clock.totals()}
    final = {**{k + "_before": v for k, v in before.items()}, **{k + "_after": v for k, v in after.items()},
             "eval/kl": after["eval/kl"], "memory/model_bytes": resident_bytes(model), **extra}
    if reward.gold:
        final.update(gold_summary(before, after, before_samples, after_samples, world.GOLD_MAX))
    summary = run.finish(final)
    save_samples(run.args.out, before_samples, after_samples)
    show_samples(after_samples, "\nsamples after training:", every=run.args.eval_samples)
    print(f"memory: model {summary['memory/model_bytes'] / 2**20:.1f} MiB resident, process peak RSS "
          f"{summary['memory/peak_rss_bytes'] / 2**20:.0f} MiB" + (
              f", CUDA peak {summary['memory/cuda_peak_bytes'] / 2**20:.0f} MiB (run.PhaseMemory: per phase in "
              "summary.json)" if "memory/cuda_peak_bytes" in summary else ""))
    print(f"time: {format_totals(summary)} (of {summary['time/total_seconds']:.0f} s; the rest: loading, logging, "
          "checkpoints)")
    print(f"done in {summary['time/total_seconds']:.0f}s: reward {summary['eval/reward_before']:+.3f} -> "
          f"{summary['eval/reward_after']:+.3f}, "
          + (f"gold {summary['eval/gold_before']:.3f} -> {summary['eval/gold_after']:.3f} of "
             f"{summary['eval/gold_max']:.1f} (headroom closed {summary['eval/headroom_closed']:.2f}), "
             if reward.gold else "")
          + f"KL {summary['eval/kl']:.2f} nats; policy adapter in {os.path.join(run.args.out, 'policy')}")
    return summary
