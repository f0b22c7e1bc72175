"""The GPU check: every script on CUDA in bf16, fp16 and 4-bit, 135M-shaped steps with tokens/s and peak CUDA memory,
and the first steps' losses on CUDA against the CPU's. One table; exit status 1 if any check fails.

    python dev/gpu_check.py                       # on a machine with one CUDA GPU
    python dev/gpu_check.py --device cpu --quick  # the same logic on the CPU, small: a smoke test (12 minutes on
                                                  # 2 shared cores; CPU fp16 matmuls are slow)

The three parts (every run is a real `python train_*.py` subprocess, through this file's --child wrapper, which
records the process's torch.cuda.max_memory_allocated at exit):
1. every script (SFT, reward, DPO, PPO, GRPO, REINFORCE) on the embedded tiny model, builtin data, its default
   settings but a few steps (TINY_RUN), in --dtype bfloat16, --dtype float16 and --quantization 4bit. Checks: it
   exits 0, finishes, its frozen base is bit-identical (params/frozen_unchanged), its last loss is finite, it moved
   (supervised: the last logged loss differs from the first; RL: eval/kl after training > 0, the policy left the
   reference), and on CUDA its summary.json reports CUDA memory (a memory/cuda* key).
2. 135M-shaped steps (dev/run.py's SMOL_135M, random weights, built locally; the tiny tokenizer), raw-schema rows
   of exactly 512 prompt + 512 response tokens (dev/real_shapes.write_data): a reward step (LoRA, --dtype auto,
   8 pairs of 1024 tokens), the QLoRA DPO recipe exactly as examples/qlora_dpo_r1.sh writes it (4-bit, fp16, r=1,
   8 pairs of 1024 tokens, 8 steps: how many steps fp16's loss scaling skips is in the row), and a PPO iteration
   (16 responses of 512 prompt + 256 new tokens, on that reward model). Reported: seconds per step (the median
   interval between metrics.jsonl rows, polled every 20 ms, first step left out), tokens/s (the tokens the trained
   model reads per step / that time; DPO's reference pass and PPO's scoring passes come on top), peak CUDA memory
   (summary.json's memory/cuda_peak_bytes* keys when the script writes them, else the process's
   torch.cuda.max_memory_allocated, which includes the evaluations).
3. CPU vs CUDA: SFT, reward and DPO on the tiny model (deterministic data and steps: the RL scripts sample, and a CUDA
   generator draws other numbers than a CPU one) in float32 on the CPU, against CUDA float32 / bfloat16 / float16.
   Every logged step's loss must agree within the dtype's tolerance, |cuda - cpu| <= tol x max(|cpu|, 1):
     float32   1e-4  the same arithmetic in another order (cuBLAS / CPU reductions; TF32 is off for matmuls by
                     default, and minirlhf does not turn it on: with TF32, 10-bit mantissas, this would need ~1e-2):
                     single ops agree to ~1e-6 relative; 1e-4 leaves room for AdamW, whose first steps are
                     lr x sign(gradient) and flip where a gradient is ~0, while a real bug (a mask, a shift) moves a
                     loss by 1e-2 or more;
     bfloat16  2e-2  8-bit mantissa, unit roundoff 2^-9 = 2e-3 for the stored base and every matmul output; a loss
                     averages many such errors (~1e-3 seen), 2e-2 is ten units;
     float16   5e-3  11-bit mantissa, unit roundoff 2^-12 = 2.4e-4; 5e-3 is twenty units. Steps after one that the
                     fp16 loss scaler skipped (its gradients overflowed) are not compared: the CPU run did update.
   (in --device cpu mode both sides run on the CPU: this checks the logic, not CUDA.)

Needs the packages `pip install -e .` installs; without bitsandbytes the 4-bit rows are skipped with a line saying so
(and the DPO recipe runs on a bf16 base); without datasets nothing can load data, and the check stops at once saying
so.
"""
import argparse
import concurrent.futures
import importlib
import importlib.util
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

DEV = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DEV)
SCRIPTS = ("train_sft.py", "train_reward.py", "train_dpo.py", "train_ppo.py", "train_grpo.py", "train_reinforce.py")
SUPERVISED = ("train_sft.py", "train_reward.py", "train_dpo.py")
# Part 1 and 3: the defaults, but a few steps with a row per step and small evaluations.
TINY_RUN = {
    "train_sft.py": ["--max-steps", "4", "--log-every", "1", "--eval-every", "4"],
    "train_reward.py": ["--max-steps", "4", "--eval-every", "1", "--max-eval-pairs", "64"],
    "train_dpo.py": ["--max-steps", "4", "--log-every", "1", "--max-eval-pairs", "64", "--eval-prompts", "16",
                     "--eval-samples", "1"],
    "train_ppo.py": ["--iterations", "2", "--eval-prompts", "16", "--eval-samples", "1"],
    "train_grpo.py": ["--iterations", "2", "--eval-prompts", "16", "--eval-samples", "1"],
    "train_reinforce.py": ["--iterations", "2", "--eval-prompts", "16", "--eval-samples", "1"],
}
VARIANTS = {"bf16": ["--dtype", "bfloat16"], "fp16": ["--dtype", "float16"], "4bit": ["--quantization", "4bit"]}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}  # part 3: see the module docstring
QLORA_RECIPE = os.path.join(REPO, "examples", "qlora_dpo_r1.sh")
real_shapes = common = None  # dev/real_shapes.py and bench/common.py, imported by main() (--child needs neither)


def child(result_path, script, argv):
    """--child: run `script argv` in this process as `python script argv` would, and write its peak CUDA memory
    (torch.cuda.max_memory_allocated / reserved; {} without CUDA) to result_path at exit, whatever the exit."""
    import atexit

    import torch

    def record():
        peak = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = {"max_allocated": torch.cuda.max_memory_allocated(),
                    "max_reserved": torch.cuda.max_memory_reserved()}
        with open(result_path, "w") as f:
            json.dump(peak, f)
    atexit.register(record)
    sys.argv = [script, *argv]
    sys.path[0] = REPO  # as `python script` would have it (instead of this file's folder)
    import runpy
    runpy.run_path(os.path.join(REPO, script), run_name="__main__")


class Checker:
    """Runs the scripts (dev/real_shapes.run_command through the --child wrapper) and gathers the table's rows."""

    def __init__(self, device, work, threads):
        self.device, self.work, self.threads, self.rows = device, work, threads, []
        self.numbers = itertools.count(1)  # run folders 01-..., 02-...; next() is atomic: runs start from threads

    def run(self, name, argv, poll=0.2, timeout=600):
        """`python argv...` with --out in the work folder; the run_command result plus the child's CUDA peak."""
        out = os.path.join(self.work, f"{next(self.numbers):02d}-{name}")
        argv = [*argv, "--out", out, "--seed", "0", "--threads", str(self.threads)]
        peak_file, log = out + ".cuda.json", out + ".log"
        result = real_shapes.run_command(argv, log, self.threads, timeout,
                                         prefix=(os.path.abspath(__file__), "--child", peak_file), poll=poll)
        result["cuda"] = json.load(open(peak_file)) if os.path.isfile(peak_file) else {}
        result.update(log=log, out=out)
        return result

    def add(self, part, script, setting, value, ok, why=""):
        self.rows.append(dict(part=part, script=script, setting=setting, value=value, ok=ok, why=why))

    def table(self):
        mark = {True: "ok", False: "**FAIL**", None: "skipped"}
        lines = ["| part | script | setting | result | check |", "|---|---|---|---|---|"]
        lines += [f"| {r['part']} | {r['script']} | {r['setting']} | {r['value']} | {mark[r['ok']]}"
                  + (f": {r['why']}" if r["why"] else "") + " |" for r in sorted(self.rows, key=lambda r: r["part"])]
        return "\n".join(lines)


def losses(result):
    """{step: loss} of a run's metrics.jsonl rows (train/loss, or loss/total for RL)."""
    out = {}
    for _, row in result["rows"]:
        key = next((k for k in ("train/loss", "loss/total") if k in row), None)
        if key:
            out[row["step"]] = row[key]
    return out


def cuda_memory(result):
    """(bytes, where from): summary.json's memory/cuda_peak_bytes* (the largest), any memory/cuda* key, or the
    process's max_memory_allocated from the --child wrapper."""
    summary = result["summary"]
    for prefix in ("memory/cuda_peak_bytes", "memory/cuda"):
        keys = [k for k in summary if k.startswith(prefix) and isinstance(summary[k], (int, float))]
        if keys:
            return max(summary[k] for k in keys), ", ".join(sorted(keys))
    if result["cuda"].get("max_allocated"):
        return result["cuda"]["max_allocated"], "process max_memory_allocated"
    return None, "none"


def failure(result):
    """Why a run failed (its exit status and last log line), or None."""
    if result["returncode"] == 0:
        return None
    lines = [line.strip() for line in open(result["log"]) if line.strip()]
    return f"exit {result['returncode']}: {(lines[-1] if lines else '')[:200]}"


def check_run(result, script, device):
    """(value text, ok, why) of a part-1 run (module docstring)."""
    broken = failure(result)
    if broken:
        return "-", False, broken
    summary, steps = result["summary"], losses(result)
    problems = []
    if summary.get("train/finished") is False:
        problems.append("did not finish")
    if summary.get("params/frozen_unchanged") is not True:
        problems.append(f"params/frozen_unchanged = {summary.get('params/frozen_unchanged')}")
    first, last = (steps[min(steps)], steps[max(steps)]) if steps else (None, None)
    if last is None or not math.isfinite(last):
        problems.append(f"last loss {last}")
    skipped = real_shapes.skipped_steps(result["rows"])
    if script in SUPERVISED:
        moved = first is not None and last != first
        value = f"loss {first:.4g} -> {last:.4g}" if steps else "no loss logged"
    else:
        kl = summary.get("eval/kl")
        moved = kl is not None and kl > 0
        value = (f"loss {first:.4g} -> {last:.4g}, " if steps else "") + f"eval/kl {kl:.3g}" if kl is not None \
            else "no eval/kl in summary.json"
    if not moved:
        problems.append("did not move")
    if skipped:
        value += f"; steps {skipped} skipped (non-finite gradients)"
    if device == "cuda":
        peak, source = cuda_memory(result)
        if not source.startswith("memory/cuda"):
            problems.append("summary.json has no memory/cuda* key")
        value += f"; CUDA peak {peak / 2**20:,.0f} MiB" if peak else ""
    return value, not problems, "; ".join(problems)


def part_tiny(checker, device, has_4bit, pool):
    """Parts 1 and 3 on the tiny model: returns {(script, dtype): result} for part 3."""
    jobs = {}
    for script in SCRIPTS:
        for variant, flags in VARIANTS.items():
            if variant == "4bit" and not has_4bit:
                checker.add("1 tiny", script, variant, "-", None, "bitsandbytes is not installed: 4-bit not run")
                continue
            jobs[(script, variant)] = pool.submit(checker.run, f"{script[6:-3]}-{variant}",
                                                  [script, "--device", device, *flags, *TINY_RUN[script]])
    for script in SUPERVISED:  # part 3's references: float32 on the CPU, float32 on the device
        jobs[(script, "cpu-float32")] = pool.submit(checker.run, f"{script[6:-3]}-cpu-fp32",
                                                    [script, "--device", "cpu", "--dtype", "float32",
                                                     *TINY_RUN[script]])
        jobs[(script, "float32")] = pool.submit(checker.run, f"{script[6:-3]}-{device}-fp32",
                                                [script, "--device", device, "--dtype", "float32",
                                                 *TINY_RUN[script]])
    results = {key: job.result() for key, job in jobs.items()}
    for (script, variant), result in results.items():
        if variant in VARIANTS:
            flags = " ".join(VARIANTS[variant])
            checker.add("1 tiny", script, flags, *check_run(result, script, device))
    return results


def part_compare(checker, device, results):
    """Part 3: each logged step's loss against the CPU float32 run, within the dtype's tolerance."""
    names = {"float32": "float32", "bfloat16": "bf16", "float16": "fp16"}
    for script in SUPERVISED:
        reference = results[(script, "cpu-float32")]
        for dtype, key in names.items():
            result = results.get((script, key))
            setting = f"CPU float32 vs {device} {dtype} (tol {TOLERANCE[dtype]:g})"
            broken = failure(reference) or (failure(result) if result else "not run")
            if broken:
                checker.add("3 cpu vs cuda", script, setting, "-", False, broken)
                continue
            cpu, other = losses(reference), losses(result)
            skipped = real_shapes.skipped_steps(result["rows"])
            compared = [s for s in sorted(cpu) if s in other and not any(k < s for k in skipped)]
            worst = max((abs(other[s] - cpu[s]) / max(abs(cpu[s]), 1.0) for s in compared), default=None)
            ok = bool(compared) and worst <= TOLERANCE[dtype]
            note = f"; after step {min(skipped)} (skipped by fp16 loss scaling) not compared" if skipped else ""
            value = (f"steps {compared[0]}-{compared[-1]}: worst {worst:.2g} (step {compared[0]}: "
                     f"{cpu[compared[0]]:.6g} vs {other[compared[0]]:.6g}){note}") if compared else "no step compared"
            checker.add("3 cpu vs cuda", script, setting, value, ok,
                        "" if ok else "outside the tolerance" if compared else "no common step")


def part_135m(checker, device, has_4bit, quick):
    """Part 2: 135M-shaped reward, QLoRA DPO (the recipe) and PPO steps: s/step, tokens/s, peak CUDA memory."""
    from transformers import AutoTokenizer
    model = os.path.join(checker.work, "smol-135m")
    _, n_params = real_shapes.build_model(model, layers=2 if quick else None)
    prompt, response, new_tokens = (24, 24, 16) if quick else (512, 512, 256)
    max_length = prompt + response  # every row fills max_length: prompt + response + EOS, cut at max_length
    lengths = {"juyoungml/HelpSteer2-binarized": dict(prompt=(prompt, prompt), response=(response, response))}
    data = real_shapes.write_data(checker.work, AutoTokenizer.from_pretrained(model), lengths, rows=16)
    data = data["juyoungml/HelpSteer2-binarized"]
    label = f"{'2-layer' if quick else 'SmolLM2-135M'}-shaped ({n_params / 1e6:.0f} M)"
    data_flags = ["--model", model, "--dataset", "juyoungml/HelpSteer2-binarized", "--data-files", data,
              "--device", device, "--max-prompt-length", str(prompt)]

    def report(name, result, tokens_per_step, setting):
        broken = failure(result)
        if broken:
            checker.add("2 135M", name, setting, "-", False, broken)
            return
        times = [t for t, _ in result["rows"]]
        intervals = [b - a for a, b in zip(times, times[1:])]  # row k is written at the end of step k
        step = statistics.median(intervals) if intervals else None
        peak, source = cuda_memory(result)
        skipped = real_shapes.skipped_steps(result["rows"])
        value = (f"{step:.3f} s/step, {tokens_per_step / step:,.0f} tokens/s" if step else "no step timed") + (
            f"; peak CUDA {peak / 2**20:,.0f} MiB ({source})" if peak else "")
        if skipped:
            value += f"; steps {skipped} of {len(times)} skipped by fp16 loss scaling"
        frozen = result["summary"].get("params/frozen_unchanged")
        problems = [text for bad, text in ((step is None, "fewer than 2 logged steps"),
                                           (frozen is not True, f"params/frozen_unchanged = {frozen}"),
                                           (times and len(skipped) == len(times), "every step was skipped"))
                    if bad]
        checker.add("2 135M", name, setting, value, not problems, "; ".join(problems))

    reward = checker.run("135m-reward", ["train_reward.py", *data_flags, "--dtype", "auto", "--batch-size", "8",
                                         "--max-length", str(max_length), "--max-steps", "6", "--eval-every", "1",
                                         "--max-eval-pairs", "1"], poll=0.02)
    report("train_reward.py", reward, 16 * max_length,
           f"{label}, LoRA r=16, --dtype auto, 8 pairs x {max_length} tokens")
    # the QLoRA DPO workshop recipe as written, with local model and data and a minimal sampling evaluation
    recipe, = common.recipe_commands(QLORA_RECIPE, {"MODEL": model, "OUT": "unused"})
    recipe = common.with_flags(recipe, data_files=data, device=device, log_every=1, eval_prompts=1,
                                    eval_samples=1, max_new_tokens=32, max_eval_pairs=8)
    out_at = recipe.index("--out")
    del recipe[out_at:out_at + 2]  # checker.run sets --out
    setting = "examples/qlora_dpo_r1.sh: 4-bit, fp16, r=1 q/v, 8 pairs x 1024 tokens, 8 steps"
    if not has_4bit:
        recipe = common.with_flags(recipe, quantization="none")
        setting += " (bitsandbytes missing: a 16-bit base, not 4-bit)"
    if quick:
        recipe = common.with_flags(recipe, max_length=max_length, max_prompt_length=prompt, max_steps=3,
                                        batch_size=4)
        setting += f" (--quick: {max_length} tokens, 3 steps of 4 pairs)"
    dpo = checker.run("135m-dpo-qlora", recipe, poll=0.02)
    report("train_dpo.py", dpo, 2 * int(common.flag_value(recipe, "--batch-size"))
           * int(common.flag_value(recipe, "--max-length")), label + ", " + setting)
    if failure(reward):
        checker.add("2 135M", "train_ppo.py", label, "-", False, "not run: the reward model's run failed")
        return
    rollout = 4 if quick else 16
    ppo = checker.run("135m-ppo", ["train_ppo.py", *data_flags, "--dtype", "auto", "--reward-model",
                                   os.path.join(reward["out"], "reward_model"),
                                   "--iterations", "4", "--rollout-size", str(rollout), "--minibatch-size",
                                   str(rollout // 2), "--ppo-epochs", "1", "--max-new-tokens", str(new_tokens),
                                   "--eval-every", "0", "--eval-prompts", "1", "--eval-samples", "1"], poll=0.02)
    report("train_ppo.py", ppo, rollout * (prompt + new_tokens),
           f"{label}, --dtype auto, rollout {rollout} x ({prompt} prompt + {new_tokens} new tokens), 2 minibatches")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) | cpu (a smoke test of this script)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer model and short rows in part 2")
    parser.add_argument("--parts", nargs="+", default=["1", "2", "3"], choices=["1", "2", "3"],
                        help="which parts to run (the module docstring); part 3 runs part 1's jobs too")
    parser.add_argument("--jobs", type=int, default=None, help="tiny-model runs at a time (default 4 on CUDA, 1 on "
                        "the CPU); part 2 always runs alone")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of every run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal: see child()
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2:])
    global real_shapes, common
    sys.path[:0] = [REPO, DEV, os.path.join(REPO, "bench")]
    real_shapes, common = importlib.import_module("real_shapes"), importlib.import_module("common")
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dev/gpu_check.py: error: no CUDA device; on a CPU run `--device cpu --quick` (a smoke test "
                         "of this script's logic)")
    if importlib.util.find_spec("datasets") is None:
        raise SystemExit("dev/gpu_check.py: error: the datasets package is missing: every script loads its data "
                         "with it (pip install -e . installs it)")
    has_4bit = importlib.util.find_spec("bitsandbytes") is not None
    if not has_4bit:
        print("bitsandbytes is not installed: the 4-bit rows are skipped (pip install -e . installs it)",
              file=sys.stderr)
    start = time.time()
    work = tempfile.mkdtemp(prefix="minirlhf-gpu-check-")
    checker = Checker(args.device, work, threads=args.threads)
    try:
        jobs = args.jobs or (4 if args.device == "cuda" else 1)
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            if {"1", "3"} & set(args.parts):  # part 3 compares runs of part 1 with CPU runs
                results = part_tiny(checker, args.device, has_4bit, pool)
        if "3" in args.parts:
            part_compare(checker, args.device, results)
        if "2" in args.parts:
            part_135m(checker, args.device, has_4bit, args.quick)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"dev/gpu_check.py on {name}: torch {torch.__version__}; {time.time() - start:.0f} s\n")
    print(checker.table())
    failed = [r for r in checker.rows if r["ok"] is False]
    print(f"\n{len(failed)} check(s) failed" if failed else "\nevery check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
