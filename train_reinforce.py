"""REINFORCE: the whole response is one action, pushed up or down by how much its KL-regularised reward beats a
baseline (Williams 1992): the average so far (the SmolLM2 + HelpSteer2 setup) or, RLOO, the other responses to the
same prompt (Ahmadian et al. 2024); or, REINFORCE++ (Hu et al. 2025), each token pushed by its own return to go,
normalised over the whole rollout. ONE frozen base serves every role through LoRA adapters.

    python train_reinforce.py                  # against the shipped reward model (~20 seconds on a 2-core CPU)
    python train_reinforce.py --reward gold    # against the built-in world's gold score
    python train_reinforce.py --baseline leave-one-out --samples-per-prompt 4    # RLOO, k = 4
    python train_reinforce.py --baseline reinforce++                             # REINFORCE++

The roles on the one base (minirlhf/roles.py): the policy is a LoRA adapter "policy" (B = 0 at the start), the
reward model a frozen adapter "reward" + head (or the gold score), the reference the base with adapters disabled.
One iteration reads top to bottom:
  1. rollout     rollout_size / k prompts, each sampled k times (--samples-per-prompt, default 1; contiguous)
  2. reward      R = score - β · KL(sequence), KL(sequence) = Σ_t of a per-token estimate (k1 | k2 | k3)
  3. advantages  A = R - b (baselines.py), --baseline running-mean: b the mean of every R seen so far, each
                 taken after its own update; leave-one-out (RLOO): b the mean R of the other k - 1 of its prompt;
                 reinforce++: one per token, A_t = the return to go G_t = score - β Σ_{s>=t} KL_s, normalised over
                 every real token of the rollout (reinforce_pp.py); reinforce++-baseline: each score minus its
                 prompt's mean score first
  4. update      ONE on-policy pass of shuffled minibatches of -log π(y|x) · A (reinforce.py): there is no ratio
                 to correct for re-used samples, so no clipping and no second epoch; --tis-cap: each token's log π
                 times min(π_trainer_old / π_sampler, C) (mismatch.py); with per-token A: -Σ_t A_t log π_t
Writes what train_ppo.py writes, without a value head. Logged per iteration: objective/* (objective/kl_coef: β),
policy/approx_kl (k3 between the sampling and the updated policy), policy/entropy, loss/policy, time/*,
perf/tokens_per_second, mismatch/* (as train_grpo.py's), and every --eval-every iterations the eval/ metrics of
evaluation.py. objective/kl and
policy/approx_kl are of the sampling distribution (the --top-k / --top-p / --min-new-tokens filtered one, when set);
eval/kl is the exact KL of the unfiltered π at temperature 1.
"""
from dataclasses import dataclass

import torch

from minirlhf.baselines import RunningMeanBaseline, leave_one_out_advantages
from minirlhf.cli import run_script
from minirlhf.errors import InputError
from minirlhf.kl import AdaptiveKLController, k3
from minirlhf.mismatch import mismatch_stats
from minirlhf.models import dropout_off
from minirlhf.ops import masked_sum
from minirlhf.reinforce import reinforce_loss
from minirlhf.reinforce_pp import reinforce_pp_advantages
from minirlhf.report import HeldOut, finish, iteration_metrics, log_iteration
from minirlhf.roles import Reward, load_policy, roles
from minirlhf.rollout import (TrainPrompts, add_up, micro_batch_rows, minibatches, old_logprobs_and_corrections,
                              policy_logprobs, reference_logprobs, sample_rollout, start_rl_run)
from minirlhf.precision import LossScaler
from minirlhf.run import Run
from minirlhf.sampling import SamplingSettings
from minirlhf.settings import GroupArgs, RLArgs, RewardKLArgs
from minirlhf.token_rewards import KL_ESTIMATORS, per_token_kl
from minirlhf.training import lr_at, make_optimizer, optimizer_step, set_lr
from minirlhf.validation import check_choice, check_group_minibatches, check_kl_floor, check_rl_args

@dataclass
class Args(GroupArgs, RewardKLArgs, RLArgs):  # + model, data, sampling, eval, run, rollout, KL settings (settings.py)
    baseline: str = "running-mean"
    """how a reward becomes an advantage: running-mean (minus the mean of every reward seen so far in the run, the
    SmolLM2 + HelpSteer2 setup) | leave-one-out (RLOO: minus the mean of the other k - 1 responses to its prompt;
    --samples-per-prompt k >= 2) | reinforce++ (Hu et al. 2025: one advantage per token, its return to go score -
    β·Σ_{s>=t} KL_s, normalised by the mean and std over every token of the rollout; the paper's KL is --kl-estimator
    k1, the default; its PPO clip never acts in this one on-policy pass, ratio 1) | reinforce++-baseline (the same,
    each score minus its prompt's mean score first; k >= 2)"""
    samples_per_prompt: int = 1
    """responses sampled per prompt (k, dividing --rollout-size): a rollout is rollout_size / k prompts, k times each"""
    out: str = "runs/reinforce"  # a shared setting, this script's default



RANGES = {"samples_per_prompt": ">= 1"}  # this script's own flags; the shared ones are declared in settings.py


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_rl_args(args, RANGES, kl_estimators=tuple(KL_ESTIMATORS))
    if args.baseline == "moving-average":
        raise InputError("--baseline moving-average is now --baseline running-mean (the same baseline: the mean of "
                         "every reward so far, not an exponential moving average)")
    check_choice("--baseline", args.baseline, ("running-mean", "leave-one-out", "reinforce++", "reinforce++-baseline"))
    if args.rollout_size % args.samples_per_prompt:
        raise InputError(f"--samples-per-prompt {args.samples_per_prompt} must divide --rollout-size "
                         f"{args.rollout_size}")
    if args.baseline in ("leave-one-out", "reinforce++-baseline") and args.samples_per_prompt < 2:
        raise InputError(f"--baseline {args.baseline} needs --samples-per-prompt >= 2 dividing --rollout-size "
                         f"{args.rollout_size}, got {args.samples_per_prompt}")
    check_group_minibatches(args, args.samples_per_prompt, "--samples-per-prompt")


def main(args):
    run = Run(args, check_args)  # ---- plumbing: settings, --out / --resume, torchrun, threads, seed (run.py)
    k = args.samples_per_prompt

    # 1. ONE frozen base serves every role: the policy adapter (trainable), the reward adapter + head (frozen)
    tokenizer, model, params = load_policy(args)  # the base, and on it the policy: LoRA adapter "policy", B = 0
    sampling = SamplingSettings.from_args(args, tokenizer.eos_token_id)  # the distribution rollouts are drawn from
    reward = Reward(model, args, tokenizer)  # the reward adapter(s) + head(s) of --reward-model, or gold
    dropout_off(model)  # sampling and update log-probs must come from one and the same policy
    run.print(roles(model, reward, args, run.dist.world_size))

    # 2. prompts for the rollouts (each sampled k times); the held-out prompts of the evaluations; optimizer, KL
    # controller, the running-mean baseline (the others keep no state)
    train_prompts = TrainPrompts(args, tokenizer, run.dist)  # sharded over processes, reshuffled every epoch
    held_out = HeldOut(model, tokenizer, reward, args, run.device, run.clock)  # times itself: "evaluation"
    optimizer = make_optimizer(params, args.lr)
    scaler = LossScaler(model)  # fp16's loss scaling; a plain backward otherwise (precision.py)
    kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon) if args.target_kl else None
    baseline = RunningMeanBaseline() if args.baseline == "running-mean" else None  # per process: its own mean
    # ---- plumbing: the rollout sampler's generator, resume (the baseline and KL controller too), the evaluation
    # before training (read back on resume)
    generator, before = start_rl_run(run, args, model, reward, train_prompts, held_out, optimizer, scaler,
                                     baseline=baseline, kl_controller=kl_ctl)

    # 3. the loop: rollout -> KL-regularised reward -> minus the baseline -> one pass of -log π · A
    # b_ tensors hold the whole rollout (B responses), mb_ tensors one minibatch; (B, R) = the response columns.
    last = {}  # the last rollout's tensors, saved at the end
    for iteration in run.steps(desc="reinforce", unit="iteration"):  # ---- plumbing: Ctrl-C, checkpoints
        set_lr(optimizer, lr_at(iteration - 1, args.lr, args.iterations, args.warmup_iterations))

        # 3a. rollout: rollout_size / k prompts, each sampled k times (contiguous); 3b. reward = score - β x KL
        run.phase("generation")  # ---- time per phase: metrics time/*, summary time/*_seconds
        batch = sample_rollout(model, tokenizer, train_prompts.take(args.rollout_size // k, repeat=k), args, generator)
        run.phase("scoring")
        b_scores = reward(batch)  # (B,)
        run.phase("logprobs")
        b_logprobs = batch["logprobs"][:, batch["P"]:]  # (B, R): the sampler's own log-probs (no second pass)
        # with --tis-cap / --mismatch-mask-threshold: the trainer's, recomputed, for the TIS weights and the mask, and
        # in the KL (the sampler's rounding, measured against the trainer's reference, would read as KL: mismatch.py)
        b_old_logprobs, b_tis, b_loss_mask, mismatch = old_logprobs_and_corrections(model, batch, sampling, args)
        b_ref_logprobs = reference_logprobs(model, batch, args.temperature, args.forward_batch_size)  # (B, R)
        b_mask, kl_coef = batch["mask"], kl_ctl.value if kl_ctl else args.kl_coef  # (B, R): right-padded responses
        b_kl = per_token_kl(b_old_logprobs, b_ref_logprobs, b_mask, args.kl_estimator)  # (B, R)
        b_rlhf_reward = b_scores - kl_coef * b_kl.sum(-1)  # (B,)
        b_returns = b_rlhf_reward[:, None] * b_mask  # (B, R): each response's R on its every token

        # 3c. advantages: the reward minus its baseline, the mean of every reward seen so far or (RLOO) the
        # mean reward of the other k - 1 responses to its prompt; REINFORCE++: one per token, the returns to go of
        # -β KL_t (+ the score, less its prompt's mean score with -baseline, at the last token), normalised
        if args.baseline == "leave-one-out":
            b_advantages = leave_one_out_advantages(b_rlhf_reward, k)  # (B,)
        elif args.baseline in ("reinforce++", "reinforce++-baseline"):
            b_advantages, b_returns = reinforce_pp_advantages(b_scores, b_kl, b_mask, kl_coef,
                                                              k if args.baseline == "reinforce++-baseline" else None)
        else:
            b_advantages = baseline.advantages(b_rlhf_reward)  # (B,)
        if b_loss_mask is not b_mask:  # --mismatch-mask-threshold: a dropped response's advantage is 0, so its loss
            keep = b_loss_mask.any(-1)  # and gradient are (its tokens leave the statistics)
            b_advantages = b_advantages * (keep if b_advantages.dim() == 1 else keep[:, None])

        # 3d. one on-policy pass of shuffled minibatches: -log π(y|x) · A (Williams 1992; reinforce.py), each token's
        # log π times its TIS weight with --tis-cap; b_loss_mask: b_mask less the responses the mismatch mask drops
        run.phase("update")
        stats = []
        for mb in minibatches(len(b_scores), args.minibatch_size, group_size=k if args.group_minibatches else 1):
            optimizer.zero_grad(set_to_none=True)
            mb_stats, mb_logprobs = minibatch_gradient(model, batch, sampling, mb, b_old_logprobs, b_advantages,
                                                       b_loss_mask, b_tis, args, scaler)  # below
            if mismatch is None:  # sampler vs trainer, measured for free on the first minibatch, whose log-probs are
                mismatch = mismatch_stats(b_logprobs[mb], mb_logprobs, b_mask[mb])  # before any step (mismatch.py)
            grad_norm = optimizer_step(optimizer, params, loss=mb_stats["loss/total"].item(), grad_clip=args.grad_clip,
                                       step=iteration - 1, world_size=run.dist.world_size,
                                       scaler=scaler)  # + NaN guard
            stats.append({**mb_stats, "train/grad_norm": grad_norm})
        last = {**{k: batch[k] for k in ("input_ids", "attention_mask", "response_mask")}, "logprobs": b_logprobs,
                "ref_logprobs": b_ref_logprobs, "scores": b_scores, "returns": b_returns,
                "advantages": b_advantages if b_advantages.dim() == 2 else b_advantages[:, None] * b_mask}

        # 3e. adaptive KL; logging (and every --eval-every iterations the held-out evaluation)
        metrics = iteration_metrics(batch, b_scores, b_kl, b_rlhf_reward, run.dist.world_size)
        if kl_ctl:
            if iteration == 1:  # the rollout of the fresh policy (= the reference): the sampling filters' KL floor
                check_kl_floor(args, metrics["objective/kl"])
            kl_ctl.update(metrics["objective/kl"], len(b_scores) * run.dist.world_size)
        metrics.update({"objective/kl_coef": kl_coef, "train/lr": optimizer.param_groups[0]["lr"], **mismatch})
        metrics.update(reward.metrics())  # with an ensemble of reward models: objective/ensemble_std
        log_iteration(run, iteration, metrics, stats, batch, held_out)

    # 4. the policy adapter, the last rollout and the evaluation after training
    return finish(run, model, held_out, before, last)


def minibatch_gradient(model, batch, sampling, mb, old_logprobs, advantages, loss_mask, tis, args, scaler):
    """Step 3d's loss on one minibatch, backward: -log pi(y|x) * A per response (-sum_t A_t log pi_t with per-token
    A), each token's log pi times its TIS weight with --tis-cap (reinforce.reinforce_loss), the mean over the
    minibatch's responses; the gradient accumulates in the parameters' .grad (the caller zeroes it before and steps
    after). Returns the minibatch's statistics, {name: scalar tensor}, and the policy's log-probs of its rows,
    (len(mb), R), detached (on the first minibatch: the trainer's at the sampler's weights, for the mismatch metrics).

    mb: the minibatch's rows of the rollout (an index tensor); advantages (B,) one per response, or (B, R) one per
    token (REINFORCE++); old_logprobs (for approx_kl), loss_mask (the update's mask: the statistics' tokens) and tis
    (TIS weights, or None) hold the whole rollout, (B, R) each. Micro-batches of <= --micro-batch-size rows, a
    backward each: the loss is a mean over the minibatch's rows (sum / len(mb)) and each statistic a mean over its
    tokens, so the micro-batches add up exactly (tests/test_memory.py)."""
    n_tokens, parts, logprobs = loss_mask[mb].sum().clamp(min=1), [], []  # the minibatch's real tokens: means / them
    for mu in mb.split(micro_batch_rows(args)):
        mu_mask = loss_mask[mu]  # (b, R)
        newlogprobs, entropy, _ = policy_logprobs(model, batch, sampling, mu)  # (b, R) each
        logprobs.append(newlogprobs.detach())
        loss = reinforce_loss(newlogprobs, advantages[mu], batch["mask"][mu],
                              None if tis is None else tis[mu]).sum() / len(mb)
        scaler.backward(loss)
        parts.append({"policy/entropy": masked_sum(entropy.detach(), mu_mask) / n_tokens,
                      "policy/approx_kl": masked_sum(k3(old_logprobs[mu], newlogprobs.detach()), mu_mask) / n_tokens,
                      "loss/policy": loss.detach(), "loss/total": loss.detach()})
    return add_up(parts), torch.cat(logprobs)  # the minibatch's


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
