"""Every bad input a user was seen to try ends in ONE line naming the flag or file, a non-zero exit, no traceback,
and leaves an existing --out folder exactly as it was.

Most cases fail in the scripts' validation, before anything is loaded, so they run in this process (runpy of the
script's __main__ block: run_script turns InputError into SystemExit("script.py: error: ...")); a few run as real
subprocesses to show what the command line prints. A case that raised anything else (a bug) would fail here with its
traceback. Cases: (script, argv, text the one line must contain).
"""
import hashlib
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minirlhf.assets import ASSETS_DIR, TINY_LLAMA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SCRIPTS = ("train_sft.py", "train_reward.py", "train_dpo.py", "train_ppo.py", "train_grpo.py", "train_reinforce.py",
           "train_online_dpo.py", "train_distill.py")
TEACHER = os.path.join(ASSETS_DIR, "reward-model")  # an adapter folder on the embedded base: a valid --teacher
REQUIRED = {"train_distill.py": ["--teacher", TEACHER]}  # a script's required flags, given before each case's own

# ---- settings out of range: zero, negative, NaN, inf (validation.py), in every script that has the flag
RANGE_CASES = [
    *[(s, ["--lr", v], "--lr") for s in SCRIPTS for v in ("0", "-1", "nan", "inf")],
    *[(s, ["--grad-clip", v], "--grad-clip") for s in SCRIPTS for v in ("-1", "0", "nan")],
    *[(s, ["--lora-alpha", v], "--lora-alpha") for s in SCRIPTS for v in ("0", "nan")],
    *[(s, ["--lora-r", "0"], "--lora-r") for s in SCRIPTS],
    *[(s, ["--lora-dropout", v], "--lora-dropout") for s in ("train_sft.py", "train_reward.py", "train_dpo.py")
      for v in ("-1", "1", "nan")],
    *[(s, ["--weight-decay", v], "--weight-decay") for s in ("train_sft.py", "train_reward.py") for v in ("-1", "nan")],
    *[(s, ["--seed", "-1"], "--seed") for s in SCRIPTS],
    *[(s, ["--threads", "-2"], "--threads") for s in SCRIPTS],
    *[(s, ["--save-every", "-1"], "--save-every") for s in SCRIPTS],
    ("train_sft.py", ["--min-lr-ratio", "-1"], "--min-lr-ratio"),
    ("train_sft.py", ["--batch-size", "0"], "--batch-size"),
    ("train_sft.py", ["--batch-size", "-1"], "--batch-size"),
    ("train_sft.py", ["--log-every", "0"], "--log-every"),
    ("train_sft.py", ["--eval-every", "0"], "--eval-every"),
    ("train_sft.py", ["--block-size", "1"], "--block-size"),
    ("train_sft.py", ["--max-steps", "0"], "--max-steps"),
    ("train_sft.py", ["--warmup-steps", "-1"], "--warmup-steps"),
    ("train_reward.py", ["--epochs", "0"], "--epochs"),
    ("train_reward.py", ["--num-classes", "0"], "--num-classes"),
    ("train_reward.py", ["--num-classes", "1"], "--num-classes"),
    ("train_reward.py", ["--num-classes", "-1"], "--num-classes"),
    ("train_reward.py", ["--eval-every", "0"], "--eval-every"),
    ("train_reward.py", ["--alpha", "nan"], "--alpha"),
    ("train_reward.py", ["--max-steps", "0"], "--max-steps"),
    ("train_reward.py", ["--grad-accum", "0"], "--grad-accum"),
    ("train_reward.py", ["--max-length", "1"], "--max-length"),
    ("train_dpo.py", ["--epochs", "0"], "--epochs"),
    ("train_dpo.py", ["--beta", "0"], "--beta"),
    ("train_dpo.py", ["--beta", "nan"], "--beta"),
    ("train_dpo.py", ["--loss", "cdpo", "--label-smoothing", "0.7"], "--label-smoothing"),
    ("train_dpo.py", ["--log-every", "0"], "--log-every"),
    ("train_dpo.py", ["--eval-every", "-1"], "--eval-every"),
    ("train_dpo.py", ["--eval-prompts", "0"], "--eval-prompts"),
    ("train_dpo.py", ["--eval-prompts", "-1"], "--eval-prompts"),
    ("train_dpo.py", ["--eval-samples", "0"], "--eval-samples"),
    ("train_dpo.py", ["--max-eval-pairs", "0"], "--max-eval-pairs"),
    ("train_dpo.py", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("train_dpo.py", ["--temperature", "nan"], "--temperature"),
    ("train_ppo.py", ["--kl-coef", "nan"], "--kl-coef"),
    ("train_ppo.py", ["--kl-coef", "-1"], "--kl-coef"),
    ("train_ppo.py", ["--vf-coef", "nan"], "--vf-coef"),
    ("train_ppo.py", ["--temperature", "nan"], "--temperature"),
    ("train_ppo.py", ["--temperature", "0"], "--temperature"),
    ("train_ppo.py", ["--eval-prompts", "-1"], "--eval-prompts"),
    ("train_ppo.py", ["--eval-prompts", "0"], "--eval-prompts"),
    ("train_ppo.py", ["--eval-samples", "0"], "--eval-samples"),
    ("train_ppo.py", ["--iterations", "0"], "--iterations"),
    ("train_ppo.py", ["--gamma", "1.5"], "--gamma"),
    ("train_ppo.py", ["--lam", "nan"], "--lam"),
    ("train_ppo.py", ["--clip-eps", "0"], "--clip-eps"),
    ("train_ppo.py", ["--target-kl", "-1"], "--target-kl"),
    ("train_ppo.py", ["--missing-eos-penalty", "nan"], "--missing-eos-penalty"),
    ("train_ppo.py", ["--reward-entropy-coef", "inf"], "--reward-entropy-coef"),
    ("train_ppo.py", ["--entropy-coef", "0.1"], "--entropy-coef is now --reward-entropy-coef"),
    ("train_reinforce.py", ["--baseline", "moving-average"], "--baseline running-mean"),
    ("train_ppo.py", ["--rollout-size", "0"], "--rollout-size"),
    # the range the code accepts, narrower than a plain bound: numpy's seeds stop at 2^32 - 1
    *[(s, ["--seed", "4294967296"], "--seed") for s in SCRIPTS],
    ("train_grpo.py", ["--clip-high", "0.1"], "--clip-high"),  # below --clip-eps 0.2: a narrower upper clip
]
# ---- choices and flag combinations
CHOICE_CASES = [
    *[(s, ["--quantization", "3bit"], "--quantization") for s in SCRIPTS],
    *[(s, ["--template", "zz"], "--template") for s in SCRIPTS],
    *[(s, ["--dataset", "nope/nothing"], "--dataset") for s in SCRIPTS],
    *[(s, ["--dtype", "float8"], "--dtype") for s in SCRIPTS],
    *[(s, ["--forward-batch-size", "0"], "--forward-batch-size") for s in SCRIPTS],
    *[(s, ["--cost-per-hour", v], "--cost-per-hour") for s in SCRIPTS for v in ("-1", "nan")],
    *[(s, ["--report-to", "wandb"], "--report-to") for s in SCRIPTS],
    *[(s, ["--system-prompt", " "], "--system-prompt") for s in SCRIPTS],
    *[(s, ["--top-p", "0"], "--top-p") for s in ("train_dpo.py", "train_ppo.py", "train_grpo.py", "train_reinforce.py",
                                                "train_online_dpo.py", "train_distill.py")],
    *[(s, ["--top-k", "-1"], "--top-k") for s in ("train_ppo.py", "train_grpo.py", "train_reinforce.py",
                                                 "train_online_dpo.py", "train_distill.py")],
    *[(s, ["--pass-k", "4", "0"], "--pass-k must be integers >= 1") for s in ("train_dpo.py", "train_ppo.py",
                                                                            "train_grpo.py", "train_reinforce.py")],
    *[(s, ["--dataset", "juyoungml/HelpSteer2-binarized", "--pass-k", "4"], "--pass-k counts correct answers")
      for s in ("train_dpo.py", "train_ppo.py", "train_grpo.py", "train_reinforce.py")],
    ("train_ppo.py", ["--min-new-tokens", "25"], "--min-new-tokens"),
    ("train_reinforce.py", ["--baseline", "leave-one-out"], "--samples-per-prompt"),
    ("train_reinforce.py", ["--baseline", "reinforce++-baseline"], "--samples-per-prompt"),
    ("train_reinforce.py", ["--samples-per-prompt", "5"], "--samples-per-prompt"),
    ("train_grpo.py", ["--loss-aggregation", "mean"], "--loss-aggregation"),
    ("train_grpo.py", ["--advantage-std", "rollout"], "--advantage-std"),
    ("train_grpo.py", ["--policy-loss", "dapo"], "--policy-loss"),
    ("train_grpo.py", ["--clip-high", "0"], "--clip-high"),
    ("train_dpo.py", ["--rpo-alpha", "-1"], "--rpo-alpha"),
    ("train_sft.py", ["--block-size", "100000"], "--block-size"),  # after loading: the data cannot fill one block
    ("train_reward.py", ["--split", "dev"], "--split"),
    ("train_reward.py", ["--loss", "hinge"], "--loss"),
    ("train_dpo.py", ["--loss", "orpo"], "--loss"),
    ("train_dpo.py", ["--loss", "kto", "--batch-size", "1"], "--batch-size"),
    ("train_dpo.py", ["--loss", "kto", "--kto-desirable-weight", "nan"], "--kto-desirable-weight"),
    ("train_online_dpo.py", ["--loss", "kto"], "--loss"),
    ("train_online_dpo.py", ["--rollout-size", "7", "--minibatch-size", "7"], "--rollout-size"),
    ("train_online_dpo.py", ["--beta", "nan"], "--beta"),
    ("train_online_dpo.py", ["--tis-cap", "2"], "--tis-cap"),
    ("train_ppo.py", ["--reward", "oracle"], "--reward"),
    ("train_grpo.py", ["--group-size", "1"], "--group-size"),
    ("train_grpo.py", ["--group-size", "3"], "--group-size"),
    ("train_grpo.py", ["--group-minibatches", "--minibatch-size", "12"], "--group-minibatches"),
    ("train_reinforce.py", ["--group-minibatches", "--samples-per-prompt", "4", "--minibatch-size", "6"],
     "--group-minibatches"),
    ("train_grpo.py", ["--beta", "nan"], "--beta"),
    ("train_distill.py", ["--teacher", "/no/such/folder"], "--teacher"),
    ("train_distill.py", ["--teacher", os.path.join(ASSETS_DIR, "tiny-llama")], "full model"),
    ("train_distill.py", ["--divergence", "kl"], "--divergence"),
    ("train_distill.py", ["--jsd-beta", "0.3"], "--divergence jsd"),  # β of a divergence not chosen
    *[("train_distill.py", ["--divergence", "jsd", "--jsd-beta", v], "--jsd-beta") for v in ("0", "1", "nan")],
    ("train_distill.py", ["--divergence", "forward-kl", "--top-k", "5"], "--divergence forward-kl"),
    ("train_distill.py", ["--tis-cap", "2"], "--tis-cap"),
    ("train_reinforce.py", ["--kl-coef", "-1"], "--kl-coef"),
    ("train_reinforce.py", ["--kl-estimator", "k4"], "--kl-estimator"),
    ("train_ppo.py", ["--kl-estimator", "k5"], "--kl-estimator"),
    ("train_sft.py", ["--merge", "--full-finetune"], "--merge"),
    ("train_sft.py", ["--init-config", "{}"], "--tokenizer"),
    ("train_sft.py", ["--init-config", "/no/such/config.json", "--tokenizer", TINY_LLAMA], "--init-config"),
    ("train_sft.py", ["--init-config", "{not json", "--tokenizer", TINY_LLAMA], "--init-config"),
    ("train_reward.py", ["--dataset", "builtin", "--data-files", "x.jsonl"], "--data-files"),
    ("train_reward.py", ["--reward-model", TINY_LLAMA], "--eval-only"),
    # checked against the model's skeleton (its config.json on the meta device) before anything loads
    *[(s, ["--lora-targets", "q_prj"], "--lora-targets") for s in SCRIPTS],
    ("train_ppo.py", ["--lora-targets", "q_proj", "v_prj"], "v_prj"),
    ("train_sft.py", ["--full-finetune", "--quantization", "4bit"], "--full-finetune"),
    ("train_reward.py", ["--full-finetune", "--quantization", "8bit"], "--full-finetune"),
    ("train_ppo.py", ["--lora-targets", "embed_tokens"], "embed_tokens matches no linear module"),
    # data smaller than the work asked of it, or cut to nothing: one line before the model loads
    ("train_sft.py", ["--batch-size", "100000"], "do not fill one optimizer step"),
    ("train_dpo.py", ["--max-train-pairs", "3"], "3 training pairs do not fill one optimizer step of 32"),
    ("train_reward.py", ["--max-train-pairs", "3"], "3 training pairs do not fill one optimizer step of 32"),
    ("train_sft.py", ["--no-packing", "--block-size", "2"], "no response token"),
    ("train_sft.py", ["--init-config", '{"model_type": "llama", "hidden_act": "nope"}', "--tokenizer", TINY_LLAMA],
     "--init-config"),
    ("train_sft.py", ["--init-config", '{"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4}',
                      "--tokenizer", TINY_LLAMA], "--init-config"),
]
CASES = RANGE_CASES + CHOICE_CASES


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture
def previous_run(tmp_path):
    """An --out folder holding a finished earlier run, which a failing command must leave untouched."""
    out = tmp_path / "run"
    (out / "policy").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.5}\n')
    (out / "summary.json").write_text(json.dumps({"train/finished": True}))
    (out / "policy" / "adapter_model.safetensors").write_bytes(b"earlier weights")
    return str(out)


def run_in_process(script, argv, monkeypatch):
    """Run script's __main__ with argv; returns the SystemExit code (a str: the one line) or None if it returned."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        return e.code
    return None


def assert_one_line(code, script, expected):
    assert isinstance(code, str), f"expected a one-line error, got exit code {code!r}"
    assert "\n" not in code and code.startswith(f"{script}: error: "), code
    assert expected in code, code


@pytest.mark.parametrize("script,argv,expected", CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_bad_setting_is_one_line_before_anything_loads(script, argv, expected, previous_run, monkeypatch):
    before = snapshot(previous_run)
    code = run_in_process(script, [*REQUIRED.get(script, []), "--threads", "1", *argv, "--out", previous_run],
                          monkeypatch)  # argv wins
    assert_one_line(code, script, expected)
    assert snapshot(previous_run) == before


# ---- the NaN guard: a learning rate of 1e30 diverges (1e6 left 4-token PPO rollouts finite); the run stops with
# one line and writes no NaN anywhere
DIVERGE = {
    "train_sft.py": ["--max-steps", "6", "--warmup-steps", "0", "--batch-size", "4"],
    "train_reward.py": ["--max-steps", "6", "--warmup-steps", "0", "--batch-size", "4", "--max-eval-pairs", "8"],
    "train_dpo.py": ["--max-steps", "6", "--warmup-steps", "0", "--batch-size", "4", "--eval-prompts", "2",
                     "--eval-samples", "1", "--max-new-tokens", "4", "--max-eval-pairs", "8", "--save-every", "1"],
    "train_ppo.py": ["--iterations", "6", "--warmup-iterations", "0", "--rollout-size", "8", "--minibatch-size", "8",
                     "--eval-prompts", "2", "--eval-samples", "1", "--max-new-tokens", "4", "--save-every", "1"],
    "train_grpo.py": ["--iterations", "6", "--warmup-iterations", "0", "--rollout-size", "8", "--minibatch-size", "8",
                      "--group-size", "4", "--eval-prompts", "2", "--eval-samples", "1", "--max-new-tokens", "4",
                      "--save-every", "1"],
    "train_reinforce.py": ["--iterations", "6", "--warmup-iterations", "0", "--rollout-size", "8", "--minibatch-size",
                           "8", "--eval-prompts", "2", "--eval-samples", "1", "--max-new-tokens", "4", "--save-every",
                           "1"],
    "train_online_dpo.py": ["--iterations", "6", "--warmup-iterations", "0", "--rollout-size", "8", "--minibatch-size",
                            "8", "--reward", "gold", "--eval-prompts", "2", "--eval-samples", "1", "--max-new-tokens",
                            "4", "--save-every", "1"],
    "train_distill.py": ["--iterations", "6", "--warmup-iterations", "0", "--rollout-size", "8", "--minibatch-size",
                         "8", "--eval-prompts", "2", "--eval-samples", "1", "--max-new-tokens", "4", "--save-every",
                         "1", "--teacher", TEACHER],
}


@pytest.mark.parametrize("script", DIVERGE)
def test_divergence_stops_with_one_line_and_no_nan_is_saved(script, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    code = run_in_process(script, [*DIVERGE[script], "--lr", "1e30", "--out", out, "--threads", "1"], monkeypatch)
    assert_one_line(code, script, "diverged")
    saved = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".safetensors")]
    for path in saved:  # adapters, heads: whatever was written holds only finite numbers
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path
    for path in [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f == "trainer.pt"]:
        state = torch.load(path, weights_only=False)  # our own file, written by the run under test
        assert all(torch.isfinite(t).all() for t in state["trainable"].values()), path
    assert not os.path.exists(os.path.join(out, "summary.json"))  # no summary of a diverged run
    for line in open(os.path.join(out, "metrics.jsonl")) if os.path.exists(os.path.join(out, "metrics.jsonl")) else []:
        assert all(not isinstance(v, float) or math.isfinite(v) for v in json.loads(line).values()), line


def test_command_line_prints_one_line_on_stderr(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), "--lr", "nan", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["train_sft.py: error: --lr must be a finite number (> 0), got nan"]


def test_ctrl_c_before_training_is_one_line_exit_130(tmp_path):
    """A Ctrl-C while the model loads or the policy is evaluated before training (no checkpoint to write yet)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_dpo.py"), "--threads", "1", "--eval-prompts",
                             "120", "--eval-samples", "8", "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**ENV, "PYTHONUNBUFFERED": "1"},  # else the line below arrives only at exit
                            # a shell's background job ignores SIGINT and its children inherit that: restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # the parameter report comes right before the evaluation before training
        if line.startswith("trainable params"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted" in stderr.strip().splitlines()[-1]


# ---- dropout means what the flags say
def test_sampling_restores_every_module_mode():
    """sample() restores every module's own mode: ending with model.train(was_training) would switch back on a
    dropout that dropout_off had turned off in a training-mode (checkpointed) model."""
    from conftest import make_tiny_llama
    from minirlhf import lora
    from minirlhf.sampling import sample
    model = make_tiny_llama()
    lora.add_lora(model, ["q_proj"], r=2, alpha=4, dropout=0.05)
    model.train()
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops
    for d in drops:  # what models.dropout_off does to a checkpointed model: train mode, every dropout off
        d.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    sample(model, torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long), 3, eos_token_id=2, pad_token_id=0,
           generator=torch.Generator().manual_seed(0))
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_dpo_lora_dropout_acts_in_training(tmp_path):
    """--lora-dropout 0.5 must change what DPO learns (it did nothing while the model sat in eval mode)."""
    flags = ["--threads", "1", "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "0", "--eval-prompts", "1",
             "--eval-samples", "1", "--max-new-tokens", "2", "--max-eval-pairs", "4"]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train_dpo.py"), *flags, "--lora-dropout", p,
                               "--out", str(tmp_path / p)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=ENV) for p in ("0", "0.5")]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    a, b = (load_file(str(tmp_path / p / "policy" / "adapter_model.safetensors")) for p in ("0", "0.5"))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ---- files and folders: each named in the one line (built in tmp_path; "{name}" in argv is replaced by its path)
def make_bad_files(root):
    """The broken inputs a user was seen to pass, as files and folders under root: {name: path}."""
    import shutil
    from minirlhf.checkpoint import CHECKPOINT_DIR, save_checkpoint
    from minirlhf.distributed import DistInfo
    p = {}
    for name, content in (("empty.jsonl", b""), ("notjson.jsonl", b"hello world\n"),
                          ("binary.jsonl", bytes(range(256)) * 4), ("truncated.jsonl", b'{"prompt": "a", "cho')):
        (root / name).write_bytes(content)
        p[name] = str(root / name)
    rm = os.path.join(TINY_LLAMA, "..", "reward-model")
    for name, drop in (("rm_no_adapter_config", "adapter_config.json"), ("rm_no_adapter", "adapter_model.safetensors"),
                       ("rm_no_head", "head.safetensors")):
        shutil.copytree(rm, root / name)
        os.remove(root / name / drop)
        p[name] = str(root / name)
    shutil.copytree(rm, root / "rm_truncated_head")
    data = open(root / "rm_truncated_head" / "head.safetensors", "rb").read()
    (root / "rm_truncated_head" / "head.safetensors").write_bytes(data[:len(data) // 2])
    p["rm_truncated_head"] = str(root / "rm_truncated_head")
    model = root / "model_no_weights"
    shutil.copytree(TINY_LLAMA, model)
    os.remove(model / "model.safetensors")
    p["model_no_weights"] = str(model)
    model = root / "model_bad_config"
    shutil.copytree(TINY_LLAMA, model)
    (model / "config.json").write_text("{not json")
    p["model_bad_config"] = str(model)
    for name, change in (("model_bad_activation", {"hidden_act": "nope"}),
                         ("model_bad_heads", {"num_attention_heads": 5, "head_dim": None}),
                         ("model_bad_rope", {"rope_parameters": {"rope_type": "bogus", "rope_theta": 10000.0}}),
                         ("model_no_layers", {"num_hidden_layers": 0})):
        model = root / name
        shutil.copytree(TINY_LLAMA, model)
        config = json.loads((model / "config.json").read_text())
        config.update(change)
        (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        p[name] = str(model)
    (root / "lock_is_folder" / ".minirlhf.lock").mkdir(parents=True)
    p["lock_is_folder"] = str(root / "lock_is_folder")
    (root / "a_file").write_text("x")
    p["a_file"] = str(root / "a_file")
    # an interrupted run: a checkpoint and no summary; and a crafted checkpoint that would run code if unpickled
    interrupted = root / "interrupted"
    save_checkpoint(str(interrupted), {"step": 3, "args": {}}, {"rng": {}}, DistInfo())
    p["interrupted"] = str(interrupted)
    # runs of another script: one whose checkpoint names it, one from before checkpoints did
    from minirlhf.determinism import rng_state
    save_checkpoint(str(root / "grpo_run"), {"step": 3, "args": {"group_size": 8, "beta": 0.04},
                                             "script": "train_grpo.py"}, {"rng": rng_state()}, DistInfo())
    save_checkpoint(str(root / "unnamed_run"), {"step": 3, "args": {f"flag_{i}": i for i in range(40)}},
                    {"rng": rng_state()}, DistInfo())
    p["grpo_run"], p["unnamed_run"] = str(root / "grpo_run"), str(root / "unnamed_run")
    crafted = root / "crafted" / CHECKPOINT_DIR
    crafted.mkdir(parents=True)
    torch.save({"step": 1, "evil": Marker(str(root / "pwned"))}, crafted / "trainer.pt")
    p["crafted"], p["pwned"] = str(root / "crafted"), str(root / "pwned")
    return p


class Marker:
    """Unpickling this creates a file: proof that a checkpoint ran code."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.path),)


FILE_CASES = [
    ("train_reward.py", ["--dataset", "juyoungml/HelpSteer2-binarized", "--data-files", "{empty.jsonl}"],
     "empty.jsonl"),
    ("train_dpo.py", ["--dataset", "juyoungml/HelpSteer2-binarized", "--data-files", "{notjson.jsonl}"], "not JSON"),
    ("train_sft.py", ["--dataset", "juyoungml/HelpSteer2-binarized", "--data-files", "{binary.jsonl}"],
     "binary.jsonl"),
    ("train_ppo.py", ["--dataset", "juyoungml/HelpSteer2-binarized", "--reward-model", "{rm_no_adapter}",
                      "--data-files", "{truncated.jsonl}"], "--reward-model"),
    ("train_reward.py", ["--dataset", "juyoungml/HelpSteer2-binarized", "--data-files", "{truncated.jsonl}"],
     "truncated"),
    ("train_ppo.py", ["--reward-model", "{rm_no_adapter_config}"], "adapter_config.json"),
    ("train_ppo.py", ["--reward-model", "{rm_no_adapter}"], "adapter_model.safetensors"),
    ("train_ppo.py", ["--reward-model", "{rm_no_head}"], "head.safetensors"),
    ("train_ppo.py", ["--reward-model", "{rm_truncated_head}"], "head.safetensors"),
    ("train_reward.py", ["--eval-only", "--reward-model", "{rm_no_adapter_config}"], "adapter_config.json"),
    ("train_dpo.py", ["--sft-adapter", "{a_file}/nowhere"], "--sft-adapter"),
    ("train_reward.py", ["--model", "{model_no_weights}"], "no model weights"),
    ("train_dpo.py", ["--model", "{model_bad_config}"], "config.json"),
    ("train_sft.py", ["--model", "/nonexistent"], "--model"),
    ("train_sft.py", ["--model", "{model_bad_activation}"], "'nope'"),
    ("train_ppo.py", ["--model", "{model_bad_heads}"], "not a multiple of the number of attention heads"),
    ("train_dpo.py", ["--model", "{model_bad_rope}"], "'bogus'"),
    ("train_reward.py", ["--model", "{model_no_layers}"], "--lora-targets"),
    ("train_ppo.py", ["--model", "nobody/no-such-model"], "--model"),
    ("train_sft.py", ["--device", "foo"], "--device"),
    ("train_reward.py", ["--out", "{a_file}"], "--out"),
    ("train_dpo.py", ["--out", "{a_file}/run"], "--out"),
    ("train_sft.py", ["--out", "{interrupted}"], "--overwrite"),
    ("train_sft.py", ["--out", "{lock_is_folder}"], "lock file"),
    ("train_dpo.py", ["--resume", "{crafted}"], "pickled"),
    ("train_reward.py", ["--resume", "{a_file}"], "--resume"),
    ("train_ppo.py", ["--resume", "{grpo_run}"], "was written by train_grpo.py; resume it with python train_grpo.py"),
    ("train_dpo.py", ["--resume", "{unnamed_run}"], "(and 35 more), which train_dpo.py has not"),
]
if not torch.cuda.is_available():
    FILE_CASES.append(("train_ppo.py", ["--device", "cuda"], "no CUDA device"))


@pytest.mark.parametrize("script,argv,expected", FILE_CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in FILE_CASES])
def test_bad_file_or_folder_is_one_line(script, argv, expected, tmp_path, monkeypatch):
    paths = make_bad_files(tmp_path)
    argv = [re.sub(r"\{([^}]+)\}", lambda m: paths[m[1]], a) for a in argv]
    out = ["--out", str(tmp_path / "out")] if "--out" not in argv and "--resume" not in argv else []
    before = {k: snapshot(v) for k, v in paths.items() if os.path.isdir(v)}
    code = run_in_process(script, ["--threads", "1", *argv, *out], monkeypatch)
    assert_one_line(code, script, expected)
    assert {k: snapshot(v) for k, v in paths.items() if os.path.isdir(v)} == before  # nothing damaged or removed
    assert not os.path.exists(paths["pwned"])  # the crafted checkpoint never ran its code


def test_compare_out_is_checked_before_anything_loads(tmp_path, monkeypatch):
    """compare --out names a file: a folder (or a path under a file) is refused before the model loads and the
    policies are sampled, not after."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("minirlhf.models.load_model", no_model)
    (tmp_path / "a_file").write_text("x")
    for out, expected in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "t.md", "is a file, not a folder")):
        monkeypatch.setattr(sys, "argv", ["compare.py", "--threads", "1", "--out", str(out)])
        with pytest.raises(SystemExit) as e:
            runpy.run_module("minirlhf.compare", run_name="__main__")
        assert_one_line(e.value.code, "python -m minirlhf.compare", f"--out {out} ")
        assert expected in e.value.code
