"""DAPO's dynamic sampling and soft overlong punishment (minirlhf/dapo.py) against hand-written cases and
Eq. 13 written out case by case; the joined rollout of dynamic sampling (rollout.join_rollouts); and a short
train_grpo.py run with both options, whose last rollout is read back and re-scored by hand."""
import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file

from minirlhf.assets import TINY_LLAMA
from minirlhf.dapo import informative_groups, overlong_penalty
from minirlhf.rollout import join_rollouts, rollout_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ informative_groups

def test_informative_groups_hand_written():
    scores = torch.tensor([1.0, 1.0, 1.0,  0.0, 1.0, 0.0,  2.5, 2.5, 2.5,  4.0, 0.0, 4.0])  # G = 3
    assert informative_groups(scores, 3).tolist() == [False, True, False, True]
    assert informative_groups(scores, 12).tolist() == [True]
    assert informative_groups(scores, 1).tolist() == [False] * 12  # one response: nothing to compare it with


def test_informative_groups_is_dapos_count_rule_for_a_01_reward():
    """DAPO Eq. 11: 0 < #correct < G, counted by hand over random 0/1 rewards."""
    g = torch.Generator().manual_seed(0)
    for G in (2, 4, 8):
        rewards = torch.randint(0, 2, (50 * G,), generator=g).float()
        correct = [int(sum(rewards[i:i + G].tolist())) for i in range(0, len(rewards), G)]
        assert informative_groups(rewards, G).tolist() == [0 < c < G for c in correct]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_informative_groups_uses_exact_equality(dtype):
    """Scores one float apart are informative (their advantages are small, not zero); equal ones are not."""
    two = torch.tensor(2.0, dtype=dtype)
    next_up = torch.nextafter(two, torch.tensor(3.0, dtype=dtype))
    assert next_up != two
    scores = torch.stack([two, next_up, two, two, two, two])
    assert informative_groups(scores, 2).tolist() == [True, False, False]
    assert informative_groups(scores, 3).tolist() == [True, False]


def test_informative_groups_rejects_a_ragged_batch():
    with pytest.raises(ValueError, match="informative_groups"):
        informative_groups(torch.zeros(7), 2)


# ------------------------------------------------------------------ overlong_penalty

def eq13(length, max_len, buffer):
    """DAPO Eq. 13, its three cases as written, in exact fractions."""
    if length <= max_len - buffer:
        return Fraction(0)
    if length <= max_len:
        return Fraction((max_len - buffer) - length, buffer)
    return Fraction(-1)


@pytest.mark.parametrize("max_len,buffer", [(20, 8), (24, 1), (7, 7), (10, 3)])
def test_overlong_penalty_is_eq13(max_len, buffer):
    lengths = list(range(0, max_len + 4))
    expected = torch.tensor([float(eq13(n, max_len, buffer)) for n in lengths], dtype=torch.float64)
    got = overlong_penalty(torch.tensor(lengths, dtype=torch.float64), max_len, buffer)
    assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=0, atol=1e-15)
    got32 = overlong_penalty(torch.tensor(lengths), max_len, buffer)  # integer lengths -> float32
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), expected, rtol=0, atol=1e-7)


def test_overlong_penalty_boundaries_by_hand():
    p = overlong_penalty(torch.tensor([12, 13, 16, 19, 20, 21]), max_len=20, buffer=8).tolist()
    assert p == [0.0, -0.125, -0.5, -0.875, -1.0, -1.0]


def test_overlong_penalty_rejects_a_buffer_outside_1_to_max_len():
    for buffer in (0, 21):
        with pytest.raises(ValueError, match="buffer"):
            overlong_penalty(torch.tensor([5]), max_len=20, buffer=buffer)


# ------------------------------------------------------------------ rollout_rows / join_rollouts

def fake_rollout(prompts, responses, pad=0):
    """A sample_rollout batch written by hand: prompts left-padded, responses right-padded, log-prob = token / 100."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    rows = [[pad] * (P - len(p)) + p + r + [pad] * (R - len(r)) for p, r in zip(prompts, responses)]
    attention = [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)) for p, r in zip(prompts, responses)]
    response = [[0] * P + [1] * len(r) + [0] * (R - len(r)) for r in responses]
    ids = torch.tensor(rows)
    response_mask = torch.tensor(response)
    return {"input_ids": ids, "attention_mask": torch.tensor(attention), "response_mask": response_mask,
            "logprobs": ids.float() / 100 * response_mask, "response_ids": ids[:, P:],
            "ended": torch.tensor([len(r) < R for r in responses]), "texts": [str(r) for r in responses],
            "prompts": [str(p) for p in prompts], "P": P, "mask": response_mask[:, P:].bool()}


def unpadded(batch, i):
    """Row i as (prompt tokens, response tokens, response log-probs, text, prompt, ended), padding removed."""
    ids, att, resp = batch["input_ids"][i], batch["attention_mask"][i].bool(), batch["response_mask"][i].bool()
    return (ids[att & ~resp].tolist(), ids[resp].tolist(), batch["logprobs"][i][resp].tolist(), batch["texts"][i],
            batch["prompts"][i], bool(batch["ended"][i]))


def test_join_rollouts_keeps_each_selected_row():
    a = fake_rollout([[5, 6], [7], [8, 9, 10]], [[11], [12, 13, 14], [15, 16]])
    b = fake_rollout([[21, 22, 23, 24], [25]], [[26, 27, 28, 29, 30], [31]])
    parts = [rollout_rows(a, torch.tensor([0, 2])), rollout_rows(b, torch.tensor([1, 0]))]
    joined = join_rollouts(parts, pad_token_id=0)
    expected = [unpadded(a, 0), unpadded(a, 2), unpadded(b, 1), unpadded(b, 0)]
    assert [unpadded(joined, i) for i in range(4)] == expected
    P = joined["P"]
    assert P == 4 and joined["input_ids"].shape == (4, 4 + 5)
    assert torch.equal(joined["mask"], joined["response_mask"][:, P:].bool())
    assert torch.equal(joined["response_ids"], joined["input_ids"][:, P:])


# ------------------------------------------------------------------ a run of train_grpo.py with both options

# 3-token responses in groups of 2: many groups tie, so rounds are refilled and some iterations end short
FLAGS = ["--iterations", "3", "--rollout-size", "8", "--group-size", "2", "--minibatch-size", "4", "--max-new-tokens",
         "3", "--eval-prompts", "4", "--eval-samples", "1", "--eval-every", "2", "--threads", "1", "--reward", "gold"]
MAX_LEN, BUFFER, SCALE, G = 3, 2, 0.75, 2


@pytest.fixture(scope="module")
def dapo_run(tmp_path_factory):
    if not os.path.isfile(os.path.join(TINY_LLAMA, "config.json")):
        pytest.skip("the embedded tiny Llama is not built yet")
    out = tmp_path_factory.mktemp("dapo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), *FLAGS, "--dynamic-sampling",
                           "--dynamic-sampling-max-rounds", "3", "--overlong-buffer", str(BUFFER),
                           "--overlong-penalty", str(SCALE), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return out, rows


def test_dynamic_sampling_logs_its_rounds_and_keeps_informative_groups(dapo_run):
    out, rows = dapo_run
    assert len(rows) == 3
    for row in rows:
        kept, rounds, dropped = row["rollout/kept_groups"], row["rollout/sampling_rounds"], row["rollout/dropped_groups"]
        assert 0 <= kept <= 4 and 1 <= rounds <= 3
        assert rounds == 3 or kept == 4  # it stops as soon as the rollout is full
        assert kept + dropped <= 4 * rounds and (rounds == 1 or dropped >= 1)
    assert any(row["rollout/sampling_rounds"] > 1 for row in rows)  # (else this run would not test the refill)
    last = load_file(os.path.join(out, "last_rollout.safetensors"))
    kept = rows[-1]["rollout/kept_groups"]
    scores = last["scores"].view(-1, G)  # (groups, G)
    if kept:  # every group the update saw has scores that differ (else its advantages were all zero)
        assert scores.shape[0] == kept
        assert all(len(set(group.tolist())) > 1 for group in scores)
        assert (last["advantages"][:, 0].view(-1, G) != 0).all()


def test_scores_are_gold_plus_the_overlong_penalty(dapo_run):
    """The last rollout re-scored by hand: the gold score of each decoded response + SCALE x Eq. 13 of its length."""
    from minirlhf.data import world
    from minirlhf.models import load_tokenizer
    out, _ = dapo_run
    tok = load_tokenizer(TINY_LLAMA)
    r = load_file(os.path.join(out, "last_rollout.safetensors"))
    P = r["input_ids"].shape[1] - r["ref_logprobs"].shape[1]
    mask = r["response_mask"][:, P:].bool()
    texts = [tok.decode(row[P:][m], skip_special_tokens=True) for row, m in zip(r["input_ids"], mask)]
    prompts = [tok.decode(row[:P], skip_special_tokens=False).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
               for row in r["input_ids"]]
    lengths = mask.sum(-1).tolist()
    expected = [world.gold_score(p, t) + SCALE * float(eq13(n, MAX_LEN, BUFFER)) for p, t, n in
                zip(prompts, texts, lengths)]
    assert r["scores"].tolist() == pytest.approx(expected, abs=1e-5)
    assert all(len(set(prompts[i:i + G])) == 1 for i in range(0, len(prompts), G))  # still group-contiguous


def test_bad_dapo_flags_give_one_line_errors():
    import train_grpo
    from minirlhf.cli import parse_args
    for argv, message in [(["--overlong-buffer", "30"], "--overlong-buffer 30 is above --max-new-tokens 24"),
                          (["--overlong-buffer", "0"], "--overlong-buffer"),
                          (["--overlong-penalty", "-1"], "--overlong-penalty"),
                          (["--dynamic-sampling-max-rounds", "0"], "--dynamic-sampling-max-rounds")]:
        with pytest.raises(ValueError, match=message):
            train_grpo.check_args(parse_args(train_grpo.Args, ["--reward", "gold"] + argv))
    train_grpo.check_args(parse_args(train_grpo.Args, ["--reward", "gold", "--overlong-buffer", "24"]))
