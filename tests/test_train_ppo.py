"""Smoke runs of train_ppo.py (PPO, REINFORCE, GRPO) on the embedded tiny Llama, a few seconds each, plus checks
against independent code: the reference log-probs the run used are recomputed with a plain transformers forward of
the base, the scores with PEFT's own LoRA (peft.PeftModel) and the head's weights read by hand. If training had
touched the base, the reward adapter or its head, these would not match.

The three runs start together in subprocesses (one thread each) to keep the file under ~40 s. The reward models are
small random ones built here (a LoRA adapter with random B + a random head), so the test does not depend on a trained
asset and knows exactly what went in."""
import hashlib
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minirlhf.assets import TINY_LLAMA
from minirlhf.phases import PHASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {algo: os.path.join(REPO, f"train_{algo}.py") for algo in ("ppo", "reinforce", "grpo")}
SCRIPT = SCRIPTS["ppo"]
FAST = ["--iterations", "2", "--rollout-size", "8", "--minibatch-size", "4", "--eval-prompts", "4", "--eval-samples",
        "1", "--eval-every", "1", "--max-new-tokens", "8", "--threads", "1"]
RUNS = {  # algo -> extra flags; {scalar} / {rating} are the reward model folders built below
    # --forward-batch-size: every pass in chunks (PPO: rollouts of 3 + 3 + 2 rows, minibatches in micro-batches of
    # 3 + 1), so the checks below also hold for the chunked passes; GRPO runs the default, in one piece
    "ppo": ["--reward-model", "{scalar}", "--missing-eos-penalty", "1.0", "--target-kl", "0.5", "--kl-horizon", "50",
            "--ppo-epochs", "2", "--forward-batch-size", "3"],
    "reinforce": ["--reward-model", "{rating}", "--reward-transform", "expected-minus-entropy",
                  "--reward-entropy-coef", "0.1", "--kl-estimator", "k3", "--forward-batch-size", "5"],
    "grpo": ["--reward", "gold", "--gradient-checkpointing", "--group-size", "4", "--ppo-epochs", "2"],
}
STEP_KEYS = ["objective/kl", "objective/scores", "objective/rlhf_reward", "policy/approx_kl", "policy/entropy",
             "loss/policy", "time/generation", "time/scoring", "time/logprobs", "time/update", "perf/tokens_per_second"]
SUMMARY_KEYS = ["time/total_seconds", "params/trainable", "params/total", "eval/gold_before", "eval/gold_after",
                "eval/gold_max", "eval/kl", "eval/reward_before", "eval/reward_after", "eval/headroom_closed",
                *[f"time/{phase}_seconds" for phase in PHASES]]

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(TINY_LLAMA, "config.json")),
                                reason="the embedded tiny Llama (minirlhf/assets/tiny-llama) is not built yet")


def digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder))}


def make_reward_model(path, kind):
    """A random reward model folder as train_reward.py writes it: PEFT adapter "reward" (B random) + head."""
    from minirlhf import lora
    from minirlhf.formats import save_adapter, save_head
    from minirlhf.heads import RatingHead, ScalarHead
    from minirlhf.models import load_model, load_tokenizer
    torch.manual_seed(1 if kind == "scalar" else 2)
    model = load_model(TINY_LLAMA, tokenizer=load_tokenizer(TINY_LLAMA))
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter="reward")
    for _, m in lora.lora_layers(model, "reward"):
        torch.nn.init.normal_(m.lora_B["reward"].weight, std=0.05)
    save_adapter(model, path, "reward")
    hidden = model.config.hidden_size
    save_head(ScalarHead(hidden) if kind == "scalar" else RatingHead(hidden, 10), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    rms = {kind: make_reward_model(str(root / f"rm_{kind}"), kind) for kind in ("scalar", "rating")}
    hashes = {kind: digest(path) for kind, path in rms.items()}
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = {}
    for algo, extra in RUNS.items():
        cmd = [sys.executable, SCRIPTS[algo], "--out", str(root / algo), *FAST,
               *[a.format(**rms) for a in extra]]
        procs[algo] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    results = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    for algo in RUNS:
        code, out, err = results[algo]
        assert code == 0, f"{algo} run failed:\n{out[-3000:]}\n{err[-3000:]}"
    return {"root": root, "rms": rms, "hashes": hashes, "results": results}


def rollout(runs, algo):
    return load_file(os.path.join(runs["root"], algo, "last_rollout.safetensors"))


@pytest.mark.parametrize("algo", list(RUNS))
def test_output_contract(runs, algo):
    out = runs["root"] / algo
    for name in ("args.json", "metrics.jsonl", "summary.json", "curves.png", "last_rollout.safetensors",
                 "policy/adapter_config.json", "policy/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "value_head" / "head.safetensors").is_file() == (algo == "ppo")  # only PPO has a critic
    settings = json.loads((out / "args.json").read_text())  # the settings of the script that ran: its algorithm's
    assert ("vf_coef" in settings, "group_size" in settings, "kl_estimator" in settings) == \
        {"ppo": (True, False, True), "grpo": (False, True, False), "reinforce": (False, False, True)}[algo]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    keys = STEP_KEYS + {"ppo": ["policy/clipfrac", "val/vpred", "val/clipfrac", "loss/value"],
                        "grpo": ["policy/clipfrac", "loss/kl"], "reinforce": []}[algo]
    for row in rows:
        assert all(k in row for k in keys), set(keys) - set(row)
    assert "eval/gold" in rows[0] and "time/evaluation" in rows[0]  # --eval-every 1: evaluated after iteration 1
    summary = json.loads((out / "summary.json").read_text())
    assert all(k in summary for k in SUMMARY_KEYS), set(SUMMARY_KEYS) - set(summary)
    for phase in ("generation", "scoring", "logprobs", "update"):  # the totals are the iterations' sums
        assert summary[f"time/{phase}_seconds"] == pytest.approx(sum(r[f"time/{phase}"] for r in rows), abs=2e-3)
    assert summary["time/evaluation_seconds"] > rows[0]["time/evaluation"] > 0  # + before and after training
    assert sum(summary[f"time/{phase}_seconds"] for phase in PHASES) <= summary["time/total_seconds"]
    assert summary["eval/kl_before"] == pytest.approx(0.0, abs=1e-6)  # the fresh policy IS the reference
    assert summary["eval/kl"] > 0  # and after training it is not
    assert summary["eval/gold_max"] == 4.0 and summary["params/trainable"] > 0
    assert summary["params/frozen_unchanged"] is True  # the script's own checksum of base + reward model
    samples = json.loads((out / "samples.json").read_text())  # the held-out samples before and after, side by side
    assert [s["prompt"] for s in samples["before"]] == [s["prompt"] for s in samples["after"]]
    assert summary["eval/gold_after"] == pytest.approx(sum(s["gold"] for s in samples["after"]) / len(samples["after"]))
    stdout = runs["results"][algo][1]
    assert "time: generation" in stdout and "trainable params:" in stdout and "peak RSS" in stdout and "samples after training:" in stdout


def test_adaptive_kl_moves_the_coefficient(runs):
    rows = [json.loads(line) for line in (runs["root"] / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["objective/kl_coef"] == 0.3 and rows[1]["objective/kl_coef"] != 0.3


@pytest.mark.parametrize("algo", list(RUNS))
def test_policy_adapter_changed(runs, algo):
    adapter = load_file(os.path.join(runs["root"], algo, "policy", "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if k.endswith("lora_B.weight")]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at exactly 0
    if algo == "ppo":
        value = load_file(os.path.join(runs["root"], algo, "value_head", "head.safetensors"))
        assert any(v.abs().max() > 0 for v in value.values())  # the value head starts at exactly 0


def test_reward_model_files_untouched(runs):
    for kind, path in runs["rms"].items():
        assert digest(path) == runs["hashes"][kind]


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32).eval()


@pytest.mark.parametrize("algo", list(RUNS))
def test_reference_logprobs_equal_the_base_models(runs, base, algo):
    """The run's reference log-probs (last iteration) vs a plain transformers forward of the untouched base."""
    r = rollout(runs, algo)
    ids, attn, resp = r["input_ids"], r["attention_mask"], r["response_mask"]
    P = ids.shape[1] - r["ref_logprobs"].shape[1]
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    logp = F.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # token t from t-1
    expected = logp[:, P - 1:] * resp[:, P:]  # (B, R)
    assert torch.allclose(r["ref_logprobs"].double(), expected, atol=1e-4)
    # and the policy that sampled the last rollout had moved away from it (after one iteration of updates)
    assert not torch.allclose(r["logprobs"].double(), expected, atol=1e-4)


def peft_scores(path, rollout_tensors, kind):
    """Scores recomputed with peft's LoRA and the head's raw weights, at each row's last real token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32),
                                      path).eval()
    ids, attn = rollout_tensors["input_ids"], rollout_tensors["attention_mask"]
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                       output_hidden_states=True).hidden_states[-1]  # (B, T, H), after the final norm
    last = torch.tensor([max(t for t in range(ids.shape[1]) if attn[b, t]) for b in range(ids.shape[0])])
    head = load_file(os.path.join(path, "head.safetensors"))
    out = hidden[torch.arange(ids.shape[0]), last] @ head["linear.weight"].T + head["linear.bias"]  # (B, 1|K)
    if kind == "scalar":
        return out[:, 0]
    p = out.softmax(-1)
    expected = p @ torch.arange(1.0, 11.0)
    return expected - 0.1 * -(p * p.log()).sum(-1)  # expected-minus-entropy, reward_entropy_coef 0.1


@pytest.mark.parametrize("algo,kind", [("ppo", "scalar"), ("reinforce", "rating")])
def test_scores_match_an_independent_reward_model(runs, algo, kind):
    r = rollout(runs, algo)
    expected = peft_scores(runs["rms"][kind], r, kind)
    if algo == "ppo":  # --missing-eos-penalty 1.0 on responses without EOS
        from minirlhf.models import load_tokenizer
        eos = load_tokenizer(TINY_LLAMA).eos_token_id
        P = r["input_ids"].shape[1] - r["ref_logprobs"].shape[1]
        expected = expected - 1.0 * (~(r["input_ids"][:, P:] == eos).any(1)).float()
    assert torch.allclose(r["scores"], expected, atol=1e-4)


def test_grpo_scores_are_gold_and_advantages_group_normalised(runs):
    from minirlhf.data import world
    from minirlhf.models import load_tokenizer
    tok = load_tokenizer(TINY_LLAMA)
    r = rollout(runs, "grpo")
    P = r["input_ids"].shape[1] - r["ref_logprobs"].shape[1]
    users = [tok.decode(row[:P], skip_special_tokens=False) for row in r["input_ids"]]
    texts = [tok.decode(row[P:][m.bool()], skip_special_tokens=True) for row, m in zip(r["input_ids"],
                                                                                       r["response_mask"][:, P:])]
    prompts = [u.split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for u in users]
    assert r["scores"].tolist() == pytest.approx([world.gold_score(p, t) for p, t in zip(prompts, texts)])
    adv = r["advantages"][:, 0].view(-1, 4)  # group-contiguous, G = 4
    assert all(len(set(prompts[i:i + 4])) == 1 for i in range(0, len(prompts), 4))
    assert torch.allclose(adv.sum(1), torch.zeros(adv.shape[0]), atol=1e-4)


def test_compare_table_reproduces_the_runs_final_numbers(runs, tmp_path):
    from minirlhf import compare
    from minirlhf.cli import parse_args
    out = tmp_path / "table.md"
    args = parse_args(compare.Args, ["--policies", "base", str(runs["root"] / "ppo"), "--reward-models",
                                      runs["rms"]["scalar"], "--gold", "--prompts", "4", "--samples", "1",
                                      "--max-new-tokens", "8", "--forward-batch-size", "3", "--threads", "1",
                                      "--out", str(out)])  # sampled in chunks of 3 as the PPO run was
    table = compare.main(args)
    summary = json.loads((runs["root"] / "ppo" / "summary.json").read_text())
    base_row, ppo_row = table
    assert float(base_row[1]) == pytest.approx(summary["eval/reward_before"], abs=2e-3)
    assert float(ppo_row[1]) == pytest.approx(summary["eval/reward_after"], abs=2e-3)
    assert float(ppo_row[2]) == pytest.approx(summary["eval/gold_after"], abs=2e-3)
    assert float(ppo_row[3]) == pytest.approx(summary["eval/kl"], abs=1e-2)
    assert out.read_text().startswith("| policy |")


def test_bad_flags_give_one_line_errors(runs, tmp_path, monkeypatch):
    # the script's __main__ block, run in this process (a subprocess would spend ~8 s importing torch again):
    # SystemExit with a message string is what prints that one line to stderr and exits with status 1
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--kl-estimator", "k5"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exit_info.value.code == "train_ppo.py: error: --kl-estimator must be one of ('k1', 'k2', 'k3'), got 'k5'"
    import train_grpo
    import train_ppo
    from minirlhf.cli import parse_args
    rm = runs["rms"]["scalar"]
    for script, argv, message in [
        (train_ppo, ["--minibatch-size", "100"], "larger than --rollout-size"),
        (train_grpo, ["--group-size", "3"], "dividing --rollout-size"),
        (train_ppo, ["--reward-model", str(tmp_path / "nowhere")], "not a reward model folder"),
        (train_ppo, ["--reward-model", rm, "--reward-transform", "expected-minus-entropy"], "rating"),
        (train_grpo, ["--reward", "gold", "--dataset", "rajpurkar/squad"], "built-in world"),
        (train_ppo, ["--kl-estimator", "k5"], "--kl-estimator"),
        (train_ppo, ["--target-kl", "1.0", "--kl-coef", "0"], "--target-kl"),
    ]:
        with pytest.raises(ValueError, match=message):
            script.check_args(parse_args(script.Args, ["--reward-model", rm] + argv))
    with pytest.raises(SystemExit):  # GRPO's KL is a fixed term of its loss: there is no adaptive KL to target
        parse_args(train_grpo.Args, ["--target-kl", "1.0"])


# ------------------------------------------------------------------ RLOO and the GRPO family's options
VARIANTS = {  # name -> (script, extra flags); every new flag value runs once, all on the gold score (no reward model)
    "rloo": ("reinforce", ["--baseline", "leave-one-out", "--samples-per-prompt", "4", "--forward-batch-size", "3"]),
    "rpp_baseline": ("reinforce", ["--baseline", "reinforce++-baseline", "--samples-per-prompt", "4"]),
    "grpo_sequence": ("grpo", ["--group-size", "4", "--loss-aggregation", "sequence", "--advantage-std", "batch",
                               "--clip-high", "0.28", "--forward-batch-size", "3"]),
    "grpo_constant": ("grpo", ["--group-size", "4", "--loss-aggregation", "constant", "--advantage-std", "none"]),
}


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = {name: subprocess.Popen([sys.executable, SCRIPTS[algo], "--out", str(root / name), *FAST, "--reward",
                                     "gold", "--eval-prompts", "2", "--eval-every", "0", *extra], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (algo, extra) in VARIANTS.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name} run failed:\n{out[-3000:]}\n{err[-3000:]}"
    return root


def grouped_prompts(r, k):
    """The prompts of a last_rollout, checked to come in contiguous groups of k."""
    from minirlhf.models import load_tokenizer
    tok = load_tokenizer(TINY_LLAMA)
    P = r["input_ids"].shape[1] - r["ref_logprobs"].shape[1]
    prompts = [tok.decode(row[:P], skip_special_tokens=True) for row in r["input_ids"]]
    assert all(len(set(prompts[i:i + k])) == 1 for i in range(0, len(prompts), k))
    assert len(set(prompts)) == len(prompts) // k  # and each group is another prompt
    return prompts


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_runs_train_and_record_their_options(variant_runs, name):
    import math
    out = variant_runs / name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss/policy"]) for r in rows)
    settings = json.loads((out / "args.json").read_text())
    extra = VARIANTS[name][1]
    for flag, value in zip(extra[::2], extra[1::2]):
        assert str(settings[flag[2:].replace("-", "_")]) == value
    adapter = load_file(str(out / "policy" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if k.endswith("lora_B.weight"))  # B starts at 0
    assert json.loads((out / "summary.json").read_text())["params/frozen_unchanged"] is True


def test_rloo_advantages_are_leave_one_out_of_the_rewards(variant_runs):
    r = load_file(str(variant_runs / "rloo" / "last_rollout.safetensors"))
    grouped_prompts(r, 4)
    rewards, advantages = r["returns"][:, 0].tolist(), r["advantages"][:, 0]  # R = score - β KL, one per response
    expected = [rewards[i] - sum(rewards[j] for j in range(i // 4 * 4, i // 4 * 4 + 4) if j != i) / 3
                for i in range(len(rewards))]  # each reward minus the mean of the other 3 of its prompt
    assert torch.allclose(advantages, torch.tensor(expected), atol=1e-5)
    assert not torch.allclose(advantages, torch.zeros_like(advantages))


def test_reinforce_pp_baseline_advantages_are_normalised_returns_to_go(variant_runs):
    """From the saved rollout alone: k1 per token, scores less their prompt's mean, returns to go with β = 0.3 (the
    default), then (G - mean) / std over every real token of the rollout, by loops."""
    import statistics
    r = load_file(str(variant_runs / "rpp_baseline" / "last_rollout.safetensors"))
    grouped_prompts(r, 4)
    P = r["input_ids"].shape[1] - r["ref_logprobs"].shape[1]
    lengths = r["response_mask"][:, P:].sum(-1).tolist()
    scores, kl = r["scores"].tolist(), (r["logprobs"] - r["ref_logprobs"]).tolist()  # k1 = log π_old - log π_ref
    returns = []
    for b, n in enumerate(lengths):
        rewards = [-0.3 * kl[b][t] for t in range(n)]
        rewards[-1] += scores[b] - statistics.fmean(scores[b // 4 * 4:b // 4 * 4 + 4])
        returns.append([sum(rewards[t:]) for t in range(n)])
    flat = [g for row in returns for g in row]
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    for b, n in enumerate(lengths):
        assert torch.allclose(r["returns"][b, :n], torch.tensor(returns[b]), atol=1e-5)
        assert torch.allclose(r["advantages"][b, :n], (torch.tensor(returns[b]) - mean) / std, atol=1e-4)
        assert (r["advantages"][b, n:] == 0).all()
    assert len(set(r["advantages"][0, :lengths[0]].tolist())) > 1  # one advantage per token, not per response


@pytest.mark.parametrize("name,scale", [("grpo_sequence", "batch"), ("grpo_constant", "none")])
def test_grpo_advantage_std_options(variant_runs, name, scale):
    import statistics
    r = load_file(str(variant_runs / name / "last_rollout.safetensors"))
    grouped_prompts(r, 4)
    scores, advantages = r["scores"].tolist(), r["advantages"][:, 0]
    divide = statistics.stdev(scores) + 1e-4 if scale == "batch" else 1.0  # the whole rollout's std, or none
    expected = [(s - statistics.fmean(scores[i // 4 * 4:i // 4 * 4 + 4])) / divide for i, s in enumerate(scores)]
    expected = [0.0 if len(set(scores[i // 4 * 4:i // 4 * 4 + 4])) == 1 else e for i, e in enumerate(expected)]
    assert torch.allclose(advantages, torch.tensor(expected), atol=1e-5)


def test_bad_option_values_give_one_line_errors():
    import train_grpo
    import train_reinforce
    from minirlhf.cli import parse_args
    for script, argv, message in [
        (train_reinforce, ["--baseline", "leave-one-out"], "--baseline leave-one-out needs --samples-per-prompt >= 2"),
        (train_reinforce, ["--samples-per-prompt", "3"], "--samples-per-prompt 3 must divide --rollout-size 64"),
        (train_reinforce, ["--samples-per-prompt", "0"], "--samples-per-prompt"),
        (train_reinforce, ["--baseline", "rloo"], "--baseline must be one of"),
        (train_reinforce, ["--baseline", "reinforce++-baseline"], r"--baseline reinforce\+\+-baseline needs"),
        (train_grpo, ["--loss-aggregation", "mean"], "--loss-aggregation must be one of"),
        (train_grpo, ["--advantage-std", "global"], "--advantage-std must be one of"),
        (train_grpo, ["--clip-high", "0"], "--clip-high"),
        (train_grpo, ["--clip-high", "nan"], "--clip-high"),
    ]:
        with pytest.raises(ValueError, match=message):
            script.check_args(parse_args(script.Args, ["--reward", "gold"] + argv))
    for script in (train_reinforce, train_grpo):  # and the defaults pass
        script.check_args(parse_args(script.Args, ["--reward", "gold"]))
    train_reinforce.check_args(parse_args(train_reinforce.Args, ["--reward", "gold", "--baseline", "reinforce++"]))
