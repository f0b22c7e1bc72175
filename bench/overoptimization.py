"""Reward over-optimisation ("reward hacking", as in the StackLLaMA setup): PPO against a LEARNED reward model at
several KL coefficients.

    python bench/overoptimization.py                      # ~15-25 minutes on 2 CPU cores (3 runs of 80 iterations)
    python bench/overoptimization.py --kl-coefs 0 0.3 --iterations 40 --jobs 2

The learned reward model is only a proxy for what we want (on the built-in world we also know the gold score). Each
run trains the policy with train_ppo.py against the proxy, for longer than the default, and evaluates it every
--eval-every iterations on held-out prompts: proxy reward, gold score and the exact KL(π‖π_ref) per sequence.
Plotted against that KL (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization", plot both scores against
sqrt(KL) from the initial policy), the expected picture is a proxy that keeps rising while the gold score rises, peaks
and falls once the policy exploits what the reward model wrongly likes; the KL penalty β·KL holds the policy back.
Writes docs/overoptimization.png (two panels: proxy and gold against KL, one line per β) and
docs/overoptimization.md (a table), and keeps every run under --runs-dir. A benchmark, never run as a test.
"""
import argparse
import json
import os
import time

from common import REPO, Child


def run(kl_coef, args):
    """Start train_ppo.py for one KL coefficient; returns (common.Child, out_dir)."""
    out = os.path.join(args.runs_dir, f"kl{kl_coef:g}")
    cmd = ["train_ppo.py", "--kl-coef", str(kl_coef),
           "--iterations", str(args.iterations), "--eval-every", str(args.eval_every), "--threads", str(args.threads),
           "--seed", str(args.seed), "--out", out, *args.extra]
    return Child(cmd, out + ".log"), out


def curve(out):
    """[(iteration, eval/kl, eval/reward, eval/gold)] from the before-training point, the evaluations, the end."""
    summary = json.load(open(os.path.join(out, "summary.json")))
    points = [(0, 0.0, summary["eval/reward_before"], summary["eval/gold_before"])]
    for line in open(os.path.join(out, "metrics.jsonl")):
        row = json.loads(line)
        if "eval/gold" in row:
            points.append((row["step"], row["eval/kl"], row["eval/reward"], row["eval/gold"]))
    points.append((summary["train/iterations"], summary["eval/kl"], summary["eval/reward_after"],
                   summary["eval/gold_after"]))
    return points, summary


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (kl_coef, (points, _)), colour in zip(curves.items(), plt.cm.viridis_r([0.15, 0.45, 0.7, 0.9, 1.0])):
        kl = [p[1] for p in points]
        axes[0].plot(kl, [p[2] for p in points], "o-", color=colour, label=f"β = {kl_coef:g}")
        axes[1].plot(kl, [p[3] for p in points], "o-", color=colour, label=f"β = {kl_coef:g}")
    axes[0].set(title="proxy: learned reward model", xlabel="KL(π‖π_ref) per sequence (nats)", ylabel="mean score")
    axes[1].set(title="gold score (0..4)", xlabel="KL(π‖π_ref) per sequence (nats)", ylabel="mean gold")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("PPO against a learned reward model, held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(curves, args, seconds):
    lines = ["| β (kl-coef) | KL at end (nats) | proxy before → after | gold before → after | best gold (at KL) |",
             "|---|---|---|---|---|"]
    for kl_coef, (points, s) in curves.items():
        best = max(points, key=lambda p: p[3])
        lines.append(f"| {kl_coef:g} | {s['eval/kl']:.2f} | {s['eval/reward_before']:+.2f} → "
                     f"{s['eval/reward_after']:+.2f} | {s['eval/gold_before']:.2f} → {s['eval/gold_after']:.2f} | "
                     f"{best[3]:.2f} (KL {best[1]:.2f}, iteration {best[0]}) |")
    lines.append(f"\nPPO, {args.iterations} iterations, evaluated every {args.eval_every} on held-out prompts "
                 f"(train_ppo.py defaults otherwise{', plus ' + ' '.join(args.extra) if args.extra else ''}); "
                 f"seed {args.seed}; {seconds / 60:.1f} minutes in all, {args.jobs} run(s) at a time, "
                 f"{args.threads} thread(s) each.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kl-coefs", type=float, nargs="+", default=[0.0, 0.05, 0.3],
                        help="KL coefficients β to compare (include 0: no KL penalty)")
    parser.add_argument("--iterations", type=int, default=80, help="PPO iterations per run (the default run has 40)")
    parser.add_argument("--eval-every", type=int, default=8, help="iterations between evaluations")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", default=os.path.join(REPO, "runs", "overoptimization"))
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "overoptimization"),
                        help="writes OUT.png and OUT.md")
    parser.add_argument("extra", nargs="*", help="more train_ppo.py flags, after --")
    args = parser.parse_args(argv)
    os.makedirs(args.runs_dir, exist_ok=True)
    start, pending, running = time.time(), list(args.kl_coefs), []
    while pending or running:
        while pending and len(running) < args.jobs:
            kl_coef = pending.pop(0)
            running.append((kl_coef, *run(kl_coef, args)))
            print(f"started β = {kl_coef:g}")
        time.sleep(2)
        for item in [r for r in running if r[1].poll()]:
            running.remove(item)
            if item[1].returncode != 0:
                raise SystemExit(f"overoptimization.py: error: the β = {item[0]:g} run failed; see {item[2]}.log")
            print(f"finished β = {item[0]:g} after {(time.time() - start) / 60:.1f} min")
    curves = {kl_coef: curve(os.path.join(args.runs_dir, f"kl{kl_coef:g}")) for kl_coef in args.kl_coefs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    plot(curves, args.out + ".png")
    text = table(curves, args, time.time() - start)
    with open(args.out + ".md", "w") as f:
        f.write(f"# Reward over-optimisation on the built-in world\n\n![gold and proxy against KL]"
                f"({os.path.basename(args.out)}.png)\n\n" + text)
    print(text)
    for kl_coef, (points, _) in curves.items():
        print(f"β = {kl_coef:g}: " + "  ".join(f"it {i}: KL {k:.2f} proxy {r:+.2f} gold {g:.2f}"
                                                for i, k, r, g in points))


if __name__ == "__main__":
    main()
