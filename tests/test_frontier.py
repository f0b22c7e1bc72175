"""bench/frontier.py without training anything: every command it would run is accepted by its script's own flags
(and sets the knob, seed and evaluation it claims), best-of-N's printed table is parsed by column name, the means,
spreads and "best at KL <= 5" are checked against numbers worked out by hand, the cache skips a finished run and
re-runs a failed or unfinished one, and the markdown block is replaced between its markers only."""
import importlib
import json
import math
import os

import pytest

from conftest import load_bench
from minirlhf.cli import parse_args

frontier = load_bench("frontier")
common = load_bench("common")

ALG = {a.key: a for a in frontier.ALGORITHMS}
KNOB_FIELD = {"--kl-coef": "kl_coef", "--beta": "beta"}


def script_args(run):
    """The run's argv parsed by its script's own Args (argparse exits on an unknown flag or a bad value)."""
    if run.algorithm.trains:
        module = importlib.import_module(run.argv[0][:-3])
        return parse_args(module.Args, list(run.argv[1:]))
    from minirlhf import best_of_n
    assert run.argv[:2] == ("-m", "minirlhf.best_of_n")
    return parse_args(best_of_n.Args, list(run.argv[2:]))


@pytest.mark.parametrize("quick", [False, True])
def test_every_command_is_accepted_and_sets_what_it_claims(quick, tmp_path):
    runs = frontier.plan(frontier.ALGORITHMS, (0, 1) if not quick else (0,), str(tmp_path), quick)
    if not quick:  # 7 trained algorithms x 4 settings + best-of-N, per seed; >= 4 settings each
        trained = [a for a in frontier.ALGORITHMS if a.trains]
        assert len(runs) == 2 * (len(trained) * 4 + 1) and all(len(a.settings) >= 4 for a in trained)
        assert frontier.BEST_OF_N == (1, 2, 4, 8, 16, 32, 64)
    for run in runs:
        args = script_args(run)
        assert args.seed == run.seed and args.threads == 1, run.command
        if not run.algorithm.trains:
            assert args.n == list(run.setting) and args.prompts == (frontier.QUICK_PROMPTS if quick else 120)
            continue
        assert getattr(args, KNOB_FIELD[run.algorithm.knob]) == run.setting, run.command
        assert args.out == run.out and args.eval_every == 0, run.command
        assert (args.eval_prompts, args.eval_samples) == ((8, 1) if quick else (120, 4)), run.command
        if hasattr(args, "reward"):  # RL: the shipped reward model (a proxy), the script's 40 iterations
            assert args.reward == "model" and args.iterations == (2 if quick else 40), run.command
            if run.algorithm.ensemble:  # the shipped reward model and the two trained members, combined
                assert args.reward_model == list(frontier.members(str(tmp_path))), run.command
                assert (args.reward_ensemble, args.reward_ensemble_lambda, args.reward_ensemble_normalize) == (
                    "mean-minus-std", 1.0, False), run.command
            else:
                assert args.reward_model == parse_args(type(args), []).reward_model, run.command
        else:  # DPO / IPO: one epoch over the pairs
            assert args.max_steps == (2 if quick else -1), run.command


@pytest.mark.parametrize("quick", [False, True])
def test_ensembles_train_their_members_first(quick, tmp_path, capsys):
    """The ensembles' prerequisites: train_reward.py with its defaults at --seed 1 and 2 (--quick: 2 steps), writing
    the reward models the ensemble commands name; none without an ensemble; --dry-run lists them first."""
    import train_reward
    ensembles = [a for a in frontier.ALGORITHMS if a.ensemble]
    assert {a.key for a in ensembles} == {"ppo-ensemble", "grpo-ensemble"}
    assert frontier.prerequisites([ALG["ppo"], ALG["dpo"]], str(tmp_path), quick) == []
    first = frontier.prerequisites(frontier.ALGORITHMS, str(tmp_path), quick)
    assert [run.seed for run in first] == list(frontier.MEMBER_SEEDS) == [1, 2]
    for run in first:
        args = parse_args(train_reward.Args, list(run.argv[1:]))
        assert run.argv[0] == "train_reward.py" and args.seed == run.seed and args.threads == 1
        assert args.out == run.out and args.loss == "bt" and args.max_steps == (2 if quick else -1)
    assert frontier.members(str(tmp_path)) == (frontier.SHIPPED_REWARD_MODEL,
                                               *(os.path.join(run.out, "reward_model") for run in first))
    frontier.main(["--dry-run", "--results", str(tmp_path), "--algorithms", "grpo-ensemble", "ppo"]
                  + (["--quick"] if quick else []))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines[:2]] == ["train_reward.py"] * 2 and all(
        line.startswith("todo  ") for line in lines)
    assert len(lines) == 2 + (1 if quick else 2) * 2 * (2 if quick else 4)
    assert frontier.SHIPPED_REWARD_MODEL == os.path.relpath(os.path.join(frontier.REPO, "minirlhf", "assets",
                                                                         "reward-model"), frontier.REPO)


def test_each_algorithm_is_what_its_name_says(tmp_path):
    run = {a: frontier.make_run(ALG[a], ALG[a].settings[0], 1, str(tmp_path), False) for a in ALG}
    rloo, dr, ipo = script_args(run["rloo"]), script_args(run["dr-grpo"]), script_args(run["ipo"])
    assert (rloo.baseline, rloo.samples_per_prompt) == ("leave-one-out", 4)
    assert script_args(run["reinforce"]).baseline == "running-mean"
    assert (dr.loss_aggregation, dr.advantage_std) == ("constant", "none")
    grpo = script_args(run["grpo"])
    assert (grpo.loss_aggregation, grpo.advantage_std) == ("token", "group")  # GRPO's defaults
    assert ipo.loss == "ipo" and script_args(run["dpo"]).loss == "sigmoid"


def test_template_puts_s_for_the_seed(tmp_path):
    run = frontier.make_run(ALG["ppo"], 0.3, 1, str(tmp_path), False)
    assert run.template == run.command.replace("--seed 1", "--seed S").replace("kl-coef0.3-seed1", "kl-coef0.3-seedS")
    assert "--seed S" in run.template and run.template.endswith("kl-coef0.3-seedS")


BEST_OF_N_OUTPUT = """Loading weights: 100%
[transformers] a warning | with a bar
best-of-n on 120 held-out prompts, proxy = ScalarHead from x, gold max 4.0
| n | KL bound (nats) | proxy | gold | win rate vs n=1 | length |
|---|---|---|---|---|---|
| 1 | 0.000 | +1.332 | 1.375 | 0.500 | 10.8 |
| 2 | 0.193 | +2.770 | 2.500 | 0.812 | 14.5 |
| 64 | 3.175 | -0.618 | 4.000 | 1.000 | 7.1 |
"""


def test_parse_best_of_n_reads_columns_by_name():
    rows = frontier.parse_best_of_n(BEST_OF_N_OUTPUT)
    assert rows == [{"n": 1, "kl_bound": 0.0, "reward": 1.332, "gold": 1.375},
                    {"n": 2, "kl_bound": 0.193, "reward": 2.77, "gold": 2.5},
                    {"n": 64, "kl_bound": 3.175, "reward": -0.618, "gold": 4.0}]
    moved = BEST_OF_N_OUTPUT.replace("| n | KL bound (nats) | proxy | gold |", "| n | gold | proxy | KL bound (nats) |")
    assert frontier.parse_best_of_n(moved)[2] == {"n": 64, "kl_bound": 4.0, "reward": -0.618, "gold": 3.175}
    with pytest.raises(ValueError, match="no best-of-n table"):
        frontier.parse_best_of_n("best-of-n crashed\n")


def write_run(run, summary, wall=10.0, cpu=9.0, load="0.50"):
    os.makedirs(run.out, exist_ok=True)
    with open(os.path.join(run.out, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(run.out, "frontier.json"), "w") as f:
        json.dump({"command": run.command, "wall_seconds": wall, "cpu_seconds": cpu, "load_average_at_start": load},
                  f)


def trained(gold, kl, gold_before=2.0, reward=1.0):
    return {"eval/gold_after": gold, "eval/gold_before": gold_before, "eval/kl": kl, "eval/reward_after": reward,
            "eval/headroom_closed": (gold - gold_before) / (4.0 - gold_before), "train/finished": True}


def fake_results(tmp_path):
    """PPO at 0.05 (KL 6 and 7: over the budget, highest gold) and 0.3 (KL 2 and 3), DPO at 0.5 (no reward model),
    best-of-N with N = 1, 4 on two seeds."""
    results = []
    spec = {("ppo", 0.05): [(3.6, 6.0), (3.4, 7.0)], ("ppo", 0.3): [(3.0, 2.0), (3.2, 3.0)],
            ("dpo", 0.5): [(2.5, 1.0), (2.7, 1.5)]}
    for (key, setting), seeds in spec.items():
        for seed, (gold, kl) in enumerate(seeds):
            run = frontier.make_run(ALG[key], setting, seed, str(tmp_path), False)
            summary = trained(gold, kl)
            if key == "dpo":
                del summary["eval/reward_after"]  # DPO has no reward model
            write_run(run, summary, wall=100.0 + 2 * seed, cpu=90.0 + 2 * seed)
            results.append((run, frontier.points(run, 4.0)))
    for seed, (g1, g4) in enumerate([(2.0, 3.0), (2.2, 3.3)]):
        run = frontier.make_run(ALG["best-of-n"], (1, 4), seed, str(tmp_path), False)
        write_run(run, {"rows": [{"n": 1, "kl_bound": 0.0, "reward": 1.5, "gold": g1},
                                 {"n": 4, "kl_bound": math.log(4) - 0.75, "reward": 3.5, "gold": g4}]}, wall=60.0)
        results.append((run, frontier.points(run, 4.0)))
    return results


def test_summarise_means_spreads_and_best_within_the_kl_budget(tmp_path):
    rows = frontier.summarise(fake_results(tmp_path))
    by = {(r["algorithm"].key, r["setting"]): r for r in rows}
    assert [(r["algorithm"].key, r["setting"]) for r in rows] == [("ppo", 0.05), ("ppo", 0.3), ("dpo", 0.5),
                                                                  ("best-of-n", 1), ("best-of-n", 4)]
    ppo = by["ppo", 0.3]
    assert ppo["gold"] == pytest.approx(3.1) and ppo["gold_spread"] == pytest.approx(0.1)
    assert ppo["kl"] == pytest.approx(2.5) and ppo["kl_spread"] == pytest.approx(0.5)
    assert ppo["headroom"] == pytest.approx((1.0 / 2 + 1.2 / 2) / 2) and ppo["seconds"] == pytest.approx(101)
    assert ppo["cpu_seconds"] == pytest.approx(91) and sorted(ppo["runs"]) == [(2.0, 3.0), (3.0, 3.2)]
    # PPO at 0.05 has more gold (3.5) but mean KL 6.5 > 5: the best within the budget is 0.3
    assert by["ppo", 0.3]["best"] and not by["ppo", 0.05]["best"]
    assert by["dpo", 0.5]["best"] and by["dpo", 0.5]["reward"] is None
    # best-of-N: KL is the bound, headroom from its own N = 1 (seed 0: 1/2, seed 1: 1.1/1.8)
    bon = by["best-of-n", 4]
    assert bon["bound"] and bon["best"] and not by["best-of-n", 1]["best"]
    assert bon["kl"] == pytest.approx(math.log(4) - 0.75) and bon["headroom"] == pytest.approx((0.5 + 1.1 / 1.8) / 2)
    assert by["best-of-n", 1]["headroom"] == 0.0
    # the SFT model's gold: the training runs' gold before (2.0), not best-of-1's
    assert frontier.sft_gold(fake_results(tmp_path)) == pytest.approx(2.0)


def test_table_marks_best_and_bounds(tmp_path):
    results = fake_results(tmp_path)
    text = frontier.table(frontier.summarise(results), frontier.sft_gold(results), 4.0)
    lines = text.splitlines()
    assert lines[2] == "| SFT model (the reference) | - | 2.00 | 0 | 0 | | | | |"
    ppo = next(line for line in lines if "--kl-coef 0.3 " in line)
    assert ppo.startswith("| PPO | --kl-coef 0.3 | **3.10 ± 0.10** | 2.50 ± 0.50 | 0.55 | +1.00 | 101 / 91 | "
                          "**best** |")
    assert "--seed S" in ppo and "kl-coef0.3-seedS`" in ppo
    bon = next(line for line in lines if "N = 4" in line)
    assert "≤ 0.64 (bound)" in bon and "60 / 9 (all N)" in bon and "--n 1 4 --seed S" in bon
    assert "| DPO | --beta 0.5 | **2.60 ± 0.10** | 1.25 ± 0.25 | 0.30 | - |" in text
    assert len(lines) == 2 + 1 + 5


def test_plot_draws_a_png(tmp_path):
    results = fake_results(tmp_path)
    path = str(tmp_path / "frontier.png")
    frontier.plot(frontier.summarise(results), frontier.sft_gold(results), 4.0, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_doc_replaces_only_between_the_markers(tmp_path):
    """bench/common.write_doc, the one writer of every generated block: a new file, a file without the markers (a
    section appended), and a re-run that keeps the hand-written text around the block."""
    begin, end, path = frontier.MARK_BEGIN, frontier.MARK_END, str(tmp_path / "frontier.md")
    common.write_doc(path, "first", begin, end, new_file="# The frontier\n")
    assert open(path).read() == f"# The frontier\n\n{begin}\nfirst\n{end}\n"
    with open(path, "w") as f:
        f.write(f"# Title\n\nintro\n\n{begin}\nold table\n{end}\n\n## by hand\nkept\n")
    common.write_doc(path, "new table", begin, end)
    assert open(path).read() == f"# Title\n\nintro\n\n{begin}\nnew table\n{end}\n\n## by hand\nkept\n"
    with open(path, "w") as f:
        f.write("# Title\n\nanalysis\n")
    common.write_doc(path, "table", begin, end, new_section="## Section")
    assert open(path).read() == f"# Title\n\nanalysis\n\n## Section\n\n{begin}\ntable\n{end}\n"


def test_run_all_skips_finished_runs_and_reruns_failed_ones(tmp_path):
    """Fake runs (python -c): one writes a finished summary, one exits 3, one exits 0 without finishing (a Ctrl-C'd
    training script). A second call runs only the last two again."""
    counter = tmp_path / "starts.txt"

    def fake(name, code):
        out = str(tmp_path / name)
        body = (f"import json, os; open({str(counter)!r}, 'a').write({name!r} + '\\n'); {code}")
        return frontier.Run(ALG["ppo"], 0.3, 0, out, ("-c", body))

    ok = fake("ok", f"json.dump({{'train/finished': True}}, open(os.path.join({str(tmp_path / 'ok')!r}, "
                    "'summary.json'), 'w'))")
    crash = fake("crash", "raise SystemExit(3)")
    stopped = fake("stopped", f"json.dump({{'train/finished': False}}, open(os.path.join("
                              f"{str(tmp_path / 'stopped')!r}, 'summary.json'), 'w'))")
    said = []
    failed = frontier.run_all([ok, crash, stopped], jobs=2, say=said.append, poll=0.02)
    assert sorted(r.out for r in failed) == [crash.out, stopped.out]
    assert frontier.is_done(ok) and not frontier.is_done(stopped)
    record = json.load(open(os.path.join(ok.out, "frontier.json")))
    assert record["command"] == ok.command and record["wall_seconds"] > 0 and record["cpu_seconds"] >= 0
    assert any("FAILED" in s and "exit 3" in s for s in said)
    failed = frontier.run_all([ok, crash, stopped], jobs=1, say=said.append, poll=0.02)
    assert sorted(r.out for r in failed) == [crash.out, stopped.out]
    assert said[-3].startswith("1 of 3 runs already done; 2 to run")
    assert sorted(counter.read_text().split()) == ["crash", "crash", "ok", "stopped", "stopped"]
