"""Online DPO: DPO's loss on pairs the policy itself samples and a reward labels, fresh at every iteration (Guo et al.
2024, "Direct Language Model Alignment from Online AI Feedback", Algorithm 1; there the labeller is an LLM, here the
reward model or the gold score). ONE frozen base serves every role through LoRA adapters.

    python train_online_dpo.py                 # against the shipped reward model (~30 seconds on a 2-core CPU)
    python train_online_dpo.py --reward gold   # against the built-in world's gold score

The roles on the one base (minirlhf/roles.py): the policy is a LoRA adapter "policy" (B = 0 at the start), the
reward model a frozen adapter "reward" + head (or the gold score), the reference the base with adapters disabled.
One iteration reads top to bottom:
  1. rollout     rollout_size / 2 prompts, each sampled twice (the two responses of a prompt are contiguous)
  2. reward      one score per response
  3. pairs       the better-scored response of each prompt is chosen, the other rejected; a tie (equal scores, or
                 the same response twice) says nothing about which is better: its pair gets weight 0
  4. log-probs   the reference's log-probs of the sampled tokens (no grad)
  5. update      one pass of shuffled minibatches of pairs (--minibatch-size / 2 pairs each) of DPO's loss
                 -log σ(β x) (or IPO's, --loss ipo), x = the chosen log-ratio log π/π_ref minus the rejected one,
                 summed over each response's tokens (IPO: averaged), as train_dpo.py (dpo.preference_loss); the mean
                 over the minibatch's untied pairs
Unlike train_dpo.py, the pairs come from the policy being trained (on-policy: the data follows the policy), and unlike
PPO / GRPO the reward enters only as which response of a pair is better, not by how much.
The policy's log-probs are those of the distribution the rollout was sampled from, the reference's its softmax at the
same temperature (as in the other RL scripts): at the defaults (--temperature 1, no --top-k / --top-p filter) they are
log π and log π_ref themselves, DPO's.
Writes what train_grpo.py writes (policy/, last_rollout.safetensors with the pairs' rows "chosen", "rejected" and
their "pair_weights", summary.json). Logged per iteration: objective/* (objective/kl: the k3 KL per sequence of the
rollout; objective/kl_coef: β), rewards/* and logps/* as train_dpo.py's (means over the untied pairs),
pairs/trained, pairs/tie_fraction, policy/entropy, policy/approx_kl (k3 between the sampling and the updated policy),
loss/policy, time/*, perf/tokens_per_second, and every --eval-every iterations the eval/ metrics of evaluation.py.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch

from minirlhf.cli import run_script
from minirlhf.dpo import preference_loss
from minirlhf.errors import InputError
from minirlhf.kl import k3
from minirlhf.models import dropout_off
from minirlhf.ops import masked_sum
from minirlhf.precision import LossScaler
from minirlhf.report import HeldOut, finish, iteration_metrics, log_iteration
from minirlhf.roles import Reward, load_policy, roles
from minirlhf.rollout import (TrainPrompts, add_up, micro_batch_rows, minibatches, policy_logprobs, reference_logprobs,
                              sample_rollout, start_rl_run)
from minirlhf.run import Run
from minirlhf.sampling import SamplingSettings
from minirlhf.settings import RLArgs
from minirlhf.token_rewards import per_token_kl
from minirlhf.training import lr_at, make_optimizer, optimizer_step, set_lr
from minirlhf.validation import check_choice, check_rl_args

LOSSES = ("sigmoid", "ipo")


@dataclass
class Args(RLArgs):  # + the model, data, sampling, evaluation, run and rollout settings (minirlhf/settings.py)
    loss: str = "sigmoid"
    """the preference loss of each sampled pair: sigmoid (DPO, -log σ(βx)) | ipo ((x - 1/(2β))², length-averaged
    log-probs); dpo.preference_loss"""
    beta: float = 0.5
    """β: strength of the implicit KL constraint (smaller = further from the reference). Guo et al. use 0.1; on the
    built-in world it over-optimises the shipped reward model (gold falls as KL passes 10 nats): 0.5, as train_dpo.py"""
    samples_per_prompt: ClassVar[int] = 2  # not a flag: a pair per prompt (rollout.TrainPrompts reads it)
    out: str = "runs/online_dpo"  # a shared setting, this script's default


RANGES = {"beta": "> 0"}  # this script's own flags; the shared ones are declared in settings.py


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_rl_args(args, RANGES)
    check_choice("--loss", args.loss, LOSSES)
    for flag, size in (("--rollout-size", args.rollout_size), ("--minibatch-size", args.minibatch_size)):
        if size % 2:
            raise InputError(f"online DPO samples two responses per prompt: {flag} counts responses and must be "
                             f"even, got {size}")
    if args.tis_cap is not None or args.mismatch_mask_threshold is not None:
        raise InputError("--tis-cap / --mismatch-mask-threshold correct a policy-gradient loss's importance ratio: "
                         "online DPO's loss has none; leave them out")


def main(args):
    run = Run(args, check_args)  # ---- plumbing: settings, --out / --resume, torchrun, threads, seed (run.py)
    device, average = run.device, args.loss == "ipo"  # IPO compares per-token averages, DPO sums (as train_dpo.py)

    # 1. ONE frozen base serves every role: the policy adapter (trainable), the reward adapter + head (frozen)
    tokenizer, model, params = load_policy(args)  # the base, and on it the policy: LoRA adapter "policy", B = 0
    sampling = SamplingSettings.from_args(args, tokenizer.eos_token_id)  # the distribution rollouts are drawn from
    reward = Reward(model, args, tokenizer)  # the reward adapter(s) + head(s) of --reward-model, or gold
    dropout_off(model)  # sampling and the update's log-probs must come from one and the same policy
    run.print(roles(model, reward, args, run.dist.world_size))

    # 2. prompts for the rollouts (each sampled twice); the held-out prompts of the evaluations; optimizer
    train_prompts = TrainPrompts(args, tokenizer, run.dist)  # sharded over processes, reshuffled every epoch
    held_out = HeldOut(model, tokenizer, reward, args, device, run.clock)  # times itself: "evaluation"
    optimizer = make_optimizer(params, args.lr)
    scaler = LossScaler(model)  # fp16's loss scaling; a plain backward otherwise (precision.py)
    # ---- plumbing: the rollout sampler's generator, resume, the evaluation before training (read back on resume)
    generator, before = start_rl_run(run, args, model, reward, train_prompts, held_out, optimizer, scaler)

    # 3. the loop: two samples per prompt -> reward -> chosen / rejected -> one pass of DPO over the pairs
    # b_ tensors hold the whole rollout (B responses), p_ tensors one value per pair (B / 2); (B, R) = response columns
    last = {}  # the last rollout's tensors, saved at the end
    for iteration in run.steps(desc="online-dpo", unit="iteration"):  # ---- plumbing: Ctrl-C, checkpoints
        set_lr(optimizer, lr_at(iteration - 1, args.lr, args.iterations, args.warmup_iterations))

        # 3a. rollout: rollout_size / 2 prompts, each sampled twice (contiguous); 3b. one score per response
        run.phase("generation")  # ---- time per phase: metrics time/*, summary time/*_seconds
        batch = sample_rollout(model, tokenizer, train_prompts.take(args.rollout_size // 2, repeat=2), args, generator)
        b_mask = batch["mask"]  # (B, R): right-padded responses
        run.phase("scoring")
        b_scores = reward(batch)  # (B,)

        # 3c. the pairs: rows 2i and 2i + 1 answer the same prompt; the better-scored one is chosen
        p_chosen, p_rejected, p_weights = pair_up(b_scores, batch["response_ids"])  # (B / 2,) each

        # 3d. the reference's log-probs of the sampled tokens (no grad); the sampler's own are the policy's before
        # the update (for the KL and approx_kl logged)
        run.phase("logprobs")
        b_logprobs = batch["logprobs"][:, batch["P"]:]  # (B, T) -> (B, R)
        b_ref_logprobs = reference_logprobs(model, batch, args.temperature, args.forward_batch_size)  # (B, R)
        b_kl = per_token_kl(b_logprobs, b_ref_logprobs, b_mask, "k3")  # (B, R), for logging

        # 3e. one pass of shuffled minibatches of pairs: DPO's (or IPO's) loss, the mean over the untied pairs
        run.phase("update")
        stats = []
        for mb in minibatches(len(p_chosen), args.minibatch_size // 2):
            optimizer.zero_grad(set_to_none=True)
            mb_stats = minibatch_gradient(model, batch, sampling, mb, p_chosen, p_rejected, p_weights, b_logprobs,
                                          b_ref_logprobs, args, scaler, average)  # below
            grad_norm = optimizer_step(optimizer, params, loss=mb_stats["loss/total"].item(),
                                       grad_clip=args.grad_clip, step=iteration - 1,
                                       world_size=run.dist.world_size, scaler=scaler)  # + NaN guard
            stats.append({**mb_stats, "train/grad_norm": grad_norm})
        last = {**{k: batch[k] for k in ("input_ids", "attention_mask", "response_mask")}, "logprobs": b_logprobs,
                "ref_logprobs": b_ref_logprobs, "scores": b_scores, "chosen": p_chosen, "rejected": p_rejected,
                "pair_weights": p_weights}

        # 3f. logging (and every --eval-every iterations the held-out evaluation)
        metrics = iteration_metrics(batch, b_scores, b_kl, b_scores - args.beta * b_kl.sum(-1), run.dist.world_size)
        metrics.update({"objective/kl_coef": args.beta, "pairs/trained": p_weights.sum().item(),
                        "pairs/tie_fraction": 1 - p_weights.mean().item(), "train/lr": optimizer.param_groups[0]["lr"]})
        metrics.update(reward.metrics())  # with an ensemble of reward models: objective/ensemble_std
        log_iteration(run, iteration, metrics, stats, batch, held_out)

    # 4. the policy adapter, the last rollout and the evaluation after training
    return finish(run, model, held_out, before, last)


def pair_up(scores, response_ids):
    """Step 3c: the rollout's rows 2i and 2i + 1 (two responses to one prompt) as a pair. Returns the chosen rows
    (the higher score), the rejected rows and each pair's weight, (B / 2,) each: 1, or 0 for a tie (equal scores, or
    the same tokens twice), which says nothing about which response is better (Guo et al. label every pair; a reward
    model or the gold score can tie)."""
    first, second = scores[0::2], scores[1::2]  # (B / 2,) each
    rows = torch.arange(0, len(scores), 2, device=scores.device)  # (B / 2,): the first row of each pair
    second_wins = second > first
    same = (first == second) | (response_ids[0::2] == response_ids[1::2]).all(-1)
    return rows + second_wins, rows + ~second_wins, (~same).to(scores.dtype)


def minibatch_gradient(model, batch, sampling, mb, chosen, rejected, weights, old_logprobs, ref_logprobs, args, scaler,
                       average=False):
    """Step 3e's loss on one minibatch of pairs, backward: DPO's per-pair loss (dpo.preference_loss) of each pair's
    chosen and rejected responses, summed over the response tokens (IPO: `average`, per-token means), times the pair's
    weight, summed / the minibatch's untied pairs; the gradient accumulates in the parameters' .grad (the caller zeroes
    it before and steps after). Returns the minibatch's statistics, {name: scalar tensor}: rewards/* and logps/*
    (means over the untied pairs), policy/entropy and policy/approx_kl (means over their tokens), loss/policy,
    loss/total.

    mb: the minibatch's pairs (an index tensor into chosen, rejected, weights (B / 2,) each: rows of the rollout and
    pair weights); old_logprobs (the sampler's, for approx_kl) and ref_logprobs hold the whole rollout, (B, R) each.
    Micro-batches of <= --micro-batch-size rows (half as many pairs, at least one), a backward each: the loss and
    every statistic is a sum over its pairs (or tokens) / the minibatch's count, so the micro-batches add up to the
    minibatch's exactly (tests/test_memory.py)."""
    mb_rows = torch.cat([chosen[mb], rejected[mb]])  # (2b,)
    n_pairs = weights[mb].sum().clamp(min=1)  # the untied pairs: the loss and the pair statistics are means over them
    untied = weights.bool()  # (B / 2,)
    n_tokens = (batch["mask"][mb_rows] & untied[mb].repeat(2)[:, None]).sum().clamp(min=1)  # the untied pairs' tokens
    parts = []
    for mu in mb.split(max(1, micro_batch_rows(args) // 2)):
        rows, w = torch.cat([chosen[mu], rejected[mu]]), weights[mu]  # (2u,): chosen rows first; (u,)
        logprobs, entropy, _ = policy_logprobs(model, batch, sampling, rows)  # (2u, R) each
        mask = batch["mask"][rows]  # (2u, R)
        lengths = mask.sum(-1).clamp(min=1)  # (2u,)
        ref = ref_logprobs[rows].sum(-1)  # (2u,)
        losses, pair_stats = preference_loss(logprobs.sum(-1), ref / lengths if average else ref, lengths, args.loss,
                                             args.beta, average=average)  # (u,) each: dpo.py
        loss = (w * losses).sum() / n_pairs
        scaler.backward(loss)
        tokens = mask & untied[mu].repeat(2)[:, None]  # (2u, R): the untied pairs' response tokens
        parts.append({**{k: (w * v).sum() / n_pairs for k, v in pair_stats.items()},
                      "policy/entropy": masked_sum(entropy.detach(), tokens) / n_tokens,
                      "policy/approx_kl": masked_sum(k3(old_logprobs[rows], logprobs.detach()), tokens) / n_tokens,
                      "loss/policy": loss.detach(), "loss/total": loss.detach()})
    return add_up(parts)  # the minibatch's


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
