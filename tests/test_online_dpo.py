"""train_online_dpo.py: the pairs it forms from two samples per prompt (against a Python loop), its bad settings, and
two short runs on the embedded tiny Llama (DPO on the gold score, IPO on the shipped reward model in micro-batches):
the output contract, the pairs of the last rollout, and the loss of the first update, where the policy IS the
reference (LoRA B = 0) so every log-ratio is 0: DPO's -log σ(0) = log 2, IPO's (0 - 1/(2β))²."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minirlhf.assets import TINY_LLAMA
from minirlhf.cli import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--iterations", "2", "--rollout-size", "8", "--minibatch-size", "8", "--eval-prompts", "4", "--eval-samples",
        "1", "--eval-every", "1", "--max-new-tokens", "8", "--threads", "1"]
RUNS = {"dpo_gold": ["--reward", "gold"],
        "ipo": ["--loss", "ipo", "--beta", "0.1", "--forward-batch-size", "3"]}  # micro-batches of 1 pair

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(TINY_LLAMA, "config.json")),
                                reason="the embedded tiny Llama (minirlhf/assets/tiny-llama) is not built yet")


def test_pair_up_chooses_the_better_of_each_prompts_two_responses():
    sys.path.insert(0, REPO)
    import train_online_dpo
    scores = torch.tensor([1.0, 3.0, 2.0, 0.5, 1.5, 1.5, 0.0, 4.0, 2.0, 1.0])
    ids = torch.tensor([[5, 6], [5, 7], [8, 2], [9, 2], [4, 2], [3, 2], [7, 7], [7, 7], [1, 2], [1, 3]])
    chosen, rejected, weights = train_online_dpo.pair_up(scores, ids)
    want_c, want_r, want_w = [], [], []
    for i in range(0, 10, 2):  # by hand: rows i and i + 1 answer one prompt
        a, b = (i, i + 1) if scores[i] >= scores[i + 1] else (i + 1, i)
        want_c.append(a), want_r.append(b)
        want_w.append(0.0 if scores[i] == scores[i + 1] or ids[i].tolist() == ids[i + 1].tolist() else 1.0)
    assert chosen.tolist() == want_c and rejected.tolist() == want_r and weights.tolist() == want_w
    assert want_w == [1.0, 1.0, 0.0, 0.0, 1.0]  # a tied score and the same response twice (scores differing: a
    # reward model's float rounding over identical tokens) both say nothing


@pytest.mark.parametrize("argv,message", [
    (["--rollout-size", "7", "--minibatch-size", "7"], "--rollout-size counts responses and must be even"),
    (["--minibatch-size", "5"], "--minibatch-size counts responses and must be even"),
    (["--tis-cap", "2"], "online DPO's loss has none"),
    (["--loss", "kto"], "--loss must be one of"),
    (["--beta", "0"], "--beta"),
])
def test_bad_settings_are_refused(argv, message):
    sys.path.insert(0, REPO)
    import train_online_dpo
    with pytest.raises(ValueError, match=message):
        train_online_dpo.check_args(parse_args(train_online_dpo.Args, ["--reward", "gold"] + argv))
    train_online_dpo.check_args(parse_args(train_online_dpo.Args, ["--reward", "gold"]))  # the defaults pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_dpo")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = {name: subprocess.Popen([sys.executable, os.path.join(REPO, "train_online_dpo.py"), "--out",
                                     str(root / name), *FAST, *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, extra in RUNS.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name} run failed:\n{out[-3000:]}\n{err[-3000:]}"
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_output_contract_and_first_update(runs, name):
    out = runs / name
    for f in ("args.json", "metrics.jsonl", "summary.json", "last_rollout.safetensors", "policy/adapter_config.json",
              "policy/adapter_model.safetensors"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval/gold_before", "eval/gold_after", "eval/gold_max", "eval/kl", "eval/headroom_closed",
                "eval/reward_before", "eval/reward_after", "time/update_seconds"):
        assert key in summary, key
    assert summary["params/frozen_unchanged"] is True and summary["eval/kl_before"] == pytest.approx(0.0, abs=1e-6)
    adapter = load_file(str(out / "policy" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if k.endswith("lora_B.weight"))  # B starts at 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "eval/gold" in rows[0]
    for key in ("objective/kl", "objective/scores", "rewards/chosen", "rewards/accuracies", "logps/chosen",
                "pairs/trained", "pairs/tie_fraction", "policy/entropy", "policy/approx_kl", "loss/policy"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    first = rows[0]  # one minibatch of the 4 pairs, taken at the reference (x = 0 for every pair)
    assert 0 < first["pairs/trained"] == pytest.approx(4 * (1 - first["pairs/tie_fraction"]))
    want = {"dpo_gold": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2}[name]
    assert first["loss/policy"] == pytest.approx(want, rel=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", list(RUNS))
def test_last_rollout_pairs_the_two_responses_of_each_prompt(runs, name):
    from minirlhf.models import load_tokenizer
    r = load_file(str(runs / name / "last_rollout.safetensors"))
    chosen, rejected, weights, scores = r["chosen"].tolist(), r["rejected"].tolist(), r["pair_weights"], r["scores"]
    assert sorted(chosen + rejected) == list(range(8))  # every response in exactly one pair
    tok = load_tokenizer(TINY_LLAMA)
    P = r["input_ids"].shape[1] - r["ref_logprobs"].shape[1]
    prompts = [tok.decode(row[:P], skip_special_tokens=True) for row in r["input_ids"]]
    for c, j, w in zip(chosen, rejected, weights.tolist()):
        assert c // 2 == j // 2 and prompts[c] == prompts[j]  # the two samples of one prompt
        assert scores[c] >= scores[j]
        same = torch.equal(r["input_ids"][c], r["input_ids"][j])
        assert w == (0.0 if scores[c] == scores[j] or same else 1.0)
