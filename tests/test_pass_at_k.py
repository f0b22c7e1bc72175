"""pass_at_k.py against exact combinatorics (math.comb, exact fractions), against the k-subsets enumerated and drawn at
random, and against the closed form 1 - (1 - p)^k it estimates without bias; pass_at_k_evaluation on the embedded
tiny Llama against the pass@k recomputed by hand from the same samples; --pass-k end to end in train_grpo.py (the
training and the other evaluation numbers unchanged), train_dpo.py and python -m minirlhf.compare."""
import itertools
import json
import math
import os
import random
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from minirlhf.assets import TINY_LLAMA
from minirlhf.pass_at_k import pass_at_k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exact(n, c, k):
    """1 - C(n - c, k) / C(n, k) as an exact fraction, then a float (math.comb(m, k) is 0 for k > m)."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_matches_exact_combinatorics_for_every_small_case():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert abs(pass_at_k(n, c, k).item() - exact(n, c, k)) < 1e-12, (n, c, k)


@pytest.mark.parametrize("n, c, k", [(1000, 500, 100), (1000, 3, 64), (4096, 1, 1024), (200, 199, 2)])
def test_large_n_is_stable(n, c, k):
    # the binomials have hundreds of digits here; the product form stays within float rounding of the exact value
    got = pass_at_k(n, c, k)
    assert got.dtype == torch.float64 and abs(got.item() - exact(n, c, k)) < 1e-12


def test_equals_the_share_of_k_subsets_holding_a_correct_response():
    # exact enumeration: n labelled samples, every k-subset drawn without replacement, "any correct?"
    for n in range(1, 9):
        for c in range(n + 1):
            labels = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(labels, k))
                share = sum(any(s) for s in subsets) / len(subsets)
                assert abs(pass_at_k(n, c, k).item() - share) < 1e-12, (n, c, k)


def test_monte_carlo_draws_of_k_without_replacement():
    rng = random.Random(0)
    for n, c, k, draws in [(64, 5, 16, 20000), (30, 2, 3, 20000), (10, 7, 2, 20000)]:
        labels = [True] * c + [False] * (n - c)
        hits = sum(any(rng.sample(labels, k)) for _ in range(draws)) / draws
        se = math.sqrt(hits * (1 - hits) / draws) + 1e-9
        assert abs(pass_at_k(n, c, k).item() - hits) < 4.5 * se, (n, c, k, hits)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("n, k", [(16, 1), (16, 4), (64, 16), (10, 10)])
def test_unbiased_for_one_minus_one_minus_p_to_the_k(p, n, k):
    # E over c ~ Binomial(n, p) of the estimate, summed exactly with the binomial pmf, is 1 - (1 - p)^k
    mean = sum(math.comb(n, c) * p ** c * (1 - p) ** (n - c) * pass_at_k(n, c, k).item() for c in range(n + 1))
    assert abs(mean - (1 - (1 - p) ** k)) < 1e-12


def test_known_values_and_edges():
    assert pass_at_k(10, 0, 5).item() == 0.0  # nothing correct
    assert pass_at_k(10, 6, 5).item() == 1.0  # n - c = 4 < k: every 5-subset holds a correct one, exactly
    assert pass_at_k(10, 10, 1).item() == 1.0
    assert abs(pass_at_k(10, 3, 1).item() - 0.3) < 1e-15  # pass@1 = c / n
    assert abs(pass_at_k(4, 1, 2).item() - 0.5) < 1e-15  # 3 of the 6 pairs hold the correct one
    assert abs(pass_at_k(5, 2, 2).item() - 0.7) < 1e-15  # 1 - C(3, 2)/C(5, 2) = 1 - 3/10


def test_tensors_broadcast_and_match_the_scalar_calls():
    n = torch.tensor([[4, 8, 16], [64, 5, 9]])
    c = torch.tensor([[0, 3, 16], [10, 1, 2]])
    got = pass_at_k(n, c, 4)  # rows with different n in one call
    assert got.shape == (2, 3) and got.dtype == torch.float64
    for idx in itertools.product(range(2), range(3)):
        assert abs(got[idx].item() - exact(n[idx].item(), c[idx].item(), 4)) < 1e-12
    per_c = pass_at_k(16, torch.arange(17), 4)  # one n, every c
    assert torch.allclose(per_c, torch.tensor([exact(16, c, 4) for c in range(17)], dtype=torch.float64),
                          rtol=0, atol=1e-12)
    assert (per_c.diff() >= 0).all()  # more correct samples never lower pass@k


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1), (torch.tensor([8, 2]), 1, 4),
                                     (4.0, 1, 1), (4, 1, 2.0), (4, 1, True)])
def test_refuses_impossible_inputs(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


# ---- the evaluation on the embedded tiny Llama --------------------------------------------------------------------

needs_tiny = pytest.mark.skipif(not os.path.isfile(os.path.join(TINY_LLAMA, "config.json")),
                                reason="the embedded tiny Llama is not built yet")


@needs_tiny
def test_pass_at_k_evaluation_recomputed_by_hand_from_its_samples():
    from minirlhf.data import world
    from minirlhf.evaluation import PASS_AT_K_SEED_OFFSET, generate, held_out_prompts, pass_at_k_evaluation
    from minirlhf.models import load_model, load_tokenizer
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(TINY_LLAMA)
    model = load_model(TINY_LLAMA, tokenizer=tokenizer, device="cpu").eval()
    prompts, ids = held_out_prompts("builtin", "test", None, tokenizer, 6, 1, None)
    ks, seed, batch = [1, 2, 8], 3, 16  # 6 prompts x 8 samples in 3 batches of 16, one generator
    got = pass_at_k_evaluation(model, tokenizer, prompts, ids, ks=ks, correct_fn=world.is_correct,
                               max_new_tokens=12, batch_size=batch, seed=seed)
    g = torch.Generator().manual_seed(seed + PASS_AT_K_SEED_OFFSET)
    rows = [(p, i) for p, i in zip(prompts, ids) for _ in range(8)]
    texts = []
    for s in range(0, len(rows), batch):
        texts += generate(model, tokenizer, [i for _, i in rows[s:s + batch]], max_new_tokens=12, generator=g)["texts"]
    counts = [sum(world.is_correct(rows[8 * b][0], t) for t in texts[8 * b:8 * b + 8]) for b in range(6)]
    assert list(got) == ["eval/pass@1", "eval/pass@2", "eval/pass@8"]
    for k in ks:
        expected = sum(exact(8, c, k) for c in counts) / 6
        assert abs(got[f"eval/pass@{k}"] - expected) < 1e-9, (k, counts)
    assert got["eval/pass@8"] == sum(c > 0 for c in counts) / 6  # k = n: the share of prompts solved at all
    assert 0 < sum(counts) < 48  # the SFT model is right sometimes, not always: the check above has teeth


@needs_tiny
def test_pass_k_adds_metrics_and_changes_nothing_else(tmp_path):
    fast = ["--iterations", "2", "--rollout-size", "8", "--minibatch-size", "4", "--group-size", "4",
            "--eval-prompts", "4", "--eval-samples", "1", "--eval-every", "1", "--max-new-tokens", "8",
            "--threads", "1", "--reward", "gold"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": REPO}
    # DPO evaluates each prompt --eval-samples 4 times, GRPO once: pass@k takes each prompt once either way, so the
    # base model's numbers before training are the same
    dpo = ["--max-steps", "2", "--batch-size", "4", "--max-eval-pairs", "8", "--eval-prompts", "4", "--eval-samples",
           "4", "--max-new-tokens", "8", "--threads", "1", "--pass-k", "1", "2", "4"]
    commands = {"off": ["train_grpo.py", *fast], "on": ["train_grpo.py", *fast, "--pass-k", "2", "1", "4"],
                "dpo": ["train_dpo.py", *dpo]}
    outs = {name: str(tmp_path / name) for name in commands}
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, script), *argv, "--out", outs[name]], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, (script, *argv) in commands.items()]
    for p in procs:
        out = p.communicate()[0]
        assert p.returncode == 0, out[-3000:]
    summaries = {name: json.load(open(os.path.join(out, "summary.json"))) for name, out in outs.items()}
    rows = {name: [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))] for name, out in outs.items()}
    for k in (1, 2, 4):
        assert summaries["dpo"][f"eval/pass@{k}_before"] == summaries["on"][f"eval/pass@{k}_before"]
        assert 0 <= summaries["dpo"][f"eval/pass@{k}_after"] <= 1
    timing = ("time/", "perf/", "memory/", "cost/")
    for off, on in zip(rows["off"], rows["on"]):  # every training and evaluation number the same
        assert {k: v for k, v in off.items() if not k.startswith(timing)} == \
               {k: v for k, v in on.items() if not k.startswith(timing) and not k.startswith("eval/pass@")}
        assert ("eval/pass@4" in on) == ("eval/gold" in on) and not any(k.startswith("eval/pass@") for k in off)
    same = {k: v for k, v in summaries["off"].items() if k.startswith("eval/")}
    assert same == {k: summaries["on"][k] for k in same}
    for when in ("before", "after"):
        p1, p2, p4 = (summaries["on"][f"eval/pass@{k}_{when}"] for k in (1, 2, 4))
        assert 0 <= p1 <= p2 <= p4 <= 1

    # python -m minirlhf.compare --pass-k: the same prompts, sampler and seed give the run's numbers before and after
    from minirlhf import compare
    from minirlhf.cli import parse_args
    table = compare.main(parse_args(compare.Args, ["--policies", "base", outs["on"], "--prompts", "4", "--samples", "1",
                                                   "--max-new-tokens", "8", "--pass-k", "4", "1", "2",
                                                   "--threads", "1"]))
    for row, when in zip(table, ("before", "after")):
        assert [float(v) for v in row[-3:]] == pytest.approx(
            [summaries["on"][f"eval/pass@{k}_{when}"] for k in (1, 2, 4)], abs=5.01e-4)  # 3 decimals


def test_compare_pass_k_needs_the_built_in_world(monkeypatch):
    import runpy
    monkeypatch.setattr(sys, "argv", ["compare.py", "--threads", "1", "--dataset", "juyoungml/HelpSteer2-binarized",
                                      "--pass-k", "4"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("minirlhf.compare", run_name="__main__")
    assert e.value.code.startswith("python -m minirlhf.compare: error: --pass-k counts correct answers")
