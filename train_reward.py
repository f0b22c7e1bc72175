"""Train a reward model on preference pairs: a LoRA adapter + a head on the shared base (StackLLaMA step 2, seed 003).

    python train_reward.py                                  # Bradley-Terry on the built-in world (~1 minute on a CPU)
    python train_reward.py --loss distributional            # seed 002's 10-class rating model
    python train_reward.py --eval-only --reward-model runs/reward/reward_model

Losses (minirlhf/reward_losses.py):
  bt              -log σ(r_c - r_r)                                    Bradley-Terry (Ouyang et al. 2022, Eq. 1)
  margin          -log σ(r_c - r_r - m), m = chosen_score - rejected_score    (Llama 2's margin loss)
  distributional  -log Σ_i Σ_j p_c(i) p_r(j) σ(α(i - j)) over K rating classes (seed 002)
The reward of a sequence is the head read at its LAST REAL token (heads.sequence_scores); for the distributional
head, the expected rating Σ_k k p(k) is the scalar reward. Held-out accuracy = share of pairs with r_c > r_r.
Writes DIR/args.json, metrics.jsonl, summary.json, curves.png and DIR/reward_model/ (PEFT adapter + head).
"""
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import datasets
import torch
from tqdm import tqdm

from minirlhf import distributed, lora
from minirlhf.assets import TINY_LLAMA
from minirlhf.checkpoint import (GracefulStop, atomic_directory, end_of_step, restore_training, save_training,
                                 set_rng_state)
from minirlhf.cli import run_script
from minirlhf.data import load_preference_dataset
from minirlhf.data.tokenize import collate_pairs, require_pad_token, tokenize_preference_dataset
from minirlhf.heads import RatingHead, ScalarHead, save_head, sequence_scores
from minirlhf.errors import InputError
from minirlhf.models import (check_reward_model_dir, count_parameters, load_model, load_reward_model, load_tokenizer,
                             parameter_report)
from minirlhf.sampling import eval_mode
from minirlhf.reward_losses import bradley_terry_loss, distributional_loss, expected_rating
from minirlhf.tracking import RunLog
from minirlhf.training import (start_run, epoch_order, frozen_fingerprint, lr_at, make_optimizer, make_trainable,
                               optimizer_step, set_lr, steps_per_epoch)
from minirlhf.validation import check_choice, check_common

LOSSES = ("bt", "margin", "distributional")


@dataclass
class Args:
    model: str = TINY_LLAMA
    """base model: a Hugging Face folder or Hub id (default: the embedded tiny Llama)"""
    dataset: str = "builtin"
    """preference data: 'builtin' or a Hub id minirlhf.data knows (e.g. juyoungml/HelpSteer2-binarized)"""
    data_files: Optional[str] = None
    """local files in the data set's raw schema instead of the Hub"""
    split: str = "train"
    """training split"""
    eval_split: str = "test"
    """held-out split ('validation' is accepted as 'test')"""
    template: Optional[str] = None
    """prompt format when the tokenizer has no chat template: question-answer | qa | llama3"""
    loss: str = "bt"
    """bt | margin | distributional"""
    alpha: float = 0.2
    """distributional loss: slope of σ(α(i - j)) between rating classes"""
    num_classes: int = 10
    """distributional loss: number of rating classes K"""
    quantization: str = "none"
    """base precision: none | 8bit | 4bit (NF4, double quant: QLoRA)"""
    dtype: str = "auto"
    """auto (bf16 on capable CUDA, else float32) | float32 | bfloat16"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: float = 32.0
    """LoRA alpha (the update is scaled by alpha / r)"""
    lora_dropout: float = 0.0
    """LoRA dropout"""
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """module-name suffixes to adapt (e.g. q_proj v_proj) or all-linear"""
    full_finetune: bool = False
    """train every base weight instead of a LoRA adapter (float bases only)"""
    lr: float = 2e-3
    """peak learning rate (AdamW), warmup then cosine decay"""
    warmup_steps: int = 10
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices"""
    batch_size: int = 32
    """pairs per micro-batch (per process)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    epochs: int = 1
    """passes over the training pairs"""
    max_steps: int = -1
    """stop after this many optimizer steps (-1: run the epochs)"""
    max_length: int = 64
    """prompt + response tokens"""
    max_prompt_length: int = 32
    """prompt tokens kept (from the end)"""
    grad_clip: float = 1.0
    """clip the global gradient norm"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (saves memory on big models)"""
    eval_every: int = 50
    """optimizer steps between held-out evaluations"""
    eval_batch_size: int = 64
    """pairs per evaluation batch"""
    max_train_pairs: int = 0
    """train on the first this many pairs of --split (0: all)"""
    max_eval_pairs: int = 0
    """evaluate on at most this many held-out pairs (0: all)"""
    eval_only: bool = False
    """only evaluate --reward-model on the held-out split"""
    reward_model: Optional[str] = None
    """with --eval-only: a reward_model/ folder written by this script"""
    save_every: int = 50
    """optimizer steps between checkpoints in DIR/checkpoint (0: only on Ctrl-C and at the end)"""
    resume: Optional[str] = None
    """continue the run whose output directory is this (from its checkpoint/, bit for bit; writes there)"""
    overwrite: bool = False
    """start over in an --out folder that holds an interrupted run (its checkpoint is deleted); without it such a
    folder is refused: continue it with --resume instead"""
    seed: int = 0
    """seed for python, numpy, torch and the data order"""
    device: str = "auto"
    """auto | cpu | cuda"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    out: str = "runs/reward"
    """output directory"""


def pair_scores(model, head, batch, device):
    """Scalar rewards of the chosen and rejected rows of a collated batch: (B,), (B,), and the raw head outputs."""
    out = sequence_scores(model, head, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    b = out.shape[0] // 2  # rows 0..B-1 are prompt+chosen, B..2B-1 prompt+rejected
    scalar = expected_rating(out) if out.dim() == 2 else out  # (2B,)
    return scalar[:b], scalar[b:], out[:b], out[b:]


def pair_loss(args, out_c, out_r, batch, device):
    """Per-pair losses (B,) for the chosen loss type."""
    if args.loss == "distributional":
        return distributional_loss(out_c, out_r, alpha=args.alpha)
    margin = batch["margin"].to(device) if args.loss == "margin" else None
    return bradley_terry_loss(out_c, out_r, margin=margin)


@torch.no_grad()
def evaluate(model, head, data, args, pad_id, device):
    """Held-out accuracy (r_c > r_r), mean reward margin and loss."""
    correct, margins, losses = [], [], []
    with eval_mode(model):
        for i in tqdm(range(0, len(data), args.eval_batch_size), desc="eval", leave=False, mininterval=5):
            batch = collate_pairs([data[j] for j in range(i, min(i + args.eval_batch_size, len(data)))], pad_id)
            r_c, r_r, out_c, out_r = pair_scores(model, head, batch, device)
            correct.append((r_c > r_r).float())
            margins.append(r_c - r_r)
            losses.append(pair_loss(args, out_c, out_r, batch, device))
    return {"eval/accuracy": torch.cat(correct).mean().item(), "eval/margin": torch.cat(margins).mean().item(),
            "eval/loss": torch.cat(losses).mean().item()}


RANGES = {"eval_every": ">= 1", "eval_batch_size": ">= 1", "max_eval_pairs": ">= 0", "num_classes": ">= 2",
          "alpha": "> 0"}


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_common(args, RANGES)
    check_choice("--loss", args.loss, LOSSES)
    if args.eval_only and not args.reward_model:
        raise InputError("--eval-only needs --reward-model DIR (a reward_model/ folder written by train_reward.py)")
    if args.reward_model and not args.eval_only:
        raise InputError("--reward-model is the model --eval-only evaluates; to train a new one leave it out")
    if args.reward_model:
        check_reward_model_dir(args.reward_model)


def main(args):
    datasets.disable_progress_bars()  # one progress bar per loop is enough
    check_args(args)
    dist, checkpoint, device = start_run(args)  # torchrun, the checkpoint to resume (checked now), threads, seed

    # 1. one frozen base, a reward adapter and a head on top
    tokenizer = load_tokenizer(args.model)
    pad_id = require_pad_token(tokenizer)
    model = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                       tokenizer=tokenizer, gradient_checkpointing=args.gradient_checkpointing)
    hidden = model.config.hidden_size
    if args.eval_only:
        adapter, head = load_reward_model(model, args.reward_model)
        lora.set_active_adapter(model, adapter)
        if isinstance(head, RatingHead) != (args.loss == "distributional"):  # evaluate with the head's own loss
            args.loss = "distributional" if isinstance(head, RatingHead) else "bt"
        params = []
    else:
        params = make_trainable(model, "reward", args.full_finetune, args.lora_r, args.lora_alpha, args.lora_dropout,
                                args.lora_targets)
        # a Bradley-Terry head has no bias: the loss only sees r_c - r_r (heads.ScalarHead)
        head = RatingHead(hidden, args.num_classes) if args.loss == "distributional" else ScalarHead(hidden, bias=False)
        head = head.to(device)
        params += list(head.parameters())
    trainable, total = count_parameters(model)
    trainable += sum(p.numel() for p in head.parameters()) if not args.eval_only else 0
    total += sum(p.numel() for p in head.parameters())
    if dist.is_main:
        print(parameter_report(model), f"(+ {sum(p.numel() for p in head.parameters())} head)")

    # 2. data: tokenised pairs (prompt masked out; the reward reads the last real token)
    def load(split):
        rows = load_preference_dataset(args.dataset, split=split, data_files=args.data_files)
        if args.loss == "margin" and "margin" not in rows.column_names:
            raise InputError(f"--loss margin needs scores, but {args.dataset} has no margin column")
        return tokenize_preference_dataset(rows, tokenizer, args.max_length, args.max_prompt_length, args.template)
    eval_data = load(args.eval_split)
    if args.max_eval_pairs > 0:
        eval_data = eval_data.select(range(min(args.max_eval_pairs, len(eval_data))))
    keep = ["prompt_ids", "chosen_ids", "rejected_ids"] + (["margin"] if args.loss == "margin" else [])
    eval_data = eval_data.select_columns(keep)
    ceiling = None
    if args.dataset == "builtin":
        from minirlhf.data import world
        ceiling = world.accuracy_ceiling(args.eval_split)

    if args.eval_only:
        log = RunLog(args.out, args, enabled=dist.is_main)
        metrics = evaluate(model, head, eval_data, args, pad_id, device)
        if ceiling is not None:
            metrics["eval/accuracy_ceiling"] = ceiling
        summary = log.summary({"params/trainable": 0, "params/total": total, **metrics})
        print(" | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return summary
    train_data = load(args.split).select_columns(keep)
    if args.max_train_pairs > 0:
        train_data = train_data.select(range(min(args.max_train_pairs, len(train_data))))
    micro = args.batch_size
    per_epoch = steps_per_epoch(len(train_data), micro * args.grad_accum * dist.world_size, "training pairs")
    total_steps = args.max_steps if args.max_steps > 0 else per_epoch * args.epochs
    if dist.is_main:
        print(f"data: {len(train_data)} train pairs, {len(eval_data)} held-out pairs; {total_steps} steps of "
              f"{micro * args.grad_accum * dist.world_size} pairs (per process {micro} x {args.grad_accum} accum)")
    optimizer = make_optimizer(params, args.lr, args.weight_decay)
    fingerprint = frozen_fingerprint(model)  # the frozen base must be bit-identical at the end
    step, epoch, order, recent = 0, 0, [], []  # optimizer steps, data position, metrics since the last log line
    if checkpoint:  # weights, optimizer, counters, data position and RNG exactly as the checkpoint left them
        restore_training(checkpoint, model=model, heads={"head": head}, optimizer=optimizer)
        state, local = checkpoint
        step, epoch, order, recent = state["step"], local["epoch"], local["order"], local["recent"]
        set_rng_state(local["rng"])
        if dist.is_main:
            print(f"resumed {args.resume} at step {step}")
    log = RunLog(args.out, args, enabled=dist.is_main, resume_step=step if args.resume else None)

    def save_checkpoint():
        return save_training(args.out, dist, step=step, args=args, model=model, heads={"head": head},
                             optimizer=optimizer, local={"epoch": epoch, "order": order, "recent": recent})

    # 3. the loop: micro-batches of pairs -> rewards at the last token -> pairwise loss -> step
    model.train()
    tick, metrics = time.time(), {}
    bar = tqdm(total=total_steps, initial=step, desc="reward", disable=not dist.is_main, mininterval=5)
    with GracefulStop() as stop:
        while step < total_steps:
            optimizer.zero_grad(set_to_none=True)
            for _ in range(args.grad_accum):
                if len(order) < micro:  # next epoch, reshuffled (the same order on every machine)
                    order = epoch_order(len(train_data), epoch, args.seed, dist.rank, dist.world_size)
                    epoch += 1
                idx, order = order[:micro], order[micro:]
                batch = collate_pairs([train_data[i] for i in idx], pad_id)
                r_c, r_r, out_c, out_r = pair_scores(model, head, batch, device)
                loss = pair_loss(args, out_c, out_r, batch, device).mean() / args.grad_accum
                loss.backward()
                recent.append(((r_c > r_r).float().mean().item(), loss.item() * args.grad_accum))
            set_lr(optimizer, lr_at(step, args.lr, total_steps, args.warmup_steps))
            grad_norm = optimizer_step(optimizer, params, loss=recent[-1][1], grad_clip=args.grad_clip, step=step,
                                       world_size=dist.world_size)  # all-reduce, clip, NaN guard, step
            step += 1
            bar.update(1)
            if step % args.eval_every == 0 or step == total_steps:
                metrics = {"train/loss": sum(l for _, l in recent) / len(recent),
                           "train/accuracy": sum(a for a, _ in recent) / len(recent),
                           "train/grad_norm": grad_norm.item(), "train/lr": optimizer.param_groups[0]["lr"],
                           "perf/pairs_per_second": len(recent) * micro / (time.time() - tick)}
                if dist.is_main:
                    metrics.update(evaluate(model, head, eval_data, args, pad_id, device))
                    log.log(step, metrics)
                    tqdm.write(f"step {step:5d} | loss {metrics['train/loss']:.4f} | train acc "
                               f"{metrics['train/accuracy']:.3f} | eval acc {metrics['eval/accuracy']:.3f} | "
                               f"margin {metrics['eval/margin']:+.3f}")
                tick, recent = time.time(), []
            if end_of_step(stop, dist, step, total_steps, args.save_every, save_checkpoint, args.out):
                break
    bar.close()

    # 4. save the adapter (PEFT format) and the head side by side; summary
    if dist.is_main:
        def write(tmp):
            if args.full_finetune:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            else:
                lora.save_adapter(model, tmp, adapter="reward")
            save_head(head, tmp)
        atomic_directory(os.path.join(args.out, "reward_model"), write)
        final = evaluate(model, head, eval_data, args, pad_id, device)
        if ceiling is not None:
            final["eval/accuracy_ceiling"] = ceiling
            final["eval/accuracy_vs_ceiling"] = final["eval/accuracy"] / ceiling
        summary = log.summary({"params/trainable": trainable, "params/total": total, "train/steps": step,
                               "train/finished": step == total_steps,
                               "params/frozen_unchanged": frozen_fingerprint(model) == fingerprint, **final})
        print(f"done in {summary['time/total_seconds']:.0f}s: eval/accuracy {final['eval/accuracy']:.4f}"
              + (f" (ceiling {ceiling:.4f}, {100 * final['eval/accuracy'] / ceiling:.1f}% of it)" if ceiling else "")
              + f"; reward model in {os.path.join(args.out, 'reward_model')}")
    distributed.cleanup()
    return summary if dist.is_main else None


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
