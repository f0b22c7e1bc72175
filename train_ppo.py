"""PPO for a language model, every role served by ONE frozen base model with LoRA adapters (the multi-adapter setup).

    python train_ppo.py                                # against the shipped reward model (~30 seconds on a 2-core CPU)
    python train_ppo.py --reward gold                  # against the built-in world's gold score

The roles on the one base (minirlhf/roles.py), all in memory once:
  policy     LoRA adapter "policy" (trainable, B = 0 at the start, so the policy starts AS the base)
  value      ScalarHead on the policy's hidden states (zero-initialised: V = 0 at the start)
  reward     LoRA adapter "reward" + its head, loaded frozen from --reward-model (a train_reward.py folder); several
             folders: an ensemble, adapters "reward", "reward1", ..., combined by --reward-ensemble
  reference  the base with every adapter disabled (models.reference): exactly where the policy started

One iteration reads top to bottom (cleanrl's ppo.py; Ziegler et al. 2019, Stiennon et al. 2020):
  1. rollout     sample a response to each of a batch of prompts with the policy
  2. reward      score each prompt + response: the reward model at the last real token, or the gold score
  3. log-probs   policy log-probs and values, reference log-probs of the sampled tokens, at the sampling temperature
  4. advantages  r_t = -β·KL_t on every token (+ the score on the last real token)       (token_rewards.py)
                 GAE(γ, λ) over r_t and V(s_t), advantages whitened over the rollout     (gae.py)
  5. update      epochs of shuffled minibatches: clipped policy loss + vf_coef · clipped value loss
                 (Schulman et al. 2017, Eq. 7 and 9: ppo.py), means over the minibatch's real tokens
Every --eval-every iterations, and before and after training, held-out prompts are sampled and measured
(evaluation.evaluate_policy): proxy reward, gold score (built-in world), exact KL(π‖π_ref) per sequence, length.
Writes DIR/args.json, metrics.jsonl, summary.json, curves.png, DIR/policy/ (PEFT adapter), DIR/value_head/ and
DIR/last_rollout.safetensors (the last rollout's tensors: what the last update saw, to inspect by hand).
Logged per iteration (metrics.jsonl): objective/scores (mean score), objective/kl (mean per-sequence sum of the
per-token KL estimate on the rollout, nats), objective/rlhf_reward (score - β·KL), policy/approx_kl (k3 of π_old vs π
during the update), policy/clipfrac, policy/entropy, val/vpred, val/clipfrac, loss/policy, loss/value,
time/generation, time/scoring, time/logprobs, time/update and time/evaluation (the iteration's seconds per phase:
phases.py; their totals are time/*_seconds in summary.json), perf/tokens_per_second (rollout tokens / iteration wall
time), mismatch/kl, mismatch/k1, mismatch/max_ratio (the sampler's log-probs of the rollout's tokens against the
recomputed old ones: mismatch.py; with --tis-cap / --mismatch-mask-threshold also mismatch/tis_capped,
mismatch/tis_weight, mismatch/masked_responses), and every --eval-every iterations the eval/ metrics of evaluation.py.
With several --reward-model folders also objective/ensemble_std: the members' std, averaged over the rollout.
objective/kl and policy/approx_kl are of the sampling distribution (the --top-k / --top-p / --min-new-tokens filtered
one, when set); eval/kl is the exact KL of the unfiltered π at temperature 1.
"""
from dataclasses import dataclass

from minirlhf.cli import run_script
from minirlhf.formats import save_head
from minirlhf.gae import gae
from minirlhf.heads import ScalarHead
from minirlhf.kl import AdaptiveKLController
from minirlhf.models import dropout_off
from minirlhf.ops import masked_sum
from minirlhf.ppo import policy_loss, value_loss
from minirlhf.report import HeldOut, finish, iteration_metrics, log_iteration
from minirlhf.roles import Reward, load_policy, roles
from minirlhf.rollout import (TrainPrompts, add_up, micro_batch_rows, minibatches, old_logprobs_and_corrections,
                              policy_logprobs, reference_logprobs, rollout_logprobs, sample_rollout, start_rl_run)
from minirlhf.precision import LossScaler
from minirlhf.run import Run
from minirlhf.sampling import SamplingSettings
from minirlhf.settings import RLArgs, RewardKLArgs
from minirlhf.token_rewards import KL_ESTIMATORS, token_rewards, whiten_advantages, whiten_rewards
from minirlhf.training import lr_at, make_optimizer, optimizer_step, set_lr
from minirlhf.validation import check_kl_floor, check_rl_args

@dataclass
class Args(RewardKLArgs, RLArgs):  # + the model, data, sampling, evaluation, run, rollout and KL settings (settings.py)
    ppo_epochs: int = 2
    """passes over each rollout (the clipped ratio corrects for re-using samples)"""
    clip_eps: float = 0.2
    """policy ratio clip range: [1 - clip_eps, 1 + clip_eps]"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE λ"""
    whiten_rewards: bool = False
    """divide the per-token rewards by their std over the rollout (mean kept)"""
    whiten_advantages: bool = True
    """normalise advantages to mean 0, std 1 over the rollout's real tokens"""
    vf_clip: float = 0.2
    """value clip range, in the value's units"""
    vf_coef: float = 0.1
    """weight of the value loss (the value head shares the policy's trunk and adapter)"""
    out: str = "runs/ppo"  # a shared setting, this script's default



RANGES = {"ppo_epochs": ">= 1", "gamma": "[0, 1]", "lam": "[0, 1]", "clip_eps": "> 0", "vf_clip": "> 0",
          "vf_coef": ">= 0"}  # this script's own flags; the shared ones are declared in settings.py


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_rl_args(args, RANGES, kl_estimators=tuple(KL_ESTIMATORS))


def main(args):
    run = Run(args, check_args)  # ---- plumbing: settings, --out / --resume, torchrun, threads, seed (run.py)
    device = run.device

    # 1. ONE frozen base serves every role: policy adapter (trainable), value head, reward adapter + head (frozen)
    tokenizer, model, params = load_policy(args)  # the base, and on it the policy: LoRA adapter "policy", B = 0
    sampling = SamplingSettings.from_args(args, tokenizer.eos_token_id)  # the distribution rollouts are drawn from
    # The value head reads the policy's own hidden states (one trunk pass gives log-probs and values), so the value
    # loss also trains the policy adapter: vf_coef keeps that small. init_std=0: V = 0 everywhere at the start, so the
    # first advantages come from the rewards alone; the gradient dV/dw = h is not zero, so the head still learns.
    value_head = ScalarHead(model.config.hidden_size, init_std=0.0).to(device)
    params += list(value_head.parameters())
    reward = Reward(model, args, tokenizer)  # the reward adapter(s) + head(s) of --reward-model, or gold
    dropout_off(model)  # sampling, old and new log-probs must come from one and the same policy
    run.print(roles(model, reward, args, run.dist.world_size),
              f"value head: {sum(p.numel() for p in value_head.parameters())} parameters on the policy's hidden states")

    # 2. prompts for the rollouts; the held-out prompts of the evaluations; optimizer, KL controller
    train_prompts = TrainPrompts(args, tokenizer, run.dist)  # sharded over processes, reshuffled every epoch
    held_out = HeldOut(model, tokenizer, reward, args, device, run.clock)  # times itself: "evaluation"
    optimizer = make_optimizer(params, args.lr)
    scaler = LossScaler(model)  # fp16's loss scaling; a plain backward otherwise (precision.py)
    kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon) if args.target_kl else None
    # ---- plumbing: the rollout sampler's generator, resume (the value head and KL controller too), the evaluation
    # before training (read back on resume)
    generator, before = start_rl_run(run, args, model, reward, train_prompts, held_out, optimizer, scaler,
                                     heads={"value": value_head}, kl_controller=kl_ctl)

    # 3. the loop: rollout -> reward -> KL -> advantages -> minibatch epochs
    # b_ tensors hold the whole rollout (B responses), mb_ tensors one minibatch; (B, R) = the response columns.
    last = {}  # the last rollout's tensors, saved at the end
    for iteration in run.steps(desc="ppo", unit="iteration"):  # ---- plumbing: Ctrl-C, checkpoints
        set_lr(optimizer, lr_at(iteration - 1, args.lr, args.iterations, args.warmup_iterations))
        kl_coef = kl_ctl.value if kl_ctl else args.kl_coef

        # 3a. rollout: one response to each of rollout_size prompts; 3b. its score (minus --missing-eos-penalty)
        run.phase("generation")  # ---- time per phase: metrics time/*, summary time/*_seconds
        batch = sample_rollout(model, tokenizer, train_prompts.take(args.rollout_size), args, generator)
        b_mask = batch["mask"]  # (B, R): right-padded responses
        run.phase("scoring")
        b_scores = reward(batch)  # (B,): the reward model reads the last real token

        run.phase("logprobs")
        # 3c. log-probs of the sampled tokens under the policy (+ its values) and under the reference (no grad)
        b_logprobs, b_values = rollout_logprobs(model, batch, sampling, args.forward_batch_size, value_head)
        b_values = b_values * b_mask  # (B, R): V(s_t), the state before token t
        b_ref_logprobs = reference_logprobs(model, batch, args.temperature, args.forward_batch_size)  # (B, R)
        # the sampler's log-probs of the same tokens (batch["logprobs"]) against these: the mismatch metrics, and
        # with --tis-cap / --mismatch-mask-threshold the TIS weights and the update's mask (mismatch.py)
        _, b_tis, b_loss_mask, mismatch = old_logprobs_and_corrections(model, batch, sampling, args, b_logprobs)

        # 3d. per-token rewards: -β·KL on every token, the score on the last; GAE; whitened advantages
        b_rewards, b_kl = token_rewards(b_scores, b_logprobs, b_ref_logprobs, b_mask, kl_coef,
                                        args.kl_estimator)  # (B, R) each
        if args.whiten_rewards:
            b_rewards = whiten_rewards(b_rewards, b_mask)
        b_advantages, b_returns = gae(b_rewards, b_values, b_mask, args.gamma, args.lam)  # (B, R) each
        if args.whiten_advantages:
            b_advantages = whiten_advantages(b_advantages, b_mask)

        # 3e. epochs of shuffled minibatches: clipped policy loss (x the TIS weight) + vf_coef x clipped value loss;
        # b_loss_mask: b_mask less the responses --mismatch-mask-threshold drops
        run.phase("update")
        stats = []
        for _ in range(args.ppo_epochs):
            for mb in minibatches(len(b_scores), args.minibatch_size):
                optimizer.zero_grad(set_to_none=True)
                mb_stats = minibatch_gradient(model, value_head, batch, sampling, mb, b_logprobs, b_values,
                                              b_advantages, b_returns, b_loss_mask, b_tis, args, scaler)  # below
                grad_norm = optimizer_step(optimizer, params, loss=mb_stats["loss/total"].item(),
                                           grad_clip=args.grad_clip, step=iteration - 1,
                                           world_size=run.dist.world_size, scaler=scaler)  # + NaN guard
                stats.append({**mb_stats, "train/grad_norm": grad_norm})
        last = {**{k: batch[k] for k in ("input_ids", "attention_mask", "response_mask")}, "logprobs": b_logprobs,
                "ref_logprobs": b_ref_logprobs, "values": b_values, "scores": b_scores, "advantages": b_advantages,
                "returns": b_returns}

        # 3f. adaptive KL; logging (and every --eval-every iterations the held-out evaluation)
        metrics = iteration_metrics(batch, b_scores, b_kl, b_scores - kl_coef * b_kl.sum(-1), run.dist.world_size)
        if kl_ctl:
            if iteration == 1:  # the rollout of the fresh policy (= the reference): the sampling filters' KL floor
                check_kl_floor(args, metrics["objective/kl"])
            kl_ctl.update(metrics["objective/kl"], len(b_scores) * run.dist.world_size)
        metrics.update({"objective/kl_coef": kl_coef, "train/lr": optimizer.param_groups[0]["lr"], **mismatch})
        metrics.update(reward.metrics())  # with an ensemble of reward models: objective/ensemble_std
        log_iteration(run, iteration, metrics, stats, batch, held_out)

    # 4. save the value head; the policy adapter, the last rollout and the evaluation after training: finish
    run.save("value_head", lambda folder: save_head(value_head, folder))
    return finish(run, model, held_out, before, last)


def minibatch_gradient(model, value_head, batch, sampling, mb, old_logprobs, old_values, advantages, returns,
                       loss_mask, tis, args, scaler):
    """Step 3e's loss on one minibatch, backward: clipped policy loss (x the TIS weight) + vf_coef x clipped value
    loss, means over the minibatch's real tokens; the gradient accumulates in the parameters' .grad (the caller
    zeroes it before and steps after). Returns the minibatch's statistics, {name: scalar tensor}.

    mb: the minibatch's rows of the rollout (an index tensor); old_logprobs, old_values, advantages, returns,
    loss_mask (the update's mask) and tis (TIS weights, or None) hold the whole rollout, (B, R) each. Micro-batches
    of <= --micro-batch-size rows, a backward each: as each loss is a sum over its tokens / n_tokens, their
    gradients and statistics add up to the minibatch's means exactly (tests/test_memory.py)."""
    n_tokens, parts = loss_mask[mb].sum().clamp(min=1), []  # the minibatch's real tokens: means / them
    for mu in mb.split(micro_batch_rows(args)):
        mu_mask = loss_mask[mu]  # (b, R)
        newlogprobs, entropy, vpred = policy_logprobs(model, batch, sampling, mu, value_head)  # (b, R) each
        pg_loss, pg_stats = policy_loss(newlogprobs, old_logprobs[mu], advantages[mu], mu_mask, args.clip_eps,
                                        n_tokens, None if tis is None else tis[mu])
        v_loss, v_stats = value_loss(vpred, old_values[mu], returns[mu], mu_mask, args.vf_clip, n_tokens)
        loss = pg_loss + args.vf_coef * v_loss
        scaler.backward(loss)
        parts.append({"policy/entropy": masked_sum(entropy.detach(), mu_mask) / n_tokens,
                      **{f"policy/{k}": v for k, v in pg_stats.items()}, "loss/value": v_loss.detach(),
                      "val/clipfrac": v_stats["clipfrac"], "val/vpred": masked_sum(vpred.detach(), mu_mask) / n_tokens,
                      "loss/policy": pg_loss.detach(), "loss/total": loss.detach()})
    return add_up(parts)  # the minibatch's


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
