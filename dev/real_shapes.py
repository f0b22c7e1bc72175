"""The real-model recipes (examples/*.sh) at real shapes on the CPU: every command of every recipe, 2-3 optimizer
steps each, on a SmolLM2-135M-shaped model built locally, fed raw-schema rows of the recipes' lengths.

    python dev/real_shapes.py                 # full run, 2 threads; writes the table into docs/real_models.md
    python dev/real_shapes.py --threads 1     # when other processes share the cores
    python dev/real_shapes.py --quick         # 2 layers, ~30-60-token texts: a smoke run of the plumbing (prints)
    python dev/real_shapes.py --only qlora_dpo_r1 stackllama_8bit   # some recipes

What a GPU user runs is the recipe; what this runs is the same commands with the few flags a CPU needs changed:
- The commands come from examples/*.sh themselves (common.recipe_commands runs each script under bash with `python`
  replaced by a function that records its arguments), so the recipes stay the one source of truth. The recipes'
  MODEL and OUT variables point at the local model and a temporary folder, so chained stages (an SFT model, a reward
  model) are the ones this run just trained.
- The model: a LlamaForCausalLM with SmolLM2-135M's shape (dev/run.py's SMOL_135M: hidden 576, 30 layers, 9 heads,
  3 KV heads, intermediate 1536, vocab 49152, tied embeddings), random weights, no download, with the embedded tiny
  model's tokenizer (512 tokens, a chat template; its ids lie inside the 49152-row embedding). The recipes that name
  a Llama (1B, 8B) run on this same 135M shape: an 8B does not fit a 20-minute budget on two cores.
- The data: raw-schema rows of each data set a recipe reads (HelpSteer2-binarized, stack-exchange-paired, hh-rlhf,
  squad), generated deterministically, written as JSON lines and passed with --data-files. Prompts and responses are
  300-1000 tokens (counted with the tokenizer), prompts capped where a recipe's --max-length would otherwise drop the
  row (stack-exchange and hh-rlhf: --max-length 512).
- Flags changed (`overrides`): --data-files, --device cpu, --threads, and the size of the run: 3 optimizer steps of
  one pair / one 1024-token block for the supervised scripts (the same pair every step, --max-train-pairs 1; SFT
  reads a file of one row, which packs into one block: so the loss going down means the model learned), 2
  iterations of 2 responses (one optimizer step each) for the RL scripts, minimal evaluations (one held-out pair or
  prompt), --max-new-tokens = min(the recipe's, 300) for RL (32 for DPO's sampling evaluation); and --dtype float16
  becomes bfloat16 (CPU_FLOAT16: the CPU has no fast fp16 matmul). Everything else (quantization, LoRA rank and
  targets, learning rates, lengths, templates, system prompt, gradient checkpointing, --forward-batch-size) is the
  recipe's.

What it records per command (a table row):
- s/step: the median time between consecutive metrics.jsonl rows (the harness timestamps each row as it appears,
  polling every 0.2 s); every script logs one row per optimizer step here (RL: per iteration, which is one optimizer
  step: rollout + scoring + update), at the end of the step, so the first step is left out: it pays one-time
  allocations and, for DPO and RL, follows the evaluation before training. train_reward.py's rows include its
  per-step evaluation of one held-out pair (forward only). RL rows add the rollout's generation time (time/generation).
- peak memory: the child's VmHWM (Linux's resident-set high-water mark of that process, read from /proc while it
  runs: common.Child).
- loss first -> last: train/loss (RL: loss/total) of the first and last logged step. "moved": for the supervised
  scripts, whether the loss on the repeated pair / the blocks went down; for RL (a fresh rollout each iteration, so
  the losses are not comparable), whether the policy left the reference: eval/kl after training > 0.
- params and frozen base: params/trainable, params/total, params/frozen_unchanged from summary.json.
"""
import argparse
import glob
import importlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from common import (OFFLINE, REPO, flag_value, flag_values, load_average, machine, mib,  # noqa: E402
                    recipe_commands, run_script, with_flags, write_doc)

EXAMPLES = os.path.join(REPO, "examples")
MARK_BEGIN, MARK_END = "<!-- dev/real_shapes.py: begin (generated) -->", "<!-- dev/real_shapes.py: end -->"
DOC = os.path.join(REPO, "docs", "real_models.md")
SECTION = "## Real-shape benchmark"


# ---------------------------------------------------------------------------------------- the recipes
CPU_RECIPES = ("smollm2_cpu",)  # the laptop recipe: the real model itself, run end to end by bench/real_model.py


def recipes(only=None):
    """{name: path} of the GPU recipes examples/*.sh (the names in `only`, when given)."""
    found = {os.path.basename(p)[:-3]: p for p in sorted(glob.glob(os.path.join(EXAMPLES, "*.sh")))
             if os.path.basename(p)[:-3] not in CPU_RECIPES}
    unknown = sorted(set(only or ()) - set(found))
    if unknown:
        raise SystemExit(f"dev/real_shapes.py: error: --only: no recipe {unknown}; known: {', '.join(found)}")
    return {name: path for name, path in found.items() if not only or name in only}


# ------------------------------------------------------------------------------- what the CPU run changes
# fp16 matrix products have no fast kernel on this CPU: a 4-layer 135M-wide model's forward + backward over 2 x 256
# tokens took 50-60 s in float16 against 1.2 s in float32 and 1.0 s in bfloat16 (torch.profiler: aten::mm, 99 %).
# A recipe's --dtype float16 runs here in bfloat16, the other 16-bit autocast; fp16 and its loss scaling are checked
# on CUDA by dev/gpu_check.py.
CPU_FLOAT16 = "bfloat16"


SUPERVISED = ("train_sft.py", "train_reward.py", "train_dpo.py")
STEPS = 3  # optimizer steps of a supervised script; an RL script runs 2 iterations of one step each


def overrides(argv, data_files, threads, quick):
    """The recipe command `argv` (["train_x.py", flags...]) with the flags a CPU benchmark changes (module docstring).
    Returns (argv, the benchmark's shape in words)."""
    script, dataset = argv[0], flag_value(argv, "--dataset")
    if dataset not in data_files:
        raise SystemExit(f"dev/real_shapes.py: error: {script} reads --dataset {dataset!r}, for which this "
                         f"benchmark writes no rows; known: {', '.join(data_files)}")
    argv = with_flags(argv, data_files=data_files[dataset], device="cpu", threads=threads)
    note = ""
    if flag_value(argv, "--dtype") == "float16":
        argv, note = with_flags(argv, dtype=CPU_FLOAT16), f"; --dtype float16 run as {CPU_FLOAT16} (CPU_FLOAT16)"
    if script == "train_sft.py":  # one row = one packed block, the same every step; evaluated at the end only
        argv = with_flags(argv, data_files=first_row_file(data_files[dataset]), max_steps=STEPS, batch_size=1,
                          log_every=1, eval_every=STEPS)
        if quick:  # the short texts of --quick fill no 1024-token block
            argv = with_flags(argv, block_size=64)
        return argv, f"{STEPS} steps x the same block of {flag_value(argv, '--block-size', 128)} tokens{note}"
    if script in SUPERVISED:  # the same pair every step
        argv = with_flags(argv, max_steps=STEPS, batch_size=1, grad_accum=1, max_train_pairs=1, max_eval_pairs=1)
        if script == "train_reward.py":
            argv = with_flags(argv, eval_every=1)  # it logs the loss only when it evaluates
        else:  # DPO's sampling evaluation before and after training: one prompt, a few tokens
            argv = with_flags(argv, log_every=1, eval_every=0, eval_prompts=1, eval_samples=1,
                              max_new_tokens=8 if quick else 32)
        return argv, (f"{STEPS} steps x 1 pair (2 rows of <= {flag_value(argv, '--max-length', 64)} tokens, "
                      f"prompt <= {flag_value(argv, '--max-prompt-length', 32)}){note}")
    new_tokens = min(int(flag_value(argv, "--max-new-tokens", 24)), 16 if quick else 300)
    argv = with_flags(argv, iterations=2, rollout_size=2, minibatch_size=2, eval_every=0, eval_prompts=1,
                      eval_samples=1, max_new_tokens=new_tokens)
    if script != "train_reinforce.py":
        argv = with_flags(argv, ppo_epochs=1)
    if script == "train_grpo.py":
        argv = with_flags(argv, group_size=2)
    return argv, (f"2 iterations x 2 responses (prompt <= {flag_value(argv, '--max-prompt-length', 32)} + "
                  f"{new_tokens} new tokens), 1 optimizer step each{note}")


# ------------------------------------------------------------------------------------------ model and data
def build_model(folder, layers=None):
    """The SmolLM2-135M-shaped model (dev/run.py's SMOL_135M; `layers` fewer for --quick), random weights, saved with
    the embedded tiny model's tokenizer. Returns the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from minirlhf.assets import TINY_LLAMA
    dev_run = importlib.import_module("run")  # dev/run.py (dev/ is on sys.path: this file's folder)
    shape = dict(dev_run.SMOL_135M, **({"num_hidden_layers": layers} if layers else {}))
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.model_max_length = shape["max_position_embeddings"]  # the tiny model's 128 would warn on every row
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (shape["eos_token_id"], shape["pad_token_id"]), \
        "the tiny tokenizer's EOS / pad ids must be the 135M config's"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    return tokenizer, n


WORDS = ("the model reads each answer and the reward it gets depends on how clear and correct that answer is when a "
         "question asks for a list of steps the best reply gives them in order with a short reason for each one "
         "while a weak reply repeats the question or drifts to another topic people who write code often ask how to "
         "sort a list merge two tables read a file line by line or measure the time a function takes and good "
         "answers show a small example first then explain why it works and where it breaks").split()


def text_of(tokenizer, n_tokens, seed):
    """Deterministic English-like text of at most n_tokens tokens (as close as whole words allow)."""
    rng = random.Random(seed)
    words = []
    while len(words) < n_tokens:  # >= 1 token a word: n_tokens words are always enough
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
        words += [sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."]

    def count(k):
        return len(tokenizer(" ".join(words[:k]), add_special_tokens=False)["input_ids"])
    lo, hi = 1, len(words)  # the largest k with count(k) <= n_tokens: binary search (count grows with k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= n_tokens else (lo, mid - 1)
    return " ".join(words[:lo])


# Token lengths of the rows written per data set: (shortest, longest) prompt and response; rows spread evenly between.
# Prompts stay below each recipe's --max-length with its template (a longer prompt drops the pair): 1024 for
# HelpSteer2, 512 for stack-exchange-paired (StackLLaMA's reward model) and hh-rlhf (Llama-3 format + system prompt).
LENGTHS = {
    "juyoungml/HelpSteer2-binarized": dict(prompt=(300, 950), response=(300, 1000)),
    "lvwerra/stack-exchange-paired": dict(prompt=(300, 450), response=(300, 1000)),
    "Anthropic/hh-rlhf": dict(prompt=(300, 400), response=(300, 1000)),
    "rajpurkar/squad": dict(prompt=(300, 1000)),
}
ROWS = 4  # rows per data set


def quick_lengths():
    """--quick: every text 30-60 tokens."""
    return {dataset: {part: (30, 60) for part in parts} for dataset, parts in LENGTHS.items()}


def spread(lo, hi, i, n):
    return lo + (hi - lo) * i // max(1, n - 1)


def raw_row(dataset, prompt, chosen, rejected, i):
    """One row in `dataset`'s raw Hub schema (minirlhf/data/sources.py; tests/fixtures/*.jsonl)."""
    if dataset == "juyoungml/HelpSteer2-binarized":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": 4 - i % 2 * 0.5,
                "rejected_score": 1 + i % 2, "chosen_rationale": "", "rejected_rationale": "",
                "score_diff": 3 - i % 2 * 1.5, "difficulty": "easy"}
    if dataset == "lvwerra/stack-exchange-paired":
        return {"qid": i, "question": prompt, "date": "2023/01/01", "metadata": [], "response_j": chosen,
                "response_k": rejected}
    if dataset == "Anthropic/hh-rlhf":
        return {"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
                "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}"}
    if dataset == "rajpurkar/squad":
        return {"id": f"{i:024d}", "title": "Bench", "context": "", "question": prompt,
                "answers": {"text": [], "answer_start": []}}
    raise KeyError(dataset)


def write_data(folder, tokenizer, lengths=LENGTHS, rows=ROWS):
    """{dataset id: a .jsonl file of `rows` raw rows} for every data set of `lengths` (as LENGTHS). Prompt i is long
    when its responses are short and the other way round, so every pair fills about the same number of tokens."""
    files = {}
    for k, (dataset, parts) in enumerate(lengths.items()):
        path = os.path.join(folder, dataset.replace("/", "__") + ".jsonl")
        with open(path, "w") as f:
            for i in range(rows):
                seed = 1000 * k + 10 * i
                prompt = text_of(tokenizer, spread(*parts["prompt"], i, rows), seed)
                responses = [text_of(tokenizer, spread(*parts["response"], rows - 1 - i, rows), seed + j)
                             for j in (1, 2)] if "response" in parts else [None, None]
                f.write(json.dumps(raw_row(dataset, prompt, *responses, i)) + "\n")
        with open(path) as f, open(first_row_file(path), "w") as first:  # SFT's data: one row, one packed block
            first.write(f.readline())
        files[dataset] = path
    return files


def first_row_file(path):
    return path[:-len(".jsonl")] + ".first.jsonl"


# --------------------------------------------------------------------------------------------- one command
def run_command(argv, log_path, threads, timeout, prefix=(), poll=0.2):
    """Run `python [prefix...] argv...` (common.run_script); at every poll read the new rows of its metrics.jsonl
    (timestamped as they appear). Returns {returncode, wall, peak_bytes, rows: [(seconds since start, row)],
    summary}."""
    out = flag_value(argv, "--out")
    metrics = os.path.join(out, "metrics.jsonl")
    start, rows, seen = time.time(), [], [0]

    def read_rows():
        if os.path.isfile(metrics):
            with open(metrics) as f:
                lines = f.read().splitlines()
            for line in lines[seen[0]:]:  # a line still being written fails to parse: read it next time
                try:
                    rows.append((time.time() - start, json.loads(line)))
                    seen[0] += 1
                except ValueError:
                    break
    child = run_script([*prefix, *argv], log_path, threads, OFFLINE, poll, timeout, read_rows)
    summary_path = os.path.join(out, "summary.json")
    summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
    return dict(returncode=child.returncode, wall=child.wall_seconds, peak_bytes=child.peak_rss_bytes, rows=rows,
                summary=summary)


LOSS_KEYS = ("train/loss", "loss/total")


def skipped_steps(rows):
    """Steps whose logged gradient norm is not finite (the optimizer step was skipped: fp16 overflow)."""
    return [row["step"] for _, row in rows
            if isinstance(row.get("train/grad_norm"), float) and not math.isfinite(row["train/grad_norm"])]


def measure(result, script):
    """The table's numbers from one run_command result (module docstring)."""
    rows = result["rows"]
    times = [t for t, _ in rows]
    intervals = [b - a for a, b in zip(times, times[1:])]
    key = next((k for k in LOSS_KEYS if rows and k in rows[0][1]), None)
    first, last = (rows[0][1][key], rows[-1][1][key]) if key else (None, None)
    summary = result["summary"]
    if script not in SUPERVISED:
        kl = summary.get("eval/kl")
        moved = "yes" if kl is not None and kl > 0 else "**no**"
        moved += f" (KL {kl:.3g} nats)" if kl is not None else ""
    elif first is None:
        moved = "-"
    else:
        moved = "**no**" if last == first else f"{'yes, down' if last < first else '**up**'} ({last - first:+.2g})"
    skipped = skipped_steps(rows)
    if skipped:  # fp16 loss scaling skips a step whose gradients overflowed
        moved += f"; {len(skipped)} of {len(rows)} steps skipped (non-finite gradients)"
    return dict(step=statistics.median(intervals) if intervals else None, steps=len(rows), loss_key=key,
                first=first, last=last, moved=moved, peak=result["peak_bytes"],
                trainable=summary.get("params/trainable"), total=summary.get("params/total"),
                frozen=summary.get("params/frozen_unchanged"), wall=result["wall"],
                generation=[r.get("time/generation") for _, r in rows if "time/generation" in r])


# ------------------------------------------------------------------------------------------------- report
def count(n):
    return "-" if n is None else (f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} k")


def table(results):
    lines = ["| recipe | stage | benchmark shape | s/step | peak memory | loss first -> last | moved | trainable / "
             "total params | frozen base unchanged | wall |", "|" + "---|" * 10]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['recipe']} | {r['stage']} | {r['shape']} | **{r['error']}** | | | | | | |")
            continue
        m = r["m"]
        step = "-" if m["step"] is None else f"{m['step']:.1f} s"
        if m["generation"]:
            step += f" (generation {statistics.median(m['generation']):.1f} s)"
        loss = "-" if m["first"] is None else f"{m['first']:.4g} -> {m['last']:.4g}"
        frozen = {True: "yes", False: "**no**", None: "-"}[m["frozen"]]
        lines.append(f"| {r['recipe']} | {r['stage']} | {r['shape']} | {step} | {mib(m['peak'])} | {loss} | "
                     f"{m['moved']} | {count(m['trainable'])} / {count(m['total'])} | {frozen} | {m['wall']:.0f} s |")
    return "\n".join(lines)


def stage_name(argv):
    """e.g. "train_reward.py --loss bt, full fine-tuning, 4bit": the script and the flags that tell its stages apart."""
    bits = [argv[0]]
    for flag in ("--loss", "--quantization", "--dtype"):
        value = flag_value(argv, flag)
        if value and value not in ("none", "auto", "sigmoid"):
            bits.append(f"{flag} {value}")
    if flag_values(argv, "--full-finetune") is not None:
        bits.append("--full-finetune")
    return " ".join(bits)


def shown(argv, placeholders):
    """The command as text, with this run's temporary paths written as placeholders."""
    text = " ".join(["python", *(repr(w) if " " in w else w for w in argv)])
    for path, name in placeholders.items():
        text = text.replace(path, name)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (2 = both cores: needs "
                        "an idle machine; 1 when the cores are shared)")
    parser.add_argument("--quick", action="store_true", help="2 layers and 30-60-token texts: a smoke run; prints the "
                        "table, writes no file unless --out is given")
    parser.add_argument("--only", nargs="+", help="recipe names (examples/NAME.sh) to run; default all")
    parser.add_argument("--out", help=f"markdown file to write the table into (default {os.path.relpath(DOC, REPO)}; "
                        "none with --quick)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one command may take")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, data, runs, logs)")
    args = parser.parse_args()
    sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]  # train_*.py (their Args) and dev/run.py
    out_doc = args.out or (None if args.quick else DOC)
    start, load_start = time.time(), load_average()
    work = tempfile.mkdtemp(prefix="minirlhf-real-shapes-")
    results, failed = [], False
    try:
        model_dir, runs = os.path.join(work, "smol-135m"), os.path.join(work, "runs")
        tokenizer, n_params = build_model(model_dir, layers=2 if args.quick else None)
        data_files = write_data(work, tokenizer, quick_lengths() if args.quick else LENGTHS)
        placeholders = {model_dir: "$MODEL", runs: "$OUT", work: "$DATA"}
        print(f"dev/real_shapes.py: {n_params / 1e6:.1f} M-parameter model in {model_dir}; "
              f"{args.threads} thread(s); {'quick' if args.quick else 'full'} run", file=sys.stderr)
        commands_shown = []
        for name, path in recipes(args.only).items():
            out = os.path.join(runs, name)
            broken = None
            for argv in recipe_commands(path, {"MODEL": model_dir, "OUT": out}):
                if not argv[0].startswith("train_"):
                    continue  # e.g. python -m minirlhf.compare: not a training stage
                argv, shape = overrides(argv, data_files, args.threads, args.quick)
                row = dict(recipe=name, stage=stage_name(argv), shape=shape)
                commands_shown.append(f"- {name}: `{shown(argv, placeholders)}`")
                if broken:
                    results.append(dict(row, error=f"not run: {broken} failed"))
                    continue
                log = os.path.join(work, f"{name}-{len(results)}.log")
                result = run_command(argv, log, args.threads, args.timeout)
                if result["returncode"] != 0:
                    failed, broken = True, argv[0]
                    tail = "".join(open(log).readlines()[-15:])
                    print(f"  {name}: {argv[0]} failed (exit {result['returncode']}); log tail:\n{tail}",
                          file=sys.stderr)
                    results.append(dict(row, error=f"failed, exit {result['returncode']}"))
                    continue
                results.append(dict(row, m=measure(result, argv[0])))
                print(f"  {name}: {row['stage']}: {result['wall']:.0f} s", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)  # full fine-tuning checkpoints are GBs
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    cpu, cores = machine()
    import torch
    import transformers
    command = " ".join(["python", "dev/real_shapes.py", *sys.argv[1:]])
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu}, {cores} cores; torch "
              f"{torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
              f"**{args.threads} thread(s)**; load average {load_start} at the start, "
              f"{load_average()} at the end; wall time {time.time() - start:.0f} s. "
              f"Model: {n_params / 1e6:.1f} M parameters ({'2 layers: --quick' if args.quick else 'SmolLM2-135M shape'}"
              f", random weights), float32 on the CPU unless the recipe says otherwise.\n\nCommand: `{command}`\n")
    block = (header + "\n" + table(results) + "\n\n<details><summary>The commands this run made of the recipes "
             "($MODEL: the local 135M-shaped model; $OUT: a temporary folder; $DATA: the generated rows)</summary>"
             "\n\n" + "\n".join(commands_shown) + "\n\n</details>")
    print(block)
    if out_doc:
        write_doc(out_doc, block, MARK_BEGIN, MARK_END, new_file="# Real models\n", new_section=SECTION)
        print(f"wrote {os.path.relpath(out_doc, REPO)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
