"""The KL choices the scripts offer, and what they say about them (docs/kl.md, "What the scripts offer"):

- --kl-estimator k2 | k3 in the reward (train_ppo.py, train_reinforce.py) still run, with one warning line naming the
  gradient they give (validation.kl_estimator_warning); k1, the default, prints nothing; a refused command prints its
  error alone;
- --kl-loss k3 | k2 | k3+ and --kl-off-policy-weight (train_grpo.py): checked, and a short run with them finishes
  (their gradients: tests/test_kl_gradients.py);
- --target-kl below the KL floor of the sampling filters is refused with one line after the first rollout
  (validation.check_kl_floor), in a real subprocess of train_ppo.py on the embedded tiny model.
"""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from minirlhf.cli import parse_args
from minirlhf.errors import InputError
from minirlhf.validation import check_kl_floor, filter_flags, kl_estimator_warning
from test_bad_inputs import run_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--threads", "1", "--rollout-size", "8", "--minibatch-size", "4", "--max-new-tokens", "8",
            "--eval-prompts", "3", "--eval-samples", "1", "--eval-every", "0"]


def script_module(monkeypatch, name):
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])  # the warning's prefix
    return __import__(name)


# ---- --kl-estimator in the reward: one warning line for k2 and k3 ----------------------------------------------------

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("script", ["train_ppo", "train_reinforce"])
def test_kl_estimator_k2_k3_in_the_reward_warn_in_one_line(script, estimator, monkeypatch, capsys):
    module = script_module(monkeypatch, script)
    module.check_args(parse_args(module.Args, ["--kl-estimator", estimator]))
    captured = capsys.readouterr()
    assert captured.out == ""
    if estimator == "k1":
        assert captured.err == ""
        return
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"{script}.py: warning: --kl-estimator "
                                                                     f"{estimator} in the reward: its gradient is ")
    assert "not the KL's (docs/kl.md); k1 is the correct choice" in captured.err
    assert {"k2": "∇E_π[k2] − ∇KL(π‖π_ref)", "k3": "∇KL(π‖π_ref) − ∇KL(π_ref‖π)"}[estimator] in captured.err


def test_a_refused_command_prints_its_error_without_the_warning(monkeypatch, capsys):
    module = script_module(monkeypatch, "train_ppo")
    with pytest.raises(InputError, match="--lr must be > 0"):
        module.check_args(parse_args(module.Args, ["--kl-estimator", "k3", "--lr", "-1"]))
    assert capsys.readouterr().err == ""
    assert kl_estimator_warning("k1") is None and "k3" in kl_estimator_warning("k3")


# ---- --kl-loss and --kl-off-policy-weight in train_grpo.py -----------------------------------------------------------

def test_grpo_kl_loss_is_checked_and_the_choices_run(monkeypatch, tmp_path):
    module = script_module(monkeypatch, "train_grpo")
    with pytest.raises(InputError, match=r"--kl-loss must be one of \('k3', 'k2', 'k3\+'\), got 'k1'"):
        module.check_args(parse_args(module.Args, ["--kl-loss", "k1"]))
    assert parse_args(module.Args, []).kl_loss == "k3" and not parse_args(module.Args, []).kl_off_policy_weight
    out = str(tmp_path / "grpo")
    module.main(parse_args(module.Args, TINY_RUN + ["--iterations", "1", "--group-size", "4", "--kl-loss", "k3+",
                                                    "--kl-off-policy-weight", "--out", out]))
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert math.isfinite(row["loss/kl"]) and row["loss/kl"] >= 0  # k3's value: never negative


# ---- --target-kl below the KL floor of the sampling filters ----------------------------------------------------------

def settings(target_kl, top_k=0, top_p=1.0, min_new_tokens=0):
    return SimpleNamespace(target_kl=target_kl, top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens)


def test_check_kl_floor_refuses_only_a_target_below_a_filters_floor():
    with pytest.raises(InputError) as e:
        check_kl_floor(settings(0.1, top_k=5, min_new_tokens=8), 0.4734)
    assert str(e.value).startswith("--target-kl 0.1 is below the KL floor of the sampling filters (--top-k 5 "
                                   "--min-new-tokens 8): the fresh policy, equal to the reference, already measures "
                                   "objective/kl 0.473 nats per sequence")
    check_kl_floor(settings(0.5, top_k=5), 0.4734)  # reachable
    check_kl_floor(settings(0.1), 0.4734)  # no filter: no floor (the sampled distribution is π)
    check_kl_floor(settings(None, top_k=5), 0.4734)  # fixed β: nothing is steered
    assert filter_flags(settings(None, top_p=0.9)) == "--top-p 0.9" and filter_flags(settings(None)) == ""


def test_target_kl_below_the_top_k_floor_stops_the_script_in_one_line(tmp_path):
    """train_ppo.py --top-k 5 --target-kl 0.1: the first rollout (policy = reference) measures objective/kl ~0.5
    nats per sequence (k1, the default estimator), above the target: exit 1, the last stderr line the refusal."""
    out = tmp_path / "ppo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_ppo.py"), *TINY_RUN, "--iterations", "3",
                           "--top-k", "5", "--target-kl", "0.1", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train_ppo.py: error: --target-kl 0.1 is below the KL floor of the sampling filters "
                           "(--top-k 5): the fresh policy, equal to the reference, already measures objective/kl "), \
        last
    assert "Traceback" not in proc.stderr and float(last.split("objective/kl ")[1].split()[0]) > 0.1
    assert not (out / "summary.json").exists()


def test_target_kl_below_the_min_new_tokens_floor_stops_reinforce(monkeypatch, tmp_path):
    """--min-new-tokens 8 of --max-new-tokens 8: EOS is forbidden at every step, the first rollout measures ~1.5 nats
    (at --min-new-tokens 4 only ~0.002: the tiny model rarely ends that early), the check of the same function."""
    code = run_in_process("train_reinforce.py", TINY_RUN + ["--iterations", "2", "--min-new-tokens", "8",
                                                            "--target-kl", "0.1", "--out", str(tmp_path / "r")],
                          monkeypatch)
    assert isinstance(code, str) and "\n" not in code, code
    assert code.startswith("train_reinforce.py: error: --target-kl 0.1 is below the KL floor of the sampling "
                           "filters (--min-new-tokens 8)"), code
