"""The sampler against transformers' generate, in the settings RL samples in: seconds per call, side by side.

    python dev/sampler.py                 # ~2 minutes, 1 thread; writes its block into docs/benchmarks.md
    python dev/sampler.py --no-write

The embedded tiny Llama (the SFT model every toy run starts from), chat prompts of the built-in world (left-padded),
24 new tokens at temperature 1, full softmax. Three settings:
- all 24 steps: min_new_tokens = 24, so every row runs every step (the per-step cost alone; dev/run.py's setting);
- rollout, 64 prompts: rows stop at EOS, as in train_ppo.py's rollouts (64 distinct prompts);
- GRPO rollout, 8 prompts x 8: rows stop at EOS, each prompt sampled 8 times in a row (train_grpo.py's default), with
  a LoRA policy adapter (r 8, all linear layers, B != 0) active, as during training.
minirlhf's `sampling.sample` (fast/decode.py's forward: padding never computed, a repeated prompt prefilled once,
stopped rows dropped from the batch), the same loop on transformers' forward (`engine="hf"`), and
`model.generate(do_sample=True, top_k=0, top_p=1)` with the same prompts, length and stopping: median seconds of
`--repeats` calls each, the three alternating so they share the machine's state. CPU time (time.process_time) as
well as wall time: on a shared machine CPU time is the steadier of the two.
"""
import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]
from common import load_average, write_doc  # noqa: E402

from minirlhf.assets import TINY_LLAMA  # noqa: E402
from minirlhf.data import load_prompt_dataset  # noqa: E402
from minirlhf.data.tokenize import collate_prompts, tokenize_prompt_dataset  # noqa: E402
from minirlhf.models import load_model, load_tokenizer  # noqa: E402
from minirlhf.sampling import sample  # noqa: E402
from minirlhf.training import make_trainable  # noqa: E402

NEW_TOKENS, TARGET = 24, 2.0  # the target: >= 2x generate on the tiny model
MARK_BEGIN, MARK_END = "<!-- dev/sampler.py: begin (generated) -->", "<!-- dev/sampler.py: end -->"
SECTION = "## The sampler against generate, in RL's settings (dev/sampler.py)"


def prompts(tokenizer, n, repeat):
    """(n * repeat, P) left-padded ids and mask of the first n training prompts, each `repeat` times in a row."""
    data = tokenize_prompt_dataset(load_prompt_dataset("builtin", split="train"), tokenizer, 32)
    rows = [{"prompt_ids": data[i]["prompt_ids"]} for i in range(n) for _ in range(repeat)]
    batch = collate_prompts(rows, tokenizer.pad_token_id)
    return batch["input_ids"], batch["attention_mask"]


def measure(model, tokenizer, ids, mask, min_new_tokens, repeats):
    """{engine: (median wall seconds, median CPU seconds)} of one call each, alternating."""
    common = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def ours(engine):
        return lambda: sample(model, ids, mask, NEW_TOKENS, min_new_tokens=min_new_tokens, temperature=1.0,
                              engine=engine, **common)

    def generate():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=NEW_TOKENS, min_new_tokens=min_new_tokens, **common)

    runs = {"sample": ours("auto"), "sample (hf)": ours("hf"), "generate": generate}
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            w, c = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load = time.time(), load_average()
    tokenizer = load_tokenizer(TINY_LLAMA)
    model = load_model(TINY_LLAMA, dtype="float32", device="cpu", tokenizer=tokenizer).eval()
    settings = [("all 24 steps (min_new_tokens 24), 64 prompts", 64, 1, NEW_TOKENS, False),
                ("rollout: 64 prompts, rows stop at EOS", 64, 1, 0, False),
                ("GRPO rollout: 8 prompts x 8, rows stop at EOS, LoRA policy adapter", 8, 8, 0, True)]
    rows = []
    for label, n, repeat, min_new, adapter in settings:
        if adapter:
            torch.manual_seed(0)
            for p in make_trainable(model, "policy", lora_r=8, lora_alpha=16, lora_targets=["all-linear"]):
                p.data.normal_(0, 0.02)  # a trained-looking policy: B != 0
        ids, mask = prompts(tokenizer, n, repeat)
        t = measure(model, tokenizer, ids, mask, min_new, args.repeats)
        rows.append((label, t))
        print(f"{label}: " + ", ".join(f"{k} {w * 1000:.0f} ms ({c * 1000:.0f} ms CPU)" for k, (w, c) in t.items()),
              file=sys.stderr)
    lines = ["| setting | sample | sample, engine=\"hf\" | generate | generate / sample (wall) | (CPU) | target "
             "| met? |", "|---|---|---|---|---|---|---|---|"]
    for label, t in rows:
        ratio_wall, ratio_cpu = t["generate"][0] / t["sample"][0], t["generate"][1] / t["sample"][1]
        lines.append(f"| {label} | {t['sample'][0] * 1000:.0f} ms | {t['sample (hf)'][0] * 1000:.0f} ms | "
                     f"{t['generate'][0] * 1000:.0f} ms | {ratio_wall:.2f} | {ratio_cpu:.2f} | >= {TARGET:.1f} | "
                     f"{'yes' if ratio_wall >= TARGET else '**no**'} |")
    block = (f"Measured {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, {args.threads} thread(s); "
             f"load average {load} at the start, {load_average()} at the end; "
             f"{time.time() - started:.0f} s.\n\nCommand: `python dev/sampler.py`\n\n" + "\n".join(lines))
    print(block)
    if not args.no_write:
        write_doc(args.out, block, MARK_BEGIN, MARK_END, new_section=SECTION)


if __name__ == "__main__":
    main()
