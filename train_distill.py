"""On-policy distillation (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", arXiv 2306.13649): the student samples responses, and at every token it sampled it is
pulled toward the teacher's next-token distribution over the whole vocabulary. No reward in the loss: the teacher's
distributions are the whole signal, dense (every token, every vocabulary entry) where RL's reward is one number per
response.

    python train_grpo.py --reward gold --out runs/grpo              # a teacher: any policy folder on the same base
    python train_distill.py --teacher runs/grpo/policy              # reverse KL (~30 seconds on a 2-core CPU)
    python train_distill.py --teacher runs/grpo/policy --divergence jsd --jsd-beta 0.5

The roles on the one base (minirlhf/roles.py): the student is a LoRA adapter "policy" (B = 0 at the start: the
base), the teacher a second, frozen adapter "teacher" read from --teacher, the reference the base with adapters
disabled; the reward model (or the gold score) only measures: the logged rollout score and the held-out evaluation.
One iteration reads top to bottom:
  1. rollout     --rollout-size prompts, one response each, sampled by the student
  2. score       one score per response, logged (not trained on)
  3. log-probs   the student's (the sampler's own) and the reference's, for the logged KL to the base
  4. update      one pass of shuffled minibatches of the divergence between the student's and the teacher's
                 next-token distributions at every response token, averaged over the tokens (distill.py):
                 --divergence reverse-kl KL(student ‖ teacher) (on-policy distillation) | forward-kl
                 KL(teacher ‖ student) | jsd (GKD's generalized JSD, --jsd-beta β: the teacher's weight)
The student's distribution is the one it samples from (--temperature, then --top-k / --top-p / --min-new-tokens:
sampling.sampling_logits); the teacher's is its unfiltered softmax at the same temperature. The gradient reaches the
student through its distributions only, not through which tokens it sampled (GKD, Sec. 3).
Writes what train_grpo.py writes (policy/: the student adapter; last_rollout.safetensors without advantages). Logged
per iteration: loss/distill (the divergence per response token: 0 when the teacher is the student), objective/scores,
objective/kl (k3 to the base, per sequence), policy/entropy, policy/approx_kl, time/*, perf/tokens_per_second, and
every --eval-every iterations the eval/ metrics of evaluation.py (eval/kl: the exact KL of the student to the base).
"""
from dataclasses import dataclass
from typing import Optional

from minirlhf.cli import run_script
from minirlhf.distill import DIVERGENCES
from minirlhf.errors import InputError
from minirlhf.folders import check_adapter_dir
from minirlhf.formats import load_adapter
from minirlhf.heads import response_divergence
from minirlhf.kl import k3
from minirlhf.models import dropout_off
from minirlhf.ops import masked_sum
from minirlhf.precision import LossScaler
from minirlhf.report import HeldOut, finish, iteration_metrics, log_iteration
from minirlhf.roles import Reward, load_policy, roles
from minirlhf.rollout import (TrainPrompts, add_up, micro_batch_rows, minibatches, reference_logprobs, sample_rollout,
                              start_rl_run)
from minirlhf.run import Run
from minirlhf.sampling import SamplingSettings
from minirlhf.settings import RLArgs
from minirlhf.token_rewards import per_token_kl
from minirlhf.training import lr_at, make_optimizer, optimizer_step, set_lr
from minirlhf.validation import check_choice, check_rl_args

TEACHER = "teacher"  # the teacher's adapter name on the shared base


@dataclass
class Args(RLArgs):  # + the model, data, sampling, evaluation, run and rollout settings (minirlhf/settings.py)
    teacher: Optional[str] = None
    """the teacher (required): a policy adapter folder trained on the same base (e.g. runs/grpo/policy), loaded as a
    frozen second adapter; the reward settings only measure the student (logged score, held-out evaluation)"""
    divergence: str = "reverse-kl"
    """per response token, between the student's and the teacher's next-token distributions (distill.py):
    reverse-kl KL(student ‖ teacher) (on-policy distillation: mode-seeking) | forward-kl KL(teacher ‖ student)
    (mode-covering) | jsd (GKD's generalized JSD, --jsd-beta)"""
    jsd_beta: Optional[float] = None
    """jsd only: β, the teacher's weight in the mixture m = β teacher + (1 - β) student (toward 0: forward KL,
    toward 1: reverse KL; none: 0.5, the symmetric JSD)"""
    out: str = "runs/distill"  # a shared setting, this script's default


RANGES = {"jsd_beta": "none or (0, 1)"}  # this script's own flags; the shared ones are declared in settings.py


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_rl_args(args, RANGES)
    check_choice("--divergence", args.divergence, DIVERGENCES)
    if args.jsd_beta is not None and args.divergence != "jsd":
        raise InputError(f"--jsd-beta is the generalized JSD's β: use it with --divergence jsd (got --divergence "
                         f"{args.divergence})")
    if args.divergence == "forward-kl" and (args.top_k > 0 or args.top_p < 1 or args.min_new_tokens > 0):
        raise InputError("--divergence forward-kl: KL(teacher ‖ student) is infinite where --top-k / --top-p / "
                         "--min-new-tokens give the student's token probability 0 and the teacher's not; use "
                         "reverse-kl or jsd with them")
    if args.tis_cap is not None or args.mismatch_mask_threshold is not None:
        raise InputError("--tis-cap and --mismatch-mask-threshold correct a policy-gradient ratio; distillation's "
                         "loss has none (it reads the student's distributions, not its sampled log-probs)")
    if args.teacher is None:
        raise InputError("--teacher DIR is required: the policy adapter folder to distil, trained on the same base "
                         "(e.g. runs/grpo/policy, written by train_grpo.py)")
    check_adapter_dir(args.teacher, "--teacher")


def main(args):
    run = Run(args, check_args)  # ---- plumbing: settings, --out / --resume, torchrun, threads, seed (run.py)
    device = run.device

    # 1. ONE frozen base serves every role: the student adapter (trainable), the teacher adapter (frozen), the reward
    # adapter + head (frozen, for measuring only)
    tokenizer, model, params = load_policy(args)  # the base, and on it the student: LoRA adapter "policy", B = 0
    load_adapter(model, args.teacher, adapter=TEACHER, flag="--teacher")  # frozen; "policy" stays the active one
    sampling = SamplingSettings.from_args(args, tokenizer.eos_token_id)  # the distribution the student samples from
    reward = Reward(model, args, tokenizer)  # the reward adapter(s) + head(s) of --reward-model, or gold
    dropout_off(model)  # sampling and the update's distributions must come from one and the same student
    run.print(roles(model, reward, args, run.dist.world_size), f"teacher = adapter {TEACHER!r} from {args.teacher}")

    # 2. prompts for the rollouts; the held-out prompts of the evaluations; optimizer
    train_prompts = TrainPrompts(args, tokenizer, run.dist)  # sharded over processes, reshuffled every epoch
    held_out = HeldOut(model, tokenizer, reward, args, device, run.clock)  # times itself: "evaluation"
    optimizer = make_optimizer(params, args.lr)
    scaler = LossScaler(model)  # fp16's loss scaling; a plain backward otherwise (precision.py)
    # ---- plumbing: the rollout sampler's generator, resume, the evaluation before training (read back on resume)
    generator, before = start_rl_run(run, args, model, reward, train_prompts, held_out, optimizer, scaler)

    # 3. the loop: the student samples -> (score, KL to the base: logged) -> minibatches of the divergence to the
    # teacher at every sampled token. b_ tensors hold the whole rollout (B responses); (B, R) = the response columns.
    last = {}  # the last rollout's tensors, saved at the end
    for iteration in run.steps(desc="distill", unit="iteration"):  # ---- plumbing: Ctrl-C, checkpoints
        set_lr(optimizer, lr_at(iteration - 1, args.lr, args.iterations, args.warmup_iterations))

        # 3a. rollout: --rollout-size prompts, one response each, from the student; 3b. one score each, logged only
        run.phase("generation")  # ---- time per phase: metrics time/*, summary time/*_seconds
        batch = sample_rollout(model, tokenizer, train_prompts.take(args.rollout_size), args, generator)
        b_mask = batch["mask"]  # (B, R): right-padded responses
        run.phase("scoring")
        b_scores = reward(batch)  # (B,)

        # 3c. the student's log-probs of its tokens (the sampler's own) and the reference's: the KL to the base, logged
        run.phase("logprobs")
        b_logprobs = batch["logprobs"][:, batch["P"]:]  # (B, T) -> (B, R)
        b_ref_logprobs = reference_logprobs(model, batch, args.temperature, args.forward_batch_size)  # (B, R)
        b_kl = per_token_kl(b_logprobs, b_ref_logprobs, b_mask, "k3")  # (B, R)

        # 3d. one pass of shuffled minibatches: the divergence to the teacher at every response token (below)
        run.phase("update")
        stats = []
        for mb in minibatches(len(b_scores), args.minibatch_size):
            optimizer.zero_grad(set_to_none=True)
            mb_stats = minibatch_gradient(model, batch, sampling, mb, b_logprobs, args, scaler)  # below
            grad_norm = optimizer_step(optimizer, params, loss=mb_stats["loss/total"].item(), grad_clip=args.grad_clip,
                                       step=iteration - 1, world_size=run.dist.world_size,
                                       scaler=scaler)  # + NaN guard
            stats.append({**mb_stats, "train/grad_norm": grad_norm})
        last = {**{k: batch[k] for k in ("input_ids", "attention_mask", "response_mask")}, "logprobs": b_logprobs,
                "ref_logprobs": b_ref_logprobs, "scores": b_scores}

        # 3e. logging (and every --eval-every iterations the held-out evaluation)
        metrics = iteration_metrics(batch, b_scores, b_kl, b_scores, run.dist.world_size)
        metrics["train/lr"] = optimizer.param_groups[0]["lr"]
        metrics.update(reward.metrics())  # with an ensemble of reward models: objective/ensemble_std (logged only)
        log_iteration(run, iteration, metrics, stats, batch, held_out)

    # 4. the student adapter, the last rollout and the evaluation after training
    return finish(run, model, held_out, before, last)


def minibatch_gradient(model, batch, sampling, mb, old_logprobs, args, scaler):
    """Step 3d's loss on one minibatch, backward: the --divergence between the student's and the teacher's next-token
    distributions at every response token (heads.response_divergence: the student's at the sampling distribution,
    the teacher's unfiltered at the same temperature; distill.token_divergence), summed over the minibatch's
    response tokens / their number; the gradient accumulates in the parameters' .grad (the caller zeroes it before
    and steps after). Returns the minibatch's statistics, {name: scalar tensor}.

    mb: the minibatch's rows of the rollout (an index tensor); old_logprobs (B, R): the sampler's log-probs, for
    policy/approx_kl. Micro-batches of <= --micro-batch-size rows, a backward each (the teacher's trunk pass, without
    grad, too): the loss is a sum over tokens / the minibatch's count, so the micro-batches add up exactly
    (tests/test_memory.py)."""
    P, mask = batch["P"], batch["mask"]  # (B, R)
    beta = 0.5 if args.jsd_beta is None else args.jsd_beta
    n_tokens, parts = mask[mb].sum().clamp(min=1), []  # the minibatch's response tokens: every mean is / them
    for mu in mb.split(micro_batch_rows(args)):
        mu_mask = mask[mu]  # (b, R)
        divergence, logprobs, entropy = (x[:, P:] for x in response_divergence(  # (b, T) -> (b, R) each
            model, TEACHER, batch["input_ids"][mu], batch["attention_mask"][mu], batch["response_mask"][mu], sampling,
            args.divergence, beta))
        loss = masked_sum(divergence, mu_mask) / n_tokens
        scaler.backward(loss)
        parts.append({"policy/entropy": masked_sum(entropy, mu_mask) / n_tokens,
                      "policy/approx_kl": masked_sum(k3(old_logprobs[mu], logprobs), mu_mask) / n_tokens,
                      "loss/distill": loss.detach(), "loss/total": loss.detach()})
    return add_up(parts)  # the minibatch's


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
