"""Supervised fine-tuning (SFT): next-token cross-entropy on chat-formatted demonstrations.

    python train_sft.py --max-steps 200                 # LoRA-fine-tune the embedded tiny model on the built-in world
    python train_sft.py --full-finetune --max-steps 200 # every weight trains
    python train_sft.py --no-packing                    # padded examples, loss on the response tokens only
    python train_sft.py --merge                         # fold the LoRA adapter into the base, save the merged model
    python train_sft.py --init-config cfg.json --tokenizer DIR   # a fresh model from a config (assets/build.py);
                                                                  # DIR holds a tokenizer and a config.json

Each demonstration becomes   <formatted prompt> + response + EOS   (the same text the sampler later sees and
produces). With packing (the StackLLaMA setup) all of them are joined into one stream and cut into block_size blocks
(minirlhf/data/packing.py) and the loss covers every token, prompt included. Without packing each example is its own
right-padded row, truncated to block_size tokens (the prompt keeps its end), and the loss covers response tokens only
(completion-only loss). AdamW, linear warmup then cosine decay to min_lr.
Data: the built-in world's demonstrations, or the chosen responses of any preference data set minirlhf.data knows
(the StackLLaMA setup fine-tunes on lvwerra/stack-exchange-paired's preferred answers).
Writes DIR/args.json, metrics.jsonl, summary.json, curves.png and DIR/adapter (PEFT format) and/or DIR/model
(save_pretrained + tokenizer: full fine-tuning, --init-config or --merge), each atomically.
"""
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from minirlhf.cli import run_script
from minirlhf.data import describe_source, load_preference_dataset, world
from minirlhf.data.packing import pack
from minirlhf.data.templates import format_prompt
from minirlhf.data.tokenize import pad, report_cuts, resolve_lengths
from minirlhf.errors import InputError
from minirlhf.folders import read_json_object
from minirlhf.formats import save_adapter
from minirlhf.heads import response_logprobs
from minirlhf.hub import skeleton_of
from minirlhf.lora import adapter_names, merge_lora
from minirlhf.models import load_model, load_tokenizer, parameter_report
from minirlhf.ops import masked_mean
from minirlhf.precision import LossScaler, resolve_dtype, set_compute_dtype
from minirlhf.run import Run
from minirlhf.sampling import eval_mode
from minirlhf.settings import DataArgs, ModelArgs, OptimArgs, RunArgs
from minirlhf.training import EpochOrder, lr_at, make_optimizer, make_trainable, optimizer_step, set_lr, steps_per_epoch
from minirlhf.validation import check_common


@dataclass
class Args(RunArgs, OptimArgs, DataArgs, ModelArgs):  # shared: settings.py
    """Supervised fine-tuning of a causal LM on chat-formatted demonstrations, packed into blocks."""
    init_config: Optional[str] = None
    """JSON file (or inline JSON) of a model config: train a fresh model from it instead of --model (every weight
    trains: --full-finetune)"""
    tokenizer: Optional[str] = None
    """tokenizer dir or Hub id; default: the one beside --model"""
    packing: bool = True
    """pack demonstrations into blocks (loss on every token) or pad them (--no-packing: loss on responses only)"""
    block_size: int = 128
    """tokens per packed block, or the maximum example length without packing"""
    max_prompt_length: int = 64
    """without packing: prompt tokens kept (from the end)"""
    full_finetune: bool = False
    """train every base weight instead of a LoRA adapter (float bases only)"""
    lora_dropout: float = 0.0
    """LoRA dropout"""
    merge: bool = False
    """after LoRA training, fold the adapter into the base and save the merged model (StackLLaMA, before RL)"""
    batch_size: int = 16
    """blocks per optimizer step (per process: under torchrun the effective batch is batch_size x processes)"""
    max_steps: int = 300
    """optimizer steps"""
    min_lr_ratio: float = 0.1
    """the cosine decays to lr * min_lr_ratio at max_steps"""
    warmup_steps: int = 30
    """linear warmup steps"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms)"""
    log_every: int = 25
    """optimizer steps between log lines"""
    max_eval_blocks: int = 32
    """held-out blocks (examples with --no-packing) the evaluations cover: the first this many of the test split
    (0: all of it; the whole split of a real model's tokenizer can take minutes on a CPU)"""
    # shared settings, this script's defaults
    lr: float = 1e-3
    eval_every: int = 100
    save_every: int = 100
    out: str = "runs/sft"


def demonstrations(args, split):
    """[{"prompt": messages, "response": str}] of the built-in world, or a preference set's chosen responses."""
    if args.dataset == "builtin":
        return world.sft_rows(split)
    rows = load_preference_dataset(args.dataset, split=split, data_files=args.data_files)
    return [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows]


def tokenize_rows(tokenizer, rows, template=None, system_prompt=None):
    """Token ids of formatted prompt + response (no EOS: pack() appends it)."""
    texts = [format_prompt(tokenizer, r["prompt"], template, system_prompt) + r["response"] for r in rows]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def padded_examples(tokenizer, rows, args, name=None):
    """Without packing: a (N, T) right-padded batch of prompt + response + EOS, cut to block_size tokens (the prompt
    keeps its last max_prompt_length tokens; none: derived from the rows, tokenize.resolve_lengths), and the (N, T)
    loss mask that is 1 on response tokens only. What was cut is reported in one line naming `name`."""
    prompts = [tokenizer(format_prompt(tokenizer, r["prompt"], args.template, args.system_prompt),
                         add_special_tokens=False)["input_ids"] for r in rows]
    responses = [tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for r in rows]
    derived = () if args.max_prompt_length is not None else ("max_prompt_length",)
    max_prompt_length = args.max_prompt_length if not derived else resolve_lengths(
        [len(p) for p in prompts], [len(r) for r in responses], max_length=args.block_size)[0]
    report_cuts(name, [len(p) for p in prompts], max_prompt_length, [(len(r),) for r in responses], args.block_size,
                derived=derived, length_flag="--block-size")
    ids, masks = [], []
    for prompt, response in zip(prompts, responses):
        prompt = prompt[-max_prompt_length:]
        ids.append((prompt + response)[:args.block_size])
        masks.append(([0] * len(prompt) + [1] * len(response))[:args.block_size])
    return (pad(ids, tokenizer.pad_token_id), pad([[1] * len(x) for x in ids], 0), pad(masks, 0))  # (N, T) x 3


def lm_loss(model, blocks, attention_mask=None, loss_mask=None):
    """Mean next-token cross-entropy over a (B, L) batch: -log π(x_t | x_<t) averaged over every token of packed
    blocks (but the first, which nothing predicts), or over the loss_mask tokens. The off-by-one shift from positions
    to the tokens they predict is heads.predicting_states, inside response_logprobs, as everywhere in minirlhf."""
    attention_mask = torch.ones_like(blocks) if attention_mask is None else attention_mask
    targets = torch.ones_like(blocks) if loss_mask is None else loss_mask.clone()  # (B, L): the tokens the loss covers
    targets[:, 0] = 0  # the first token has no context to be predicted from
    return -masked_mean(response_logprobs(model, blocks, attention_mask, targets), targets)


@torch.no_grad()
def eval_loss(model, data, batch_size):
    """Mean next-token loss over the (N, L) tensors of `data`, in batches of batch_size rows, weighted by rows."""
    blocks = data[0]
    with eval_mode(model):
        total = sum(lm_loss(model, *[t[i:i + batch_size] for t in data]).item() * len(blocks[i:i + batch_size])
                    for i in range(0, len(blocks), batch_size))
    return total / len(blocks)


RANGES = {"block_size": ">= 2", "batch_size": ">= 1", "lora_dropout": "[0, 1)", "max_steps": ">= 1",
          "min_lr_ratio": "[0, 1]", "eval_every": ">= 1", "max_eval_blocks": ">= 0"}


def check_args(args):
    """Every setting checked before anything is loaded: one InputError naming the flag (validation.py)."""
    check_common(args, RANGES)
    if args.merge and (args.full_finetune or args.init_config or args.quantization != "none"):
        raise InputError("--merge folds a LoRA adapter into a float base: it needs LoRA training "
                         "(no --full-finetune / --init-config) and --quantization none")
    if args.init_config is not None and args.tokenizer is None:
        raise InputError("--init-config needs --tokenizer (a fresh model has no tokenizer beside it)")
    if args.init_config is not None:
        config = init_config(args.init_config)  # readable JSON, or one line saying why not
        try:  # what transformers builds of it, on the meta device (no memory): a config it rejects fails now
            skeleton_of(AutoConfig.for_model(**config))
        except Exception as e:  # whatever transformers raises for a config it cannot build (KeyError, ValueError...)
            raise InputError(f"--init-config: transformers cannot build a causal language model from it "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


def init_config(text_or_path):
    """--init-config: inline JSON (starts with "{") or a JSON file -> dict; one InputError line when it is neither."""
    if not text_or_path.lstrip().startswith("{"):
        return read_json_object(text_or_path, "--init-config", "a JSON object of model config fields")
    try:
        config = json.loads(text_or_path)
    except ValueError as e:
        raise InputError(f"--init-config (inline): not JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError("--init-config (inline): must be a JSON object of model config fields")
    return config


def main(args):
    run = Run(args, check_args)  # ---- plumbing: settings, --out / --resume, torchrun, threads, seed (run.py)

    # data first (the tokenizer is all it needs): packed blocks (loss on every token) or padded examples (loss on
    # response tokens); data that cannot fill one batch is one line here, before the model loads
    tokenizer = load_tokenizer(args.tokenizer or args.model, flag="--tokenizer" if args.tokenizer else "--model")
    train_data, eval_data = (sft_data(args, tokenizer, split, run.device) for split in (args.split, args.eval_split))
    n_eval_all = len(eval_data[0])
    if args.max_eval_blocks > 0:
        eval_data = tuple(t[:args.max_eval_blocks] for t in eval_data)  # the first N: every evaluation the same rows
    n_train, what = len(train_data[0]), "blocks" if args.packing else "examples"
    steps_per_epoch(n_train, args.batch_size * run.dist.world_size, f"training {what}", fix="lower --batch-size",
                    source=describe_source(args.dataset, args.split, args.data_files))

    # model
    if args.init_config is not None:
        model = set_compute_dtype(fresh_model(args.init_config, tokenizer).to(run.device),
                                  resolve_dtype(args.dtype, run.device))  # trains in fp32, computes in --dtype
    else:  # a frozen base; then either all of it trains or a LoRA adapter "sft" does
        model = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                           tokenizer=tokenizer, gradient_checkpointing=args.gradient_checkpointing)
        make_trainable(model, "sft", full_finetune=args.full_finetune, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                       lora_dropout=args.lora_dropout, lora_targets=args.lora_targets)
    run.print(f"model: {parameter_report(model)} on {run.device}")
    run.print(f"data: {n_train} train {what}, {len(eval_data[0])} of {n_eval_all} held-out {what} evaluated, "
              f"{train_data[0].shape[1]} tokens each; "
              f"{args.max_steps} steps of {args.batch_size * run.dist.world_size} (per process {args.batch_size})")

    # optimizer: AdamW, weight decay on matrices only (nanoGPT)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args.lr, args.weight_decay, betas=(0.9, 0.95))
    scaler = LossScaler(model)  # fp16's loss scaling; a plain backward otherwise (precision.py)
    order = EpochOrder(n_train, args.seed, run.dist.rank, run.dist.world_size)
    recent = []  # losses since the last log line
    run.start(args.max_steps, model=model, optimizer=optimizer, samples_per_step=args.batch_size * run.dist.world_size,
              state={"order": order, "recent": recent, "scaler": scaler})  # ---- plumbing: resume, metrics.jsonl

    # the loop: a batch of blocks -> next-token loss -> (average gradients over processes) -> AdamW step
    metrics, tokens, tick = {}, 0, time.time()
    eval_rows = min(args.batch_size, args.forward_batch_size)  # held-out rows per pass: the training batch's, at
    # most --forward-batch-size (the rows of a pass change eval/loss by float rounding only)
    model.train()
    for step in run.steps(desc="sft"):  # ---- plumbing: Ctrl-C and checkpoints between steps
        batch = [t[order.take(args.batch_size)] for t in train_data]  # (B, L) each
        lr = lr_at(step - 1, args.lr, args.max_steps, args.warmup_steps, args.min_lr_ratio)
        set_lr(optimizer, lr)
        loss = lm_loss(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.backward(loss)
        grad_norm = optimizer_step(optimizer, params, loss=loss.item(), grad_clip=args.grad_clip, step=step - 1,
                                   world_size=run.dist.world_size, scaler=scaler)  # all-reduce, clip, NaN guard, step
        recent.append(loss.item())
        tokens += batch[0].numel() * run.dist.world_size
        if step % args.log_every == 0 or step == args.max_steps:
            if run.is_main:
                metrics = {"train/loss": sum(recent) / len(recent), "train/lr": lr,
                           "train/grad_norm": grad_norm.item(), "perf/tokens_per_second": tokens / (time.time() - tick)}
                if step % args.eval_every == 0 or step == args.max_steps:
                    metrics["eval/loss"] = eval_loss(model, eval_data, eval_rows)
                run.log(step, metrics)
                tqdm.write(f"step {step:5d} | loss {metrics['train/loss']:.4f} | "
                           f"eval {metrics.get('eval/loss', float('nan')):.4f} | lr {lr:.2e} | "
                           f"tok/s {metrics['perf/tokens_per_second']:6.0f}")
            recent.clear()
            tokens, tick = 0, time.time()
    if run.is_main and "eval/loss" not in metrics:  # stopped between evaluations, or resumed with no step left
        logged = next((row["train/loss"] for row in reversed(run.log_file.history) if "train/loss" in row), None)
        metrics = {"train/loss": sum(recent) / len(recent) if recent else logged, **metrics,
                   "eval/loss": eval_loss(model, eval_data, eval_rows)}

    # save: the adapter (PEFT format), and a whole model when every weight trained or the adapter is merged
    unchanged = run.frozen_unchanged()  # before a merge rewrites the base
    where = save_outputs(run, model, tokenizer, args)
    summary = run.finish({"params/frozen_unchanged": unchanged, "train/loss": metrics.get("train/loss"),
                          "eval/loss": metrics.get("eval/loss"), "eval/blocks": len(eval_data[0]),
                          "eval/blocks_available": n_eval_all})
    if run.is_main:
        print(f"done in {summary['time/total_seconds']:.0f}s: train/loss {summary['train/loss']:.4f} "
              f"eval/loss {summary['eval/loss']:.4f} (on {len(eval_data[0])} of {n_eval_all} held-out {what}); "
              f"saved in {where}")
    return summary


def sft_data(args, tokenizer, split, device):
    """One split's training data: (blocks,) (N, L) packed with EOS between demonstrations (loss on every token), or
    (ids, attention, loss mask) (N, T) padded examples (loss on response tokens). Data that cannot fill one block, or
    keeps no response token, is one line naming the flag to change."""
    rows = demonstrations(args, split)
    if args.packing:
        ids = tokenize_rows(tokenizer, rows, args.template, args.system_prompt)
        if sum(len(x) + 1 for x in ids) < args.block_size:  # + 1: the EOS pack() puts after each
            raise InputError(f"--block-size {args.block_size}: the {split} split's {len(ids)} demonstrations hold "
                             f"{sum(len(x) + 1 for x in ids)} tokens, not one block; lower --block-size")
        return (pack(ids, args.block_size, tokenizer.eos_token_id).to(device),)  # (N, L)
    examples = padded_examples(tokenizer, rows, args, f"{args.dataset} [{split}]")  # (N, T) ids, attention, loss
    if not examples[2].any():  # the loss would be a mean over no token: 0.0, never measured
        raise InputError(f"--block-size {args.block_size}: no response token of the {split} split's "
                         f"{len(rows)} examples fits after its prompt; raise --block-size or lower "
                         "--max-prompt-length")
    return tuple(t.to(device) for t in examples)


def save_outputs(run, model, tokenizer, args):
    """Save the "sft" adapter (PEFT format) when LoRA trained, and a whole model (with its tokenizer) when every
    weight trained or --merge folds the adapter in. Returns the folder the final message names."""
    lora_run = "sft" in adapter_names(model)
    if lora_run:
        run.save("adapter", lambda folder: save_adapter(model, folder, "sft"))
    if args.merge:
        merge_lora(model, "sft")

    def save(folder):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    if not lora_run or args.merge:
        run.save("model", save)
    return os.path.join(args.out, "model" if not lora_run or args.merge else "adapter")


def fresh_model(init_config_arg, tokenizer):
    """--init-config: a randomly initialised model of that config, sized to the tokenizer (assets/build.py)."""
    config = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
              **init_config(init_config_arg)}
    if config["vocab_size"] < len(tokenizer):
        raise InputError(f"--init-config: vocab_size {config['vocab_size']} < {len(tokenizer)} tokenizer tokens")
    try:
        config = AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as e:  # no or unknown model_type, a field of the wrong type
        raise InputError(f"--init-config: not a model config transformers knows ({e})") from None
    return AutoModelForCausalLM.from_config(config)


if __name__ == "__main__":
    run_script(main, Args)  # bad input or a diverged run: one line `script.py: error: ...`; a bug: its traceback
