"""Direct Preference Optimization: align the policy on preference pairs with no reward model and no sampling.

    python train_dpo.py                        # DPO on the built-in world (about 25 seconds on a 2-core CPU)
    python train_dpo.py --loss ipo --beta 0.5  # IPO;  --loss cdpo --label-smoothing 0.1 for conservative DPO
    python train_dpo.py --loss kto             # KTO: each response labelled alone, not compared with its partner

With x = (log π(y_c|p) - log π_ref(y_c|p)) - (log π(y_r|p) - log π_ref(y_r|p))   (minirlhf/dpo.py):
  sigmoid  -log σ(βx)                                  DPO, Rafailov et al. 2023, Eq. 7
  cdpo     -(1-ε) log σ(βx) - ε log σ(-βx)             conservative DPO (labels flipped with probability ε)
  ipo      (x - 1/(2β))²  with length-averaged log-probs  IPO, Azar et al. 2023, Eq. 17
  kto      no margin: with r = log π(y|p) - log π_ref(y|p) and a reference point z0,     KTO, Ethayarajh et al. 2024,
           a desirable y costs λ_D (1 - σ(β(r - z0))), an undesirable one λ_U (1 - σ(β(z0 - r)))           Eq. 8
           Here each pair gives one of each: its chosen response is desirable and its rejected one undesirable (as
           TRL runs KTO on paired data); a pair's loss is the mean of the two. z0 estimates KL(π‖π_ref) as the paper
           does (Sec. 4.1), on mismatched pairs: every prompt of the micro-batch with the NEXT pair's chosen and
           rejected responses, log π - log π_ref averaged over those 2B rows, clamped at >= 0, no gradient (two more
           forward passes without grad per micro-batch: the policy's and the reference's; kto_reference_point).
Two options for DPO's habit of lowering the chosen response's likelihood too (it only needs the rejected one to fall
faster), both off by default:
  --rpo-alpha α       + α · (-log π(y_c|p) / |y_c|): the chosen response's NLL per token  RPO, Pang et al. 2024, Eq. 1
  --length-normalize  sigmoid / cdpo on per-token average log-probs      SimPO's reward, Meng et al. 2024, Eq. 4
π is the base with a LoRA adapter "policy"; π_ref is the same base with adapters disabled (or a frozen copy of
--sft-adapter when the policy starts from one). Dropout is off in every pass (it would make the log-ratios noisy),
except the LoRA adapter's own --lora-dropout in the training step's policy pass (0 by default).
On the built-in world the policy is sampled on held-out prompts before and after training and scored by the gold
reward: eval/gold_before, eval/gold_after, eval/kl, eval/win_rate (gold after > gold before on the same prompt), and
with --pass-k 1 4 16 eval/pass@k (report.held_out_pass_at_k).
"""
from dataclasses import dataclass
from typing import Optional

import datasets
import torch
from tqdm import tqdm

from minirlhf.cli import run_script
from minirlhf.data import describe_source, load_preference_dataset, world
from minirlhf.data.tokenize import collate_pairs, pair_batches, require_pad_token, tokenize_preference_dataset
from minirlhf.dpo import LOSSES, kto_reference_point, preference_loss
from minirlhf.errors import InputError
from minirlhf.evaluation import before_training, evaluate_policy, held_out_prompts
from minirlhf.folders import check_adapter_dir
from minirlhf.formats import load_adapter, save_adapter
from minirlhf.heads import in_row_chunks, response_logprobs
from minirlhf.lora import copy_adapter, lora_parameters, set_active_adapter
from minirlhf.models import dropout_off, load_model, load_tokenizer, parameter_report, reference
from minirlhf.precision import LossScaler
from minirlhf.report import final_summary, held_out_pass_at_k
from minirlhf.run import Run
from minirlhf.settings import DataArgs, EvalArgs, ModelArgs, OptimArgs, PairArgs, RunArgs, SamplingArgs
from minirlhf.training import (EpochOrder, lora_dropout_active, lr_at, make_optimizer, make_trainable, optimizer_step,
                               set_lr, steps_per_epoch)
from minirlhf.validation import check_choice, check_common, check_sampling

METRICS = ["train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]  # the columns of each step's per-pair statistics (+ nll/chosen with RPO)


@dataclass
class Args(RunArgs, EvalArgs, SamplingArgs, PairArgs, OptimArgs, DataArgs, ModelArgs):  # shared: settings.py
    loss: str = "sigmoid"
    """sigmoid (DPO) | ipo | cdpo | kto (each response labelled alone: chosen desirable, rejected undesirable)"""
    beta: float = 0.5
    """β: strength of the implicit KL constraint (smaller = further from the reference; 0.5 suits the built-in
    world's noisy labels, 0.1 is the usual choice on real data)"""
    label_smoothing: Optional[float] = None
    """cdpo: ε, the assumed probability that a label is flipped (none: 0.1 with --loss cdpo; only cdpo takes it)"""
    rpo_alpha: float = 0.0
    """RPO (Pang et al. 2024, Eq. 1): add α x the chosen response's NLL per token, -log π(y_c|p) / |y_c|, to every
    pair's loss: it keeps the chosen likelihood from falling (logged as nll/chosen; 0: plain preference loss)"""
    length_normalize: bool = False
    """sigmoid / cdpo: compare per-token average log-probs instead of sums (SimPO's length-normalised reward, Meng et
    al. 2024, Eq. 4, inside DPO's log-ratio): a long response no longer moves the margin more than a short one. The
    margin shrinks about |y|-fold: raise --beta with it. IPO always averages"""
    kto_desirable_weight: float = 1.0
    """kto: λ_D, the weight of a desirable (chosen) response's loss (the paper advises λ_D n_D / (λ_U n_U) in [1, 4/3];
    on pairs n_D = n_U)"""
    kto_undesirable_weight: float = 1.0
    """kto: λ_U, the weight of an undesirable (rejected) response's loss"""
    sft_adapter: Optional[str] = None
    """start the policy from this trained adapter; the reference is then a frozen copy of it"""
    precompute_ref: bool = False
    """compute every reference log-prob in one pass before training (training then runs no reference forward)"""
    log_every: int = 10
    """optimizer steps between log lines"""
    # shared settings, this script's defaults: held-out pairs, 4 samples per evaluation prompt, no evaluation between
    lr: float = 1e-3
    max_eval_pairs: int = 256
    eval_samples: int = 4
    eval_every: int = 0
    save_every: int = 50
    out: str = "runs/dpo"


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


RANGES = {"beta": "> 0", "label_smoothing": "none or [0, 0.5)", "max_eval_pairs": ">= 1", "rpo_alpha": ">= 0",
          "kto_desirable_weight": "> 0", "kto_undesirable_weight": "> 0"}


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_common(args, RANGES)
    check_sampling(args)
    check_choice("--loss", args.loss, LOSSES)
    if args.loss != "cdpo" and args.label_smoothing:
        raise InputError("--label-smoothing is the cdpo loss's ε: use it with --loss cdpo")
    if args.loss != "kto" and (args.kto_desirable_weight, args.kto_undesirable_weight) != (1.0, 1.0):
        raise InputError("--kto-desirable-weight and --kto-undesirable-weight are the kto loss's λ_D and λ_U: use them "
                         "with --loss kto")
    if args.loss == "kto":
        if args.batch_size < 2:
            raise InputError(f"--loss kto estimates its reference point z0 on each prompt paired with another pair's "
                             f"responses: it needs --batch-size >= 2, got {args.batch_size}")
        if args.precompute_ref or args.length_normalize:
            raise InputError(f"--loss kto: not with --{'precompute-ref' if args.precompute_ref else 'length-normalize'}"
                             " (KTO compares summed log-probs, and its z0 needs reference passes over mismatched "
                             "pairs at every step)")
    if args.sft_adapter:
        check_adapter_dir(args.sft_adapter, "--sft-adapter")


def main(args):
    datasets.disable_progress_bars()  # one progress bar per loop is enough
    check_args(args)
    run = Run(args)  # ---- plumbing: --out / --resume checks, torchrun, threads, seed (minirlhf/run.py)
    device = run.device  # IPO uses length-averaged log-probs (as TRL); DPO the sums unless --length-normalize
    average = args.loss == "ipo" or args.length_normalize
    columns = METRICS + (["nll/chosen"] if args.rpo_alpha > 0 else []) + (["kl/z0"] if args.loss == "kto" else [])

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
    params = add_policy(model, args)  # a fresh LoRA adapter "policy", or --sft-adapter's (then also the reference)
    dropout_off(model)  # no dropout in the reference, evaluation and sampling passes; the training step's policy
    # pass switches on the LoRA dropout alone (training.lora_dropout_active): --lora-dropout does what it says
    run.print(parameter_report(model))
    if args.precompute_ref:  # one reference pass now; training then never runs the reference
        train_data = with_reference_logps(model, train_data, pad_id, device, average, args.forward_batch_size,
                                          show=run.is_main)

    def sample_eval():
        metrics, samples = evaluate_policy(model, tokenizer, eval_prompts, eval_ids,
                                           gold_fn=world.gold_score if args.dataset == "builtin" else None,
                                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                           top_k=args.top_k, top_p=args.top_p, min_new_tokens=args.min_new_tokens,
                                           stop_strings=tuple(args.stop_strings), batch_size=args.forward_batch_size,
                                           seed=args.seed, device=device)
        metrics.update(held_out_pass_at_k(model, tokenizer, eval_prompts, eval_ids, args, device))  # --pass-k
        return metrics, samples

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
            z0 = kto_z0(model, examples, pad_id, device, args.forward_batch_size) if args.loss == "kto" else None
            with lora_dropout_active(model):  # --lora-dropout acts here only (and in a checkpointed backward)
                sums = sequence_logps(model, batch, device)  # (2B,) summed over each response's tokens
                lengths = response_lengths(batch, device)  # (2B,)
                losses, stats = preference_loss(sums, ref, lengths, args.loss, args.beta, args.label_smoothing,
                                                args.rpo_alpha, average, z0, args.kto_desirable_weight,
                                                args.kto_undesirable_weight)  # (B,) each: dpo.py
                scaler.backward(losses.mean() / args.grad_accum)
            recent.append(torch.stack([losses.detach(), *stats.values()], 1))  # (B, 7 to 9): the columns
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
    return report(run, model, sample_eval, before, pair_chunks(eval_pairs, args.forward_batch_size), pad_id, args,
                  average)


def add_policy(model, args):
    """The trainable LoRA adapter "policy" on the frozen base, and its parameters: a fresh one (--lora-r, ...; the
    reference is then the base, adapters off) or --sft-adapter's weights, copied into a frozen adapter "reference" as
    well: the reference is where the policy starts."""
    if not args.sft_adapter:
        return make_trainable(model, "policy", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                              lora_dropout=args.lora_dropout, lora_targets=args.lora_targets)
    load_adapter(model, args.sft_adapter, adapter="policy", trainable=True, flag="--sft-adapter")
    copy_adapter(model, "policy", "reference")
    set_active_adapter(model, "policy")
    return lora_parameters(model, "policy")


def load_pairs(args, tokenizer, split, max_pairs):
    """Tokenised pairs of one split (the first max_pairs of them; 0: all)."""
    rows = load_preference_dataset(args.dataset, split=split, data_files=args.data_files)
    data = tokenize_preference_dataset(rows, tokenizer, args.max_length, args.max_prompt_length, args.template,
                                       system_prompt=args.system_prompt, name=f"{args.dataset} [{split}]")
    data = data.select(range(min(max_pairs, len(data)))) if max_pairs > 0 else data
    return data.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])


def pair_chunks(data, batch_size):
    """Lists of batch_size pairs (the last may be shorter), in order."""
    for i in range(0, len(data), batch_size):
        yield [data[j] for j in range(i, min(i + batch_size, len(data)))]


@torch.no_grad()
def kto_z0(model, examples, pad_id, device, rows):
    """--loss kto: the reference point z0 of a batch of B pairs (Ethayarajh et al. 2024, Sec. 4.1), from MISMATCHED
    pairs: pair i's prompt with pair (i + 1) mod B's chosen and rejected responses, 2B rows; the policy's and the
    reference's summed log-probs of them (two passes without grad, `rows` rows at a time), then
    dpo.kto_reference_point: max(0, mean of log π - log π_ref), detached. Two pairs with the same prompt make a
    matched row; one pair alone is matched with itself."""
    shifted = examples[1:] + examples[:1]
    batch = collate_pairs([{"prompt_ids": e["prompt_ids"], "chosen_ids": s["chosen_ids"],
                            "rejected_ids": s["rejected_ids"]} for e, s in zip(examples, shifted)], pad_id)
    policy = sequence_logps(model, batch, device, rows=rows)  # (2B,)
    with reference(model):
        ref = sequence_logps(model, batch, device, rows=rows)  # (2B,)
    return kto_reference_point(policy, ref)


@torch.no_grad()
def with_reference_logps(model, data, pad_id, device, average, forward_batch_size, show=True):
    """--precompute-ref: the data with a column ref_logps = [log π_ref(chosen), log π_ref(rejected)] per pair."""
    ref_logps = []
    with reference(model):
        for batch in tqdm(pair_batches(data, pad_id, forward_batch_size), desc="reference log-probs", disable=not show):
            logps = sequence_logps(model, batch, device, average, forward_batch_size).cpu()  # (2b,)
            ref_logps += torch.stack(logps.chunk(2), 1).tolist()  # b rows of [chosen, rejected]
    return data.add_column("ref_logps", ref_logps)


@torch.no_grad()
def pair_eval(model, chunks, pad_id, args, device, average):
    """Held-out implicit-reward accuracy and loss (no sampling); with --rpo-alpha the loss holds the α x NLL term
    too and eval/nll/chosen is its NLL; with --loss kto each chunk's z0 is estimated on the chunk (kto_z0)."""
    stats = []
    for chunk in chunks:
        batch = collate_pairs(chunk, pad_id)
        sums = sequence_logps(model, batch, device, rows=args.forward_batch_size)  # (2B,)
        with reference(model):
            ref = sequence_logps(model, batch, device, average, args.forward_batch_size)
        z0 = kto_z0(model, chunk, pad_id, device, args.forward_batch_size) if args.loss == "kto" else None
        losses, pair = preference_loss(sums, ref, response_lengths(batch, device), args.loss, args.beta,
                                       args.label_smoothing, args.rpo_alpha, average, z0, args.kto_desirable_weight,
                                       args.kto_undesirable_weight)
        stats.append(torch.stack([losses, pair["rewards/accuracies"], *([pair["nll/chosen"]] if args.rpo_alpha > 0
                                                                         else [])], 1))
    means = torch.cat(stats).mean(0).tolist()
    return dict(zip(["eval/loss", "eval/rewards/accuracies", "eval/nll/chosen"], means))


def report(run, model, sample_eval, before, eval_chunks, pad_id, args, average):
    """After training (rank 0): the held-out pair loss and accuracy and the sampling evaluation after training, into
    summary.json with the one before (and the gold verdict on the built-in world): report.final_summary."""
    if not run.is_main:
        return run.finish({})
    after = sample_eval()
    pairs_eval = pair_eval(model, eval_chunks, pad_id, args, run.device, average)
    return final_summary(run, model, before, after, "eval/gold" in after[0], pairs_eval)


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
