"""RL from a reward: PPO, REINFORCE or GRPO, every role served by ONE frozen base model with LoRA adapters.

    python train_ppo.py                               # PPO against the default reward model (~2 minutes, CPU)
    python train_ppo.py --algo grpo --reward gold     # GRPO with the built-in world's gold score as the reward
    python train_ppo.py --algo reinforce              # REINFORCE with a moving-average baseline (seed 002)

The roles on the one base (seed 003), all in memory once:
  policy     LoRA adapter "policy" (trainable, B = 0 at the start, so the policy starts AS the base)
  value      ScalarHead on the policy's hidden states (PPO only; zero-initialised: V = 0 at the start)
  reward     LoRA adapter "reward" + its head, loaded frozen from --reward-model (a train_reward.py folder)
  reference  the base with every adapter disabled (models.reference): exactly where the policy started

One iteration reads top to bottom (cleanrl's ppo.py):
  1. rollout     sample responses to a batch of prompts with the policy (evaluation.generate)
  2. reward      score each prompt + response: the reward model at the last real token, or the gold score
  3. log-probs   policy (and value) and reference log-probs of the sampled tokens, at the sampling temperature
  4. advantages  ppo:       r_t = -β·KL_t (+ score on the last real token), GAE(γ, λ), whitened   (rollout.py, gae.py)
                 reinforce: A = (score - β·KL(seq)) - moving-average baseline                    (baselines.py)
                 grpo:      A = (score - mean of its group) / std of its group                   (baselines.py)
  5. update      epochs of shuffled minibatches:
                 ppo:       clipped policy loss + vf_coef · clipped value loss   (Schulman et al. 2017, Eq. 7, 9)
                 reinforce: -log π(y|x) · A, one on-policy pass                   (Williams 1992)
                 grpo:      clipped policy loss + β · k3 KL to the reference      (Shao et al. 2024, Eq. 3-4)
                 (the losses are means over all real tokens of a minibatch; DeepSeekMath averages per sequence first)
Every --eval-every iterations, and before and after training, held-out prompts are sampled and measured
(evaluation.evaluate_policy): proxy reward, gold score (built-in world), exact KL(π‖π_ref) per sequence, length.
Writes DIR/args.json, metrics.jsonl, summary.json, curves.png, DIR/policy/ (PEFT adapter), DIR/value_head/ (ppo) and
DIR/last_rollout.safetensors (the last rollout's tensors: what the last update saw, to inspect by hand).
Logged per iteration (metrics.jsonl): objective/scores (mean score), objective/kl (mean per-sequence sum of the
per-token KL estimate on the rollout, nats), objective/rlhf_reward (score - β·KL), policy/approx_kl (k3 of π_old vs π
during the update), policy/clipfrac, policy/entropy, val/vpred, val/clipfrac, loss/policy, loss/value, loss/kl (grpo),
time/generation and time/training (seconds), perf/tokens_per_second (rollout tokens / iteration wall time), and every
--eval-every iterations the eval/ metrics of evaluation.py.
"""
import json
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from minirlhf import distributed, lora
from minirlhf.assets import ASSETS_DIR, TINY_LLAMA
from minirlhf.baselines import MovingAverageBaseline, group_advantages
from minirlhf.checkpoint import (GracefulStop, atomic_directory, end_of_step, restore_training, save_training,
                                 set_rng_state)
from minirlhf.cli import run_script
from minirlhf.data import load_prompt_dataset
from minirlhf.data.tokenize import require_pad_token, tokenize_prompt_dataset
from minirlhf.evaluation import evaluate_policy, generate
from minirlhf.gae import gae
from minirlhf.heads import (RatingHead, ScalarHead, response_logprobs, response_logprobs_and_states,
                            save_head, sequence_scores)
from minirlhf.kl import AdaptiveKLController, k3
from minirlhf.errors import InputError
from minirlhf.models import (check_reward_model_dir, count_parameters, load_model, load_reward_model, load_tokenizer,
                             parameter_report, reference, resident_bytes, dropout_off)
from minirlhf.ops import masked_mean
from minirlhf.ppo import policy_loss, value_loss
from minirlhf.reward_losses import expected_rating, rating_entropy
from minirlhf.rollout import (KL_ESTIMATORS, minibatches, missing_eos_penalty, per_token_kl, sequence_logprobs,
                              token_rewards, whiten_advantages, whiten_rewards)
from minirlhf.tracking import RunLog
from minirlhf.training import (start_run, epoch_order, frozen_fingerprint, lr_at, make_optimizer, make_trainable,
                               optimizer_step, set_lr)
from minirlhf.validation import check_choice, check_common

ALGOS = ("ppo", "reinforce", "grpo")
REWARDS = ("model", "gold")
REWARD_TRANSFORMS = ("expected", "expected-minus-entropy")


@dataclass
class Args:
    model: str = TINY_LLAMA
    """base model: a Hugging Face folder or Hub id (default: the embedded tiny Llama)"""
    algo: str = "ppo"
    """ppo | reinforce | grpo"""
    reward: str = "model"
    """model (the reward model in --reward-model) | gold (the built-in world's gold score, a verifiable reward)"""
    reward_model: str = os.path.join(ASSETS_DIR, "reward-model")
    """a reward_model/ folder written by train_reward.py: PEFT adapter + head (default: the embedded one)"""
    reward_transform: str = "expected"
    """rating (distributional) heads only: expected (E[rating]) | expected-minus-entropy (E[rating] - c·H[rating])"""
    entropy_coef: float = 0.1
    """c of expected-minus-entropy: how much an unsure reward model's score is discounted"""
    dataset: str = "builtin"
    """prompts: 'builtin' or a data set minirlhf.data knows (its prompts)"""
    data_files: Optional[str] = None
    """local files in the data set's raw schema instead of the Hub"""
    split: str = "train"
    """training prompts' split"""
    eval_split: str = "test"
    """held-out prompts' split"""
    template: Optional[str] = None
    """prompt format when the tokenizer has no chat template: question-answer | qa | llama3"""
    quantization: str = "none"
    """base precision: none | 8bit | 4bit (NF4, double quant: QLoRA)"""
    dtype: str = "auto"
    """auto (bf16 on capable CUDA, else float32) | float32 | bfloat16"""
    lora_r: int = 8
    """policy LoRA rank"""
    lora_alpha: float = 16.0
    """policy LoRA alpha (the update is scaled by alpha / r)"""
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """module-name suffixes to adapt (e.g. q_proj v_proj) or all-linear"""
    gradient_checkpointing: bool = False
    """recompute the policy trunk's activations in the backward pass (less memory, ~1.5x the update time)"""
    iterations: int = 40
    """rollout + update iterations"""
    rollout_size: int = 64
    """responses sampled per iteration (per process: under torchrun each process samples its own rollout from its
    shard of the prompts); grpo: prompts x group size"""
    group_size: int = 8
    """grpo: responses sampled per prompt (G)"""
    minibatch_size: int = 32
    """responses per optimizer step"""
    ppo_epochs: int = 2
    """ppo, grpo: passes over each rollout (reinforce always makes one: it has no ratio to correct for reuse)"""
    max_new_tokens: int = 24
    """response tokens sampled at most"""
    max_prompt_length: int = 32
    """prompt tokens kept (from the end)"""
    temperature: float = 1.0
    """sampling temperature; log-probs (and so ratios and KL) are taken at the same temperature"""
    lr: float = 2e-3
    """peak learning rate (AdamW), warmup then cosine decay over the iterations"""
    warmup_iterations: int = 2
    """linear warmup, in iterations"""
    grad_clip: float = 1.0
    """clip the global gradient norm"""
    kl_coef: float = 0.3
    """ppo, reinforce: β of the reward score - β·KL (0: no KL penalty)"""
    kl_estimator: str = "k1"
    """ppo, reinforce: per-token KL estimate in the reward: k1 | k2 | k3 (kl.py)"""
    target_kl: Optional[float] = None
    """ppo, reinforce: adapt β toward this KL per sequence (nats; Ziegler et al. 2019); none: fixed β"""
    kl_horizon: int = 10000
    """adaptive KL: horizon in episodes"""
    beta: float = 0.04
    """grpo: weight of the k3 KL to the reference inside the loss (DeepSeekMath's β)"""
    missing_eos_penalty: Optional[float] = None
    """subtract this from the score of a response cut off before EOS (none: no penalty)"""
    whiten_rewards: bool = False
    """ppo: divide the per-token rewards by their std over the rollout (mean kept)"""
    whiten_advantages: bool = True
    """ppo: normalise advantages to mean 0, std 1 over the rollout's real tokens"""
    gamma: float = 1.0
    """ppo: discount"""
    lam: float = 0.95
    """ppo: GAE λ"""
    clip_eps: float = 0.2
    """ppo, grpo: policy ratio clip range"""
    vf_clip: float = 0.2
    """ppo: value clip range, in the value's units"""
    vf_coef: float = 0.1
    """ppo: weight of the value loss (the value head shares the policy's trunk and adapter)"""
    eval_every: int = 10
    """iterations between sampling evaluations (0: only before and after)"""
    eval_prompts: int = 120
    """held-out prompts sampled per evaluation"""
    eval_samples: int = 2
    """responses sampled per held-out prompt (more: less noisy gold / reward numbers)"""
    save_every: int = 10
    """iterations between checkpoints in DIR/checkpoint (0: only on Ctrl-C and at the end)"""
    resume: Optional[str] = None
    """continue the run whose output directory is this (from its checkpoint/, bit for bit; writes there)"""
    overwrite: bool = False
    """start over in an --out folder that holds an interrupted run (its checkpoint is deleted); without it such a
    folder is refused: continue it with --resume instead"""
    seed: int = 0
    """seed for python, numpy, torch, the prompt order and the samplers"""
    device: str = "auto"
    """auto | cpu | cuda"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    out: str = "runs/ppo"
    """output directory"""


RANGES = {"iterations": ">= 1", "rollout_size": ">= 1", "group_size": ">= 1", "minibatch_size": ">= 1",
          "ppo_epochs": ">= 1", "warmup_iterations": ">= 0", "kl_coef": ">= 0", "target_kl": "none or > 0",
          "kl_horizon": ">= 1", "beta": ">= 0", "missing_eos_penalty": "none or >= 0", "gamma": "[0, 1]",
          "lam": "[0, 1]", "clip_eps": "> 0", "vf_clip": "> 0", "vf_coef": ">= 0", "entropy_coef": ">= 0",
          "eval_every": ">= 0"}


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_common(args, RANGES, datasets="prompt")
    for flag, value, allowed in (("--algo", args.algo, ALGOS), ("--reward", args.reward, REWARDS),
                                 ("--kl-estimator", args.kl_estimator, tuple(KL_ESTIMATORS)),
                                 ("--reward-transform", args.reward_transform, REWARD_TRANSFORMS)):
        check_choice(flag, value, allowed)
    if args.minibatch_size > args.rollout_size:
        raise InputError(f"--minibatch-size {args.minibatch_size} is larger than --rollout-size {args.rollout_size}")
    if args.algo == "grpo" and (args.group_size < 2 or args.rollout_size % args.group_size):
        raise InputError(f"grpo needs --group-size >= 2 dividing --rollout-size {args.rollout_size}, "
                         f"got {args.group_size}")
    if args.target_kl is not None and (args.kl_coef <= 0 or args.algo == "grpo"):
        raise InputError("--target-kl needs --kl-coef > 0 (its starting value) and --algo ppo or reinforce")
    if args.reward == "gold" and args.dataset != "builtin":
        raise InputError("--reward gold is the built-in world's gold score: it needs --dataset builtin")
    if args.reward == "model":
        check_reward_model_dir(args.reward_model)  # one line naming the missing file
        if os.path.isfile(os.path.join(args.reward_model, "config.json")) and not os.path.isfile(
                os.path.join(args.reward_model, "adapter_config.json")):
            raise InputError(f"--reward-model {args.reward_model!r} is a fully fine-tuned model, not an adapter on "
                             "the shared base; train it with LoRA (train_reward.py without --full-finetune)")
        with open(os.path.join(args.reward_model, "head_config.json")) as f:
            kind = json.load(f).get("kind")
        if kind != "rating" and args.reward_transform != "expected":
            raise InputError(f"--reward-transform {args.reward_transform} needs a rating (distributional) reward "
                             f"head; {args.reward_model!r} holds a {kind} head")


def main(args):
    check_args(args)
    dist, checkpoint, device = start_run(args)  # torchrun, the checkpoint to resume (checked now), threads, seed

    # 1. one frozen base: the policy adapter (trainable), a value head, the reward adapter + head (frozen)
    tokenizer = load_tokenizer(args.model)
    require_pad_token(tokenizer)
    model = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                       tokenizer=tokenizer, gradient_checkpointing=args.gradient_checkpointing)
    hidden = model.config.hidden_size
    params = make_trainable(model, "policy", False, args.lora_r, args.lora_alpha, 0.0, args.lora_targets)
    # The value head reads the policy's own hidden states (one trunk pass gives log-probs and values), so the value
    # loss also trains the policy adapter: vf_coef keeps that small. init_std=0: weights and bias start at zero, so
    # V = 0 everywhere and the first advantages come from the rewards alone, not from a random head's noise; the
    # gradient dV/dw = h is not zero, so the head still learns.
    value_head = ScalarHead(hidden, init_std=0.0).to(device)
    if args.algo == "ppo":
        params += list(value_head.parameters())
    reward_head = None
    if args.reward == "model":
        _, reward_head = load_reward_model(model, args.reward_model)  # adapter "reward", frozen; "policy" stays active
        reward_head.requires_grad_(False)
    dropout_off(model)  # sampling, old and new log-probs must come from one and the same policy
    trainable, total = count_parameters(model)
    heads = [value_head] if args.algo == "ppo" else []
    trainable += sum(p.numel() for h in heads for p in h.parameters())
    total += sum(p.numel() for h in heads + ([reward_head] if reward_head else []) for p in h.parameters())
    if dist.is_main:
        print(parameter_report(model) + (f" (+ {sum(p.numel() for p in value_head.parameters())} value head)"
                                         if args.algo == "ppo" else ""))
        print(f"roles on one base: {', '.join(lora.adapter_names(model))} adapters"
              + (f" + {type(reward_head).__name__} from {args.reward_model}" if reward_head else ", gold reward")
              + "; reference = base with adapters disabled")

    # 2. prompts: training prompts for the rollouts, held-out prompts for the evaluations
    def load(split):
        data = tokenize_prompt_dataset(load_prompt_dataset(args.dataset, split=split, data_files=args.data_files),
                                       tokenizer, args.max_prompt_length, args.template)
        return data["prompt"], data["prompt_ids"]
    train_prompts, train_ids = load(args.split)
    eval_prompts, eval_ids = load(args.eval_split)
    eval_prompts = [p for p in eval_prompts[:args.eval_prompts] for _ in range(args.eval_samples)]
    eval_ids = [p for p in eval_ids[:args.eval_prompts] for _ in range(args.eval_samples)]
    gold_fn = None
    if args.dataset == "builtin":
        from minirlhf.data import world
        gold_fn = world.gold_score

    @torch.no_grad()
    def score(batch, prompts):
        """(B,) scalar reward of each prompt + response of a generate() batch."""
        if args.reward == "gold":
            return torch.tensor([gold_fn(p, t) for p, t in zip(prompts, batch["texts"])], device=device)
        with lora.use_adapter(model, "reward" if "reward" in lora.adapter_names(model) else None):
            out = sequence_scores(model, reward_head, batch["input_ids"].to(device),
                                  batch["attention_mask"].to(device))  # read at the last real token: (B,) or (B, K)
        if isinstance(reward_head, RatingHead):
            rating = expected_rating(out)  # (B, K) -> (B,)
            if args.reward_transform == "expected-minus-entropy":  # an unsure reward model's score counts less
                rating = rating - args.entropy_coef * rating_entropy(out)
            return rating
        return out

    def sample_eval():
        reward_fn = None if args.reward == "gold" else (lambda batch: score(batch, None))
        metrics, samples = evaluate_policy(model, tokenizer, eval_prompts, eval_ids, gold_fn=gold_fn,
                                           reward_fn=reward_fn, max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, seed=args.seed, device=device)
        if args.reward == "gold":  # the proxy IS the gold score
            metrics["eval/reward"] = metrics["eval/gold"]
            for s in samples:
                s["reward"] = s["gold"]
        return metrics, samples

    def show(samples, title, n=6):
        print(title)
        for s in samples[:n * args.eval_samples:args.eval_samples]:
            print(f"  {s['prompt']!r:45} -> {s['response']!r}  (reward {s['reward']:+.2f}"
                  + (f", gold {s['gold']:.1f})" if s["gold"] is not None else ")"))

    if dist.is_main:
        print(f"{args.iterations} iterations of {args.rollout_size * dist.world_size} responses "
              f"({dist.world_size} process(es) x {args.rollout_size}), minibatches of {args.minibatch_size} per "
              "process")
    if checkpoint:  # the evaluation before training was done by the interrupted run
        before, before_samples = checkpoint[0]["before"], checkpoint[0]["before_samples"]
    else:
        before, before_samples = sample_eval() if dist.is_main else ({}, [])
        if dist.is_main:
            print(" | ".join(f"{k} {v:.3f}" for k, v in before.items()) + "   (before training)")
            show(before_samples, "samples before training:")

    def fingerprint():  # the frozen base, reward adapter and reward head must be bit-identical at the end
        return frozen_fingerprint(model) + (frozen_fingerprint(reward_head) if reward_head is not None else [])
    frozen_at_start = fingerprint()
    optimizer = make_optimizer(params, args.lr)
    kl_ctl = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon) if args.target_kl else None
    baseline = MovingAverageBaseline()  # reinforce
    repeat = args.group_size if args.algo == "grpo" else 1  # responses per prompt
    n_prompts = args.rollout_size // repeat
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + dist.rank)  # the rollout sampler's
    iteration, order, epoch, last = 0, [], 0, None
    if checkpoint:  # weights, optimizer, KL controller, baseline, counters, prompt order, samplers' RNG
        restore_training(checkpoint, model=model, heads={"value": value_head}, optimizer=optimizer)
        state, local = checkpoint
        iteration, order, epoch = state["step"], local["order"], local["epoch"]
        if kl_ctl:
            kl_ctl.load_state_dict(state["kl_controller"])
        baseline.load_state_dict(local["baseline"])
        generator.set_state(local["generator"])
        set_rng_state(local["rng"])
        if dist.is_main:
            print(f"resumed {args.resume} at iteration {iteration}")
    log = RunLog(args.out, args, enabled=dist.is_main, resume_step=iteration if checkpoint else None)

    def save_checkpoint():
        return save_training(args.out, dist, step=iteration, args=args, model=model, heads={"value": value_head},
                             optimizer=optimizer, shared={"kl_controller": kl_ctl.state_dict() if kl_ctl else None,
                                                          "before": before, "before_samples": before_samples},
                             local={"epoch": epoch, "order": order, "baseline": baseline.state_dict(),
                                    "generator": generator.get_state()})

    # 3. the loop: rollout -> reward -> KL -> advantages -> minibatch epochs
    # b_ tensors hold the whole rollout (B responses), mb_ tensors one minibatch; (B, T) = prompt + response,
    # (B, R) = the response slice [:, P:] that every piece of RL bookkeeping works on.
    bar = tqdm(total=args.iterations, initial=iteration, desc=args.algo, disable=not dist.is_main, mininterval=5)
    with GracefulStop() as stop:
        while iteration < args.iterations:
            tick = time.time()
            set_lr(optimizer, lr_at(iteration, args.lr, args.iterations, args.warmup_iterations))
            kl_coef = kl_ctl.value if kl_ctl else args.kl_coef

            # 3a. rollout: n_prompts prompts (grpo: each group_size times, group-contiguous), one response each
            if len(order) < n_prompts:
                order = epoch_order(len(train_ids), epoch, args.seed, dist.rank, dist.world_size)
                epoch += 1
            idx, order = order[:n_prompts], order[n_prompts:]
            prompts = [train_prompts[i] for i in idx for _ in range(repeat)]
            batch = generate(model, tokenizer, [train_ids[i] for i in idx for _ in range(repeat)],
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, generator=generator,
                             device=device)
            b_input_ids, b_attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            b_response_mask = batch["response_mask"].to(device)  # (B, T): 1 on response tokens incl. EOS
            P = b_input_ids.shape[1] - batch["response_ids"].shape[1]  # prompt columns (left-padded)
            b_mask = b_response_mask[:, P:].bool()  # (B, R): right-padded responses
            t_generation = time.time() - tick

            # 3b. reward: one score per response (the reward model reads the last real token)
            b_scores = score(batch, prompts)  # (B,)
            if args.missing_eos_penalty is not None:
                b_scores = missing_eos_penalty(b_scores, batch["ended"].to(device), args.missing_eos_penalty)

            # 3c. log-probs of the sampled tokens under the policy (+ its values) and under the reference
            with torch.no_grad():
                b_logprobs, _, b_states = response_logprobs_and_states(
                    model, b_input_ids, b_attention_mask, b_response_mask, args.temperature)  # (B, T), (B, T, H)
                b_values = value_head(b_states)[:, P:] * b_mask  # (B, R): V(s_t), the state before token t
                with reference(model):
                    b_ref_logprobs = response_logprobs(model, b_input_ids, b_attention_mask, b_response_mask,
                                                       temperature=args.temperature)  # (B, T)
            b_logprobs, b_ref_logprobs = b_logprobs[:, P:], b_ref_logprobs[:, P:]  # (B, T) -> (B, R)

            # 3d. KL and advantages
            if args.algo == "ppo":  # KL in the per-token reward, score on the last token, then GAE
                b_rewards, b_kl = token_rewards(b_scores, b_logprobs, b_ref_logprobs, b_mask, kl_coef,
                                                args.kl_estimator)  # (B, R) each
                if args.whiten_rewards:
                    b_rewards = whiten_rewards(b_rewards, b_mask)
                b_advantages, b_returns = gae(b_rewards, b_values, b_mask, args.gamma, args.lam)  # (B, R) each
                if args.whiten_advantages:
                    b_advantages = whiten_advantages(b_advantages, b_mask)
                b_rlhf_reward = b_scores - kl_coef * b_kl.sum(-1)  # (B,)
            elif args.algo == "reinforce":  # one number per response: (score - β KL) - moving-average baseline
                b_kl = per_token_kl(b_logprobs, b_ref_logprobs, b_mask, args.kl_estimator)  # (B, R)
                b_rlhf_reward = b_scores - kl_coef * b_kl.sum(-1)  # (B,)
                b_advantages = baseline.advantages(b_rlhf_reward)[:, None] * b_mask  # (B,) -> (B, R)
                b_returns = b_rlhf_reward[:, None] * b_mask
            else:  # grpo: the score normalised within its group; the KL goes into the loss, not the reward
                b_kl = per_token_kl(b_logprobs, b_ref_logprobs, b_mask, "k3")  # (B, R), for logging
                b_rlhf_reward = b_scores - args.beta * b_kl.sum(-1)  # (B,)
                b_advantages = group_advantages(b_scores, args.group_size)[:, None] * b_mask  # (B,) -> (B, R)
                b_returns = b_scores[:, None] * b_mask

            # 3e. minibatch epochs (reinforce: one on-policy pass)
            t_train, stats = time.time(), []
            for _ in range(args.ppo_epochs if args.algo != "reinforce" else 1):
                for mb in minibatches(len(b_scores), args.minibatch_size):
                    mb_mask = b_mask[mb]  # (b, R)
                    newlogprobs, entropy, mb_states = response_logprobs_and_states(
                        model, b_input_ids[mb], b_attention_mask[mb], b_response_mask[mb], args.temperature)
                    newlogprobs, entropy = newlogprobs[:, P:], entropy[:, P:]  # (b, T) -> (b, R)
                    mb_stats = {"policy/entropy": masked_mean(entropy.detach(), mb_mask)}
                    if args.algo == "reinforce":  # -log π(y|x) · A  (Williams 1992)
                        pg_loss = -(sequence_logprobs(newlogprobs, mb_mask) * b_advantages[mb][:, 0]).mean()
                        mb_stats["policy/approx_kl"] = masked_mean(k3(b_logprobs[mb], newlogprobs.detach()), mb_mask)
                    else:  # PPO-clip on the ratio π / π_old
                        pg_loss, pg_stats = policy_loss(newlogprobs, b_logprobs[mb], b_advantages[mb], mb_mask,
                                                        args.clip_eps)
                        mb_stats.update({f"policy/{k}": v for k, v in pg_stats.items()})
                    loss = pg_loss
                    if args.algo == "ppo":  # + the clipped value loss of the value head on the same trunk
                        vpred = value_head(mb_states)[:, P:]  # (b, R)
                        v_loss, v_stats = value_loss(vpred, b_values[mb], b_returns[mb], mb_mask, args.vf_clip)
                        loss = loss + args.vf_coef * v_loss
                        mb_stats.update({"loss/value": v_loss.detach(), "val/clipfrac": v_stats["clipfrac"],
                                         "val/vpred": masked_mean(vpred.detach(), mb_mask)})
                    if args.algo == "grpo":  # + β · k3 estimate of KL(π‖π_ref) on the sampled tokens
                        kl_loss = masked_mean(k3(newlogprobs, b_ref_logprobs[mb]), mb_mask)
                        loss = loss + args.beta * kl_loss
                        mb_stats["loss/kl"] = kl_loss.detach()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = optimizer_step(optimizer, params, loss=loss.item(), grad_clip=args.grad_clip,
                                               step=iteration, world_size=dist.world_size)  # + NaN guard
                    stats.append({**mb_stats, "loss/policy": pg_loss.detach(), "loss/total": loss.detach(),
                                  "train/grad_norm": grad_norm})
            t_train = time.time() - t_train
            iteration += 1
            bar.update(1)

            # 3f. adaptive KL, logging, evaluation
            mean_kl = distributed.all_reduce_mean(b_kl.sum(-1).mean().item(), dist.world_size)  # nats / sequence
            if kl_ctl:
                kl_ctl.update(mean_kl, len(b_scores) * dist.world_size)
            last = {"input_ids": b_input_ids, "attention_mask": b_attention_mask, "response_mask": b_response_mask,
                    "logprobs": b_logprobs, "ref_logprobs": b_ref_logprobs, "values": b_values, "scores": b_scores,
                    "advantages": b_advantages, "returns": b_returns}
            if dist.is_main:
                metrics = {k: torch.stack([s[k].float() for s in stats]).mean().item() for k in stats[0]}
                metrics.update({
                    "objective/kl": mean_kl, "objective/kl_coef": kl_coef if args.algo != "grpo" else args.beta,
                    "objective/scores": b_scores.mean().item(),
                    "objective/rlhf_reward": b_rlhf_reward.mean().item(),
                    "rollout/length": b_mask.sum(-1).float().mean().item(),
                    "rollout/eos_fraction": batch["ended"].float().mean().item(),
                    "train/lr": optimizer.param_groups[0]["lr"], "time/generation": t_generation,
                    "time/training": t_train,
                    "perf/tokens_per_second": b_attention_mask.sum().item() / (time.time() - tick)})
                if args.eval_every and iteration % args.eval_every == 0 and iteration < args.iterations:
                    metrics.update(sample_eval()[0])
                log.log(iteration, metrics)
                tqdm.write(f"iter {iteration:3d} | score {metrics['objective/scores']:+.3f} | kl "
                           f"{metrics['objective/kl']:6.2f} | entropy {metrics['policy/entropy']:.3f} | len "
                           f"{metrics['rollout/length']:4.1f} | approx_kl {metrics['policy/approx_kl']:.4f}"
                           + (f" | eval gold {metrics['eval/gold']:.3f} reward {metrics['eval/reward']:+.3f} kl "
                              f"{metrics['eval/kl']:.2f}" if "eval/gold" in metrics else "")
                           + f" | {time.time() - tick:.1f}s")
            if end_of_step(stop, dist, iteration, args.iterations, args.save_every, save_checkpoint, args.out,
                           unit="iteration"):
                break
    bar.close()

    # 4. save the policy adapter (PEFT format) and value head; evaluate after training
    summary = None
    if dist.is_main:
        atomic_directory(os.path.join(args.out, "policy"), lambda tmp: lora.save_adapter(model, tmp, "policy"))
        if args.algo == "ppo":
            atomic_directory(os.path.join(args.out, "value_head"), lambda tmp: save_head(value_head, tmp))
        if last is not None:
            save_file({k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
                       for k, v in last.items()}, os.path.join(args.out, "last_rollout.safetensors"))
        after, after_samples = sample_eval()
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        final = {"params/trainable": trainable, "params/total": total, "train/iterations": iteration,
                 "train/finished": iteration == args.iterations,
                 "train/episodes": iteration * args.rollout_size,
                 **{k + "_before": v for k, v in before.items()}, **{k + "_after": v for k, v in after.items()},
                 "eval/kl": after["eval/kl"], "params/frozen_unchanged": fingerprint() == frozen_at_start,
                 "memory/model_bytes": resident_bytes(model),
                 "memory/peak_rss_bytes": peak_rss}
        if torch.cuda.is_available():
            final["memory/cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        if gold_fn:
            g0, g1 = before["eval/gold"], after["eval/gold"]
            final.update({"eval/gold_before": g0, "eval/gold_after": g1, "eval/gold_max": world.GOLD_MAX,
                          "eval/headroom_closed": ((g1 - g0) / (world.GOLD_MAX - g0) if g0 < world.GOLD_MAX
                                                   else float("nan"))})
        summary = log.summary(final)
        show(after_samples, "\nsamples after training:")
        print(f"memory: model {final['memory/model_bytes'] / 2**20:.1f} MiB resident, process peak RSS "
              f"{peak_rss / 2**20:.0f} MiB" + (f", CUDA peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
                                               if torch.cuda.is_available() else ""))
        print(f"done in {summary['time/total_seconds']:.0f}s: reward {summary['eval/reward_before']:+.3f} -> "
              f"{summary['eval/reward_after']:+.3f}, "
              + (f"gold {summary['eval/gold_before']:.3f} -> {summary['eval/gold_after']:.3f} of "
                 f"{summary['eval/gold_max']:.1f} (headroom closed {summary['eval/headroom_closed']:.2f}), "
                 if gold_fn else "")
              + f"KL {summary['eval/kl']:.2f} nats; policy adapter in {os.path.join(args.out, 'policy')}")
    distributed.cleanup()
    return summary


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
