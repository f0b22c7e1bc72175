"""Supervised fine-tuning (SFT): next-token cross-entropy on chat-formatted demonstrations, packed into blocks.

    python train_sft.py --max-steps 200                 # fine-tune the embedded tiny model on the built-in world
    python train_sft.py --init-config cfg.json --tokenizer DIR   # a fresh model from a config (assets/build.py);
                                                                  # DIR holds a tokenizer and a config.json

Each demonstration becomes   <chat-formatted prompt> + response + EOS   (the same text the sampler later sees and
produces); all of them are joined into one stream and cut into (block_size) blocks (minirlhf/data/packing.py). The
loss covers every token of a block, prompt tokens included. AdamW, linear warmup then cosine decay to min_lr.
Writes DIR/args.json, DIR/metrics.jsonl, DIR/summary.json and DIR/model (save_pretrained + tokenizer, atomically).
"""
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from minirlhf.assets import TINY_LLAMA
from minirlhf.checkpoint import atomic_directory, seed_everything
from minirlhf.cli import format_args, parse_args
from minirlhf.data import world
from minirlhf.data.packing import pack
from minirlhf.models import count_parameters, get_device, load_model, load_tokenizer
from minirlhf.tracking import RunLog


@dataclass
class Args:
    """Supervised fine-tuning of a causal LM on chat-formatted demonstrations, packed into blocks."""
    model: str = TINY_LLAMA
    """Hugging Face model dir or Hub id to fine-tune (all parameters); ignored with --init-config"""
    init_config: Optional[str] = None
    """JSON file (or inline JSON) of a model config: train a fresh model from it instead of --model"""
    tokenizer: Optional[str] = None
    """tokenizer dir or Hub id; default: the one beside --model"""
    dataset: str = "builtin"
    """demonstrations: 'builtin' (the built-in world's SFT rows) is the only one so far"""
    block_size: int = 128
    """tokens per packed training block"""
    batch_size: int = 16
    """blocks per optimizer step"""
    max_steps: int = 300
    """optimizer steps"""
    lr: float = 1e-3
    """peak learning rate (AdamW)"""
    min_lr_ratio: float = 0.1
    """the cosine decays to lr * min_lr_ratio at max_steps"""
    warmup_steps: int = 30
    """linear warmup steps from 0 to lr"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this"""
    log_every: int = 25
    """steps between log lines / metrics.jsonl rows"""
    eval_every: int = 100
    """steps between evaluations of the held-out loss"""
    seed: int = 0
    """seed for python, numpy and torch (init, block order)"""
    device: str = "auto"
    """'auto' (CUDA if present, else CPU), 'cpu' or 'cuda'"""
    threads: int = 0
    """torch CPU threads (0 = torch's default); 1 is much faster when other processes share the cores"""
    out: str = "runs/sft"
    """output directory"""


def tokenize_rows(tokenizer, rows):
    """Token ids of chat-formatted prompt + response (no EOS: pack() appends it)."""
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) + r["response"]
             for r in rows]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def lm_loss(model, blocks):
    """Mean next-token cross-entropy over a (B, L) batch of packed blocks."""
    logits = model(input_ids=blocks).logits  # (B, L, V)
    # the off-by-one shift: the logits at position t predict the token at t + 1
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), blocks[:, 1:].reshape(-1))


def lr_at(step, args):
    """Linear warmup to args.lr, then cosine decay to args.lr * min_lr_ratio."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def eval_loss(model, blocks, batch_size):
    """Mean next-token loss over all of `blocks` (N, L), in batches."""
    model.eval()
    total = sum(lm_loss(model, blocks[i:i + batch_size]).item() * len(blocks[i:i + batch_size])
                for i in range(0, len(blocks), batch_size))
    model.train()
    return total / len(blocks)


def main(args):
    start = time.time()
    print(format_args(args))
    if args.max_steps < 1:
        raise ValueError(f"train_sft: --max-steps must be >= 1, got {args.max_steps}")
    if args.dataset != "builtin":
        raise ValueError(f"train_sft: --dataset {args.dataset!r} is not supported yet; use 'builtin'")
    if args.init_config is not None and args.tokenizer is None:
        raise ValueError("train_sft: --init-config needs --tokenizer (a fresh model has no tokenizer beside it)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = get_device(args.device)
    log = RunLog(args.out, args)  # writes args.json; its clock gives time/total_seconds

    # model and tokenizer
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.init_config is not None:
        text = args.init_config if args.init_config.lstrip().startswith("{") else open(args.init_config).read()
        config = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, **json.loads(text)}
        if config["vocab_size"] < len(tokenizer):
            raise ValueError(f"train_sft: config vocab_size {config['vocab_size']} < {len(tokenizer)} tokenizer tokens")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).to(device)
    else:
        model = load_model(args.model, dtype="float32", device=args.device, tokenizer=tokenizer)
        model.requires_grad_(True)  # full fine-tuning (load_model returns a frozen base)
    trainable, total = count_parameters(model)
    print(f"model: {total:,d} parameters ({trainable:,d} trainable) on {device}")

    # data: packed blocks
    eos_id = tokenizer.eos_token_id
    train_blocks = pack(tokenize_rows(tokenizer, world.sft_rows("train")), args.block_size, eos_id).to(device)
    eval_blocks = pack(tokenize_rows(tokenizer, world.sft_rows("test")), args.block_size, eos_id).to(device)
    print(f"data: {len(train_blocks)} train blocks, {len(eval_blocks)} eval blocks of {args.block_size} tokens")

    # optimizer: decay matrices only (nanoGPT)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))

    order, cursor = torch.randperm(len(train_blocks)), 0
    recent, tokens, tick = [], 0, time.time()
    metrics = {}
    model.train()
    for step in tqdm(range(1, args.max_steps + 1), desc="sft", mininterval=5):
        if cursor + args.batch_size > len(order):  # a new epoch: reshuffle the blocks
            order, cursor = torch.randperm(len(train_blocks)), 0
        batch = train_blocks[order[cursor:cursor + args.batch_size]]  # (B, L)
        cursor += args.batch_size
        lr = lr_at(step - 1, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        recent.append(loss.item())
        tokens += batch.numel()

        if step % args.log_every == 0 or step == args.max_steps:
            metrics = {"train/loss": sum(recent) / len(recent), "train/lr": lr, "train/grad_norm": grad_norm.item(),
                       "perf/tokens_per_second": tokens / (time.time() - tick)}
            if step % args.eval_every == 0 or step == args.max_steps:
                metrics["eval/loss"] = eval_loss(model, eval_blocks, args.batch_size)
            log.log(step, metrics)
            tqdm.write(f"step {step:5d} | loss {metrics['train/loss']:.4f} | "
                       f"eval {metrics.get('eval/loss', float('nan')):.4f} | lr {lr:.2e} | "
                       f"tok/s {metrics['perf/tokens_per_second']:6.0f}")
            recent, tokens, tick = [], 0, time.time()

    def save(tmp_dir):
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
    atomic_directory(os.path.join(args.out, "model"), save)
    summary = log.summary({"params/trainable": trainable, "params/total": total, "train/loss": metrics["train/loss"],
                           "eval/loss": metrics["eval/loss"]})
    print(f"done in {time.time() - start:.0f}s: train/loss {summary['train/loss']:.4f} "
          f"eval/loss {summary['eval/loss']:.4f}; model in {os.path.join(args.out, 'model')}")
    return summary


if __name__ == "__main__":
    main(parse_args(Args))
