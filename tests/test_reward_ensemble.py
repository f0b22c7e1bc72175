"""minirlhf/reward_ensemble.py and an ensemble of reward models on one base (roles.Reward --reward-model A B ...):
combine and the members' normalisation against hand values in float64 and numpy's population statistics; one member
gives that member's scores exactly; the members load as distinct adapters, each scoring as it does alone; with
--reward-ensemble-normalize two members that differ by a scale score alike; bad ensemble flags end in one line before
anything loads."""
import os
import runpy
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minirlhf.assets import ASSETS_DIR, TINY_LLAMA
from minirlhf.cli import parse_args
from minirlhf.errors import InputError
from minirlhf.formats import save_head
from minirlhf.heads import RatingHead
from minirlhf.lora import adapter_names
from minirlhf.reward_ensemble import ENSEMBLES, combine, ensemble_std, normalize_members, reference_statistics
from minirlhf.settings import RLArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RM = os.path.join(ASSETS_DIR, "reward-model")


# ---------------------------------------------------------------- combine: the arithmetic
def test_combine_hand_values_float64():
    scores = torch.tensor([[1.0, 0.0], [2.0, 4.0], [6.0, 2.0]], dtype=torch.float64)  # M = 3 members, B = 2
    # column 0: mean 3, squared deviations 4 + 1 + 9 = 14; column 1: mean 2, squared deviations 4 + 4 + 0 = 8
    var = torch.tensor([14 / 3, 8 / 3], dtype=torch.float64)  # population (1/M)
    assert torch.equal(combine(scores, "mean"), torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert torch.equal(combine(scores, "min"), torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(combine(scores, "mean-minus-var", 0.5), torch.tensor([3 - 7 / 3, 2 - 4 / 3],
                                                                                    dtype=torch.float64))
    torch.testing.assert_close(combine(scores, "mean-minus-std", 0.5),
                               torch.tensor([3.0, 2.0], dtype=torch.float64) - 0.5 * var.sqrt())
    torch.testing.assert_close(ensemble_std(scores), var.sqrt())
    # the population spread, not the sample one (1/(M-1): variances 7 and 4)
    sample = torch.tensor([3 - 0.5 * 7 ** 0.5, 2 - 0.5 * 4 ** 0.5], dtype=torch.float64)
    assert (combine(scores, "mean-minus-std", 0.5) - sample).abs().min() > 0.1


def test_two_members_mean_minus_one_std_is_their_min():
    """M = 2: the population std is |a - b| / 2, so mean - 1·std = min(a, b) and the variance is (a - b)² / 4."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 50, generator=g, dtype=torch.float64)
    scores = torch.stack([a, b])
    torch.testing.assert_close(combine(scores, "mean-minus-std", 1.0), torch.minimum(a, b))
    torch.testing.assert_close(combine(scores, "mean-minus-var", 1.0), (a + b) / 2 - (a - b) ** 2 / 4)


def test_combine_matches_numpy_population_statistics():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(5, 7)) * 3  # M = 5 members, B = 7 responses
    lam = 0.7
    expected = {"mean": scores.mean(0), "min": scores.min(0),
                "mean-minus-var": scores.mean(0) - lam * scores.var(0, ddof=0),
                "mean-minus-std": scores.mean(0) - lam * scores.std(0, ddof=0)}
    assert set(expected) == set(ENSEMBLES)
    for how, want in expected.items():
        np.testing.assert_allclose(combine(torch.from_numpy(scores), how, lam).numpy(), want, rtol=0, atol=1e-12)
    # λ = 0: both uncertainty-weighted ones are the mean
    for how in ("mean-minus-var", "mean-minus-std"):
        np.testing.assert_allclose(combine(torch.from_numpy(scores), how, 0.0).numpy(), scores.mean(0), atol=1e-12)


def test_one_member_is_its_scores_exactly():
    """One reward model: every combination returns its float32 scores bit for bit (the default runs' numbers)."""
    scores = torch.randn(1, 33, generator=torch.Generator().manual_seed(2)) * 5  # (1, B), float32
    assert torch.equal(ensemble_std(scores), torch.zeros(33))
    for how in ENSEMBLES:
        for lam in (0.0, 1.0, 3.5):
            out = combine(scores, how, lam)
            assert out.dtype == torch.float32 and torch.equal(out, scores[0]), (how, lam)


def test_combine_refuses_bad_input():
    with pytest.raises(ValueError, match="shape"):
        combine(torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        combine(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="how must be one of"):
        combine(torch.zeros(2, 4), "median")


# ---------------------------------------------------------------- normalised members: the arithmetic
def test_reference_statistics_and_normalize_members_hand_values_float64():
    reference = torch.tensor([[1.0, 3.0, 5.0, 7.0], [10.0, 10.0, 14.0, 14.0]], dtype=torch.float64)  # M = 2, N = 4
    mean, std = reference_statistics(reference)
    # member 0: mean 4, deviations -3 -1 1 3, population variance 20/4 = 5; member 1: mean 12, deviations ±2: var 4
    assert torch.equal(mean, torch.tensor([4.0, 12.0], dtype=torch.float64))
    torch.testing.assert_close(std, torch.tensor([5 ** 0.5, 2.0], dtype=torch.float64), rtol=0, atol=1e-15)
    scores = torch.tensor([[4.0, 9.0], [12.0, 8.0]], dtype=torch.float64)  # (M, B)
    # z: member 0 (0, 5/√5 = √5), member 1 (0, -4/2 = -2); then μ̄ + σ̄·z with μ̄ = 8, σ̄ = (√5 + 2)/2
    bar = (5 ** 0.5 + 2) / 2
    want = torch.tensor([[8.0, 8 + bar * 5 ** 0.5], [8.0, 8 - 2 * bar]], dtype=torch.float64)
    torch.testing.assert_close(normalize_members(scores, mean, std), want, rtol=0, atol=1e-14)


def test_normalize_members_removes_offsets_and_scales_only():
    """Members that are one reward model up to an offset and a positive scale become the same scores (spread 0); one
    member is its own score; an order-changing disagreement survives."""
    g = torch.Generator().manual_seed(4)
    base, ref = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    affine = [(0.0, 1.0), (3.0, 2.5), (-1.5, 0.4)]  # (offset, scale) of each member
    scores = torch.stack([a + b * base for a, b in affine])  # (3, 7)
    mean, std = reference_statistics(torch.stack([a + b * ref for a, b in affine]))  # (3,) each
    out = normalize_members(scores, mean, std)
    torch.testing.assert_close(ensemble_std(out), torch.zeros(7, dtype=torch.float64), rtol=0, atol=1e-12)
    assert ensemble_std(scores).min() > 0.1  # raw: the offsets and scales pass for disagreement
    # every row is μ̄ + σ̄·z, z the first member's (offset 0, scale 1) standardised scores
    z = (base - ref.mean()) / ref.std(correction=0)
    mu = sum(a + b * ref.mean() for a, b in affine) / 3  # μ̄
    sigma = sum(b * ref.std(correction=0) for _, b in affine) / 3  # σ̄
    torch.testing.assert_close(out, (mu + sigma * z).expand(3, 7), rtol=0, atol=1e-12)
    one = normalize_members(scores[:1], mean[:1], std[:1])
    torch.testing.assert_close(one, scores[:1], rtol=0, atol=1e-12)
    flipped = torch.stack([base, -base])  # a disagreement on the order is no offset or scale: it stays
    assert ensemble_std(normalize_members(flipped, *reference_statistics(torch.stack([ref, -ref])))).max() > 0.5
    with pytest.raises(ValueError, match="std must be > 0"):
        normalize_members(scores, mean, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="need scores"):
        normalize_members(scores, mean[:2], std[:2])


# ---------------------------------------------------------------- the members on one base (roles.Reward)
def other_reward_model(folder):
    """A second reward model: the shipped one with its adapter's B matrices x 1.5 and its head's weight negated."""
    shutil.copytree(RM, folder)
    adapter = load_file(os.path.join(folder, "adapter_model.safetensors"))
    save_file({k: v * 1.5 if "lora_B" in k else v for k, v in adapter.items()},
              os.path.join(folder, "adapter_model.safetensors"))
    head = load_file(os.path.join(folder, "head.safetensors"))
    save_file({k: -v if k.endswith("weight") else v for k, v in head.items()}, os.path.join(folder, "head.safetensors"))
    return str(folder)


def reward_of(folders, ensemble="mean", lam=1.0, normalize=None):
    """roles.Reward on a freshly loaded embedded base, with the settings it reads (normalize None: the setting left
    out, as before it existed)."""
    from minirlhf.models import load_model, load_tokenizer
    from minirlhf.roles import Reward
    tokenizer = load_tokenizer(TINY_LLAMA)
    model = load_model(TINY_LLAMA, dtype="float32", device="cpu", tokenizer=tokenizer).eval()
    args = types.SimpleNamespace(reward="model", reward_model=folders, reward_ensemble=ensemble,
                                 reward_ensemble_lambda=lam, reward_transform="expected", reward_entropy_coef=0.0,
                                 dataset="builtin", forward_batch_size=3, template=None, system_prompt=None)
    if normalize is not None:
        args.reward_ensemble_normalize = normalize
    return Reward(model, args, tokenizer)


def scaled_reward_model(folder, factor):
    """The shipped reward model with its head's weight times `factor`: every score exactly `factor` times (no bias)."""
    shutil.copytree(RM, folder)
    head = load_file(os.path.join(folder, "head.safetensors"))
    save_file({k: v * factor for k, v in head.items()}, os.path.join(folder, "head.safetensors"))
    return str(folder)


def test_normalize_flag_puts_members_on_one_scale(tmp_path, monkeypatch):
    """--reward-ensemble-normalize: the shipped reward model and a copy scoring exactly 2x it differ only by a scale,
    so raw they disagree by |R - 2R| / 2 and normalised not at all: both become μ̄ + σ̄·z = 1.5·R."""
    from minirlhf import roles
    monkeypatch.setattr(roles, "REFERENCE_PAIRS", 16)  # a small reference set: fast
    double = scaled_reward_model(tmp_path / "double", 2.0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 200, (4, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "ended": torch.ones(4, dtype=torch.bool)}
    raw = reward_of([RM], normalize=False).score(batch)  # (B,): off, one member's scores as they are
    ensemble = reward_of([RM, double], ensemble="mean-minus-std", normalize=True)
    mean, std = ensemble.reference  # (2,) each, float64: the second member's are exactly twice the first's
    torch.testing.assert_close(mean[1], 2 * mean[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(std[1], 2 * std[0], rtol=1e-6, atol=0)
    members = ensemble.member_scores(batch).double()  # (2, B)
    torch.testing.assert_close(members, (1.5 * raw.double()).expand(2, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(ensemble(batch).double(), 1.5 * raw.double(), rtol=0, atol=1e-5)  # spread 0
    assert ensemble.metrics()["objective/ensemble_std"] < 1e-5
    assert "normalised (reference mean, std: " in ensemble.describe
    flat = scaled_reward_model(tmp_path / "flat", 0.0)  # scores every response 0: nothing to standardise by
    with pytest.raises(InputError, match="--reward-ensemble-normalize: .*flat.* the same score"):
        reward_of([RM, flat], normalize=True)
    ensemble.reference = None  # the same two members unnormalised: mean 1.5R minus their spread |R - 2R| / 2
    torch.testing.assert_close(ensemble(batch).double(), 1.5 * raw.double() - raw.double().abs() / 2, rtol=0,
                               atol=1e-5)


def test_members_load_as_distinct_adapters_and_score_as_alone(tmp_path):
    other = other_reward_model(tmp_path / "other")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 200, (5, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 9:] = attention[3, 5:] = 0  # right padding: read at the last real token
    batch = {"input_ids": ids, "attention_mask": attention, "ended": torch.ones(5, dtype=torch.bool)}
    alone = [reward_of([RM]).score(batch).double(), reward_of([other]).score(batch).double()]  # (B,) each
    assert (alone[0] - alone[1]).abs().min() > 1e-3  # two different reward models

    ensemble = reward_of([RM, other], ensemble="min")
    assert adapter_names(ensemble.model) == ["reward", "reward1"] and len(ensemble.heads) == 2
    members = ensemble.member_scores(batch)  # (2, B)
    for got, want in zip(members, alone):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    lowest = torch.minimum(alone[0], alone[1])
    torch.testing.assert_close(ensemble(batch).double(), lowest, rtol=0, atol=1e-5)
    spread = ((alone[0] - alone[1]).abs() / 2).mean().item()  # the population std of two: |a - b| / 2
    assert ensemble.metrics() == {"objective/ensemble_std": pytest.approx(spread, abs=1e-5)}
    ensemble.ensemble, ensemble.ensemble_lambda = "mean-minus-std", 0.5
    torch.testing.assert_close(ensemble.score(batch).double(), (alone[0] + alone[1]) / 2
                               - 0.5 * (alone[0] - alone[1]).abs() / 2, rtol=0, atol=1e-5)

    single = reward_of([RM], ensemble="min")
    assert torch.equal(single(batch), single.score(batch)) and single.metrics() == {}  # nothing to disagree


# ---------------------------------------------------------------- the flags
def test_reward_model_is_a_list_whose_default_is_the_shipped_one():
    assert parse_args(RLArgs, []).reward_model == [RM]
    assert parse_args(RLArgs, ["--reward-model", "a", "b"]).reward_model == ["a", "b"]
    args = parse_args(RLArgs, ["--reward-model", "a"])
    assert args.reward_model == ["a"] and args.reward_ensemble == "mean" and args.reward_ensemble_lambda == 1.0
    assert args.reward_ensemble_normalize is False  # off by default: the raw scores, as before
    assert parse_args(RLArgs, ["--reward-ensemble-normalize"]).reward_ensemble_normalize is True


def rating_reward_model(folder):
    """The shipped reward model's adapter under a 10-class rating head."""
    shutil.copytree(RM, folder)
    save_head(RatingHead(192, 10), folder)
    return str(folder)


def run_module_or_script(name, argv, monkeypatch):
    """The SystemExit code (the one line) of a script's or module's __main__ with argv; None if it returned."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        if name.endswith(".py"):
            runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
        else:
            runpy.run_module(name, run_name="__main__")
    except SystemExit as e:
        return e.code
    return None


CASES = [(["--reward-ensemble", "median"], "--reward-ensemble must be one of ('mean', 'min', 'mean-minus-var', "
          "'mean-minus-std'), got 'median'"),
         (["--reward-ensemble-lambda", "-1"], "--reward-ensemble-lambda must be >= 0, got -1.0"),
         (["--reward-ensemble-lambda", "nan"], "--reward-ensemble-lambda must be a finite number"),
         (["--reward-model", RM, "{copy}", RM], f"--reward-model names {RM!r} twice"),
         (["--reward-model", RM, "{rating}"], "an ensemble's members must have one kind of head, got scalar in"),
         (["--reward-model", RM, "{no_head}"], "head.safetensors"),
         (["--reward-model", RM, "{copy}", "--reward-transform", "expected-minus-entropy"], "needs a rating")]


@pytest.mark.parametrize("name", ["train_ppo.py", "train_grpo.py", "train_reinforce.py", "minirlhf.best_of_n"])
@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_ensemble_flags_are_one_line(name, argv, expected, tmp_path, monkeypatch):
    if name == "minirlhf.best_of_n" and "--reward-transform" in argv:
        return  # best-of-n has no --reward-transform
    paths = {"copy": str(tmp_path / "copy"), "rating": rating_reward_model(tmp_path / "rating"),
             "no_head": str(tmp_path / "no_head")}
    shutil.copytree(RM, paths["copy"])
    shutil.copytree(RM, paths["no_head"])
    os.remove(os.path.join(paths["no_head"], "head.safetensors"))
    argv = [paths[a[1:-1]] if a.startswith("{") else a for a in argv]
    out = [] if name.startswith("minirlhf") else ["--out", str(tmp_path / "out")]
    code = run_module_or_script(name, ["--threads", "1", *argv, *out], monkeypatch)
    prog = "python -m minirlhf.best_of_n" if name.startswith("minirlhf") else name
    assert isinstance(code, str) and "\n" not in code and code.startswith(f"{prog}: error: "), code
    assert expected in code, code
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


@pytest.mark.parametrize("name,argv,expected", [
    ("train_ppo.py", ["--reward", "gold"], "--reward-ensemble-normalize standardises reward models' scores: it needs "
                                           "--reward model, got --reward gold"),
    ("train_grpo.py", ["--dataset", "rajpurkar/squad"], "--reward-ensemble-normalize: its reference set is the "
                                                        "built-in world's training pairs; it needs --dataset builtin"),
    ("minirlhf.best_of_n", ["--reward-model", "gold"], "it needs --reward model, got --reward gold")])
def test_bad_normalize_is_one_line(name, argv, expected, tmp_path, monkeypatch):
    out = [] if name.startswith("minirlhf") else ["--out", str(tmp_path / "out")]
    code = run_module_or_script(name, ["--threads", "1", "--reward-ensemble-normalize", *argv, *out], monkeypatch)
    assert isinstance(code, str) and "\n" not in code and expected in code, code
    assert not os.path.exists(tmp_path / "out")


def test_gold_is_no_ensemble_member_of_best_of_n(monkeypatch):
    code = run_module_or_script("minirlhf.best_of_n", ["--reward-model", "gold", RM], monkeypatch)
    assert code == (f"python -m minirlhf.best_of_n: error: --reward-model: gold is the proxy on its own, not an "
                    f"ensemble member, got ['gold', {RM!r}]")


# ---------------------------------------------------------------- end to end
def test_grpo_and_best_of_n_run_on_an_ensemble(tmp_path, monkeypatch, capsys):
    """Two members: the run logs their disagreement every iteration, checks both heads unchanged, and best-of-n
    selects with the combined proxy."""
    import json
    import subprocess
    other = other_reward_model(tmp_path / "other")
    out = tmp_path / "grpo"
    subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), "--reward-model", RM, other,
                    "--reward-ensemble", "mean-minus-std", "--reward-ensemble-lambda", "0.5", "--iterations", "2",
                    "--rollout-size", "8", "--group-size", "4", "--minibatch-size", "4", "--eval-prompts", "4",
                    "--eval-samples", "1", "--eval-every", "2", "--max-new-tokens", "8", "--threads", "1",
                    "--out", str(out)], check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["objective/ensemble_std"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params/frozen_unchanged"] is True
    assert json.loads((out / "args.json").read_text())["reward_model"] == [RM, other]

    argv = ["--n", "1", "2", "--prompts", "3", "--max-new-tokens", "8", "--threads", "1", "--reward-model", RM, other,
            "--reward-ensemble", "min"]
    assert run_module_or_script("minirlhf.best_of_n", argv, monkeypatch) is None
    assert f"proxy = min of 2: ScalarHead from {RM}, {other}" in capsys.readouterr().out
