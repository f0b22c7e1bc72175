"""Does GRPO's KL term (--kl-loss, --kl-off-policy-weight) move the gold score at equal KL on the built-in world?

    python bench/kl_loss_choice.py             # 28 runs of train_grpo.py --reward gold, one at a time, one thread
                                               # each (~15 minutes on an idle core); prints the table and writes it
                                               # into docs/kl.md's generated block
    python bench/kl_loss_choice.py --dry-run   # the commands, and whether each result is already there

The frontier's protocol (bench/frontier.py: its GRPO --beta settings, its evaluation, seeds 0 and 1, its runner and
its cache), against the gold score itself (--reward gold, the README's GRPO row), for four KL terms:
    k3              DeepSeekMath's loss, the default: gradient ∇KL(π_ref‖π)
    k3, weighted    the same times sg(π/π_old): ∇KL(π_ref‖π) in the second epoch too
    k3+, weighted   k3's value, k2's gradient, times sg(π/π_old): ∇KL(π‖π_ref)
    k2, weighted    k2 in the loss, times sg(π/π_old): ∇KL(π‖π_ref)
β = 0 has no KL term, so one run per seed serves all four; the default also runs at β = 0.1 (EXTRA). "Δ gold vs k3
at this KL": the run's gold minus the gold of the default's curve (same seed, its runs at every β, β = 0 included,
joined by straight lines in eval/kl) at the run's eval/kl; "-" where that KL is outside the default's curve.
"""
import argparse
import os
import sys

from common import REPO, write_doc
from frontier import EVAL, Algorithm, make_run, points, run_all, shown

BEGIN, END = "<!-- bench/kl_loss_choice.py: begin (generated) -->", "<!-- bench/kl_loss_choice.py: end -->"
SEEDS = (0, 1)
BETAS = (0.02, 0.04, 0.2)  # bench/frontier.py's GRPO settings, less β = 0 (below)
EXTRA = (0.1,)  # the default's curve only: a point at the KL the k2-gradient terms reach at β = 0.2
GOLD = ("train_grpo.py", "--reward", "gold")
WEIGHT = ("--kl-off-policy-weight",)
VARIANTS = (  # (label, results folder, flags)
    ("k3 (default)", "k3", ()),
    ("k3, weighted", "k3-w", WEIGHT),
    ("k3+, weighted", "k3plus-w", ("--kl-loss", "k3+", *WEIGHT)),
    ("k2, weighted", "k2-w", ("--kl-loss", "k2", *WEIGHT)),
)
NO_KL = Algorithm("β = 0 (no KL term)", "beta0", GOLD, "--beta", (0.0,), (0.0,))
ALGORITHMS = [NO_KL] + [Algorithm(label, key, (*GOLD, *flags), "--beta",
                                  tuple(sorted(BETAS + EXTRA * (key == "k3"))), BETAS)
                        for label, key, flags in VARIANTS]


def interpolate(curve, kl):
    """The gold of a curve [(kl, gold)] joined by straight lines, at `kl`; None outside it."""
    curve = sorted(curve)
    for (k0, g0), (k1, g1) in zip(curve, curve[1:]):
        if k0 <= kl <= k1:
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    return None


def table(results):
    """results: {(algorithm key, beta, seed): point} -> the markdown table, one row per (β, KL term)."""
    default = {seed: [(p["kl"], p["gold"]) for (key, _, s), p in results.items()
                      if s == seed and key in ("k3", "beta0")] for seed in SEEDS}
    head = " | ".join(f"seed {s}: gold after | headroom | eval/kl | Δ gold vs k3 at this KL" for s in SEEDS)
    lines = [f"| --beta | KL term | {head} | mean gold | mean eval/kl |", "|---" * (3 + 4 * len(SEEDS)) + "|"]
    for beta in sorted((0.0, *BETAS, *EXTRA)):
        for a in ALGORITHMS:
            pts = [results.get((a.key, beta, seed)) for seed in SEEDS]
            if beta not in a.settings or None in pts:
                continue
            cells = []
            for seed, p in zip(SEEDS, pts):
                ref = None if a.key in ("k3", "beta0") else interpolate(default[seed], p["kl"])
                cells.append(f"{p['gold']:.3f} | {p['headroom']:.2f} | {p['kl']:.2f} | "
                             + ("-" if ref is None else f"{p['gold'] - ref:+.3f}"))
            mean = lambda k: sum(p[k] for p in pts) / len(pts)  # noqa: E731
            lines.append(f"| {beta:g} | {a.name} | {' | '.join(cells)} | {mean('gold'):.3f} | {mean('kl'):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="/tmp/klm", help="folder of the runs (default /tmp/klm)")
    parser.add_argument("--doc", default=os.path.join(REPO, "docs", "kl.md"),
                        help="markdown file whose generated block gets the table (default docs/kl.md)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands; run none")
    args = parser.parse_args(argv)
    runs = [make_run(a, beta, seed, args.results, quick=False) for seed in SEEDS for a in ALGORITHMS
            for beta in a.settings]
    if args.dry_run:
        from frontier import is_done
        for run in runs:
            print(f"{'done' if is_done(run) else 'todo'}  {run.command}")
        return
    failed = run_all(runs, jobs=1, threads=1)
    from minirlhf.data.gold import GOLD_MAX
    results = {(r.algorithm.key, r.setting, r.seed): points(r, GOLD_MAX)[0] for r in runs if r not in failed}
    commands = "\n".join(f"    {r.template}" for r in runs if r.seed == SEEDS[0])
    block = (f"{table(results)}\n\nEach row's command (S = the seed; every flag after `--seed` is "
             f"bench/frontier.py's evaluation, `{' '.join(EVAL)}`):\n\n{commands}\n")
    write_doc(args.doc, block, BEGIN, END)
    print(block)
    print(f"wrote {shown(args.doc)}", file=sys.stderr)
    if failed:
        raise SystemExit(f"bench/kl_loss_choice.py: error: {len(failed)} run(s) failed: "
                         + ", ".join(f"{r.out}.log" for r in failed))


if __name__ == "__main__":
    main()
