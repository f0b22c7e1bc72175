"""Train a reward model on preference pairs: a LoRA adapter + a head on the shared base (StackLLaMA's step 2; the
multi-adapter PPO setup trains its reward adapter this way).

    python train_reward.py                                  # Bradley-Terry on the built-in world (~1 minute on a CPU)
    python train_reward.py --loss distributional            # the SmolLM2 + HelpSteer2 setup's 10-class rating model
    python train_reward.py --eval-only --reward-model runs/reward/reward_model

Losses (minirlhf/reward_losses.py):
  bt              -log σ(r_c - r_r)                                    Bradley-Terry (Ouyang et al. 2022, Eq. 1)
  margin          -log σ(r_c - r_r - m), m = chosen_score - rejected_score    (Llama 2's margin loss)
  distributional  -log Σ_i Σ_j p_c(i) p_r(j) σ(α(i - j)) over K rating classes (SmolLM2 + HelpSteer2)
The reward of a sequence is the head read at its LAST REAL token (heads.sequence_scores); for the distributional
head, the expected rating Σ_k k p(k) is the scalar reward. Held-out accuracy = share of pairs with r_c > r_r.
Writes DIR/args.json, metrics.jsonl, summary.json, curves.png and DIR/reward_model/ (PEFT adapter + head).
"""
import os
import time
from dataclasses import dataclass
from typing import Optional

import datasets
import torch
from tqdm import tqdm

from minirlhf.cli import run_script
from minirlhf.data import describe_source, load_preference_dataset, world
from minirlhf.data.loading import SPLITS
from minirlhf.data.tokenize import collate_pairs, pair_batches, require_pad_token, tokenize_preference_dataset
from minirlhf.errors import InputError
from minirlhf.folders import check_reward_model_dir
from minirlhf.formats import save_adapter, save_head
from minirlhf.heads import RatingHead, ScalarHead, in_row_chunks, sequence_scores
from minirlhf.lora import set_active_adapter
from minirlhf.models import (base_precision, count_parameters, load_model, load_reward_model, load_tokenizer,
                             parameter_report)
from minirlhf.reward_losses import bradley_terry_loss, distributional_loss, expected_rating
from minirlhf.precision import LossScaler
from minirlhf.run import Run
from minirlhf.sampling import eval_mode
from minirlhf.settings import DataArgs, ModelArgs, OptimArgs, PairArgs, RunArgs
from minirlhf.tracking import RunLog
from minirlhf.training import EpochOrder, lr_at, make_optimizer, make_trainable, optimizer_step, set_lr, steps_per_epoch
from minirlhf.validation import check_choice, check_common

LOSSES = ("bt", "margin", "distributional")


@dataclass
class Args(RunArgs, PairArgs, OptimArgs, DataArgs, ModelArgs):  # shared: settings.py
    loss: str = "bt"
    """bt | margin | distributional"""
    alpha: float = 0.2
    """distributional loss: slope of σ(α(i - j)) between rating classes"""
    num_classes: int = 10
    """distributional loss: number of rating classes K"""
    full_finetune: bool = False
    """train every base weight instead of a LoRA adapter (float bases only)"""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (not on norms)"""
    eval_only: bool = False
    """only evaluate --reward-model on the held-out split"""
    reward_model: Optional[str] = None
    """with --eval-only: a reward_model/ folder written by this script"""
    # shared settings, this script's defaults
    eval_every: int = 50
    save_every: int = 50
    out: str = "runs/reward"


def pair_scores(model, head, batch, device, rows=None):
    """Scalar rewards of the chosen and rejected rows of a collated batch: (B,), (B,), and the raw head outputs.
    rows: at most this many rows per forward pass (evaluation, without grad: --forward-batch-size); None: all."""
    ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (2B, T)
    out = in_row_chunks(lambda r: sequence_scores(model, head, ids[r], attention[r]), len(ids), rows or len(ids))
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
    """Held-out accuracy (r_c > r_r), mean reward margin and loss; --forward-batch-size pairs collated at a time, their
    rows scored --forward-batch-size at a time."""
    correct, margins, losses = [], [], []
    with eval_mode(model):
        for batch in tqdm(pair_batches(data, pad_id, args.forward_batch_size), desc="eval", leave=False, mininterval=5,
                          total=-(-len(data) // args.forward_batch_size)):
            r_c, r_r, out_c, out_r = pair_scores(model, head, batch, device, args.forward_batch_size)
            correct.append((r_c > r_r).float())
            margins.append(r_c - r_r)
            losses.append(pair_loss(args, out_c, out_r, batch, device))
    return {"eval/accuracy": torch.cat(correct).mean().item(), "eval/margin": torch.cat(margins).mean().item(),
            "eval/loss": torch.cat(losses).mean().item()}


RANGES = {"eval_every": ">= 1", "num_classes": ">= 2", "alpha": "> 0"}


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
    run = Run(args, check_args)  # ---- plumbing: settings, --out / --resume, torchrun, threads, seed (run.py)

    tokenizer = load_tokenizer(args.model)
    pad_id = require_pad_token(tokenizer)
    if args.eval_only:
        return evaluate_only(args, run, load_base(args, tokenizer), tokenizer)

    # 1. data first (the tokenizer is all it needs): tokenised pairs (prompt masked out; the reward reads the last
    # real token); data that cannot fill one optimizer step is one line here, before the model loads
    eval_data, eval_positions = load_pairs(args, tokenizer, args.eval_split, args.max_eval_pairs)
    train_data, _ = load_pairs(args, tokenizer, args.split, args.max_train_pairs)
    micro, per_step = args.batch_size, args.batch_size * args.grad_accum * run.dist.world_size
    per_epoch = steps_per_epoch(len(train_data), per_step, "training pairs",
                                source=describe_source(args.dataset, args.split, args.data_files))
    total_steps = args.max_steps if args.max_steps > 0 else per_epoch * args.epochs

    # 2. one frozen base, a reward adapter and a head on top
    model = load_base(args, tokenizer)
    params = make_trainable(model, "reward", full_finetune=args.full_finetune, lora_r=args.lora_r,
                            lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=args.lora_targets)
    hidden = model.config.hidden_size  # a Bradley-Terry head has no bias: the loss only sees r_c - r_r (heads.py)
    head = RatingHead(hidden, args.num_classes) if args.loss == "distributional" else ScalarHead(hidden, bias=False)
    head = head.to(run.device)
    params += list(head.parameters())
    run.print(f"{parameter_report(model)} (+ {sum(p.numel() for p in head.parameters())} head)")
    run.print(f"data: {len(train_data)} train pairs, {len(eval_data)} held-out pairs; {total_steps} steps of "
              f"{per_step} pairs (per process {micro} x {args.grad_accum} accum)")
    optimizer = make_optimizer(params, args.lr, args.weight_decay)
    scaler = LossScaler(model)  # fp16's loss scaling; a plain backward otherwise (precision.py)
    order = EpochOrder(len(train_data), args.seed, run.dist.rank, run.dist.world_size)
    recent = []  # (accuracy, loss) of every micro-batch since the last log line
    run.start(total_steps, model=model, heads={"head": head}, optimizer=optimizer, samples_per_step=per_step,
              state={"order": order, "recent": recent, "scaler": scaler})  # ---- plumbing: resume, metrics.jsonl

    # 3. the loop: micro-batches of pairs -> rewards at the last token -> pairwise loss -> step
    model.train()
    tick = time.time()
    evaluated = None, {}  # (step, held-out metrics) of the latest evaluation: the final one if it is the last step's
    for step in run.steps(desc="reward"):  # ---- plumbing: Ctrl-C and checkpoints between steps
        optimizer.zero_grad(set_to_none=True)
        for _ in range(args.grad_accum):
            batch = collate_pairs([train_data[i] for i in order.take(micro)], pad_id)
            r_c, r_r, out_c, out_r = pair_scores(model, head, batch, run.device)
            loss = pair_loss(args, out_c, out_r, batch, run.device).mean() / args.grad_accum
            scaler.backward(loss)
            recent.append(((r_c > r_r).float().mean().item(), loss.item() * args.grad_accum))
        set_lr(optimizer, lr_at(step - 1, args.lr, total_steps, args.warmup_steps))
        grad_norm = optimizer_step(optimizer, params, loss=recent[-1][1], grad_clip=args.grad_clip, step=step - 1,
                                   world_size=run.dist.world_size, scaler=scaler)  # all-reduce, clip, NaN guard, step
        if (step % args.eval_every == 0 or step == total_steps) and run.is_main:
            metrics = {"train/loss": sum(l for _, l in recent) / len(recent),
                       "train/accuracy": sum(a for a, _ in recent) / len(recent),
                       "train/grad_norm": grad_norm.item(), "train/lr": optimizer.param_groups[0]["lr"],
                       "perf/pairs_per_second": len(recent) * micro / (time.time() - tick)}
            evaluated = step, evaluate(model, head, eval_data, args, pad_id, run.device)
            metrics.update(evaluated[1])
            run.log(step, metrics)
            tqdm.write(f"step {step:5d} | loss {metrics['train/loss']:.4f} | train acc "
                       f"{metrics['train/accuracy']:.3f} | eval acc {metrics['eval/accuracy']:.3f} | "
                       f"margin {metrics['eval/margin']:+.3f}")
        if step % args.eval_every == 0 or step == total_steps:
            tick = time.time()
            recent.clear()

    # 4. save the adapter (PEFT format) and the head side by side; summary
    def write(folder):
        if args.full_finetune:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        else:
            save_adapter(model, folder, adapter="reward")
        save_head(head, folder, base=base_precision(model))  # the scores hold for a base of this precision
    run.save("reward_model", write)
    final = {}
    if run.is_main:  # the last step's evaluation when there was one (always, unless stopped early or resumed done)
        final = dict(evaluated[1]) if evaluated[0] == run.step else evaluate(model, head, eval_data, args, pad_id,
                                                                             run.device)
    ceiling = held_out_ceiling(args, eval_positions)  # on the pairs evaluated, as eval/accuracy
    if ceiling is not None and run.is_main:
        final.update({"eval/accuracy_ceiling": ceiling, "eval/accuracy_vs_ceiling": final["eval/accuracy"] / ceiling})
    summary = run.finish(final)
    if run.is_main:
        print(f"done in {summary['time/total_seconds']:.0f}s: eval/accuracy {final['eval/accuracy']:.4f}"
              + (f" (ceiling {ceiling:.4f}, {100 * final['eval/accuracy'] / ceiling:.1f}% of it)" if ceiling else "")
              + f"; reward model in {os.path.join(args.out, 'reward_model')}")
    return summary


def load_base(args, tokenizer):
    """The frozen base of --model, in --quantization and --dtype."""
    return load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                      tokenizer=tokenizer, gradient_checkpointing=args.gradient_checkpointing)


def load_pairs(args, tokenizer, split, max_pairs):
    """Tokenised pairs of one split (the first max_pairs of them; 0: all), and their positions in the split (a pair
    whose prompt alone is longer than --max-length is skipped: the first n pairs kept need not be the first n)."""
    rows = load_preference_dataset(args.dataset, split=split, data_files=args.data_files)
    if args.loss == "margin" and "margin" not in rows.column_names:
        raise InputError(f"--loss margin needs scores, but {args.dataset} has no margin column")
    rows = rows.add_column("_position", list(range(len(rows))))
    data = tokenize_preference_dataset(rows, tokenizer, args.max_length, args.max_prompt_length, args.template,
                                       system_prompt=args.system_prompt, name=f"{args.dataset} [{split}]")
    if max_pairs > 0:
        data = data.select(range(min(max_pairs, len(data))))
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"] + (["margin"] if args.loss == "margin" else [])
    return data.select_columns(columns), list(data["_position"])


def held_out_ceiling(args, positions):
    """The built-in world's accuracy ceiling on the held-out pairs at `positions` of --eval-split (the pairs
    evaluated, so that eval/accuracy / ceiling compares like with like); None for other data sets."""
    return world.accuracy_ceiling(SPLITS[args.eval_split], positions) if args.dataset == "builtin" else None


def evaluate_only(args, run, model, tokenizer):
    """--eval-only: the held-out accuracy of the reward model in --reward-model (with its own head's loss)."""
    adapter, head = load_reward_model(model, args.reward_model)
    set_active_adapter(model, adapter)
    if isinstance(head, RatingHead) != (args.loss == "distributional"):  # evaluate with the head's own loss
        args.loss = "distributional" if isinstance(head, RatingHead) else "bt"
    pairs, positions = load_pairs(args, tokenizer, args.eval_split, args.max_eval_pairs)
    metrics = evaluate(model, head, pairs, args, require_pad_token(tokenizer), run.device)
    if args.dataset == "builtin":
        metrics["eval/accuracy_ceiling"] = held_out_ceiling(args, positions)
    total = count_parameters(model)[1] + sum(p.numel() for p in head.parameters())
    summary = RunLog(args.out, args, enabled=run.is_main).summary({"params/trainable": 0, "params/total": total,
                                                                  **metrics})
    run.print(" | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return summary


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
