"""GRPO: PPO's clipped update without a value function: each response is judged against the others sampled for the
same prompt (Shao et al. 2024, "DeepSeekMath", Sec. 4.1). Every role is served by ONE frozen base with LoRA adapters.

    python train_grpo.py --reward gold         # against the built-in world's gold score (~20 seconds on a 2-core CPU)
    python train_grpo.py                       # against the shipped reward model

The roles on the one base (minirlhf/roles.py): the policy is a LoRA adapter "policy" (B = 0 at the start), the
reward model a frozen adapter "reward" + head (or the gold score), the reference the base with adapters disabled.
One iteration reads top to bottom:
  1. rollout     rollout_size / G prompts, each sampled G times (the group of a prompt is contiguous)
  2. reward      one score per response (--overlong-buffer: + DAPO's soft overlong punishment, dapo.py);
                 --dynamic-sampling: only the groups whose scores are not all equal, refilled from more prompts (DAPO)
  3. log-probs   the old policy's log-probs of the sampled tokens (the sampler's own: no second pass) and the
                 reference's, at the sampling temperature; with --tis-cap / --mismatch-mask-threshold the trainer's
                 own, recomputed, and per-token TIS weights / responses dropped (mismatch.py)
  4. advantages  A = (score - mean of its group) / std of its group, the same for every token    (baselines.py)
                 (--advantage-std batch: / the whole rollout's std; none: not divided, as Dr. GRPO)
  5. update      epochs of shuffled minibatches of the GRPO loss: clipped ratio · A + β · k3 KL to the
                 reference, a term of the loss rather than of the reward (DeepSeekMath Eq. 3-4: grpo.py);
                 --loss-aggregation token | sequence | constant: how its token losses become one number (DAPO,
                 DeepSeekMath, Dr. GRPO), --clip-high: an upper clip 1 + clip_high above 1 + clip_eps (DAPO);
                 --policy-loss ppo | gspo | cispo: what the clip acts on (GSPO, CISPO: policy_losses.py);
                 --kl-loss k3 | k2 | k3+: the KL term, whose gradient is ∇KL(π_ref‖π) (k3) or ∇KL(π‖π_ref) (k2,
                 k3+), --kl-off-policy-weight: the term times sg(π/π_old), so that it keeps that gradient in the
                 epochs after the first (grpo.py; docs/kl.md)
Writes what train_ppo.py writes, without a value head. Logged per iteration: objective/* (objective/kl: the k3 KL
per sequence, whatever --kl-loss; objective/kl_coef: β), policy/approx_kl, policy/clipfrac, policy/entropy,
loss/policy, loss/kl (the loss's KL term per token: k3's value for k3 and k3+, k2's for k2), time/*,
perf/tokens_per_second, mismatch/kl, mismatch/k1, mismatch/max_ratio (the sampler's log-probs against the
trainer's: on the update's first minibatch, before any step; on the whole rollout with either flag, and then
mismatch/tis_capped, mismatch/tis_weight, mismatch/masked_responses), and every --eval-every iterations the eval/
metrics of evaluation.py; with --dynamic-sampling rollout/kept_groups, rollout/sampling_rounds and
rollout/dropped_groups (the other rollout/ and objective/ metrics are then of the kept groups, and summary.json's
train/samples counts rollout_size per iteration, not the rollout/sampling_rounds x rollout_size sampled;
objective/scores includes the overlong penalty). objective/kl, loss/kl
and policy/approx_kl are of the sampling distribution (--top-k / --top-p / --min-new-tokens filtered, when set);
eval/kl is the exact KL of the unfiltered π.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.baselines import SCALES, group_advantages
from minirlhf.cli import run_script
from minirlhf.dapo import informative_groups, overlong_penalty
from minirlhf.errors import InputError
from minirlhf.grpo import AGGREGATIONS, KL_LOSSES, POLICY_LOSSES, aggregation_count, grpo_loss
from minirlhf.mismatch import mismatch_stats
from minirlhf.models import dropout_off
from minirlhf.ops import masked_sum
from minirlhf.report import HeldOut, finish, iteration_metrics, log_iteration
from minirlhf.roles import Reward, load_policy, roles
from minirlhf.rollout import (TrainPrompts, add_up, join_rollouts, micro_batch_rows, minibatches,
                              old_logprobs_and_corrections, policy_logprobs, reference_logprobs, rollout_rows,
                              sample_rollout, start_rl_run)
from minirlhf.precision import LossScaler
from minirlhf.run import Run
from minirlhf.sampling import SamplingSettings
from minirlhf.settings import GroupArgs, RLArgs
from minirlhf.token_rewards import per_token_kl
from minirlhf.training import lr_at, make_optimizer, optimizer_step, set_lr
from minirlhf.validation import check_choice, check_group_minibatches, check_rl_args

@dataclass
class Args(GroupArgs, RLArgs):  # + model, data, sampling, evaluation, run and rollout settings (minirlhf/settings.py)
    group_size: int = 8
    """responses sampled per prompt (G): each is judged against its group (--rollout-size = prompts x G)"""
    ppo_epochs: int = 2
    """passes over each rollout (the clipped ratio corrects for re-using samples)"""
    clip_eps: float = 0.2
    """policy ratio clip range: [1 - clip_eps, 1 + clip_eps]"""
    clip_high: Optional[float] = None
    """upper clip 1 + clip_high instead of 1 + clip_eps (DAPO's clip-higher, e.g. 0.28: unlikely tokens can grow, the
    entropy does not collapse); none: symmetric"""
    policy_loss: str = "ppo"
    """the clipped policy term: ppo (each token's ratio clipped, PPO / DeepSeekMath) | gspo (one length-normalised
    ratio per response, clipped: GSPO, whose paper clips far tighter, --clip-eps 3e-4 --clip-high 4e-4) | cispo (each
    token's clipped ratio, detached, weights its log-prob: no token loses its gradient; MiniMax-M1 sets no lower
    bound and an upper one only, --clip-eps 1 --clip-high 0.28, which cispo alone allows); policy_losses.py"""
    advantage_std: str = "group"
    """what (score - its group's mean) is divided by: group (its group's std, DeepSeekMath) | batch (the whole
    rollout's std) | none (Dr. GRPO: too easy or too hard prompts, with a small std, are not up-weighted)"""
    loss_aggregation: str = "token"
    """token losses -> one number: token (sum / the minibatch's tokens, DAPO) | sequence (each response's mean, then
    their mean, DeepSeekMath) | constant (sum / (responses x --max-new-tokens), Dr. GRPO); grpo.py"""
    beta: float = 0.04
    """weight of the KL term to the reference inside the loss (DeepSeekMath's β; 0: no KL term)"""
    kl_loss: str = "k3"
    """the KL term: k3 (DeepSeekMath's; its gradient is ∇KL(π_ref‖π), the other direction) | k2 (gradient
    ∇KL(π‖π_ref)) | k3+ (k3's value, logged as loss/kl, with k2's gradient ∇KL(π‖π_ref)); the default is k3 because
    on the built-in world no choice moved gold at equal KL (bench/kl_loss_choice.py); grpo.py, docs/kl.md"""
    kl_off_policy_weight: bool = False
    """multiply the KL term by sg(π/π_old): with --ppo-epochs > 1 every --kl-loss then keeps its gradient after the
    first epoch (where the weight is exactly 1); off: DeepSeekMath's loss"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose scores are all equal (all-zero advantages, no gradient) and
    sample more groups from the next prompts until the rollout holds rollout_size / G of the others"""
    dynamic_sampling_max_rounds: int = 4
    """--dynamic-sampling: rollouts sampled per iteration at most; still short then, the update trains on the
    groups kept (rollout/kept_groups)"""
    overlong_buffer: Optional[int] = None
    """DAPO's soft overlong punishment over the last N of the --max-new-tokens tokens: a response reaching into them
    loses up to --overlong-penalty of its score, linearly in its length (a cut response: all of it); none: off"""
    overlong_penalty: float = 1.0
    """--overlong-buffer: the penalty's scale (the score of a response of --max-new-tokens tokens drops by this)"""
    out: str = "runs/grpo"  # a shared setting, this script's default



RANGES = {"group_size": ">= 2", "ppo_epochs": ">= 1", "beta": ">= 0", "clip_eps": "> 0",
          "clip_high": "none or > 0", "dynamic_sampling_max_rounds": ">= 1", "overlong_buffer": "none or >= 1",
          "overlong_penalty": ">= 0"}  # this script's own flags; the shared ones are declared in settings.py


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_rl_args(args, RANGES)
    check_choice("--advantage-std", args.advantage_std, SCALES)
    check_choice("--loss-aggregation", args.loss_aggregation, AGGREGATIONS)
    check_choice("--kl-loss", args.kl_loss, KL_LOSSES)
    check_choice("--policy-loss", args.policy_loss, POLICY_LOSSES)
    # cispo's two bounds are independent: MiniMax-M1's "no lower bound, an upper one" is --clip-eps 1 --clip-high 0.28
    if args.clip_high is not None and args.clip_high < args.clip_eps and args.policy_loss != "cispo":
        raise InputError(f"--clip-high {args.clip_high} is below --clip-eps {args.clip_eps}: it replaces the upper "
                         "clip 1 + clip_eps by 1 + clip_high to widen it (DAPO's clip-higher); give --clip-high >= "
                         "--clip-eps, or leave it out")
    if args.overlong_buffer is not None and args.overlong_buffer > args.max_new_tokens:
        raise InputError(f"--overlong-buffer {args.overlong_buffer} is above --max-new-tokens {args.max_new_tokens}: "
                         "the penalty grows over the last --overlong-buffer of the --max-new-tokens tokens; give "
                         "--overlong-buffer <= --max-new-tokens")
    if args.rollout_size % args.group_size:
        raise InputError(f"grpo needs --group-size >= 2 dividing --rollout-size {args.rollout_size}, "
                         f"got {args.group_size}")
    check_group_minibatches(args, args.group_size, "--group-size")


def main(args):
    run = Run(args, check_args)  # ---- plumbing: settings, --out / --resume, torchrun, threads, seed (run.py)
    device, G = run.device, args.group_size

    # 1. ONE frozen base serves every role: the policy adapter (trainable), the reward adapter + head (frozen)
    tokenizer, model, params = load_policy(args)  # the base, and on it the policy: LoRA adapter "policy", B = 0
    sampling = SamplingSettings.from_args(args, tokenizer.eos_token_id)  # the distribution rollouts are drawn from
    reward = Reward(model, args, tokenizer)  # the reward adapter(s) + head(s) of --reward-model, or gold
    dropout_off(model)  # sampling, old and new log-probs must come from one and the same policy
    run.print(roles(model, reward, args, run.dist.world_size))

    # 2. prompts for the rollouts (each sampled G times); the held-out prompts of the evaluations; optimizer
    train_prompts = TrainPrompts(args, tokenizer, run.dist)  # sharded over processes, reshuffled every epoch
    held_out = HeldOut(model, tokenizer, reward, args, device, run.clock)  # times itself: "evaluation"
    optimizer = make_optimizer(params, args.lr)
    scaler = LossScaler(model)  # fp16's loss scaling; a plain backward otherwise (precision.py)
    # ---- plumbing: the rollout sampler's generator, resume, the evaluation before training (read back on resume)
    generator, before = start_rl_run(run, args, model, reward, train_prompts, held_out, optimizer, scaler)

    # 3. the loop: rollout in groups -> reward -> group-normalised advantages -> minibatch epochs of the GRPO loss
    # b_ tensors hold the whole rollout (B responses), mb_ tensors one minibatch; (B, R) = the response columns.
    last = {}  # the last rollout's tensors, saved at the end
    for iteration in run.steps(desc="grpo", unit="iteration"):  # ---- plumbing: Ctrl-C, checkpoints
        set_lr(optimizer, lr_at(iteration - 1, args.lr, args.iterations, args.warmup_iterations))

        # 3a. rollout: rollout_size / G prompts, each sampled G times (group-contiguous); 3b. one score each
        # (--dynamic-sampling: rounds of these, keeping only the groups whose scores differ: below)
        if args.dynamic_sampling:
            batch, b_scores, sampled = dynamic_sampling(model, tokenizer, train_prompts, reward, args, generator, run)
        else:
            run.phase("generation")  # ---- time per phase: metrics time/*, summary time/*_seconds
            batch = sample_rollout(model, tokenizer, train_prompts.take(args.rollout_size // G, repeat=G), args,
                                   generator)
            run.phase("scoring")
            b_scores, sampled = score(batch, reward, args), {}  # (B,)
        b_mask = batch["mask"]  # (B, R): right-padded responses

        run.phase("logprobs")
        # 3c. log-probs of the sampled tokens under the policy that sampled them: the sampler's own (the same numbers a
        # forward pass would give, to float rounding: tests/test_sampling_flags.py; no second pass), and under the
        # reference (no grad). With --tis-cap or --mismatch-mask-threshold the update's old log-probs are the
        # trainer's, recomputed, and correct for that rounding (mismatch.py); else they are the sampler's.
        b_logprobs = batch["logprobs"][:, batch["P"]:]  # (B, T) -> (B, R)
        b_old_logprobs, b_tis, b_loss_mask, mismatch = old_logprobs_and_corrections(model, batch, sampling, args)
        b_ref_logprobs = reference_logprobs(model, batch, args.temperature, args.forward_batch_size)  # (B, R)

        # 3d. advantages: each score minus its group's mean, / its group's std (--advantage-std: or the rollout's, or
        # none); the KL goes into the loss, not the reward
        b_advantages = group_advantages(b_scores, G, scale=args.advantage_std)[:, None] * b_mask  # (B,) -> (B, R)
        b_kl = per_token_kl(b_old_logprobs, b_ref_logprobs, b_mask, "k3")  # (B, R), for logging

        # 3e. epochs of shuffled minibatches: clipped ratio x A (x the TIS weight) + beta x the KL term (--kl-loss)
        # per token, --loss-aggregation (grpo.py); b_loss_mask: b_mask less the responses the mismatch mask drops
        run.phase("update")
        stats = []
        for _ in range(args.ppo_epochs):  # (dynamic sampling may keep fewer rows than a minibatch)
            for mb in minibatches(len(b_scores), min(args.minibatch_size, len(b_scores)),
                                  group_size=G if args.group_minibatches else 1):  # whole groups: --group-minibatches
                optimizer.zero_grad(set_to_none=True)
                mb_stats, mb_logprobs = minibatch_gradient(model, batch, sampling, mb, b_old_logprobs, b_ref_logprobs,
                                                           b_advantages, b_loss_mask, b_tis, args, scaler)  # below
                if mismatch is None:  # sampler vs trainer, measured for free on the first minibatch, whose log-probs
                    mismatch = mismatch_stats(b_logprobs[mb], mb_logprobs, b_mask[mb])  # are before any step
                grad_norm = optimizer_step(optimizer, params, loss=mb_stats["loss/total"].item(),
                                           grad_clip=args.grad_clip, step=iteration - 1,
                                           world_size=run.dist.world_size, scaler=scaler)  # + NaN guard
                stats.append({**mb_stats, "train/grad_norm": grad_norm})
        last = {**{k: batch[k] for k in ("input_ids", "attention_mask", "response_mask")}, "logprobs": b_logprobs,
                "ref_logprobs": b_ref_logprobs, "scores": b_scores, "advantages": b_advantages,
                "returns": b_scores[:, None] * b_mask}

        # 3f. logging (and every --eval-every iterations the held-out evaluation)
        metrics = iteration_metrics(batch, b_scores, b_kl, b_scores - args.beta * b_kl.sum(-1), run.dist.world_size)
        metrics.update({"objective/kl_coef": args.beta, "train/lr": optimizer.param_groups[0]["lr"], **mismatch,
                        **sampled})
        metrics.update(reward.metrics())  # with an ensemble of reward models: objective/ensemble_std
        log_iteration(run, iteration, metrics, stats, batch, held_out)

    # 4. the policy adapter, the last rollout and the evaluation after training
    return finish(run, model, held_out, before, last)


def score(batch, reward, args):
    """Step 3b: (B,) scores: the reward (with --missing-eos-penalty), plus --overlong-penalty x DAPO's soft overlong
    punishment of each response's length with --overlong-buffer (dapo.overlong_penalty: 0 up to max_new_tokens -
    buffer tokens, down to -1 at max_new_tokens). A cut response is at max_new_tokens: it loses the whole
    --overlong-penalty, and --missing-eos-penalty as well when both are given (they add up)."""
    scores = reward(batch)  # (B,)
    if args.overlong_buffer is not None:
        lengths = batch["mask"].sum(-1)  # (B,) response tokens, the EOS included
        scores = scores + args.overlong_penalty * overlong_penalty(lengths, args.max_new_tokens, args.overlong_buffer)
    return scores


def dynamic_sampling(model, tokenizer, train_prompts, reward, args, generator, run):
    """Steps 3a-3b with DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2): rounds of the ordinary rollout (the next
    rollout_size / G prompts, G samples each, scored); of each round only the groups whose scores are not all equal
    are kept (dapo.informative_groups: the others' advantages are all 0), until rollout_size / G are kept (the last
    round's surplus is dropped: DAPO over-samples and trims to the batch size) or --dynamic-sampling-max-rounds rounds
    have run. Still short, the update trains on the fewer groups kept (not topped up with uninformative ones, whose
    tokens would only dilute the token mean); none kept at all, on the last round's groups (the KL term alone moves
    the policy, as it would in plain GRPO). Returns (batch, scores (B,), metrics): B = G x the groups kept;
    rollout/dropped_groups counts the groups of all rounds whose scores were all equal."""
    G, wanted = args.group_size, args.rollout_size // args.group_size
    parts, scores, kept, dropped = [], [], 0, 0
    for rounds in range(1, args.dynamic_sampling_max_rounds + 1):
        run.phase("generation")
        batch = sample_rollout(model, tokenizer, train_prompts.take(wanted, repeat=G), args, generator)
        run.phase("scoring")
        b_scores = score(batch, reward, args)  # (wanted x G,)
        informative = informative_groups(b_scores, G)  # (wanted,)
        dropped += int((~informative).sum())
        groups = informative.nonzero().squeeze(-1)[:wanted - kept]  # (k,) the groups this round adds
        if len(groups):
            rows = (groups[:, None] * G + torch.arange(G, device=groups.device)).reshape(-1)  # (k x G,) their rows
            parts.append(rollout_rows(batch, rows))
            scores.append(b_scores[rows])
            kept += len(groups)
        if kept == wanted:
            break
    if not parts:
        parts, scores = [batch], [b_scores]
    metrics = {"rollout/kept_groups": kept, "rollout/sampling_rounds": rounds, "rollout/dropped_groups": dropped}
    return join_rollouts(parts, tokenizer.pad_token_id), torch.cat(scores), metrics


def minibatch_gradient(model, batch, sampling, mb, old_logprobs, ref_logprobs, advantages, loss_mask, tis, args,
                       scaler):
    """Step 3e's loss on one minibatch, backward: clipped ratio x A (x the TIS weight; --policy-loss) + beta x the KL
    term (--kl-loss) per token, reduced by --loss-aggregation (grpo.grpo_loss); the gradient accumulates in the
    parameters' .grad (the caller zeroes it before and steps after). Returns the minibatch's statistics, {name: scalar
    tensor}, and the policy's log-probs of its rows, (len(mb), R), detached (on the first minibatch: the trainer's at
    the sampler's weights, for the mismatch metrics).

    mb: the minibatch's rows of the rollout (an index tensor); old_logprobs, ref_logprobs, advantages, loss_mask (the
    update's mask) and tis (TIS weights, or None) hold the whole rollout, (B, R) each. Micro-batches of
    <= --micro-batch-size rows, a backward each: as each loss is a sum over its tokens (or responses) / n, their
    gradients and statistics add up to the minibatch's exactly (tests/test_memory.py)."""
    n_tokens, parts, logprobs = loss_mask[mb].sum().clamp(min=1), [], []  # its real tokens: the entropy mean / them
    n = aggregation_count(loss_mask[mb], args.loss_aggregation)  # and the loss by this: tokens or rows
    for mu in mb.split(micro_batch_rows(args)):
        mu_mask = loss_mask[mu]  # (b, R)
        newlogprobs, entropy, _ = policy_logprobs(model, batch, sampling, mu)  # (b, R) each
        logprobs.append(newlogprobs.detach())
        loss, loss_stats = grpo_loss(newlogprobs, old_logprobs[mu], ref_logprobs[mu], advantages[mu], mu_mask,
                                     args.clip_eps, args.beta, n, args.loss_aggregation, args.max_new_tokens,
                                     args.clip_high, args.kl_loss, args.kl_off_policy_weight,
                                     None if tis is None else tis[mu], args.policy_loss)
        scaler.backward(loss)
        parts.append({"policy/entropy": masked_sum(entropy.detach(), mu_mask) / n_tokens,
                      "policy/clipfrac": loss_stats["clipfrac"], "policy/approx_kl": loss_stats["approx_kl"],
                      "loss/kl": loss_stats["kl"], "loss/policy": loss_stats["pg_loss"], "loss/total": loss.detach()})
    return add_up(parts), torch.cat(logprobs)  # the minibatch's


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
