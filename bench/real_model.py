"""The laptop recipe on a real model, end to end: every command of examples/smollm2_cpu.sh (SmolLM2-135M-Instruct on
the built-in world, CPU), timed, and the results written into docs/real_model.md.

    python bench/real_model.py                          # every stage, 2 threads (3-35 min a stage: docs/real_model.md)
    python bench/real_model.py --threads 1 --only grpo_gold dpo   # some stages (by their --out folder's name)
    python bench/real_model.py --report-only            # rewrite the doc from the runs already in --out

The commands come from the recipe itself (bench/common.recipe_commands runs it under bash with `python`
recording its arguments), with OUT and THREADS set: the recipe is the one source of truth. Each stage runs as its own
process; the harness records its wall time and its peak resident memory (the VmHWM of that child alone: common.Child)
and keeps its output in OUT/<stage>.log. One more process, not in the recipe, is the yardstick for the 4-bit PPO
stage's memory: the same PPO command on the float32 base for 3 iterations (`ppo_fp32_memory`): its peak RSS is what
the 4-bit run must not exceed (the peak comes from loading and the first iteration; later iterations repeat it).
"""
import argparse
import json
import os
import re

from common import REPO, flag_value, load_average, machine, recipe_commands, run_script, set_flag, write_doc

RECIPE = os.path.join(REPO, "examples", "smollm2_cpu.sh")
DOC = os.path.join(REPO, "docs", "real_model.md")
BEGIN, END = "<!-- real_model.py: begin -->", "<!-- real_model.py: end -->"
FP32_YARDSTICK = "ppo_fp32_memory"


def stage_name(argv):
    out = flag_value(argv, "--out")
    return os.path.basename(out) if out else argv[1].rsplit(".", 1)[-1]  # `-m minirlhf.best_of_n` -> best_of_n


def stages(out, threads):
    """[(name, argv)] of the recipe, plus the float32 PPO yardstick after the 4-bit PPO stage."""
    found = []
    for argv in recipe_commands(RECIPE, {"OUT": out, "THREADS": str(threads)}):
        found.append((stage_name(argv), argv))
        if flag_value(argv, "--quantization") == "4bit" and argv[0] == "train_ppo.py":
            fp32 = set_flag(set_flag(set_flag(argv, "--quantization", "none"), "--iterations", 3),
                            "--out", os.path.join(out, FP32_YARDSTICK))
            found.append((FP32_YARDSTICK, fp32))
    return found


def run_stage(name, argv, out):
    """Run one stage; {"wall_s", "peak_rss_bytes", "rc"} (also written to OUT/<name>.timing.json)."""
    log = os.path.join(out, f"{name}.log")
    print(f"[{name}] python {' '.join(argv)}  (log: {log})", flush=True)
    child = run_script(argv, log)
    timing = {"wall_s": child.wall_seconds, "peak_rss_bytes": child.peak_rss_bytes, "rc": child.returncode}
    with open(os.path.join(out, f"{name}.timing.json"), "w") as f:
        json.dump(timing, f)
    print(f"[{name}] exit {timing['rc']} in {timing['wall_s'] / 60:.1f} min, peak RSS "
          f"{timing['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return timing


def read(out, name):
    """(summary.json or {}, timing or {}, log text or "") of one stage."""
    def load(path):
        return json.load(open(path)) if os.path.exists(path) else {}
    log = os.path.join(out, f"{name}.log")
    return (load(os.path.join(out, name, "summary.json")), load(os.path.join(out, f"{name}.timing.json")),
            open(log, errors="replace").read() if os.path.exists(log) else "")


def per_iteration(summary):
    """'generation 3.1, logprobs 0.9, update 3.0' s per iteration (RL) from time/<phase>_seconds."""
    n = summary.get("train/iterations")
    phases = [(k[len("time/"):-len("_seconds")], v) for k, v in summary.items()
              if k.startswith("time/") and k.endswith("_seconds") and k not in ("time/total_seconds",
                                                                                 "time/train_seconds",
                                                                                 "time/evaluation_seconds")]
    if not n or not phases:
        return ""
    return ", ".join(f"{p} {v / n:.1f}" for p, v in phases if v / n >= 0.05)


def samples(out, name, k=4):
    """Lines 'prompt: before (gold) -> after (gold)' of the first k held-out prompts (DIR/samples.json)."""
    path = os.path.join(out, name, "samples.json")
    if not os.path.exists(path):
        return []
    both = json.load(open(path))
    every = max(1, len(both["after"]) // max(1, len({s["prompt"] for s in both["after"]})))  # samples per prompt
    return [f"{b['prompt']!r}: {b['response']!r} ({b['gold']:.1f}) -> {a['response']!r} ({a['gold']:.1f})"
            for b, a in list(zip(both["before"], both["after"]))[:k * every:every]]


def best_of_n_rows(log):
    return [[c.strip() for c in line.strip("|").split("|")] for line in log.splitlines()
            if re.match(r"\| \d+ \|", line)]


def report(out, threads, names):
    cpu, cores = machine()
    rows, notes = [], []
    others = sorted(f[:-len(".timing.json")] for f in os.listdir(out) if f.endswith(".timing.json")
                    and f[:-len(".timing.json")] not in names)  # runs kept from other settings (renamed by hand)
    for name in names + others:
        s, t, log = read(out, name)
        if not t:
            continue
        gold = (f"{s['eval/gold_before']:.2f} → {s['eval/gold_after']:.2f}" if "eval/gold_after" in s else "")
        head = f"{s['eval/headroom_closed']:.2f}" if "eval/headroom_closed" in s else ""
        kl = f"{s['eval/kl']:.2f}" if "eval/kl" in s else ""
        acc = (f"{s['eval/accuracy']:.3f} / {s['eval/accuracy_ceiling']:.3f} = {s['eval/accuracy_vs_ceiling']:.2f}"
               if "eval/accuracy_vs_ceiling" in s else "")
        rows.append(f"| {name + (' (other setting)' if name in others else '')} | {gold} | {head} | {kl} | {acc} | {per_iteration(s)} | "
                    f"{t['peak_rss_bytes'] / 2**30:.2f} | {t['wall_s'] / 60:.1f} | {'ok' if t['rc'] == 0 else 'exit ' + str(t['rc'])} |")
        if samples(out, name):
            notes.append(f"**{name}**, held-out samples before -> after (gold):\n\n"
                         + "\n".join(f"    {x}" for x in samples(out, name)))
        if name == "best_of_n" and best_of_n_rows(log):
            notes.append("**best_of_n** (proxy: the Bradley-Terry reward model of stage 1):\n\n"
                         "| n | KL bound (nats) | proxy | gold | win rate vs n=1 | length |\n|---|---|---|---|---|---|\n"
                         + "\n".join("| " + " | ".join(r) + " |" for r in best_of_n_rows(log)))
    block = (f"Measured by `python bench/real_model.py --threads {threads}` on {cpu} ({cores} logical cores), "
             f"1-minute load average {load_average()} at the end; one seed. Wall time and peak RSS are the whole "
             "process's (loading included).\n\n"
             "| stage | gold before → after | headroom closed | KL (nats) | RM accuracy / ceiling | s per iteration "
             "by phase | peak RSS (GiB) | wall (min) | |\n|---|---|---|---|---|---|---|---|---|\n"
             + "\n".join(rows) + "\n\n" + "\n\n".join(notes))
    write_doc(DOC, block, BEGIN, END, new_file="# SmolLM2-135M-Instruct on a laptop\n")
    print(f"wrote {DOC}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "real_model"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="stage names (the recipe's --out folder names)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    todo = stages(out, args.threads)
    names = [n for n, _ in todo]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        raise SystemExit(f"bench/real_model.py: error: --only: no stage {unknown}; stages: {', '.join(names)}")
    if not args.report_only:
        for name, argv in todo:
            if not args.only or name in args.only:
                run_stage(name, set_flag(argv, "--overwrite") if "--out" in argv else argv, out)
    report(out, args.threads, names)


if __name__ == "__main__":
    main()
