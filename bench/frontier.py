"""The reward–KL frontier: every algorithm of minirlhf on the built-in world, the held-out gold score it reaches
against the exact KL(π‖π_ref) it pays for it.

    python bench/frontier.py              # the full run: 16 algorithms x 4 settings x 2 seeds, and best-of-N
                                          # (130 runs, 2 at a time, one thread each, after the 2 ensemble members'
                                          # trainings; the first 114 took 29 minutes on 2 idle cores); writes
                                          # docs/frontier.md and docs/frontier.png
    python bench/frontier.py --quick      # a smoke run: seed 0, PPO / RLOO / DPO at 2 settings for 2 steps, and
                                          # best-of-N up to 4, on 8 prompts; writes under runs/frontier-quick/
    python bench/frontier.py --quick --algorithms grpo dr-grpo reinforce ipo   # the same smoke run of the others
    python bench/frontier.py --dry-run    # list every command, and whether its result is already there

Run the full run by hand on an otherwise idle machine, never in CI. Every algorithm has a knob that trades reward for
distance from the reference policy (the SFT model minirlhf/assets/tiny-llama, which every script starts from and is
pulled back to):
    PPO, REINFORCE, RLOO, REINFORCE++(-baseline)   --kl-coef   β of score − β·KL: larger = closer to the reference
    GRPO, Dr. GRPO, GSPO, CISPO, DAPO              --beta      weight of the k3 KL term in the loss
    DPO, IPO, KTO, online DPO                      --beta      strength of the implicit KL constraint: larger = closer
    best-of-N              N           no training: sample N responses, keep the reward model's favourite
A point is one script run at one setting and one seed, with the script's defaults otherwise: the RL scripts optimise
the shipped reward model, a learned proxy, so the frontier shows what gold score optimising a proxy buys. The two
ensemble rows (PPO and GRPO) optimise instead an ensemble of 3 reward models (Coste et al. 2023): the shipped one
(train_reward.py's defaults, seed 0) and two more trained with --seed 1 and --seed 2, combined by ENSEMBLE
(minirlhf/reward_ensemble.py). The bench trains those two members first, as prerequisites cached like the runs
(RESULTS/reward-models/seedN; --dry-run lists their commands first). Every run
samples the same held-out prompts before and after training (--eval-prompts 120 --eval-samples 4, as train_dpo.py's
default; --eval-every 0: no evaluation in between, which only saves time: the trained policy is bit-identical) and its
summary.json gives
    eval/gold_after        mean gold score (0..GOLD_MAX) of the sampled responses after training
    eval/kl                exact KL(π‖π_ref) summed over each response's tokens, nats per sequence
                           (evaluation.sequence_kl: the full next-token distributions, not a sampled estimate)
    eval/headroom_closed   (gold after − gold before) / (GOLD_MAX − gold before)
    eval/reward_after      the reward model's mean score (RL only: the proxy that was optimised)
Best-of-N is `python -m minirlhf.best_of_n` once per seed for every N (its printed table is parsed): its KL is the
analytic upper bound log N − (N−1)/N (Stiennon et al. 2020; Beirami et al. 2024), marked "≤" in the table and drawn
dashed; its headroom is measured from its own N = 1 row (the SFT model, one sample per prompt).

The table gives, per algorithm and setting, the mean over seeds ± the spread (half the range: with 2 seeds, mean ±
spread are the two runs), and marks each algorithm's best setting among those with mean KL ≤ 5 nats (the KL
budget). The picture draws one curve per algorithm through those means, error bars = the spread, each seed's run as
a faint dot, the SFT model's gold at KL 0 and GOLD_MAX as a line.

Each run is a subprocess (--threads 1, OMP_NUM_THREADS=1), --jobs at a time, writing into its own folder under
--results (its output in FOLDER.log). A folder holding a finished summary.json and this script's frontier.json for the
same command (its wall and CPU time, the load average at its start) is not run again: an interrupted bench continues
where it stopped (an unfinished run starts over), and a second call only redraws. RESULTS/points.json holds every
point of every run.
"""
import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

from common import REPO, Child, load_average, machine, write_doc

MARK_BEGIN, MARK_END = "<!-- bench/frontier.py: begin (generated) -->", "<!-- bench/frontier.py: end -->"
KL_LIMIT = 5.0  # nats per sequence: the KL budget of the "best setting"
SEEDS = (0, 1)
EVAL = ("--eval-every", "0", "--eval-prompts", "120", "--eval-samples", "4")  # the same evaluation for every run
QUICK_RL = ("--iterations", "2", "--eval-every", "0", "--eval-prompts", "8", "--eval-samples", "1")
QUICK_DPO = ("--max-steps", "2", "--max-train-pairs", "64", "--max-eval-pairs", "16", "--eval-every", "0",
             "--eval-prompts", "8", "--eval-samples", "1")
BEST_OF_N, QUICK_BEST_OF_N = (1, 2, 4, 8, 16, 32, 64), (1, 2, 4)
QUICK_PROMPTS = 8  # best-of-N's held-out prompts under --quick


SHIPPED_REWARD_MODEL = "minirlhf/assets/reward-model"  # what every RL script optimises by default
MEMBER_SEEDS = (1, 2)  # the ensembles' other members: train_reward.py with its defaults and these seeds
QUICK_MEMBER = ("--max-steps", "2", "--max-train-pairs", "64", "--max-eval-pairs", "16")


@dataclass(frozen=True)
class Algorithm:
    name: str  # the table's and the legend's label
    key: str  # --algorithms and the results folder
    argv: tuple  # the script and the flags that make this algorithm, before the knob
    knob: str  # the flag set to each setting
    settings: tuple  # the full run's settings of the knob
    quick: tuple  # --quick's settings
    ensemble: bool = False  # its proxy is the shipped reward model + the MEMBER_SEEDS members (trained first)

    @property
    def trains(self):
        """A training script (its summary.json has eval/*), not best-of-N."""
        return self.argv[0].startswith("train_")


# How the ensembles combine their members' scores (minirlhf/reward_ensemble.py): the best of six single PPO runs
# (seed 0, --kl-coef 0.1 and 0.3; docs/frontier.md, "Reward-model ensembles", lists them), narrowly.
ENSEMBLE = ("--reward-ensemble", "mean-minus-std", "--reward-ensemble-lambda", "1")
ENSEMBLE_NAME = "mean − 1·std"
ALGORITHMS = (
    Algorithm("PPO", "ppo", ("train_ppo.py",), "--kl-coef", (0.05, 0.1, 0.3, 1.0), (0.05, 1.0)),
    Algorithm("GRPO", "grpo", ("train_grpo.py",), "--beta", (0.0, 0.02, 0.04, 0.2), (0.0, 0.2)),
    Algorithm("Dr. GRPO (constant normaliser, no std)", "dr-grpo",
              ("train_grpo.py", "--loss-aggregation", "constant", "--advantage-std", "none"), "--beta",
              (0.0, 0.02, 0.04, 0.2), (0.0, 0.2)),
    Algorithm("REINFORCE", "reinforce", ("train_reinforce.py",), "--kl-coef", (0.05, 0.1, 0.3, 1.0), (0.05, 1.0)),
    Algorithm("RLOO (k = 4)", "rloo",
              ("train_reinforce.py", "--baseline", "leave-one-out", "--samples-per-prompt", "4"), "--kl-coef",
              (0.05, 0.1, 0.3, 1.0), (0.05, 1.0)),
    Algorithm("DPO", "dpo", ("train_dpo.py",), "--beta", (0.1, 0.3, 0.5, 1.0), (0.1, 1.0)),
    Algorithm("IPO", "ipo", ("train_dpo.py", "--loss", "ipo"), "--beta", (0.1, 0.3, 0.5, 1.0), (0.1, 1.0)),
    Algorithm("GSPO (clip 3e-4 / 4e-4)", "gspo",
              ("train_grpo.py", "--policy-loss", "gspo", "--clip-eps", "3e-4", "--clip-high", "4e-4"), "--beta",
              (0.0, 0.02, 0.04, 0.2), (0.0, 0.2)),
    Algorithm("CISPO (weight clip 1.28)", "cispo",
              ("train_grpo.py", "--policy-loss", "cispo", "--clip-eps", "1", "--clip-high", "0.28"), "--beta",
              (0.0, 0.02, 0.04, 0.2), (0.0, 0.2)),
    Algorithm("DAPO dynamic sampling", "dapo", ("train_grpo.py", "--dynamic-sampling"), "--beta",
              (0.0, 0.02, 0.04, 0.2), (0.0, 0.2)),
    Algorithm("REINFORCE++", "reinforce-pp", ("train_reinforce.py", "--baseline", "reinforce++"), "--kl-coef",
              (0.05, 0.1, 0.3, 1.0), (0.05, 1.0)),
    Algorithm("REINFORCE++-baseline (k = 4)", "reinforce-pp-baseline",
              ("train_reinforce.py", "--baseline", "reinforce++-baseline", "--samples-per-prompt", "4"), "--kl-coef",
              (0.05, 0.1, 0.3, 1.0), (0.05, 1.0)),
    Algorithm("online DPO", "online-dpo", ("train_online_dpo.py",), "--beta", (0.1, 0.3, 0.5, 1.0), (0.1, 1.0)),
    Algorithm("KTO", "kto", ("train_dpo.py", "--loss", "kto"), "--beta", (0.1, 0.3, 0.5, 1.0), (0.1, 1.0)),
    Algorithm(f"PPO, ensemble of 3 ({ENSEMBLE_NAME})", "ppo-ensemble", ("train_ppo.py", *ENSEMBLE), "--kl-coef",
              (0.05, 0.1, 0.3, 1.0), (0.05, 1.0), ensemble=True),
    Algorithm(f"GRPO, ensemble of 3 ({ENSEMBLE_NAME})", "grpo-ensemble", ("train_grpo.py", *ENSEMBLE), "--beta",
              (0.0, 0.02, 0.04, 0.2), (0.0, 0.2), ensemble=True),
    Algorithm("best-of-N", "best-of-n", ("-m", "minirlhf.best_of_n"), "--n", (BEST_OF_N,), (QUICK_BEST_OF_N,)),
)
QUICK_ALGORITHMS = ("ppo", "rloo", "dpo", "best-of-n")  # --quick without --algorithms


@dataclass(frozen=True)
class Run:
    """One subprocess: an algorithm at one setting (best-of-N: every N) and one seed."""
    algorithm: Algorithm
    setting: object  # a float, or best-of-N's tuple of N
    seed: int
    out: str  # its folder
    argv: tuple  # after `python`

    @property
    def command(self):
        """The command, run from the repository root."""
        return "python " + " ".join(self.argv)

    @property
    def template(self):
        """The command with S for the seed (in --seed and in the --out folder): the table's command for every seed."""
        argv = list(self.argv)
        argv[argv.index("--seed") + 1] = "S"
        if "--out" in argv:
            i = argv.index("--out") + 1
            argv[i] = argv[i].removesuffix(f"seed{self.seed}") + "seedS"
        return "python " + " ".join(argv)


def shown(path):
    return os.path.relpath(path, REPO) if os.path.abspath(path).startswith(REPO + os.sep) else path


MEMBER = Algorithm("reward model (an ensemble member)", "reward-models", ("train_reward.py",), "--seed", MEMBER_SEEDS,
                   MEMBER_SEEDS)  # not on the frontier: the prerequisite of the ensembles


def member_run(seed, results, quick, threads=1):
    """The Run that trains the ensembles' member of `seed`: train_reward.py with its defaults, into
    RESULTS/reward-models/seedN (its reward model in seedN/reward_model)."""
    out = os.path.join(results, MEMBER.key, f"seed{seed}")
    argv = ("train_reward.py", "--seed", str(seed), "--threads", str(threads), *(QUICK_MEMBER if quick else ()),
            "--out", shown(out))
    return Run(MEMBER, seed, seed, out, argv)


def members(results):
    """The --reward-model folders of an ensemble: the shipped reward model (seed 0), then the trained members."""
    return (SHIPPED_REWARD_MODEL, *(shown(os.path.join(results, MEMBER.key, f"seed{seed}", "reward_model"))
                                    for seed in MEMBER_SEEDS))


def make_run(algorithm, setting, seed, results, quick, threads=1):
    """The Run of `algorithm` at `setting` (best-of-N: its tuple of N) and `seed`, its folder under `results`."""
    if algorithm.trains:
        out = os.path.join(results, algorithm.key, f"{algorithm.knob.lstrip('-')}{setting:g}-seed{seed}")
        size = (QUICK_DPO if algorithm.argv[0] == "train_dpo.py" else QUICK_RL) if quick else EVAL
        proxy = ("--reward-model", *members(results)) if algorithm.ensemble else ()
        argv = (*algorithm.argv, *proxy, algorithm.knob, f"{setting:g}", "--seed", str(seed), "--threads",
                str(threads), *size, "--out", shown(out))
    else:  # best-of-N: one run for every N; it has no --out, the bench keeps its output in the folder
        out = os.path.join(results, algorithm.key, f"seed{seed}")
        argv = (*algorithm.argv, algorithm.knob, *map(str, setting), "--seed", str(seed), "--threads", str(threads),
                *(("--prompts", str(QUICK_PROMPTS)) if quick else ()))
    return Run(algorithm, setting, seed, out, argv)


def plan(algorithms, seeds, results, quick, threads=1):
    """Every Run, seed by seed (an interrupted bench has whole frontiers of the first seeds)."""
    return [make_run(a, s, seed, results, quick, threads) for seed in seeds for a in algorithms
            for s in (a.quick if quick else a.settings)]


def prerequisites(algorithms, results, quick, threads=1):
    """The Runs that must finish before `algorithms` can run: the ensembles' members (none without an ensemble)."""
    needed = any(a.ensemble for a in algorithms)
    return [member_run(seed, results, quick, threads) for seed in MEMBER_SEEDS] if needed else []


# --------------------------------------------------------------------------------------------- running (cached)
def is_done(run):
    """Whether run.out holds this command's finished result: frontier.json for the same command and a summary.json
    (for a training script, one that says "train/finished": a Ctrl-C'd run exits 0 with a checkpoint)."""
    try:
        with open(os.path.join(run.out, "frontier.json")) as f:
            record = json.load(f)
        with open(os.path.join(run.out, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return (record.get("command") == run.command and "load_average_at_start" in record
            and (not run.algorithm.trains or summary.get("train/finished") is True))


def parse_best_of_n(text):
    """The rows of the table `python -m minirlhf.best_of_n` prints: [{"n", "kl_bound", "reward", "gold"}], read by
    the header's column names (so a column added to it does not break this)."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    for i, line in enumerate(lines):
        header = [c.strip() for c in line.strip("|").split("|")]
        if header[0] == "n":
            break
    else:
        raise ValueError("no best-of-n table (a line starting with '| n |') in the output")
    col = {name: header.index(name) for name in ("n", "KL bound (nats)", "proxy", "gold")}
    rows = []
    for line in lines[i + 2:]:  # after the header and its |---| line
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append({"n": int(cells[col["n"]]), "kl_bound": float(cells[col["KL bound (nats)"]]),
                     "reward": float(cells[col["proxy"]]), "gold": float(cells[col["gold"]])})
    return rows


def finish(run, seconds, cpu_seconds, load):
    """After a run exited 0: best-of-N's parsed table becomes its summary.json; frontier.json records the command
    (the cache key), the wall time, the CPU time and the load average when it started."""
    if not run.algorithm.trains:
        with open(run.out + ".log") as f:
            rows = parse_best_of_n(f.read())
        with open(os.path.join(run.out, "summary.json"), "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    with open(os.path.join(run.out, "frontier.json"), "w") as f:
        json.dump({"command": run.command, "wall_seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                   "load_average_at_start": load}, f, indent=1)


def start(run, threads):
    """Start `python ARGV` (a common.Child) with a fresh run.out, its output to run.out + ".log"."""
    if os.path.isdir(run.out):
        shutil.rmtree(run.out)  # an unfinished run (or another command's result): start it over
    os.makedirs(run.out)
    return Child(run.argv, run.out + ".log", threads)


def run_all(runs, jobs, threads=1, say=print, poll=0.5):
    """Run every Run not done yet, `jobs` at a time. Returns the failed Runs; a failure stops nothing else."""
    todo, running, failed = [r for r in runs if not is_done(r)], [], []
    say(f"{len(runs) - len(todo)} of {len(runs)} runs already done; {len(todo)} to run, {jobs} at a time")
    t0 = time.time()
    try:
        while todo or running:
            while todo and len(running) < jobs:
                run = todo.pop(0)
                running.append((run, start(run, threads), load_average()))
            time.sleep(poll)
            for item in list(running):
                run, child, load = item
                if not child.poll():
                    continue
                running.remove(item)
                ok, cpu = child.returncode == 0, child.cpu_seconds
                if ok:
                    try:
                        finish(run, child.wall_seconds, cpu, load)
                        ok = is_done(run)
                    except (OSError, ValueError) as e:
                        say(f"  {run.command}: {e}")
                        ok = False
                if not ok:
                    failed.append(run)
                why = "" if ok else f"  (exit {child.returncode}; see {shown(run.out)}.log)"
                say(f"[{(time.time() - t0) / 60:5.1f} min] {'done  ' if ok else 'FAILED'} {child.wall_seconds:6.1f} s "
                    f"(CPU {cpu:5.1f} s) {run.command}{why}")
    except KeyboardInterrupt:
        for _, child, _ in running:  # they got the Ctrl-C too: the training scripts save a checkpoint and exit
            child.proc.wait()
        raise SystemExit("bench/frontier.py: interrupted; the finished runs are kept: run the same command again "
                         "to continue") from None
    return failed


# ------------------------------------------------------------------------------------------------ the results
def points(run, gold_max):
    """The frontier points of one finished run: [{"setting", "gold", "kl", "headroom", "reward", "gold_before",
    "seconds", "cpu_seconds", "bound"}] (one per N for best-of-N, all with the whole run's seconds)."""
    with open(os.path.join(run.out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run.out, "frontier.json")) as f:
        record = json.load(f)
    times = {"seconds": record["wall_seconds"], "cpu_seconds": record["cpu_seconds"],
             "load": float(record["load_average_at_start"])}
    if run.algorithm.trains:
        return [{"setting": run.setting, "gold": summary["eval/gold_after"], "kl": summary["eval/kl"],
                 "headroom": summary["eval/headroom_closed"], "reward": summary.get("eval/reward_after"),
                 "gold_before": summary["eval/gold_before"], **times, "bound": False}]
    first = next(r for r in summary["rows"] if r["n"] == 1)["gold"]  # best-of-1 = the SFT model
    return [{"setting": r["n"], "gold": r["gold"], "kl": r["kl_bound"], "reward": r["reward"],
             "headroom": (r["gold"] - first) / (gold_max - first), "gold_before": first, **times, "bound": True}
            for r in summary["rows"]]


def mean(xs):
    return sum(xs) / len(xs)


def spread(xs):
    """Half the range: with two seeds, mean ± spread are the two values."""
    return (max(xs) - min(xs)) / 2


def summarise(results):
    """results: [(Run, [point])] -> one row per (algorithm, setting), in ALGORITHMS' and the settings' order: the
    mean and spread over seeds of gold and KL, the means of the rest, each seed's (kl, gold), and "best": True on
    each algorithm's highest mean gold among its rows with mean KL <= KL_LIMIT."""
    groups, commands = {}, {}
    for run, pts in results:
        for p in pts:
            groups.setdefault((run.algorithm, p["setting"]), []).append(p)
            commands.setdefault((run.algorithm, p["setting"]), run.template)
    rows = []
    for (algorithm, setting), pts in groups.items():
        rewards = [p["reward"] for p in pts if p["reward"] is not None]
        rows.append({"algorithm": algorithm, "setting": setting, "seeds": len(pts), "bound": pts[0]["bound"],
                     "gold": mean([p["gold"] for p in pts]), "gold_spread": spread([p["gold"] for p in pts]),
                     "kl": mean([p["kl"] for p in pts]), "kl_spread": spread([p["kl"] for p in pts]),
                     "headroom": mean([p["headroom"] for p in pts]), "reward": mean(rewards) if rewards else None,
                     "seconds": mean([p["seconds"] for p in pts]),
                     "cpu_seconds": mean([p["cpu_seconds"] for p in pts]), "runs": [(p["kl"], p["gold"]) for p in pts],
                     "command": commands[algorithm, setting], "best": False})
    order = {a.key: i for i, a in enumerate(ALGORITHMS)}
    rows.sort(key=lambda r: (order.get(r["algorithm"].key, len(order)), r["setting"]))
    for algorithm in {r["algorithm"] for r in rows}:
        within = [r for r in rows if r["algorithm"] == algorithm and r["kl"] <= KL_LIMIT]
        if within:
            max(within, key=lambda r: r["gold"])["best"] = True
    return rows


def sft_gold(results):
    """The SFT model's held-out gold: the mean of the training runs' eval/gold_before (per seed it is the same
    number for every script: same prompts, same evaluation seed), else best-of-1's. None without results."""
    before = [p["gold_before"] for run, pts in results if run.algorithm.trains for p in pts]
    before = before or [p["gold_before"] for _, pts in results for p in pts]
    return mean(before) if before else None


def table(rows, sft, gold_max):
    """The markdown table: the SFT model's row, then one row per (algorithm, setting)."""
    lines = [f"| algorithm | knob | gold after (of {gold_max:g}) | KL(π‖π_ref) (nats) | headroom closed | "
             f"reward model | seconds per run (wall / CPU) | best at KL ≤ {KL_LIMIT:g} | command (S = seed) |",
             "|---|---|---|---|---|---|---|---|---|"]
    if sft is not None:
        lines.append(f"| SFT model (the reference) | - | {sft:.2f} | 0 | 0 | | | | |")
    for r in rows:
        a = r["algorithm"]
        gold = f"{r['gold']:.2f} ± {r['gold_spread']:.2f}"
        kl = f"≤ {r['kl']:.2f} (bound)" if r["bound"] else f"{r['kl']:.2f} ± {r['kl_spread']:.2f}"
        knob = f"N = {r['setting']}" if r["bound"] else f"{a.knob} {r['setting']:g}"
        seconds = f"{r['seconds']:.0f} / {r['cpu_seconds']:.0f}" + (" (all N)" if r["bound"] else "")
        reward = f"{r['reward']:+.2f}" if r["reward"] is not None else "-"
        lines.append(f"| {a.name} | {knob} | {'**' + gold + '**' if r['best'] else gold} | {kl} | "
                     f"{r['headroom']:.2f} | {reward} | {seconds} | {'**best**' if r['best'] else ''} | "
                     f"`{r['command']}` |")
    return "\n".join(lines)


def plot(rows, sft, gold_max, path):
    """Gold against KL: one curve per algorithm (means over seeds, error bars = spread, faint dots = each seed's run),
    best-of-N dashed (its KL is a bound), the SFT model at KL 0, GOLD_MAX and the KL budget as dotted lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 6.5))
    colours = plt.cm.tab20.colors  # one colour per algorithm (up to 20)
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    for i, algorithm in enumerate(algorithms):
        mine = sorted((r for r in rows if r["algorithm"] == algorithm), key=lambda r: r["kl"])
        colour, bound = colours[i % len(colours)], mine[0]["bound"]
        kl, gold = [r["kl"] for r in mine], [r["gold"] for r in mine]
        ax.errorbar(kl, gold, xerr=[r["kl_spread"] for r in mine], yerr=[r["gold_spread"] for r in mine],
                    fmt="s--" if bound else "o-", mfc="none" if bound else colour, color=colour, capsize=3, ms=5,
                    label=algorithm.name + (" (KL: upper bound)" if bound else ""))
        ax.scatter([k for r in mine for k, _ in r["runs"]], [g for r in mine for _, g in r["runs"]], color=colour,
                   alpha=0.25, s=12, linewidths=0)
        for r in mine:
            ax.annotate(f"{r['setting']:g}", (r["kl"], r["gold"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7, color=colour)
    if sft is not None:
        ax.plot([0], [sft], marker="*", ms=15, color="black", ls="none", label=f"SFT model (the reference): {sft:.2f}")
    ax.axhline(gold_max, ls=":", color="grey", label=f"gold maximum ({gold_max:g})")
    ax.axvline(KL_LIMIT, ls=":", color="silver", label=f"KL = {KL_LIMIT:g} nats")
    if max(r["kl"] for r in rows) > 3 * KL_LIMIT:
        ax.set_xscale("symlog", linthresh=1.0)  # linear below 1 nat, logarithmic above: far-off runs stay in view
    ax.set(xlabel="KL(π‖π_ref) per sequence (nats, exact; held-out prompts)", ylabel="gold score after training",
           title="Reward–KL frontier on the built-in world (mean over seeds; labels: the knob's value)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: it hides no point
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: seed 0, 2 settings of PPO / RLOO / DPO, 2 steps each, best-of-N up to 4")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default {' '.join(map(str, SEEDS))}; "
                                                             "--quick: 0)")
    parser.add_argument("--algorithms", nargs="+", choices=[a.key for a in ALGORITHMS],
                        help="only these (default: all; --quick: " + " ".join(QUICK_ALGORITHMS) + ")")
    parser.add_argument("--results", help="folder of the runs (default runs/frontier; --quick: runs/frontier-quick)")
    parser.add_argument("--doc", help="markdown file whose generated block is replaced; the picture goes beside it "
                                      "as .png (default docs/frontier.md; --quick: RESULTS/frontier.md)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and whether each is done; run none")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    seeds = args.seeds if args.seeds is not None else ((0,) if args.quick else SEEDS)
    results_dir = os.path.abspath(args.results or os.path.join(REPO, "runs", "frontier-quick" if args.quick
                                                               else "frontier"))
    doc = os.path.abspath(args.doc or (os.path.join(results_dir, "frontier.md") if args.quick
                                       else os.path.join(REPO, "docs", "frontier.md")))
    keys = args.algorithms or (QUICK_ALGORITHMS if args.quick else [a.key for a in ALGORITHMS])
    chosen = [a for a in ALGORITHMS if a.key in keys]
    first, runs = prerequisites(chosen, results_dir, args.quick, args.threads), plan(chosen, seeds, results_dir,
                                                                                     args.quick, args.threads)
    if args.dry_run:  # the prerequisites first: they run first
        for run in first + runs:
            print(f"{'done' if is_done(run) else 'todo'}  {run.command}")
        return

    from minirlhf.data.gold import GOLD_MAX
    began, load_start = time.time(), load_average()
    todo, todo_first = sum(not is_done(run) for run in runs), sum(not is_done(run) for run in first)
    command = " ".join(["python", "bench/frontier.py", *(sys.argv[1:] if argv is None else argv)])
    if run_all(first, args.jobs, args.threads):  # the ensembles' members: cached like the runs
        raise SystemExit("bench/frontier.py: error: an ensemble member's training failed; see the .log files under "
                         + shown(os.path.join(results_dir, MEMBER.key)))
    failed = run_all(runs, args.jobs, args.threads)
    results = [(run, points(run, GOLD_MAX)) for run in runs if run not in failed]
    if not results:
        raise SystemExit("bench/frontier.py: error: no run finished; see the .log files under " + shown(results_dir))
    rows = summarise(results)
    png = os.path.splitext(doc)[0] + ".png"
    plot(rows, sft_gold(results), GOLD_MAX, png)
    firsts = [pts[0] for _, pts in results]  # one per run (best-of-N's points share its run's times)
    cpu, cores = machine()
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu}, {cores} cores; torch {importlib.metadata.version('torch')}"
              f"; {args.jobs} run(s) at a time, {args.threads} thread(s) each; seeds {', '.join(map(str, seeds))}. "
              f"This call ran {todo - len(failed)} of the {len(results)} runs"
              + (f" (and trained {todo_first} of the {len(first)} ensemble members)" if first else "")
              + f" in {(time.time() - began) / 60:.1f} min (load average {load_start} at its start, "
              f"{load_average()} at its end)"
              + (f"; the other {len(results) - (todo - len(failed))} runs were already in "
                 f"{shown(results_dir)} from an earlier call" if todo - len(failed) < len(results) else "")
              + "; the runs took "
              f"{sum(p['seconds'] for p in firsts) / 60:.1f} min of wall time and "
              f"{sum(p['cpu_seconds'] for p in firsts) / 60:.1f} min of CPU time in all, and started at load "
              f"averages {min(p['load'] for p in firsts):.2f} to {max(p['load'] for p in firsts):.2f}"
              + (". **--quick: a smoke run, not a measurement**" if args.quick else "") + ".\n\n"
              f"Command: `{command}`\n\n![gold against KL, every algorithm]({os.path.basename(png)})\n"
              + ("\nThe ensembles' members, trained first (cached like the runs): "
                 + "; ".join(f"`{run.command}`" for run in first)
                 + f"; their --reward-model folders: `{' '.join(members(results_dir))}` (seed 0 is the "
                 "shipped reward model).\n" if first else ""))
    notes = (f"\nGold and KL: mean over the seeds ± half their range; KL(π‖π_ref) is exact (nats per sequence, "
             f"held-out prompts), best-of-N's is the upper bound log N − (N−1)/N. Headroom closed = (gold after − "
             f"gold before) / ({GOLD_MAX:g} − gold before). Reward model = the mean score of the proxy the RL run "
             f"optimises (the shipped reward model; for an ensemble, its members' combined score). **best**: the "
             f"algorithm's highest gold among its settings with mean KL ≤ {KL_LIMIT:g}. Seconds: wall / CPU time of one run (imports and loading included); CPU well below "
             f"wall means the run waited for a core. Every run's numbers: "
             f"{shown(os.path.join(results_dir, 'points.json'))}.")
    block = header + "\n" + table(rows, sft_gold(results), GOLD_MAX) + "\n" + notes
    if failed:
        block += "\n\n**Failed runs (not in the table):** " + "; ".join(f"`{r.command}`" for r in failed)
    with open(os.path.join(results_dir, "points.json"), "w") as f:
        json.dump([{"algorithm": run.algorithm.name, "seed": run.seed, "command": run.command, **p}
                   for run, pts in results for p in pts], f, indent=1)
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    write_doc(doc, block, MARK_BEGIN, MARK_END, new_file="# The reward–KL frontier\n")
    print(block)
    print(f"wrote {shown(doc)} and {shown(png)}", file=sys.stderr)
    if failed:
        raise SystemExit(f"bench/frontier.py: error: {len(failed)} run(s) failed: " + ", ".join(
            f"{shown(r.out)}.log" for r in failed))


if __name__ == "__main__":
    main()
