"""best_of_n.py: the KL bound against its closed form, select_best against a Python loop, and best-of-n on the
embedded tiny Llama (built-in world) against a selection recomputed by hand from the samples it scored."""
import math

import pytest
import torch

from minirlhf.assets import TINY_LLAMA
from minirlhf.best_of_n import best_of_n_evaluation, best_of_n_kl_bound, select_best
from minirlhf.data.world import gold_score
from minirlhf.evaluation import evaluate_policy, held_out_prompts
from minirlhf.models import load_model, load_tokenizer


@pytest.mark.parametrize("n, expected", [(1, 0.0), (2, math.log(2) - 0.5), (4, math.log(4) - 0.75),
                                         (64, math.log(64) - 63 / 64)])
def test_kl_bound_known_values(n, expected):
    assert abs(best_of_n_kl_bound(n) - expected) < 1e-15


def test_kl_bound_is_zero_at_one_increasing_and_near_log_n_minus_one():
    bounds = [best_of_n_kl_bound(n) for n in range(1, 500)]
    assert bounds[0] == 0.0 and all(b > a for a, b in zip(bounds, bounds[1:]))
    for n in (10, 100, 10_000):  # log n - (n - 1)/n = log n - 1 + 1/n
        assert abs(best_of_n_kl_bound(n) - (math.log(n) - 1) - 1 / n) < 1e-12


@pytest.mark.parametrize("n", [0, -2, 1.5, True, "4"])
def test_kl_bound_refuses_non_integers(n):
    with pytest.raises(ValueError, match="integer >= 1"):
        best_of_n_kl_bound(n)


def loop_best(scores, n):
    """The reference: per group of n, the position of the first maximum."""
    out = []
    for start in range(0, len(scores), n):
        group = scores[start:start + n]
        out.append(max(range(n), key=lambda j: (group[j], -j)))  # the largest score, the earliest on ties
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("B, n", [(7, 5), (1, 1), (13, 3), (3, 64)])
def test_select_best_matches_a_loop(seed, B, n):
    g = torch.Generator().manual_seed(seed)
    for scores in (torch.randn(B * n, generator=g, dtype=torch.float64),  # no ties
                   torch.randint(0, 3, (B * n,), generator=g).float()):  # many ties: the first must win
        best = select_best(scores, n)
        assert best.shape == (B,) and best.tolist() == loop_best(scores.tolist(), n)
        assert torch.equal(scores[torch.arange(B) * n + best], scores.view(B, n).max(1).values)


def test_select_best_first_on_ties_and_bad_input():
    assert select_best(torch.tensor([1.0, 3.0, 3.0, 2.0, 2.0, 2.0]), 3).tolist() == [1, 0]
    with pytest.raises(ValueError, match="B·n scores"):
        select_best(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="NaN"):
        select_best(torch.tensor([0.0, float("nan")]), 2)


@pytest.fixture(scope="module")
def world():
    """The embedded tiny Llama (SFT-trained on the built-in world) and 5 held-out prompts, each once."""
    tokenizer = load_tokenizer(TINY_LLAMA)
    model = load_model(TINY_LLAMA, device="cpu", tokenizer=tokenizer)
    prompts, ids = held_out_prompts("builtin", "test", None, tokenizer, 5, 1, 32)
    return model, tokenizer, prompts, ids


def recording(score):
    """A reward_fn scoring each (messages, text) with `score`, and the list of every (messages, text, score) seen."""
    seen = []

    def reward_fn(batch):
        scores = [score(p, t) for p, t in zip(batch["prompts"], batch["texts"])]
        seen.extend(zip(batch["prompts"], batch["texts"], scores))
        return torch.tensor(scores)
    return reward_fn, seen


SETTINGS = dict(seed=3, forward_batch_size=7, max_new_tokens=12)  # 7 rows a pass: chunks straddle prompts


def test_gold_as_proxy_is_monotone_and_matches_a_hand_selection(world):
    model, tokenizer, prompts, ids = world
    ns = (1, 2, 4, 8)
    reward_fn, seen = recording(gold_score)
    rows = best_of_n_evaluation(model, tokenizer, prompts, ids, reward_fn=reward_fn, gold_fn=gold_score, ns=ns,
                                **SETTINGS)
    assert [r["n"] for r in rows] == list(ns) and len(seen) == 5 * 8
    assert [p for p, _, _ in seen] == [p for p in prompts for _ in range(8)]  # each prompt's 8 samples in a row
    golds = [r["gold"] for r in rows]
    assert all(b >= a for a, b in zip(golds, golds[1:])), golds  # exact: the n's share nested samples
    assert golds[-1] > golds[0]  # and selecting helps on these prompts (the SFT policy is far from gold max)
    for r in rows:
        per_prompt = [[s for _, _, s in seen[8 * b:8 * b + r["n"]]] for b in range(5)]
        assert r["gold"] == pytest.approx(sum(max(g) for g in per_prompt) / 5, abs=1e-12)
        assert r["reward"] == pytest.approx(r["gold"], abs=1e-6)  # the proxy IS gold (float32 vs float64)
        wins = [(max(g) > g[0]) + 0.5 * (max(g) == g[0]) for g in per_prompt]
        assert r["win_rate"] == pytest.approx(sum(wins) / 5, abs=1e-12)
        assert r["kl_bound"] == best_of_n_kl_bound(r["n"])
    assert rows[0]["win_rate"] == 0.5


def test_another_proxy_picks_its_favourite_first_on_ties(world):
    """Proxy = -(characters in the response): the shortest of the first n wins, the earliest among equals; the gold
    reported is that response's gold."""
    model, tokenizer, prompts, ids = world
    reward_fn, seen = recording(lambda p, t: -float(len(t)))
    rows = best_of_n_evaluation(model, tokenizer, prompts, ids, reward_fn=reward_fn, gold_fn=gold_score, ns=(1, 3, 6),
                                **SETTINGS)
    for r in rows:
        picks = [min(seen[6 * b:6 * b + r["n"]], key=lambda s: len(s[1])) for b in range(5)]  # min: the first of equals
        assert r["gold"] == pytest.approx(sum(gold_score(p, t) for p, t, _ in picks) / 5, abs=1e-12)
        assert r["reward"] == pytest.approx(sum(s for _, _, s in picks) / 5, abs=1e-5)


def test_a_proxy_that_cannot_tell_responses_apart_keeps_the_first(world):
    """A constant proxy ties every sample: the first wins, so best-of-n is best-of-1 for every n (no selection)."""
    model, tokenizer, prompts, ids = world
    rows = best_of_n_evaluation(model, tokenizer, prompts, ids, reward_fn=recording(lambda p, t: 1.0)[0],
                                gold_fn=gold_score, ns=(1, 2, 8), **SETTINGS)
    assert all(r["gold"] == rows[0]["gold"] and r["win_rate"] == 0.5 and r["reward"] == 1.0 for r in rows)


def test_n_one_is_evaluate_policy(world):
    """With ns = (1,) the rows are sampled as evaluate_policy samples them (same seed, same batch size): same gold."""
    model, tokenizer, prompts, ids = world
    (row,) = best_of_n_evaluation(model, tokenizer, prompts, ids, reward_fn=recording(gold_score)[0],
                                  gold_fn=gold_score, ns=(1,), **SETTINGS)
    metrics, _ = evaluate_policy(model, tokenizer, prompts, ids, gold_fn=gold_score, max_new_tokens=12,
                                 batch_size=7, seed=3)
    assert row["gold"] == pytest.approx(metrics["eval/gold"], abs=1e-12)
    assert row["length"] == pytest.approx(metrics["eval/length"], abs=1e-6)


def test_bad_ns(world):
    model, tokenizer, prompts, ids = world
    for ns in ((), (0, 2), (2.0,)):
        with pytest.raises(ValueError, match="ns must be integers"):
            best_of_n_evaluation(model, tokenizer, prompts, ids, reward_fn=None, ns=ns)


def test_main_runs_the_model_named_by_the_flags(tmp_path, monkeypatch):
    """python -m minirlhf.best_of_n --model DIR: the table is DIR's (another model, not the embedded one), loaded with
    --quantization / --dtype / --device, its prompts formatted with --template when DIR's tokenizer has no chat
    template (without one: one line asking for --template)."""
    import json
    import os
    import shutil

    from transformers import AutoModelForCausalLM

    from minirlhf import best_of_n, models
    from minirlhf.cli import parse_args
    from minirlhf.errors import InputError
    other = tmp_path / "other"
    shutil.copytree(TINY_LLAMA, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))  # another policy: other samples
    model.save_pretrained(other)
    os.remove(other / "chat_template.jinja")
    config = json.load(open(other / "tokenizer_config.json"))
    config.pop("chat_template", None)
    json.dump(config, open(other / "tokenizer_config.json", "w"))
    loads = []
    load_model = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append((a, k)) or load_model(*a, **k))
    flags = ["--n", "1", "4", "--prompts", "3", "--max-new-tokens", "8", "--reward-model", "gold", "--threads", "1"]

    with pytest.raises(InputError, match="--template"):
        best_of_n.main(parse_args(best_of_n.Args, [*flags, "--model", str(other)]))
    loads.clear()
    rows = best_of_n.main(parse_args(best_of_n.Args, [*flags, "--model", str(other), "--template", "qa",
                                                      "--dtype", "float32", "--device", "cpu"]))
    (args, kwargs), = loads
    assert args == (str(other),) and (kwargs["quantization"], kwargs["dtype"], kwargs["device"]) == (
        "none", "float32", "cpu")
    tokenizer = load_tokenizer(str(other))
    expected_model = load_model(str(other), device="cpu", tokenizer=tokenizer)
    prompts, ids = held_out_prompts("builtin", "test", None, tokenizer, 3, 1, best_of_n.Args().max_prompt_length, "qa")
    assert tokenizer.decode(ids[0]).startswith("Question: ")  # the qa template, not ChatML
    expected = best_of_n_evaluation(expected_model, tokenizer, prompts, ids, reward_fn=recording(gold_score)[0],
                                    gold_fn=gold_score, ns=(1, 4), max_new_tokens=8)
    assert rows == expected
    default = best_of_n.main(parse_args(best_of_n.Args, flags))  # the embedded model: another table
    assert loads[-1][0] == (TINY_LLAMA,) and default != rows
