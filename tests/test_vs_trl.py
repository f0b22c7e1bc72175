"""bench/vs_trl.py without TRL and without training: importing it imports no trl, the step-time and ratio arithmetic
against numbers worked out by hand, the flags, every minirlhf command it would run is accepted by its script's own
Args and sets what TRL is given, the token check, the markdown block, and the one line it ends with when TRL is not
installed."""
import json
import sys

import pytest

from conftest import load_bench
from minirlhf.cli import parse_args

vs_trl = load_bench("vs_trl")


def test_importing_it_imports_no_trl():
    assert "trl" not in sys.modules


def test_step_time_ratio_and_verdict_by_hand():
    # 10 steps in 20.0 s, 30 in 26.0 s: 6 s for 20 steps; start-up (17 s) cancels
    assert vs_trl.step_seconds(20.0, 26.0, (10, 30)) == pytest.approx(0.3)
    assert vs_trl.step_seconds(9.0, 11.0, (2, 4)) == pytest.approx(1.0)
    assert vs_trl.verdict(2.5, 2.5) == "yes" and vs_trl.verdict(2.49, 2.5) == "**no**"
    assert vs_trl.verdict(3.0, 2.0, gold_ok=False) == "**no**"  # GRPO: fast but worse gold is a miss
    assert vs_trl.verdict(0.5, None) == ""


def test_table_prints_the_ratio_and_the_target():
    rows = [dict(job="DPO step (minirlhf vs DPOTrainer)", setting="16 pairs", ours="0.300 s", trl="0.600 s",
                 ratio=2.0, target=2.5, met="**no**", detail=""),
            dict(job="GRPO end to end (minirlhf vs GRPOTrainer)", setting="40 iterations", ours="30.0 s",
                 trl="65.0 s", ratio=65 / 30, target=2.0, met="yes", detail=""),
            dict(job="GRPO training loop only", setting="", ours="1 s", trl="1 s", ratio=1.0, target=None, met="",
                 detail="")]
    lines = vs_trl.table(rows).splitlines()
    assert lines[0] == "| job | setting | minirlhf | TRL | TRL / minirlhf | target | met? |"
    assert lines[2] == "| DPO step (minirlhf vs DPOTrainer) | 16 pairs | 0.300 s | 0.600 s | 2.00 | >= 2.5 | **no** |"
    assert "| 2.17 | >= 2.0 at gold >= TRL's | yes |" in lines[3]
    assert lines[4].endswith("| 1.00 |  |  |")


def test_token_check_counts_identical_rows():
    check = vs_trl.token_check([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]])
    assert check == dict(ours=2.5, trl=2.5, same=1, rows=2, trl_rows=2)
    assert vs_trl.token_check([[1]], [[1], [2, 3]])["same"] == 0  # different row counts: nothing is compared


def test_trl_tokens_reads_both_trainers_layouts(tmp_path):
    (tmp_path / "tokens.json").write_text(json.dumps({"prompt_ids": [[1, 2]], "chosen_ids": [[3]],
                                                      "rejected_ids": [[4, 5]]}))
    assert vs_trl.trl_tokens("dpo", str(tmp_path)) == [[1, 2, 3], [1, 2, 4, 5]]  # DPOTrainer: prompt apart
    (tmp_path / "tokens.json").write_text(json.dumps({"chosen_ids": [[1, 3]], "rejected_ids": [[1, 4]]}))
    assert vs_trl.trl_tokens("reward", str(tmp_path)) == [[1, 3], [1, 4]]  # RewardTrainer: whole rows


def test_flags(capsys):
    args = vs_trl.parse_args([])
    assert (args.threads, args.jobs, args.steps, args.repeats, args.no_write) == (
        1, ["dpo", "reward", "grpo"], (10, 60), 2, False)
    assert vs_trl.parse_args(["--steps", "10,30"]).steps == (10, 30)
    args = vs_trl.parse_args(["--quick", "--jobs", "reward,dpo-precompute", "--threads", "2", "--no-write"])
    assert (args.threads, args.jobs, args.steps, args.repeats, args.no_write) == (
        2, ["reward", "dpo-precompute"], (2, 4), 1, True)
    for bad in (["--jobs", "dpo,ppo"], ["--steps", "30,10"], ["--steps", "10"], ["--steps", "a,b"],
                ["--threads", "0"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as e:
            vs_trl.parse_args(bad)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("vs_trl.py: error: --"), err


@pytest.mark.parametrize("job", ["dpo", "dpo-precompute", "reward"])
def test_pair_jobs_give_both_sides_the_same_settings(job, tmp_path):
    s = vs_trl.pair_settings(job)
    argv = vs_trl.ours_command(job, s, 1, str(tmp_path), 30)
    script = {"train_dpo.py": vs_trl.train_dpo, "train_reward.py": vs_trl.train_reward}[argv[0]]
    a = parse_args(script.Args, argv[1:])  # argparse exits on an unknown flag or a bad value
    spec = vs_trl.trl_spec(job, s, 1, str(tmp_path), 30)
    assert a.batch_size == spec["batch_size"] == 16 and a.max_steps == spec["steps"] == 30
    assert (a.threads, a.dtype, a.save_every, a.out) == (1, "float32", 0, str(tmp_path))
    for key in ("lr", "warmup_steps", "max_length", "max_prompt_length", "lora_r", "lora_alpha", "grad_clip", "seed"):
        assert getattr(a, key) == spec[key], key
    assert a.lora_targets == ["all-linear"] and a.lora_dropout == 0.0 and a.grad_accum == 1
    if job == "reward":
        assert a.loss == "bt" and a.eval_every > 30 and spec["job"] == "reward"
    else:
        assert (a.loss, a.beta, a.precompute_ref) == ("sigmoid", spec["beta"], spec["precompute_ref"])
        assert a.precompute_ref == (job == "dpo-precompute") and spec["job"] == "dpo" and a.eval_every == 0


@pytest.mark.parametrize("quick", [False, True])
def test_grpo_gives_both_sides_the_same_settings(quick, tmp_path):
    s = vs_trl.grpo_settings(quick)
    argv = vs_trl.ours_command("grpo", s, 1, str(tmp_path))
    assert argv[0] == "train_grpo.py"
    a = parse_args(vs_trl.train_grpo.Args, argv[1:])
    assert (a.reward, a.eval_every, a.save_every, a.threads, a.dtype) == ("gold", 0, 0, 1, "float32")
    assert a.iterations == (vs_trl.QUICK_ITERATIONS if quick else 40)
    spec = vs_trl.trl_spec("grpo", s, 1, str(tmp_path))
    for key, value in spec.items():  # every number TRL is given is the one minirlhf runs with
        if hasattr(a, key) and key != "out":
            assert getattr(a, key) == value, key
    assert (spec["rollout_size"], spec["group_size"], spec["minibatch_size"], spec["ppo_epochs"]) == (64, 8, 32, 2)
    assert (spec["loss_aggregation"], spec["advantage_std"], spec["beta"]) == ("token", "group", 0.04)


def test_the_block_is_a_new_section_at_the_end_and_is_replaced_in_place(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written analysis\n")
    vs_trl.write_doc(str(doc), "first table")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written analysis\n\n## minirlhf vs TRL")
    assert text.rstrip().endswith(f"{vs_trl.MARK_BEGIN}\nfirst table\n{vs_trl.MARK_END}")
    doc.write_text(text + "\nanalysis of the TRL table\n")
    vs_trl.write_doc(str(doc), "second table")
    text = doc.read_text()
    assert "first table" not in text and text.count("## minirlhf vs TRL") == 1
    assert text.endswith(f"{vs_trl.MARK_BEGIN}\nsecond table\n{vs_trl.MARK_END}\n\nanalysis of the TRL table\n")


def test_without_trl_it_ends_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl fails, find_spec finds nothing: as if not installed
    monkeypatch.setattr(sys, "argv", ["bench/vs_trl.py", "--no-write", "--quick"])
    with pytest.raises(SystemExit) as e:
        vs_trl.main()
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ('vs_trl.py: error: TRL is not installed: pip install -e ".[bench]" '
                                    '-c constraints.txt')
