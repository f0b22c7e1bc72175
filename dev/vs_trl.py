"""minirlhf side by side with TRL: a DPO step, a reward-model step and GRPO end to end, same settings, whole processes.

    python dev/vs_trl.py                         # all three, 1 thread, ~7 minutes; writes docs/benchmarks.md
    python dev/vs_trl.py --jobs dpo,reward       # a subset (also: dpo-precompute, both sides precomputing the
                                                   # reference log-probs before training)
    python dev/vs_trl.py --quick --no-write      # a smoke run (~3 minutes): 2 and 4 steps, 3 GRPO iterations

Needs TRL (an optional extra, never imported by minirlhf/, the train_*.py scripts or the tests):
    pip install -e ".[bench]" -c constraints.txt   # TRL 1.16.0; its side is dev/trl_jobs.py

Every measurement is a whole process (python train_*.py ... or python dev/trl_jobs.py ...) timed from start to
exit by this script: imports, loading, data, training, saving. Both run with the same --threads
(torch.set_num_threads and OMP_NUM_THREADS), on the embedded tiny Llama (minirlhf.assets.TINY_LLAMA), in float32 on
the CPU, on the built-in world's data (minirlhf.data, `--dataset builtin`). Run it on an otherwise idle machine: the
numbers are wall-clock times, and the header records the load average at the start and the end.

- DPO and reward-model step: each side is run for two step counts (--steps, default 10 and 60) and a step costs
  (t(60) - t(10)) / 50: start-up, data preparation and the scripts' evaluations cancel. Each process runs --repeats
  times (default 2), the sides alternating, and the fastest counts: contention only adds time, and at ~0.1-0.3 s a
  step a few seconds of it would swamp 20 steps' difference. The training loops' own clocks (minirlhf's
  summary.json time/train_seconds, TRL's train_runtime) give a second estimate, printed under the table.
  16 pairs a step, LoRA r 16, alpha 32 on every linear but the LM head, no LoRA dropout, the learning rate, warmup
  and beta of train_dpo.py / train_reward.py, max length 64. minirlhf's evaluations are cut to one prompt / pair
  (they run once per process and cancel); TRL's are off. DPO's reference is the base with the adapter disabled,
  computed every step on both sides (train_dpo.py's default, TRL's with a PEFT model); the dpo-precompute job has
  both precompute it.
  TRL gets the same pairs as text, each prompt rendered by the chat template; the tokens it trains on are compared
  with minirlhf's, row by row (the table of the data each side trained on).
- GRPO: `train_grpo.py --reward gold --eval-every 0` with its defaults against GRPOTrainer configured to do the same
  work (dev/trl_jobs.py: groups of G, the rollout size as generation batch, the minibatch as train batch, the
  epochs as num_iterations, the same clip, beta, k3 KL, token-mean loss, schedule, LoRA and sampling), the gold
  score as reward function. minirlhf's process also samples and scores 240 held-out responses before and after
  training (TRL's evaluates nothing): its summary.json's time/train_seconds (the training loop) is reported next to
  TRL's train_runtime. Then, outside the timed processes, both adapters are scored by ONE evaluator, minirlhf's own
  (evaluation.evaluate_policy as train_grpo.py's final evaluation runs it: same prompts, samples and seed).
Targets (TRL time / minirlhf time): DPO step >= 4, reward-model step >= 2.5, GRPO end to end >= 2.0 with a gold
score after training at least TRL's.

    python dev/vs_trl.py --model smollm2 --jobs grpo           # GRPO on SmolLM2-135M-Instruct, 2 threads, ~3 minutes
    python dev/vs_trl.py --model smollm2 --quick --no-write    # a smoke run: 1 iteration

- GRPO on a real model (`--model smollm2`, the grpo job only; its own block in docs/benchmarks.md): SmolLM2-135M-
  Instruct from minirlhf's converted folder (minirlhf.hub.resolve_model_source), loaded by both sides with the
  same tokenizer, chat template and pad token: minirlhf adds "<|pad|>" (SmolLM2 pads with its EOS) and grows the
  embeddings to 49216 rows (minirlhf.padding); dev/trl_jobs.py applies the same two functions to TRL's tokenizer
  and model. The work is examples/smollm2_cpu.sh's GRPO stage, shortened (SMOLLM2_GRPO: 3 iterations x 16
  completions, G 4, minibatch 8, 2 epochs, 16 new tokens, lr 2e-4, beta 0.1, temperature 0.7), mapped onto
  GRPOTrainer as the tiny job's, 2 threads a process unless --threads says otherwise; minirlhf with the recipe's
  update layout (SMOLLM2_UPDATE: --group-minibatches --micro-batch-size 4). minirlhf's held-out
  evaluations (before and after training) are cut to one prompt, one sample and subtracted; the table adds each
  process's CPU seconds and peak resident memory (its VmHWM, read from /proc while it runs). Both adapters are then
  scored by minirlhf's evaluator on the recipe's 48 prompts x 2 samples (three iterations move little: reported,
  not a condition). Targets: TRL time / minirlhf time >= 3.5 (minirlhf's process less its evaluations), minirlhf's
  peak RSS <= 1.5 GiB.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
from importlib.metadata import version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the train_*.py scripts, for their Args (the settings both sides are given); bench/common.py
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

from common import OFFLINE, load_average, machine, run_script, write_doc  # noqa: E402

import torch  # noqa: E402

import train_dpo  # noqa: E402
import train_grpo  # noqa: E402
import train_reward  # noqa: E402
from minirlhf.assets import TINY_LLAMA  # noqa: E402
from minirlhf.hub import resolve_model_source  # noqa: E402
from minirlhf.phases import format_totals  # noqa: E402

JOBS = ("dpo", "dpo-precompute", "reward", "grpo")
DEFAULT_JOBS = "dpo,reward,grpo"
TARGETS = {"dpo": 4.0, "dpo-precompute": None, "reward": 2.5, "grpo": 2.0}  # TRL time / minirlhf time
PAIRS_PER_STEP = 16
QUICK_STEPS, QUICK_ITERATIONS = (2, 4), 3
NO_TRL = 'vs_trl.py: error: TRL is not installed: pip install -e ".[bench]" -c constraints.txt'
MARK_BEGIN, MARK_END = "<!-- dev/vs_trl.py: begin (generated) -->", "<!-- dev/vs_trl.py: end -->"
# --model: "tiny" (the embedded tiny Llama, every job) or "smollm2" (SmolLM2-135M-Instruct, the grpo job only)
MODELS = {"tiny": TINY_LLAMA, "smollm2": "smollm2"}
# examples/smollm2_cpu.sh's GRPO stage (its lr, beta, temperature, rollout, group and minibatch), shortened to 3
# iterations of 16 new tokens; every other setting is train_grpo.py's default, as in the tiny job
SMOLLM2_GRPO = dict(iterations=3, rollout_size=16, group_size=4, minibatch_size=8, ppo_epochs=2, max_new_tokens=16,
                    lr=2e-4, beta=0.1, temperature=0.7)
SMOLLM2_QUICK_ITERATIONS = 1
# minirlhf's update layout in the recipe: minibatches of whole groups (each prompt computed once per minibatch; every
# response still in one minibatch per epoch, as TRL's) in micro-batches of one group (memory). TRL: its own layout.
SMOLLM2_UPDATE = ["--group-minibatches", "--micro-batch-size", "4"]
SMOLLM2_THREADS = 2  # the recipe's THREADS: both cores of a laptop-sized CPU
SMOLLM2_EVAL = dict(prompts=48, samples=2)  # the recipe's held-out evaluation, for scoring both adapters afterwards
SMOLLM2_QUICK_EVAL = dict(prompts=4, samples=1)
SMOLLM2_TARGETS = {"grpo": 3.5, "peak_rss_mib": 1536}  # TRL time / minirlhf time; minirlhf's peak RSS (1.5 GiB)
SMOLLM2_BEGIN = "<!-- dev/vs_trl.py --model smollm2: begin (generated) -->"
SMOLLM2_END = "<!-- dev/vs_trl.py --model smollm2: end -->"
SECTION = ("## minirlhf vs TRL (dev/vs_trl.py)\n\n`python dev/vs_trl.py` writes the block below: the same jobs "
           "run by minirlhf's scripts and by TRL's\ntrainers, each a whole process, on identical settings; the notes "
           "after it are written by hand.")


# ------------------------------------------------------------------------------------- what each side is given
def pair_settings(job):
    """The settings of a DPO or reward-model job, from the script's own defaults (16 pairs a step): both sides'."""
    script = train_reward if job == "reward" else train_dpo
    a = script.Args()
    s = dict(batch_size=PAIRS_PER_STEP, lr=a.lr, warmup_steps=a.warmup_steps, max_length=a.max_length,
             max_prompt_length=a.max_prompt_length, lora_r=a.lora_r, lora_alpha=a.lora_alpha, grad_clip=a.grad_clip,
             seed=a.seed, forward_batch_size=a.forward_batch_size)
    if job != "reward":
        s.update(beta=a.beta, precompute_ref=job == "dpo-precompute")
    return s


def grpo_settings(quick, seed=None, model="tiny"):
    """train_grpo.py's defaults (--reward gold), both sides' (3 iterations with --quick; another seed with --seed);
    with model "smollm2", SMOLLM2_GRPO's settings over them (1 iteration with --quick)."""
    a = train_grpo.Args(**(SMOLLM2_GRPO if model == "smollm2" else {}))
    keys = ("iterations", "rollout_size", "group_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
            "max_prompt_length", "lr", "warmup_iterations", "beta", "clip_eps", "clip_high", "lora_r", "lora_alpha",
            "temperature", "top_k", "top_p", "min_new_tokens", "grad_clip", "advantage_std", "loss_aggregation",
            "missing_eos_penalty", "seed")
    s = {k: getattr(a, k) for k in keys}
    if seed is not None:
        s["seed"] = seed
    if quick:
        s["iterations"] = SMOLLM2_QUICK_ITERATIONS if model == "smollm2" else QUICK_ITERATIONS
    s["model"] = model
    return s


def ours_command(job, s, threads, out, steps=None):
    """minirlhf's side: the script and its flags, every setting that matters written out."""
    common = ["--threads", str(threads), "--dtype", "float32", "--seed", str(s["seed"]), "--save-every", "0",
              "--out", out]
    lora = ["--lora-r", str(s["lora_r"]), "--lora-alpha", str(s["lora_alpha"]), "--lora-targets", "all-linear"]
    if job == "grpo":  # the settings a smollm2 run changes written out (for the tiny model, train_grpo.py's defaults)
        work = [x for k in ("iterations", "rollout_size", "group_size", "minibatch_size", "ppo_epochs",
                            "max_new_tokens", "lr", "beta", "temperature") for x in ("--" + k.replace("_", "-"),
                                                                                     str(s[k]))]
        # on SmolLM2 the held-out evaluations before and after training are cut to one prompt, one sample
        model = (["--model", "smollm2", "--eval-prompts", "1", "--eval-samples", "1", *SMOLLM2_UPDATE]
                 if s["model"] == "smollm2" else [])
        return ["train_grpo.py", *model, "--reward", "gold", "--eval-every", "0", *work, *lora, *common]
    pairs = ["--batch-size", str(s["batch_size"]), "--max-steps", str(steps), "--lr", str(s["lr"]),
             "--warmup-steps", str(s["warmup_steps"]), "--max-length", str(s["max_length"]),
             "--max-prompt-length", str(s["max_prompt_length"]), *lora, *common]
    if job == "reward":  # evaluated once, after the last step (--eval-every above it), on 16 held-out pairs
        return ["train_reward.py", "--loss", "bt", *pairs, "--eval-every", "1000000", "--max-eval-pairs", "16"]
    # DPO: the sampling evaluation before and after on one held-out prompt, the pair evaluation on one pair
    return ["train_dpo.py", "--loss", "sigmoid", "--beta", str(s["beta"]), *pairs, "--eval-every", "0",
            "--eval-prompts", "1", "--eval-samples", "1", "--max-eval-pairs", "1",
            *(["--precompute-ref"] if s["precompute_ref"] else [])]


def trl_spec(job, s, threads, out, steps=None):
    """TRL's side: the JSON dev/trl_jobs.py reads (the same numbers)."""
    model = resolve_model_source(MODELS[s.get("model", "tiny")])  # "smollm2" -> its converted folder
    return dict(s, job="dpo" if job.startswith("dpo") else job, threads=threads, out=out, model=model,
                **({"steps": steps} if steps is not None else {}))


# ------------------------------------------------------------------------------------------------ arithmetic
def step_seconds(t_short, t_long, steps):
    """Seconds per step from whole-process times at two step counts: start-up and once-per-run work cancel."""
    short, long_ = steps
    return (t_long - t_short) / (long_ - short)


def verdict(ratio, target, gold_ok=True):
    """'yes' / '**no**' against a target on TRL time / minirlhf time ('' without a target)."""
    if target is None:
        return ""
    return "yes" if ratio >= target and gold_ok else "**no**"


def token_check(ours_rows, trl_rows):
    """Mean tokens per row on each side and how many rows are the same token ids (rows in the same order)."""
    def mean(rows):
        return sum(len(r) for r in rows) / max(1, len(rows))
    same = sum(a == b for a, b in zip(ours_rows, trl_rows)) if len(ours_rows) == len(trl_rows) else 0
    return dict(ours=mean(ours_rows), trl=mean(trl_rows), same=same, rows=len(ours_rows), trl_rows=len(trl_rows))


def ours_tokens(job, s):
    """The token rows minirlhf trains on: prompt + response of every pair (chosen rows, then rejected), or the
    prompts of GRPO; as train_*.py tokenise them."""
    from minirlhf.data import load_preference_dataset, load_prompt_dataset
    from minirlhf.data.tokenize import tokenize_preference_dataset, tokenize_prompt_dataset
    from minirlhf.models import load_tokenizer
    with contextlib.redirect_stdout(sys.stderr):  # smollm2: a line on its pad token, not the table's output
        tokenizer = load_tokenizer(MODELS[s.get("model", "tiny")])
    if job == "grpo":
        return [list(x) for x in tokenize_prompt_dataset(load_prompt_dataset("builtin", split="train"), tokenizer,
                                                         s["max_prompt_length"])["prompt_ids"]]
    data = tokenize_preference_dataset(load_preference_dataset("builtin", split="train"), tokenizer,
                                       s["max_length"], s["max_prompt_length"])
    prompts = list(data["prompt_ids"])
    return ([p + c for p, c in zip(prompts, data["chosen_ids"])]
            + [p + r for p, r in zip(prompts, data["rejected_ids"])])


def trl_tokens(job, out):
    """The same rows as TRL tokenised them (dev/trl_jobs.py's tokens.json)."""
    with open(os.path.join(out, "tokens.json")) as f:
        t = json.load(f)
    if job == "grpo":
        return t["prompt_ids"]
    if "prompt_ids" in t:  # DPOTrainer: prompt and responses apart
        return ([p + c for p, c in zip(t["prompt_ids"], t["chosen_ids"])]
                + [p + r for p, r in zip(t["prompt_ids"], t["rejected_ids"])])
    return t["chosen_ids"] + t["rejected_ids"]  # RewardTrainer: whole rows


# ------------------------------------------------------------------------------------------------- processes
def run_process(argv, threads, log, label, children=None):
    """Run one whole process (python argv...) from the repo root; returns (wall seconds, the JSON line it printed last).
    Its output goes to `log`; on failure one line names the job and the log's tail is shown. `children`: a dict that
    gets children[label] = the finished bench/common.py Child: its CPU seconds (user + sys, from wait4) and its peak
    resident memory (peak_rss_bytes: its VmHWM, read from /proc while it runs, so nothing of this parent is counted;
    wait4's ru_maxrss would be: a child started by vfork + exec inherits the parent's high-water mark)."""
    child = run_script(argv, log, threads, OFFLINE)
    if child.returncode != 0:
        sys.stderr.write(child.tail())
        raise SystemExit(f"vs_trl.py: error: {label} failed (exit {child.returncode}); its output is in {log}")
    print(f"  {label:<40} {child.wall_seconds:7.1f} s  CPU {child.cpu_seconds:6.1f} s  peak RSS "
          f"{child.peak_rss_bytes / 2**20:,.0f} MiB",
          file=sys.stderr, flush=True)
    if children is not None:
        children[label] = child
    return child.wall_seconds, child.result_line()


def trl_command(spec):
    return [os.path.join("dev", "trl_jobs.py"), json.dumps(spec)]


# ------------------------------------------------------------------------------------------------------ jobs
def measure_pair_job(job, steps, repeats, threads, tmp):
    """DPO / reward-model step: both sides at both step counts, `repeats` times, alternating sides; the fastest
    process of each (side, step count) counts (contention only ever adds time). Returns a table row and the token
    check. The training loops' own clocks (minirlhf's summary.json time/train_seconds, TRL's train_runtime) give a
    second estimate of a step, without the process start-up."""
    s = pair_settings(job)
    wall = {(side, n): [] for side in ("ours", "trl") for n in steps}
    loop = {key: [] for key in wall}
    for r in range(repeats):
        for n in steps:
            out = os.path.join(tmp, f"{job}-ours-{n}-{r}")
            wall["ours", n].append(run_process(ours_command(job, s, threads, out, n), threads, out + ".log",
                                               f"{job} minirlhf {n} steps")[0])
            with open(os.path.join(out, "summary.json")) as f:
                loop["ours", n].append(json.load(f)["time/train_seconds"])
            out = os.path.join(tmp, f"{job}-trl-{n}-{r}")
            os.makedirs(out)
            seconds, line = run_process(trl_command(trl_spec(job, s, threads, out, n)), threads, out + ".log",
                                        f"{job} TRL {n} steps")
            wall["trl", n].append(seconds)
            loop["trl", n].append(json.loads(line)["train_runtime"])
    best = {key: min(v) for key, v in wall.items()}
    ours, trl = (step_seconds(best[side, steps[0]], best[side, steps[1]], steps) for side in ("ours", "trl"))
    in_loop = {side: step_seconds(min(loop[side, steps[0]]), min(loop[side, steps[1]]), steps)
               for side in ("ours", "trl")}
    names = {"dpo": ("DPO step", "DPOTrainer"), "dpo-precompute": ("DPO step, reference precomputed", "DPOTrainer"),
             "reward": ("reward-model step (BT)", "RewardTrainer")}[job]
    setting = (f"{s['batch_size']} pairs, LoRA r {s['lora_r']} all-linear, fp32; reference "
               + ("precomputed before training" if s.get("precompute_ref") else "= adapter disabled, every step")
               if job.startswith("dpo") else
               f"{s['batch_size']} pairs, LoRA r {s['lora_r']} all-linear + linear head, fp32")

    def times(side):
        return " / ".join(f"{min(wall[side, n]):.1f}" for n in steps)
    row = dict(job=f"{names[0]} (minirlhf vs {names[1]})", setting=setting,
               ours=f"{ours:.3f} s", trl=f"{trl:.3f} s", ratio=trl / ours, target=TARGETS[job],
               met=verdict(trl / ours, TARGETS[job]),
               detail=f"fastest of {repeats} whole process(es) at {steps[0]} / {steps[1]} steps: minirlhf "
                      f"{times('ours')} s, TRL {times('trl')} s; from the training loops' own clocks: minirlhf "
                      f"{in_loop['ours']:.3f} s, TRL {in_loop['trl']:.3f} s a step "
                      f"({in_loop['trl'] / in_loop['ours']:.2f})")
    check = token_check(ours_tokens(job, s), trl_tokens(job, os.path.join(tmp, f"{job}-trl-{steps[0]}-0")))
    return [row], dict(check, job=names[0])


def measure_grpo(quick, threads, tmp, seed=None, model="tiny"):
    """GRPO end to end: minirlhf's script, then TRL's trainer, then both adapters scored by minirlhf's evaluator.
    Returns the table's rows, the token check and the gold scores (with model "smollm2": rows for CPU time and peak
    memory too, and the vocabulary both sides used in the token check)."""
    s = grpo_settings(quick, seed, model)
    smollm2 = model == "smollm2"
    ours_out, trl_out = os.path.join(tmp, "grpo-ours"), os.path.join(tmp, "grpo-trl")
    os.makedirs(trl_out)
    children = {}
    t_ours = run_process(ours_command("grpo", s, threads, ours_out), threads, ours_out + ".log",
                         f"grpo minirlhf {s['iterations']} iterations", children)[0]
    t_trl, line = run_process(trl_command(trl_spec("grpo", s, threads, trl_out)), threads, trl_out + ".log",
                              f"grpo TRL {s['iterations']} iterations", children)
    ours_child, trl_child = children.values()
    trl = json.loads(line)
    with open(os.path.join(ours_out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(ours_out, "metrics.jsonl")) as f:
        lengths = [row["rollout/length"] for row in map(json.loads, f) if "rollout/length" in row]
    # outside the timed processes: ONE evaluator (minirlhf's held-out evaluation) for the base and both adapters
    evaluation = (SMOLLM2_QUICK_EVAL if quick else SMOLLM2_EVAL) if smollm2 else None
    job = dict(threads=threads, adapters={"minirlhf": os.path.join(ours_out, "policy"),
                                          "TRL": os.path.join(trl_out, "policy")})
    if smollm2:  # the job's model and sampling; the tiny model's evaluation is train_grpo.py's defaults
        job.update(model=MODELS[model], eval_prompts=evaluation["prompts"], eval_samples=evaluation["samples"],
                   temperature=s["temperature"], max_new_tokens=s["max_new_tokens"])
    _, line = run_process([os.path.abspath(__file__), "--child-score", json.dumps(job)], threads,
                          os.path.join(tmp, "score.log"), "scoring both policies (not timed)")
    scores = json.loads(line)
    gold_ok = smollm2 or scores["minirlhf"]["eval/gold"] >= scores["TRL"]["eval/gold"]
    target = SMOLLM2_TARGETS["grpo"] if smollm2 else TARGETS["grpo"]
    iterations = f"{s['iterations']} iteration" + "s" * (s["iterations"] != 1)
    setting = (f"{iterations} x {s['rollout_size']} completions (G {s['group_size']}, "
               f"{s['ppo_epochs']} epochs, minibatch {s['minibatch_size']}, {s['max_new_tokens']} new tokens), gold "
               f"reward, LoRA r {s['lora_r']}"
               + (f", lr {s['lr']:g}, beta {s['beta']:g}, temperature {s['temperature']:g}" if smollm2 else "")
               + f"; gold after: minirlhf {scores['minirlhf']['eval/gold']:.3f}, TRL "
               f"{scores['TRL']['eval/gold']:.3f} (before {scores['base']['eval/gold']:.3f})")
    phases = format_totals(summary)  # the script's own "time:" line
    evaluated = ("one held-out prompt, one sample, before and after training" if smollm2 else
                 "its evaluations before and after training")
    # the target: on the whole processes (tiny); on SmolLM2, on minirlhf's process less its evaluations (below)
    rows = [dict(job="GRPO end to end (minirlhf vs GRPOTrainer)", setting=setting, ours=f"{t_ours:.1f} s",
                 trl=f"{t_trl:.1f} s", ratio=t_trl / t_ours, target=None if smollm2 else target,
                 met="" if smollm2 else verdict(t_trl / t_ours, target, gold_ok),
                 detail=f"whole processes; minirlhf's includes {evaluated}"
                 + (f" (its phases: {phases})" if phases else ""))]
    evaluation_seconds = summary.get("time/evaluation_seconds", 0.0)
    if evaluation_seconds > 0:  # summary.json with per-phase times: the process without minirlhf's evaluations
        ratio = t_trl / (t_ours - evaluation_seconds)
        rows.append(dict(job="GRPO end to end, minirlhf without its evaluations",
                         setting="the same two processes; minirlhf's minus its held-out evaluations",
                         ours=f"{t_ours - evaluation_seconds:.1f} s", trl=f"{t_trl:.1f} s", ratio=ratio,
                         target=target if smollm2 else None, target_text=f">= {target:.1f}" if smollm2 else None,
                         met=verdict(ratio, target) if smollm2 else "",
                         detail=f"minus summary.json's time/evaluation_seconds ({evaluation_seconds:.1f} s)"))
    rows.append(dict(job="GRPO training loop only", setting="minirlhf: summary.json time/train_seconds; TRL: "
                     "trainer.train()'s train_runtime", ours=f"{summary['time/train_seconds']:.1f} s",
                     trl=f"{trl['train_runtime']:.1f} s", ratio=trl["train_runtime"] / summary["time/train_seconds"],
                     target=None, met="", detail=""))
    if smollm2:  # CPU time (less sensitive than wall time to other work on the machine); memory: the target is on
        # minirlhf's peak alone
        cpu_ours, cpu_trl = ours_child.cpu_seconds, trl_child.cpu_seconds
        rows.append(dict(job="GRPO end to end, CPU time", setting="each whole process's user + system seconds "
                         "(minirlhf's evaluations included)", ours=f"{cpu_ours:.1f} s", trl=f"{cpu_trl:.1f} s",
                         ratio=cpu_trl / cpu_ours, target=None, met="", detail=""))
        limit, rss_ours, rss_trl = SMOLLM2_TARGETS["peak_rss_mib"], ours_child.peak_rss_bytes, trl_child.peak_rss_bytes
        rows.append(dict(job="peak resident memory (RSS)", setting="each whole process's VmHWM (/proc, polled "
                         "while it runs)", ours=f"{rss_ours / 2**20:,.0f} MiB", trl=f"{rss_trl / 2**20:,.0f} MiB",
                         ratio=rss_trl / rss_ours, target=limit, target_text=f"minirlhf <= {limit:,} MiB",
                         met="yes" if rss_ours <= limit * 2**20 else "**no**", detail=""))
    gold = dict(scores=scores, summary=summary, evaluation=evaluation,
                lengths=(sum(lengths) / max(1, len(lengths)), trl.get("completion_length", float("nan"))))
    check = token_check(ours_tokens("grpo", s), trl_tokens("grpo", trl_out))
    if smollm2:  # the vocabulary each side trained with: minirlhf's load_tokenizer / load_model, TRL's trl_jobs.py
        from minirlhf.models import load_tokenizer
        with contextlib.redirect_stdout(sys.stderr):  # it says what it did to the pad token: not the table's output
            tokenizer = load_tokenizer(MODELS[model])
        resized = re.search(r"embeddings resized \d+ -> (\d+) rows", open(ours_out + ".log").read())  # load_model's
        check["vocabulary"] = dict(ours=dict(pad_token=tokenizer.pad_token, pad_token_id=tokenizer.pad_token_id,
                                             embedding_rows=int(resized.group(1)) if resized else 0),
                                   trl=trl["vocabulary"])
    return rows, dict(check, job="GRPO prompts"), gold


def child_score(job):
    """Child process: minirlhf's held-out evaluation as train_grpo.py runs it after training (report.HeldOut:
    evaluation.evaluate_policy on the first --eval-prompts test prompts x --eval-samples, train_grpo.py's sampling
    settings and seed, the gold score) of the base and of each PEFT-format adapter in job["adapters"]. job may set
    model, eval_prompts, eval_samples, temperature and max_new_tokens (the smollm2 job); else train_grpo.py's
    defaults."""
    from minirlhf.data import world
    from minirlhf.evaluation import evaluate_policy, held_out_prompts
    from minirlhf.formats import load_adapter
    from minirlhf.lora import set_active_adapter
    from minirlhf.models import dropout_off, load_model, load_tokenizer
    from minirlhf.rollout import sampler_kwargs
    torch.set_num_threads(job["threads"])
    a = train_grpo.Args(reward="gold", **{k: job[k] for k in ("model", "eval_prompts", "eval_samples", "temperature",
                                                               "max_new_tokens") if k in job})
    tokenizer = load_tokenizer(a.model)
    model = load_model(a.model, dtype="float32", device="cpu", tokenizer=tokenizer)
    dropout_off(model)
    prompts, prompt_ids = held_out_prompts(a.dataset, a.eval_split, a.data_files, tokenizer, a.eval_prompts,
                                           a.eval_samples, a.max_prompt_length, a.template, a.system_prompt)

    def held_out():
        return evaluate_policy(model, tokenizer, prompts, prompt_ids, gold_fn=world.gold_score,
                               max_new_tokens=a.max_new_tokens, **sampler_kwargs(a), batch_size=a.forward_batch_size,
                               seed=a.seed, device="cpu")[0]
    scores = {"base": held_out()}
    for name, path in job["adapters"].items():
        load_adapter(model, path, adapter=name)  # frozen; the base with it active = that side's policy
        set_active_adapter(model, name)
        scores[name] = held_out()
    return scores


# ----------------------------------------------------------------------------------------------------- report
def table(rows):
    lines = ["| job | setting | minirlhf | TRL | TRL / minirlhf | target | met? |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        target = r.get("target_text") or (  # the smollm2 job's rows spell theirs out
            f">= {r['target']:.1f}" + (" at gold >= TRL's" if r["job"].startswith("GRPO end to end (") else "")
            if r["target"] is not None else "")
        lines.append(f"| {r['job']} | {r['setting']} | {r['ours']} | {r['trl']} | {r['ratio']:.2f} | {target} | "
                     f"{r['met']} |")
    return "\n".join(lines)


def token_table(checks):
    lines = ["| data | tokens per row, minirlhf | tokens per row, TRL | rows with the same token ids |",
             "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['job']} | {c['ours']:.2f} | {c['trl']:.2f} | {c['same']:,} of {c['rows']:,}"
                     + (f" (TRL has {c['trl_rows']:,} rows)" if c["trl_rows"] != c["rows"] else "") + " |")
    vocabularies = [c["vocabulary"] for c in checks if "vocabulary" in c]  # the smollm2 job's
    for v in vocabularies:
        ours, trl = v["ours"], v["trl"]
        same = "the same" if ours == trl else "**different**"
        lines.append(f"\nVocabulary ({same} on both sides): pad token minirlhf {ours['pad_token']!r} (id "
                     f"{ours['pad_token_id']}), TRL {trl['pad_token']!r} (id {trl['pad_token_id']}); embedding rows "
                     f"minirlhf {ours['embedding_rows']:,}, TRL {trl['embedding_rows']:,}.")
    return "\n".join(lines)


def gold_table(gold):
    s, summary, evaluation = gold["scores"], gold["summary"], gold["evaluation"] or dict(prompts=120, samples=2)
    lines = [f"| policy (scored by minirlhf's held-out evaluator: {evaluation['prompts']} prompts x "
             f"{evaluation['samples']} samples, seed 0) | eval/gold | eval/kl (nats) | eval/length (tokens) |",
             "|---|---|---|---|"]
    for name, label in (("base", "base (before training)"), ("minirlhf", "minirlhf's GRPO adapter"),
                        ("TRL", "TRL's GRPO adapter")):
        m = s[name]
        lines.append(f"| {label} | {m['eval/gold']:.3f} | {m['eval/kl']:.2f} | {m['eval/length']:.1f} |")
    ours_len, trl_len = gold["lengths"]
    if gold["evaluation"] is not None:  # the smollm2 job: minirlhf's own evaluations were cut to one sample
        return "\n".join(lines) + (f"\n\nMean training completion length minirlhf {ours_len:.1f}, TRL {trl_len:.1f} "
                                   "tokens.")
    return ("\n".join(lines) + f"\n\nminirlhf's own summary.json: gold {summary['eval/gold_before']:.3f} -> "
            f"{summary['eval/gold_after']:.3f} (of {summary['eval/gold_max']:.1f}); mean training completion length "
            f"minirlhf {ours_len:.1f}, TRL {trl_len:.1f} tokens.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="vs_trl.py", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every process, both sides (default 1; with --model smollm2, 2: "
                             "pass 1 on a machine with other work)")
    parser.add_argument("--model", default="tiny", choices=tuple(MODELS),
                        help="tiny: the embedded tiny Llama, every job; smollm2: SmolLM2-135M-Instruct, the grpo job "
                             "only (its own block)")
    parser.add_argument("--jobs", default=None, help=f"comma-separated subset of {', '.join(JOBS)} (default: "
                        f"{DEFAULT_JOBS}; with --model smollm2, grpo)")
    parser.add_argument("--steps", default="10,60", help="the two optimizer-step counts of the DPO / reward jobs")
    parser.add_argument("--repeats", type=int, default=2,
                        help="processes per side and step count in the DPO / reward jobs; the fastest counts")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_STEPS[0]} and {QUICK_STEPS[1]} steps, {QUICK_ITERATIONS} GRPO "
                             f"iterations ({SMOLLM2_QUICK_ITERATIONS} with --model smollm2)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the GRPO job's seed, both sides (default: train_grpo.py's, 0): one seed is one draw")
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave docs/ alone")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"),
                        help="markdown file to write the block into, between its markers")
    parser.add_argument("--child-score", help=argparse.SUPPRESS)  # internal: score adapters, print JSON
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = SMOLLM2_THREADS if args.model == "smollm2" else 1
    if args.jobs is None:
        args.jobs = "grpo" if args.model == "smollm2" else DEFAULT_JOBS
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in args.jobs if j not in JOBS]
    if unknown or not args.jobs:
        parser.error(f"--jobs: expected a comma-separated subset of {', '.join(JOBS)}, "
                     f"got {','.join(unknown) or 'none'}")
    if args.model == "smollm2" and args.jobs != ["grpo"]:
        parser.error(f"--model smollm2: runs the grpo job only (--jobs grpo), got --jobs {','.join(args.jobs)}")
    try:
        steps = tuple(int(x) for x in args.steps.split(","))
    except ValueError:
        steps = ()
    if len(steps) != 2 or not 1 <= steps[0] < steps[1]:
        parser.error(f"--steps: expected two step counts, the first smaller, e.g. 10,30; got {args.steps!r}")
    args.steps = QUICK_STEPS if args.quick else steps
    for flag, value in (("--threads", args.threads), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag}: expected >= 1, got {value}")
    if args.quick:
        args.repeats = 1
    return args


def main():
    args = parse_args()
    if args.child_score:
        torch.set_num_threads(json.loads(args.child_score)["threads"])
        print(json.dumps(child_score(json.loads(args.child_score))))
        return
    if importlib.util.find_spec("trl") is None:
        print(NO_TRL, file=sys.stderr)
        raise SystemExit(2)
    start, load_start = time.time(), load_average()
    command = " ".join(["python", "dev/vs_trl.py", *sys.argv[1:]])
    print(f"vs_trl.py: {args.threads} thread(s), model {args.model}, jobs {','.join(args.jobs)}"
          + (" (quick)" if args.quick else ""), file=sys.stderr)
    rows, checks, gold = [], [], None
    with tempfile.TemporaryDirectory(prefix="minirlhf-vs-trl-") as tmp:
        for job in args.jobs:
            if job == "grpo":
                job_rows, check, gold = measure_grpo(args.quick, args.threads, tmp, args.seed, args.model)
            else:
                job_rows, check = measure_pair_job(job, args.steps, args.repeats, args.threads, tmp)
            rows += job_rows
            checks.append(check)
    cpu, cores = machine()
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu}, {cores} cores; **{args.threads} thread(s)** "
              f"in every process; torch {torch.__version__}, transformers {version('transformers')}, trl "
              f"{version('trl')}, peft {version('peft')}, Python {platform.python_version()}; load average "
              f"{load_start} at the start, {load_average()} at the end; wall time {time.time() - start:.0f} s"
              + ("; model SmolLM2-135M-Instruct (minirlhf's converted folder), fp32" if args.model == "smollm2"
                 else "")
              + ("; **quick run (smoke test), not a measurement**" if args.quick else "")
              + f".\n\nCommand: `{command}`\n")
    details = "\n".join(f"- {r['job']}: {r['detail']}" for r in rows if r["detail"])
    block = (header + "\n" + table(rows) + "\n\n" + details + "\n\nThe data each side trained on:\n\n"
             + token_table(checks) + ("\n\nGRPO's result, both adapters scored by one evaluator outside the timed "
                                      "processes:\n\n" + gold_table(gold) if gold else ""))
    print(block)
    if not args.no_write:
        marks = (SMOLLM2_BEGIN, SMOLLM2_END) if args.model == "smollm2" else (MARK_BEGIN, MARK_END)
        write_doc(args.out, block, *marks, new_section=SECTION if args.model == "tiny" else "")
        print(f"wrote {os.path.relpath(args.out, REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
