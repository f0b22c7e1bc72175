"""Smoke runs of train_reward.py and train_dpo.py on the embedded default (a few steps each, via subprocess).

Each run must honour the output contract (minirlhf/tracking.py), train its adapter (LoRA B starts at 0, so B != 0 means it
changed), keep the frozen base bit-identical (the scripts' own params/frozen_unchanged fingerprint), and save an
adapter that reloads to the same outputs. Bad input must end in one line on stderr, never a traceback.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minirlhf.assets import TINY_LLAMA
from minirlhf.cli import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--threads", "1", "--batch-size", "8", "--max-steps", "3"]


def run(script, *args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def check_contract(out, extra_keys):
    for name in ("args.json", "metrics.jsonl", "summary.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows and all("step" in r for r in rows)
    s = summary(out)
    for key in ("time/total_seconds", "params/trainable", "params/total", *extra_keys):
        assert key in s, key
    assert 0 < s["params/trainable"] < s["params/total"]
    assert s["params/frozen_unchanged"] is True
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")], "a temporary file was left behind"


def adapter_trained(path):
    weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if k.endswith("lora_B.weight")]
    assert b and all(k.startswith("base_model.model.") for k in weights)
    return any(v.abs().sum() > 0 for v in b)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reward"))
    run("train_reward.py", *FAST, "--max-eval-pairs", "48", "--eval-every", "2", "--out", out)
    return out


def test_reward_contract_and_training(reward_run):
    check_contract(reward_run, ["eval/accuracy", "eval/accuracy_ceiling"])
    assert adapter_trained(os.path.join(reward_run, "reward_model"))
    assert os.path.isfile(os.path.join(reward_run, "reward_model", "head.safetensors"))
    config = json.load(open(os.path.join(reward_run, "reward_model", "head_config.json")))
    assert config["base"] == {"quantization": "none", "dtype": "float32"}  # the precision it was trained on


def test_reward_model_reloads_to_identical_scores(reward_run, tmp_path):
    run("train_reward.py", "--threads", "1", "--eval-only", "--reward-model",
        os.path.join(reward_run, "reward_model"), "--max-eval-pairs", "48", "--out", str(tmp_path))
    trained, reloaded = summary(reward_run), summary(str(tmp_path))
    for key in ("eval/accuracy", "eval/margin", "eval/loss", "eval/accuracy_ceiling"):
        assert reloaded[key] == pytest.approx(trained[key], abs=1e-6), key


def test_reward_ceiling_is_on_the_pairs_evaluated(reward_run):
    """--max-eval-pairs 48: eval/accuracy counts the first 48 held-out pairs, so must the ceiling it is divided by
    (the ceiling of all 500 differs: accuracy / ceiling could pass 1)."""
    from minirlhf.data import world
    s = summary(reward_run)
    assert s["eval/accuracy_ceiling"] == world.accuracy_ceiling("test", range(48)) != world.accuracy_ceiling("test")
    assert s["eval/accuracy_vs_ceiling"] == s["eval/accuracy"] / s["eval/accuracy_ceiling"]


def test_reward_pairs_know_their_place_in_the_split_when_some_are_skipped():
    """--max-length 18 skips the held-out pairs whose prompt alone is longer (about 30 % of them): the first 48 pairs
    kept are not the first 48 of the split, and the ceiling must count the ones kept."""
    from minirlhf.data import world
    from minirlhf.models import load_tokenizer
    module = load_script("train_reward.py")
    args = parse_args(module.Args, ["--max-length", "18", "--max-prompt-length", "16"])
    tok = load_tokenizer(TINY_LLAMA)
    pairs, positions = module.load_pairs(args, tok, "test", 48)
    rows = world.preference_rows("test")
    assert len(pairs) == len(positions) == 48 and positions != list(range(48)) and positions == sorted(positions)
    for pair, i in zip(pairs, positions):  # each pair is the row at its position (its responses cut to fit)
        for key in ("chosen", "rejected"):
            ids = tok(rows[i][key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert pair[f"{key}_ids"] == ids[:len(pair[f"{key}_ids"])] and pair[f"{key}_ids"]
    assert module.held_out_ceiling(args, positions) == world.accuracy_ceiling("test", positions)
    assert world.accuracy_ceiling("test", positions) != world.accuracy_ceiling("test", range(48))


def test_reward_is_deterministic(reward_run, tmp_path):
    run("train_reward.py", *FAST, "--max-eval-pairs", "48", "--eval-every", "2", "--out", str(tmp_path))
    a, b = summary(reward_run), summary(str(tmp_path))
    assert a["eval/margin"] == b["eval/margin"] and a["eval/loss"] == b["eval/loss"]


def test_reward_evaluates_the_held_out_pairs_once_per_evaluation_step(tmp_path, monkeypatch):
    """Steps 2 and 3 of 3 are evaluation steps (--eval-every 2, and the last step): two passes over the held-out
    pairs, the final metrics being the last step's (no third pass after saving the model)."""
    module = load_script("train_reward.py")
    calls = []
    evaluate = module.evaluate
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    out = str(tmp_path / "run")
    summary = module.main(parse_args(module.Args, ["--threads", "1", "--batch-size", "4", "--max-steps", "3",
                                                   "--eval-every", "2", "--max-train-pairs", "16",
                                                   "--max-eval-pairs", "8", "--out", out]))
    assert len(calls) == 2
    rows = metrics_rows(out)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [2, 3]
    for key in ("eval/accuracy", "eval/margin", "eval/loss"):
        assert summary[key] == rows[-1][key], key


@pytest.mark.parametrize("loss", ["distributional", "margin"])
def test_reward_other_losses(loss, tmp_path):
    run("train_reward.py", "--threads", "1", "--batch-size", "4", "--max-steps", "2", "--max-eval-pairs", "16",
        "--loss", loss, "--out", str(tmp_path))
    check_contract(str(tmp_path), ["eval/accuracy"])
    config = json.load(open(os.path.join(tmp_path, "reward_model", "head_config.json")))
    assert config["kind"] == ("rating" if loss == "distributional" else "scalar")


def test_reward_qlora_4bit_smoke(tmp_path):
    run("train_reward.py", "--threads", "1", "--batch-size", "4", "--max-steps", "2", "--max-eval-pairs", "16",
        "--quantization", "4bit", "--out", str(tmp_path))
    check_contract(str(tmp_path), ["eval/accuracy"])
    assert adapter_trained(os.path.join(tmp_path, "reward_model"))
    config = json.load(open(os.path.join(tmp_path, "reward_model", "head_config.json")))
    assert config["base"] == {"quantization": "4bit", "dtype": "float32"}
    # used on a float32 base: evaluated all the same, with one line saying the scores may shift
    proc = run("train_reward.py", "--threads", "1", "--eval-only", "--reward-model",
               os.path.join(tmp_path, "reward_model"), "--max-eval-pairs", "8", "--out", str(tmp_path / "on_float"))
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "trained on a 4-bit NF4 (float32 compute) base; this base is float32" in warnings[0]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpo"))
    run("train_dpo.py", *FAST, "--max-eval-pairs", "16", "--eval-prompts", "6", "--eval-samples", "1",
        "--max-new-tokens", "8", "--out", out)
    return out


def test_dpo_contract_and_training(dpo_run):
    check_contract(dpo_run, ["eval/gold_before", "eval/gold_after", "eval/gold_max", "eval/kl", "eval/win_rate"])
    assert adapter_trained(os.path.join(dpo_run, "policy"))
    rows = [json.loads(line) for line in open(os.path.join(dpo_run, "metrics.jsonl"))]
    for key in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert key in rows[-1], key
    samples = json.load(open(os.path.join(dpo_run, "samples.json")))  # 6 held-out prompts x 1, before and after
    assert len(samples["before"]) == len(samples["after"]) == 6
    assert all(isinstance(s["response"], str) and s["gold"] is not None for s in samples["after"])


def test_derived_lengths_cut_nothing_and_an_explicit_limit_reports_its_cuts(reward_run, dpo_run, tmp_path):
    """The default (derived) lengths cut nothing on the built-in world; a system prompt as long as SmolLM2's with the
    old --max-prompt-length 32 cuts every prompt: one line per split on stderr, the counts in summary.json."""
    for out in (reward_run, dpo_run):
        s = summary(out)
        assert (s["data/prompts_truncated"], s["data/responses_truncated"], s["data/pairs_skipped"]) == (0, 0, 0)
    proc = run("train_reward.py", "--threads", "1", "--batch-size", "4", "--max-steps", "1", "--max-eval-pairs", "8",
               "--eval-every", "1", "--system-prompt", "You are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face", "--max-prompt-length", "32", "--max-length", "96", "--out", str(tmp_path))
    lines = [line for line in proc.stderr.splitlines() if "--max-prompt-length 32: cut" in line]
    assert len(lines) == 2 and [line.split("UserWarning: ")[1].split(" (by")[0] for line in lines] == [
        "builtin [test]: --max-prompt-length 32: cut 500 of 500 prompts",
        "builtin [train]: --max-prompt-length 32: cut 3000 of 3000 prompts"], proc.stderr[-2000:]
    assert all(line.endswith("); they keep their last 32 tokens") for line in lines)
    s = summary(str(tmp_path))
    assert (s["data/prompts_truncated"], s["data/responses_truncated"], s["data/pairs_skipped"]) == (3500, 0, 0)


def test_dpo_adapter_reloads_to_identical_logprobs(dpo_run):
    """Our own loader puts the saved policy back: its held-out DPO loss equals the one the run reported."""
    from minirlhf import lora
    from minirlhf.data import load_preference_dataset
    from minirlhf.data.tokenize import collate_pairs, tokenize_preference_dataset
    from minirlhf.dpo import dpo_loss
    from minirlhf.formats import load_adapter
    from minirlhf.heads import response_logprobs
    from minirlhf.models import load_model, load_tokenizer, reference

    tok = load_tokenizer(TINY_LLAMA)
    model = load_model(TINY_LLAMA, device="cpu", tokenizer=tok)
    load_adapter(model, os.path.join(dpo_run, "policy"), adapter="policy")
    lora.set_active_adapter(model, "policy")
    model.eval()
    pairs = tokenize_preference_dataset(load_preference_dataset("builtin", "test"), tok, 64, 32).select(range(16))
    batch = collate_pairs([{k: pairs[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                           for i in range(16)], tok.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    with torch.no_grad():
        policy = response_logprobs(model, *args).sum(-1)
        with reference(model):
            ref = response_logprobs(model, *args).sum(-1)
    losses, _, _ = dpo_loss(policy[:16], policy[16:], ref[:16], ref[16:], beta=summary_arg(dpo_run, "beta"))
    assert losses.mean().item() == pytest.approx(summary(dpo_run)["eval/loss"], abs=1e-5)


def summary_arg(out, name):
    return json.load(open(os.path.join(out, "args.json")))[name]


@pytest.mark.parametrize("loss, precompute", [("ipo", "--precompute-ref"), ("cdpo", "--no-precompute-ref")])
def test_dpo_variants_and_precompute(loss, precompute, tmp_path):
    proc = run("train_dpo.py", "--threads", "1", "--batch-size", "4", "--max-steps", "2", "--max-eval-pairs", "8",
               "--eval-prompts", "4", "--eval-samples", "1", "--max-new-tokens", "6", "--loss", loss, precompute,
               "--max-train-pairs", "64", "--out", str(tmp_path))  # --precompute-ref reads every training pair
    check_contract(str(tmp_path), ["eval/gold_after", "eval/kl"])
    assert "data: 64 train pairs" in proc.stdout, proc.stdout[-2000:]


def load_script(script):
    import importlib.util
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,args,message", [
    ("train_reward.py", ["--dataset", "nope/nothing"], "unknown"),
    ("train_reward.py", ["--model", "/no/such/dir"], "/no/such/dir"),
    ("train_reward.py", ["--loss", "hinge"], "--loss"),
    ("train_reward.py", ["--batch-size", "0"], "--batch-size"),
    ("train_dpo.py", ["--beta", "-1"], "--beta"),
    ("train_dpo.py", ["--loss", "sigmoid", "--label-smoothing", "0.2"], "cdpo"),
    ("train_dpo.py", ["--loss", "kto", "--batch-size", "1"], "--batch-size >= 2"),
    ("train_dpo.py", ["--loss", "kto", "--precompute-ref"], "not with --precompute-ref"),
    ("train_dpo.py", ["--loss", "kto", "--length-normalize"], "not with --length-normalize"),
    ("train_dpo.py", ["--kto-desirable-weight", "2"], "with --loss kto"),
    ("train_dpo.py", ["--loss", "kto", "--kto-undesirable-weight", "0"], "--kto-undesirable-weight"),
    ("train_reward.py", ["--eval-only"], "--reward-model"),
    ("train_dpo.py", ["--max-train-pairs", "3", "--batch-size", "4"], "3 training pairs do not fill one"),
    ("train_reward.py", ["--max-train-pairs", "3", "--batch-size", "4"], "3 training pairs do not fill one"),
    ("train_sft.py", ["--batch-size", "100000"], "training blocks do not fill one optimizer step of 100000"),
])
def test_bad_input_raises_a_clear_error(script, args, message, tmp_path):
    """In-process (fast): main() raises one ValueError naming the problem; __main__ turns it into one line."""
    module = load_script(script)
    with pytest.raises(ValueError, match=message.replace("/", ".").replace("-", ".")):
        module.main(parse_args(module.Args, [*args, "--out", str(tmp_path), "--threads", "1"]))


@pytest.mark.parametrize("script,args,message", [("train_reward.py", ["--loss", "hinge"], "--loss"),
                                                 ("train_dpo.py", ["--model", "/no/such/dir"], "/no/such/dir")])
def test_bad_input_is_one_line_on_the_command_line(script, args, message, tmp_path):
    proc = run(script, *args, "--out", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error:") and message in last, proc.stderr[-500:]


def test_reward_checkpoint_of_the_wrong_shape(tmp_path):
    head_dir = tmp_path / "rm"
    head_dir.mkdir()
    from minirlhf.formats import save_head
    from minirlhf.heads import ScalarHead
    save_head(ScalarHead(7), str(head_dir))
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # a valid adapter: the head is what is wrong
        shutil.copy(os.path.join(TINY_LLAMA, "..", "reward-model", name), head_dir / name)
    proc = run("train_reward.py", "--eval-only", "--reward-model", str(head_dir), "--out", str(tmp_path / "o"),
               check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "hidden size" in proc.stderr.strip().splitlines()[-1]


def test_model_without_chat_template_needs_template(tmp_path):
    model_dir = tmp_path / "plain"
    shutil.copytree(TINY_LLAMA, model_dir)
    os.remove(model_dir / "chat_template.jinja")
    cfg = json.load(open(model_dir / "tokenizer_config.json"))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(model_dir / "tokenizer_config.json", "w"))
    proc = run("train_reward.py", "--model", str(model_dir), "--max-steps", "1", "--out", str(tmp_path / "o"),
               check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--template" in proc.stderr.strip().splitlines()[-1]
    run("train_reward.py", "--model", str(model_dir), "--template", "qa", "--threads", "1", "--batch-size", "4",
        "--max-steps", "1", "--max-eval-pairs", "8", "--out", str(tmp_path / "ok"))


def test_sft_loss_is_the_full_logits_cross_entropy():
    """train_sft.lm_loss (the shift inside heads.response_logprobs) against F.cross_entropy on every position's
    logits, float64, packed (every token) and masked (right-padded, response tokens only)."""
    import torch.nn.functional as F
    from conftest import make_tiny_llama
    lm_loss = load_script("train_sft.py").lm_loss
    model = make_tiny_llama(dtype=torch.float64)
    blocks = torch.randint(3, 101, (3, 9), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=blocks).logits  # (B, L, V): position t predicts token t + 1
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 101), blocks[:, 1:].reshape(-1))
    assert abs(lm_loss(model, blocks).item() - expected.item()) < 1e-12
    attention, loss_mask = torch.ones_like(blocks), torch.zeros_like(blocks)
    loss_mask[:, 4:], attention[0, 7:], loss_mask[0, 7:] = 1, 0, 0  # row 0 right-padded after 7 tokens
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), blocks[:, 1:], reduction="none")  # (B, L-1)
    expected = (losses * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
    assert abs(lm_loss(model, blocks, attention, loss_mask).item() - expected.item()) < 1e-12


DPO_TINY = ["--threads", "1", "--batch-size", "4", "--max-steps", "2", "--max-train-pairs", "16", "--max-eval-pairs",
            "8", "--eval-prompts", "2", "--eval-samples", "1", "--max-new-tokens", "6", "--log-every", "1"]


def metrics_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def dpo_rpo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpo_rpo"))
    run("train_dpo.py", *DPO_TINY, "--rpo-alpha", "0.7", "--out", out)
    return out


def test_dpo_rpo_smoke(dpo_rpo_run):
    """--rpo-alpha: nll/chosen logged each step and eval/nll/chosen at the end; at step 1 the policy IS the reference
    (LoRA B = 0), so the DPO part of train/loss is exactly log 2 and the rest is α x nll/chosen."""
    check_contract(dpo_rpo_run, ["eval/gold_after", "eval/kl", "eval/nll/chosen"])
    assert adapter_trained(os.path.join(dpo_rpo_run, "policy"))
    rows = metrics_rows(dpo_rpo_run)
    assert all("nll/chosen" in r and r["nll/chosen"] > 0 for r in rows)
    assert rows[0]["train/loss"] == pytest.approx(math.log(2) + 0.7 * rows[0]["nll/chosen"], abs=1e-6)


def test_dpo_length_normalize_smoke(dpo_rpo_run, tmp_path):
    """--length-normalize: logps/chosen becomes the per-token average. At step 1 (same pairs, policy = base) it must
    be minus the RPO run's nll/chosen, -log π(y_c|p) / |y_c|, computed from the sums by another code path."""
    run("train_dpo.py", *DPO_TINY, "--length-normalize", "--out", str(tmp_path))
    check_contract(str(tmp_path), ["eval/gold_after", "eval/kl"])
    assert adapter_trained(os.path.join(tmp_path, "policy"))
    rows, rpo = metrics_rows(str(tmp_path)), metrics_rows(dpo_rpo_run)
    assert "nll/chosen" not in rows[0] and rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["logps/chosen"] == pytest.approx(-rpo[0]["nll/chosen"], abs=1e-5)
    assert -6 < rows[0]["logps/chosen"] < 0 and rows[0]["logps/chosen"] > rpo[0]["logps/chosen"]  # average > sum


def test_dpo_sequence_logps_average_divides_by_response_tokens():
    """train_dpo.sequence_logps(average=True) = the sum over response tokens / their count (Python loop), float64;
    a row without response tokens divides by 1, not 0."""
    from conftest import make_tiny_llama
    module = load_script("train_dpo.py")
    model = make_tiny_llama(dtype=torch.float64)
    ids = torch.randint(3, 101, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 9, dtype=torch.long)
    for row, (start, end) in enumerate([(3, 9), (5, 7), (8, 9), (4, 4)]):  # 6, 2, 1 and 0 response tokens
        mask[row, start:end] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": mask}
    sums, means = module.sequence_logps(model, batch, "cpu"), module.sequence_logps(model, batch, "cpu", average=True)
    for row in range(4):
        count = max(1, sum(mask[row].tolist()))
        assert abs(means[row].item() - sums[row].item() / count) < 1e-12
    assert sums[3].item() == 0.0 and (sums[:3] < 0).all()


def test_dpo_rpo_alpha_must_be_non_negative(tmp_path):
    module = load_script("train_dpo.py")
    with pytest.raises(ValueError, match="--rpo-alpha"):
        module.main(parse_args(module.Args, ["--rpo-alpha", "-0.5", "--out", str(tmp_path), "--threads", "1"]))


def test_best_of_n_table_smoke():
    """python -m minirlhf.best_of_n prints one table row per n, with the analytic KL bound."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "minirlhf.best_of_n", "--n", "1", "4", "--prompts", "3",
                           "--max-new-tokens", "8", "--threads", "1"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 4 |")]
    assert len(rows) == 2 and rows[0].split("|")[2].strip() == "0.000"
    assert rows[1].split("|")[2].strip() == f"{math.log(4) - 0.75:.3f}"


# ---- --loss kto ------------------------------------------------------------------------------------------------------
def test_dpo_kto_smoke(tmp_path):
    """--loss kto: kl/z0 logged each step. At step 1 the policy IS the reference (LoRA B = 0): every log-ratio is 0,
    so z0 = 0 and each example sits at sigmoid(0) = 1/2: train/loss = (λ_D / 2 + λ_U / 2) / 2 = 0.6 here."""
    run("train_dpo.py", *DPO_TINY, "--loss", "kto", "--kto-desirable-weight", "1.5", "--kto-undesirable-weight", "0.9",
        "--out", str(tmp_path))
    check_contract(str(tmp_path), ["eval/gold_before", "eval/gold_after", "eval/kl", "eval/loss"])
    assert adapter_trained(os.path.join(tmp_path, "policy"))
    rows = metrics_rows(str(tmp_path))
    assert all("kl/z0" in r and r["kl/z0"] >= 0 for r in rows)
    assert rows[0]["kl/z0"] == 0.0 and rows[0]["train/loss"] == pytest.approx(0.6, abs=1e-6)
    assert rows[0]["rewards/chosen"] == 0.0 and rows[1]["rewards/margins"] != 0.0


def test_dpo_kto_z0_is_the_mean_log_ratio_of_mismatched_pairs():
    """train_dpo.kto_z0 against the mismatched rows built and scored one by one by hand: pair i's prompt with pair
    i + 1's (cyclically) chosen and rejected responses, log π - log π_ref from a plain forward of the whole sequence
    (float64, no padding), with the policy adapter and with the reference adapter; the mean, clamped at 0."""
    import torch.nn.functional as F
    from conftest import make_tiny_llama
    from minirlhf import lora
    module = load_script("train_dpo.py")
    model = make_tiny_llama(dtype=torch.float64)
    torch.manual_seed(0)
    for adapter in ("policy", "reference"):  # models.reference(model) then uses the frozen "reference" adapter
        lora.add_lora(model, "all-linear", r=4, alpha=8, adapter=adapter)
        for _, m in lora.lora_layers(model, adapter):
            torch.nn.init.normal_(m.lora_B[adapter].weight, std=0.3 if adapter == "reference" else 0.05)
    lora.set_active_adapter(model, "policy")
    g = torch.Generator().manual_seed(4)
    ids = lambda n: torch.randint(3, 101, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt_ids": ids(3 + i), "chosen_ids": ids(2 + i % 2), "rejected_ids": ids(4 - i % 3)}
                for i in range(3)]

    def logp(prompt, response):
        seq = torch.tensor([prompt + response])
        logprobs = F.log_softmax(model(input_ids=seq).logits[0, :-1], -1)  # position t predicts token t + 1
        return sum(logprobs[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(response))

    ratios = []
    for i, e in enumerate(examples):
        other = examples[(i + 1) % 3]
        for response in (other["chosen_ids"], other["rejected_ids"]):
            policy = logp(e["prompt_ids"], response)
            with lora.use_adapter(model, "reference"):
                ratios.append(policy - logp(e["prompt_ids"], response))
    want = sum(ratios) / len(ratios)
    assert want > 0.05  # the policy differs from the reference, and the clamp does not hide the value
    with torch.no_grad():
        assert module.kto_z0(model, examples, 0, "cpu", 2).item() == pytest.approx(want, rel=1e-9)
