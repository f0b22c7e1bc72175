"""Score several policies with several reward models (and the gold reward) on the same held-out prompts: a table.

    python -m minirlhf.compare --policies base runs/ppo runs/dpo --reward-models runs/reward runs/reward_dist --gold

The cross-reward-model comparison of the SmolLM2 + HelpSteer2 setup: a policy trained against one reward model is also
scored by the others, so a policy that only pleases ITS reward model (reward hacking) shows up as a high score in one
column and not in the rest (and, on the built-in world, in the gold column). Every policy is a LoRA adapter on the same
base (--model); 'base' is the base itself. Each policy samples --samples responses per held-out prompt with
evaluation.evaluate_policy (seeded: the same policy always gets the same samples, the same as train_ppo.py's final
evaluation with the same settings), and every reward model scores those same samples at their last real token. Columns:
  <reward model>  mean score (rating heads: expected rating)       gold   mean gold score (built-in world, 0..4)
  KL              mean exact KL(π‖π_base) per sequence, in nats     length mean response length in tokens
  pass@k          (--pass-k, built-in world) the unbiased pass@k of max(k) more samples per prompt (pass_at_k.py)
A folder may be the adapter folder itself or a run folder holding policy/ (train_ppo.py, train_grpo.py,
train_reinforce.py, train_dpo.py) or reward_model/ (train_reward.py). The table is printed and, with --out, written as
markdown.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from minirlhf import lora
from minirlhf.assets import TINY_LLAMA
from minirlhf.atomic import atomic_write_bytes
from minirlhf.cli import format_args, run_script
from minirlhf.data import load_prompt_dataset, world
from minirlhf.data.tokenize import require_pad_token, tokenize_prompt_dataset
from minirlhf.devices import get_device
from minirlhf.evaluation import evaluate_policy, pass_at_k_evaluation
from minirlhf.errors import InputError
from minirlhf.folders import check_adapter_dir, check_reward_model_dir
from minirlhf.formats import load_adapter
from minirlhf.heads import RatingHead, sequence_scores
from minirlhf.models import load_model, load_reward_model, load_tokenizer
from minirlhf.reward_losses import expected_rating
from minirlhf.validation import check_common


@dataclass
class Args:
    model: str = TINY_LLAMA
    """base model every adapter sits on: a folder, Hub id, smollm2 or a .gguf file (default: the embedded tiny
    Llama)"""
    policies: list[str] = field(default_factory=lambda: ["base"])
    """policy adapter folders (or run folders holding policy/); 'base' = the base model, no adapter"""
    reward_models: list[str] = field(default_factory=list)
    """reward model folders written by train_reward.py (or run folders holding reward_model/)"""
    gold: bool = False
    """add the built-in world's gold score as a column (--dataset builtin only)"""
    pass_k: list[int] = field(default_factory=list)
    """add a column pass@k for each of these k (--dataset builtin only): max(k) more responses sampled per prompt,
    a response correct when world.is_correct (evaluation.pass_at_k_evaluation); none: no such columns"""
    dataset: str = "builtin"
    """held-out prompts: 'builtin' or a data set minirlhf.data knows"""
    data_files: Optional[str] = None
    """local files in the data set's raw schema instead of the Hub"""
    split: str = "test"
    """which split's prompts"""
    template: Optional[str] = None
    """prompt format when the tokenizer has no chat template: question-answer | qa | llama3"""
    prompts: int = 120
    """held-out prompts (the first N)"""
    samples: int = 2
    """responses sampled per prompt"""
    max_new_tokens: int = 24
    """response tokens sampled at most"""
    max_prompt_length: Optional[int] = None
    """prompt tokens kept (from the end); default: derived from the data (the longest prompt after the template, at
    most 1024), so that no prompt is cut"""
    temperature: float = 1.0
    """sampling temperature"""
    quantization: str = "none"
    """base precision: none | 8bit | 4bit"""
    dtype: str = "auto"
    """compute dtype: auto | float32 | bfloat16 | float16 (minirlhf/precision.py)"""
    system_prompt: Optional[str] = None
    """a system message put before every prompt (use the one the policies were trained with)"""
    forward_batch_size: int = 64
    """responses sampled and scored per forward pass: bounds memory. The seeded sampler draws one chunk after the
    other, so the samples depend on it: use the value the runs to compare with used (the scripts' default is 64)"""
    seed: int = 0
    """sampler seed (the same for every policy)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    out: Optional[str] = None
    """also write the markdown table to this file"""


def resolve(path, inner, marker):
    """`path` itself if it holds `marker`, else path/inner if that does; else a one-line error."""
    for candidate in (path, os.path.join(path, inner)):
        if os.path.isfile(os.path.join(candidate, marker)):
            return candidate
    raise InputError(f"{path!r} has no {marker} (nor {inner}/{marker}): not a {inner.replace('_', ' ')} folder")


def check_out_file(path):
    """--out names the markdown file the table is written to: refused up front (not after all the sampling) when it
    is a folder, or lies under a file or a folder that cannot be written."""
    if os.path.isdir(path):
        raise InputError(f"--out {path} is a folder; expected the file to write the table to, e.g. "
                         f"{os.path.join(path, 'compare.md')}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # missing folders are created when the table is written
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"--out {path} cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise InputError(f"--out {path} cannot be written: {parent} is not writable")


def markdown_table(header, rows):
    """A GitHub markdown table: header (list of str), rows (lists of str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


RANGES = {"prompts": ">= 1", "samples": ">= 1"}


def main(args):
    check_common(args, RANGES, datasets="prompt")
    if not args.policies:
        raise InputError("--policies needs at least one folder (or 'base')")
    if args.gold and args.dataset != "builtin":
        raise InputError("--gold is the built-in world's gold score: it needs --dataset builtin")
    policies = [p if p == "base" else resolve(p, "policy", "adapter_config.json") for p in args.policies]
    for p in policies:
        if p != "base":
            check_adapter_dir(p, "--policies")
    rms = [resolve(r, "reward_model", "head_config.json") for r in args.reward_models]
    for r in rms:
        check_reward_model_dir(r, "--reward-models")
    if args.out is not None:
        check_out_file(args.out)
    print(format_args(args))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)

    # one base; every reward model and every policy is an adapter on it (names must not contain dots)
    tokenizer = load_tokenizer(args.model)
    require_pad_token(tokenizer)
    model = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                       tokenizer=tokenizer).eval()
    reward_models = [load_reward_model(model, path, adapter=f"reward{i}", flag="--reward-models")
                     for i, path in enumerate(rms)]
    for j, path in enumerate(policies):
        if path != "base":
            load_adapter(model, path, adapter=f"policy{j}", flag="--policies")

    data = load_prompt_dataset(args.dataset, args.split, args.data_files)
    data = tokenize_prompt_dataset(data.select(range(min(args.prompts, len(data)))), tokenizer,
                                   args.max_prompt_length, args.template, system_prompt=args.system_prompt,
                                   name=f"{args.dataset} [{args.split}]")
    rows, ids = data["prompt"], data["prompt_ids"]
    prompts = [p for p in rows for _ in range(args.samples)]
    ids = [p for p in ids for _ in range(args.samples)]
    gold_fn = None
    if args.gold:
        gold_fn = world.gold_score

    ks = sorted(set(args.pass_k))
    header = ["policy"] + [f"RM {r}" for r in args.reward_models] + (["gold"] if args.gold else []) + \
             ["KL (nats)", "length"] + [f"pass@{k}" for k in ks]
    table = []
    for j, path in enumerate(policies):
        scores = [[] for _ in reward_models]

        @torch.no_grad()
        def reward_fn(batch):  # every reward model scores the same samples; evaluate_policy keeps the first
            for k, (name, head) in enumerate(reward_models):
                with lora.use_adapter(model, name):
                    out = sequence_scores(model, head, batch["input_ids"], batch["attention_mask"])  # (B,) / (B, K)
                scores[k].append(expected_rating(out) if isinstance(head, RatingHead) else out)
            return scores[0][-1]

        with lora.use_adapter(model, None if path == "base" else f"policy{j}"):
            metrics, _ = evaluate_policy(model, tokenizer, prompts, ids, gold_fn=gold_fn,
                                         reward_fn=reward_fn if reward_models else None,
                                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         batch_size=args.forward_batch_size, seed=args.seed, device=device)
            if ks:  # each prompt once, sampled max(k) times by a generator of its own
                metrics.update(pass_at_k_evaluation(model, tokenizer, rows, data["prompt_ids"], ks=ks,
                                                    correct_fn=world.is_correct, max_new_tokens=args.max_new_tokens,
                                                    temperature=args.temperature, batch_size=args.forward_batch_size,
                                                    seed=args.seed, device=device))
        table.append([args.policies[j]] + [f"{torch.cat(s).mean().item():+.3f}" for s in scores]
                     + ([f"{metrics['eval/gold']:.3f}"] if args.gold else [])
                     + [f"{metrics['eval/kl']:.2f}", f"{metrics['eval/length']:.1f}"]
                     + [f"{metrics[f'eval/pass@{k}']:.3f}" for k in ks])
    text = markdown_table(header, table)
    note = (f"\n\n{len(rows)} held-out prompts of {args.dataset} [{args.split}] x {args.samples} samples at "
            f"temperature {args.temperature}, seed {args.seed}; base {args.model}"
            + (f"; pass@k from {max(ks)} more samples per prompt" if ks else "") + ".\n")
    print("\n" + text)
    if args.out:
        atomic_write_bytes(args.out, (text + note).encode())
        print(f"table written to {args.out}")
    return table


if __name__ == "__main__":
    run_script(main, Args, prog="python -m minirlhf.compare")  # bad input: one line; a bug: its traceback
