"""Does RL sharpen or expand? pass@k of the SFT model against the policies RL trains from it, k = 1, 2, 4, ..., 64.

    python bench/pass_at_k.py --threads 1                    # ~5-10 minutes on a shared 2-core CPU
    python bench/pass_at_k.py --threads 1 --prompts 40       # fewer held-out prompts: faster, noisier

pass@k (pass_at_k.py; Chen et al. 2021, Eq. 1) is the chance that at least one of k samples is correct (on the
built-in world: world.is_correct, the gold judge's content class). pass@1 is what the policy usually says; pass@k at
large k is what it can say at all. Yue et al. 2025 (arXiv 2504.13837) find that RL with verifiable rewards raises
pass@1 but that the base model catches up and wins at large k: RL sharpens the distribution onto answers the base
already samples, it does not expand what the base can reach. Here: the embedded tiny Llama (the SFT model) and three
policies trained from it by the default commands (GRPO against the gold score, RLOO and PPO against the shipped
reward model), each launched as a child process; then `python -m minirlhf.compare --pass-k ...` samples --samples
responses per held-out prompt from each of the four and computes every pass@k from those same samples.
Writes docs/pass_at_k.md (the table between its markers; the analysis around them is written by hand) and
docs/pass_at_k.png, and keeps the runs under --runs-dir. A benchmark, never run as a test.
"""
import argparse
import os
import time

from common import REPO, OFFLINE, load_average, machine, run_script, write_doc

# name -> the default command that trains it (without --threads / --seed / --out)
RUNS = {
    "GRPO": ["train_grpo.py", "--reward", "gold"],
    "RLOO": ["train_reinforce.py", "--baseline", "leave-one-out", "--samples-per-prompt", "4"],
    "PPO": ["train_ppo.py"],
}
BEGIN, END = "<!-- pass_at_k.py: begin -->", "<!-- pass_at_k.py: end -->"


def read_table(path):
    """{policy: {column: text}} from the markdown table compare.py wrote."""
    lines = [line for line in open(path).read().splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = [[v.strip() for v in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def crossover(base, policy, ks):
    """The first k at which the SFT model's pass@k reaches the policy's, or None."""
    return next((k for k in ks if base[k] >= policy[k]), None)


def table(results, ks, names, args, seconds):
    """The generated block: one row per policy, its pass@k curve and where the SFT model catches up."""
    base = results["SFT"]
    lines = ["| policy | trained by | gold | KL (nats) | " + " | ".join(f"pass@{k}" for k in ks)
             + " | SFT catches up at |", "|" + "---|" * (len(ks) + 5)]
    for name in ["SFT", *names]:
        r = results[name]
        command = "(the embedded tiny Llama)" if name == "SFT" else "`python " + " ".join(RUNS[name]) + "`"
        cells = [f"{r['pass'][k]:.3f}" if name == "SFT" else
                 f"{r['pass'][k]:.3f} ({r['pass'][k] - base['pass'][k]:+.3f})" for k in ks]
        k = None if name == "SFT" else crossover(base["pass"], r["pass"], ks)
        catch = "" if name == "SFT" else (f"k = {k}" if k else f"not by k = {ks[-1]}")
        lines.append(f"| {name} | {command} | {r['gold']:.3f} | {r['kl']:.2f} | " + " | ".join(cells)
                     + f" | {catch} |")
    cpu, cores = machine()
    lines.append(f"\n{args.prompts} held-out prompts of the built-in world x {ks[-1]} samples each at "
                 f"temperature 1 (one draw per policy, seed {args.seed}; every pass@k from the same samples), in "
                 f"brackets the difference to the SFT model; gold and KL from `--samples 2` other samples per prompt. "
                 f"{cpu}, "
                 f"{cores} cores shared with other jobs (load average {load_average()} at the end), --threads "
                 f"{args.threads}; {seconds / 60:.1f} minutes in all.")
    return "\n".join(lines) + "\n"


def plot(results, ks, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in results.items():
        ax.plot(ks, [r["pass"][k] for k in ks], "o-" if name != "SFT" else "s--", label=name,
                color="black" if name == "SFT" else None)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k (samples)", ylabel="pass@k", title="pass@k on held-out prompts: SFT model vs RL policies")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=120, help="held-out prompts (the first N of the test split)")
    parser.add_argument("--samples", type=int, default=64, help="samples per prompt at most: k runs over the "
                        "powers of 2 up to it, and max(k) samples are drawn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", default=os.path.join(REPO, "runs", "pass_at_k"))
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "pass_at_k"), help="writes OUT.md and OUT.png")
    args = parser.parse_args(argv)
    ks = [2 ** i for i in range(args.samples.bit_length()) if 2 ** i <= args.samples]
    os.makedirs(args.runs_dir, exist_ok=True)
    start, common = time.time(), ["--threads", str(args.threads), "--seed", str(args.seed)]
    for name, cmd in RUNS.items():
        out = os.path.join(args.runs_dir, name.lower())
        child = run_script([*cmd, *common, "--out", out, "--overwrite"], out + ".log", threads=args.threads,
                           env=OFFLINE)
        if child.returncode != 0:
            raise SystemExit(f"pass_at_k.py: error: {name} failed; see {out}.log:\n{child.tail(5)}")
        print(f"trained {name} in {child.wall_seconds:.0f} s")
    md = os.path.join(args.runs_dir, "compare.md")
    policies = ["base", *(os.path.join(args.runs_dir, name.lower()) for name in RUNS)]
    child = run_script(["-m", "minirlhf.compare", "--policies", *policies, "--gold", "--prompts", str(args.prompts),
                        "--pass-k", *map(str, ks), *common, "--out", md], os.path.join(args.runs_dir, "compare.log"),
                       threads=args.threads, env=OFFLINE)
    if child.returncode != 0:
        raise SystemExit(f"pass_at_k.py: error: the evaluation failed; see {args.runs_dir}/compare.log")
    print(f"evaluated in {child.wall_seconds:.0f} s")
    rows = read_table(md)
    results = {name: {"gold": float(rows[p]["gold"]), "kl": float(rows[p]["KL (nats)"]),
                      "pass": {k: float(rows[p][f"pass@{k}"]) for k in ks}}
               for name, p in zip(["SFT", *RUNS], policies)}
    plot(results, ks, args.out + ".png")
    block = table(results, ks, list(RUNS), args, time.time() - start)
    write_doc(args.out + ".md", block, BEGIN, END,
              new_file="# Does RL sharpen or expand? pass@k on the built-in world\n",
              new_section=f"![pass@k against k]({os.path.basename(args.out)}.png)")
    print(block)


if __name__ == "__main__":
    main()
