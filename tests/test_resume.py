"""Exact resume: a run SIGKILLed after a checkpoint and continued with --resume ends with exactly the weights,
optimizer state and logged training metrics of the same run left alone (bit for bit on the CPU); Ctrl-C (SIGINT)
saves a checkpoint and exits cleanly; a resume with different settings fails with one clear line.

Every run is a real subprocess of the script on the embedded tiny model, kept to a few seconds.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

PPO = ["--iterations", "6", "--rollout-size", "8", "--minibatch-size", "4", "--max-new-tokens", "8", "--eval-every",
       "3", "--eval-prompts", "4", "--eval-samples", "1", "--target-kl", "1.0"]
# name -> (script, arguments of a short run, its total number of steps); every run saves a checkpoint every 2 steps
RUNS = {
    "reward": ("train_reward.py", ["--max-steps", "8", "--batch-size", "8", "--eval-every", "3",
                                   "--max-eval-pairs", "16"], 8),
    "dpo": ("train_dpo.py", ["--max-steps", "8", "--batch-size", "8", "--log-every", "3", "--max-eval-pairs", "16",
                             "--eval-prompts", "4", "--eval-samples", "1", "--max-new-tokens", "8"], 8),
    "sft": ("train_sft.py", ["--max-steps", "8", "--batch-size", "4", "--log-every", "3", "--eval-every", "6",
                             "--block-size", "64"], 8),
    "ppo": ("train_ppo.py", PPO, 6),  # value head, GAE, adaptive KL controller
    "reinforce": ("train_reinforce.py", PPO, 6),  # + the running-mean baseline
    "grpo": ("train_grpo.py", PPO[:-2] + ["--group-size", "4", "--reward", "gold"], 6),  # groups, KL in the loss
    # dynamic sampling: 1 to 4 rollouts an iteration, so a varying number of prompts taken from the data order
    "grpo_dapo": ("train_grpo.py", PPO[:-2] + ["--group-size", "2", "--reward", "gold", "--max-new-tokens", "3",
                                               "--dynamic-sampling", "--overlong-buffer", "2"], 6),
    # train_online_dpo.py and train_distill.py checkpoint what train_grpo.py does (prompt order, sampler, adapter,
    # optimizer): their resume is this machinery's, left out here to keep the suite short
}
NOISY = ("perf/", "time/")  # wall-clock metrics differ between any two runs


def command(name, out, *extra):
    script, args, _ = RUNS[name]
    return [sys.executable, os.path.join(ROOT, script), *args, "--save-every", "2", "--threads", "1",
            "--out", str(out), *extra]


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def checkpoint_step(out):
    try:
        return torch.load(os.path.join(out, "checkpoint", "trainer.pt"), weights_only=False)["step"]
    except Exception:  # not written yet, or between the two renames of an atomic directory write
        return None


def kill_after(cmd, out, step, signum=signal.SIGKILL):
    """Start the run; as soon as its checkpoint reaches `step`, send `signum`. Returns the finished process."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        seen = checkpoint_step(out)
        if seen is not None and seen >= step:
            proc.send_signal(signum)
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=300)
    return proc, stdout, stderr


def final_state(out):
    """The final checkpoint's trainable weights, heads and optimizer state, and the logged training metrics."""
    state = torch.load(os.path.join(out, "checkpoint", "trainer.pt"), weights_only=False)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [{k: v for k, v in json.loads(line).items() if not k.startswith(NOISY)} for line in f]
    return state, rows


def assert_identical(a, b, where=""):
    """Nested dicts / lists of tensors and numbers equal exactly (torch.equal: same bits for floats)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module", params=sorted(RUNS))
def uninterrupted(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name)
    run(command(name, out / "full"))
    return name, out


def test_sigkill_then_resume_is_bit_identical(uninterrupted):
    script, out = uninterrupted
    total = RUNS[script][2]
    proc, stdout, stderr = kill_after(command(script, out / "killed"), out / "killed", step=2)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr[-2000:]}"
    killed_at = checkpoint_step(out / "killed")
    assert 2 <= killed_at < total, killed_at
    resumed = run(command(script, out / "ignored", "--resume", str(out / "killed")))
    assert f"resumed {out / 'killed'} at " in resumed.stdout and f" {killed_at}\n" in resumed.stdout
    assert not os.path.exists(out / "ignored")  # a resumed run writes into its own directory

    full, full_rows = final_state(out / "full")
    again, again_rows = final_state(out / "killed")
    assert full["step"] == again["step"] == total
    for key in ("trainable", "heads", "optimizer"):
        assert_identical(full[key], again[key], key)
    assert [r["step"] for r in again_rows] == [r["step"] for r in full_rows]  # rows after the kill were not doubled
    assert_identical(full_rows, again_rows, "metrics.jsonl")
    # the training loop really moved the weights (a resume of an untrained run would pass trivially)
    assert any(v.abs().sum() > 0 for k, v in full["trainable"].items() if "lora_B" in k or "lora" not in k)


def test_every_scripts_checkpoint_loads_without_pickle(uninterrupted):
    """trainer.pt holds only tensors and plain Python values: torch's restricted loader (weights_only=True, which is
    what load_checkpoint uses, so a crafted file cannot run code) reads every script's checkpoint."""
    name, out = uninterrupted
    state = torch.load(os.path.join(out, "full", "checkpoint", "trainer.pt"), map_location="cpu", weights_only=True)
    assert state["step"] == RUNS[name][2] and "rng" in state["ranks"][0]


@pytest.mark.parametrize("uninterrupted", ["dpo", "sft", "ppo"], indirect=True)  # reward / reinforce: same loops
def test_sigint_saves_a_checkpoint_and_exits_cleanly(uninterrupted, tmp_path):
    script, out = uninterrupted
    total = RUNS[script][2]
    proc, stdout, stderr = kill_after(command(script, tmp_path), tmp_path, step=2, signum=signal.SIGINT)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = checkpoint_step(tmp_path)
    assert 2 <= stopped < total and f"stopped at " in stdout and f" {stopped}: checkpoint in" in stdout, stdout[-2000:]
    if script != "ppo":
        return
    # the SIGINT checkpoint (at whatever step the signal came) is as good as any: resuming reproduces the run
    run(command(script, tmp_path, "--resume", str(tmp_path)))
    full, _ = final_state(out / "full")
    again, _ = final_state(tmp_path)
    assert_identical(full["trainable"], again["trainable"], "trainable")


@pytest.mark.parametrize("uninterrupted", ["reward", "dpo", "sft", "ppo", "reinforce", "grpo"], indirect=True)  # the
def test_resume_with_other_settings_fails_clearly(uninterrupted, tmp_path):  # check is run.py's, the same for all
    name, out = uninterrupted
    flags = [("--lora-r", "4")] + ([("--model", "some/other-model")] if name == "dpo" else [])  # one script is enough
    for flag in flags:
        proc = subprocess.run(command(name, tmp_path, "--resume", str(out / "full"), *flag), capture_output=True,
                              text=True, cwd=ROOT, env=ENV, timeout=300)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{RUNS[name][0]}: error: --resume") and flag[0] in last, last
        assert "Traceback" not in proc.stderr and "there" in last and "here" in last, last


def test_a_torn_checkpoint_directory_is_never_read(tmp_path):
    """atomic_directory writes DIR.tmp and renames: a kill mid-write leaves the old checkpoint readable (or, between
    the two renames, DIR.old, which load_checkpoint falls back to)."""
    from dataclasses import dataclass
    from minirlhf.atomic import atomic_directory
    from minirlhf.checkpoint import load_checkpoint
    from minirlhf.distributed import DistInfo

    @dataclass
    class Args:
        out: str = str(tmp_path)
        lr: float = 1.0

    def write(step):
        return lambda tmp: torch.save({"step": step, "args": {"out": str(tmp_path), "lr": 1.0}, "world_size": 1,
                                       "ranks": [{}]}, os.path.join(tmp, "trainer.pt"))
    atomic_directory(tmp_path / "checkpoint", write(1))

    def crash(tmp):
        write(2)(tmp)
        raise RuntimeError("killed while writing")
    with pytest.raises(RuntimeError):
        atomic_directory(tmp_path / "checkpoint", crash)
    assert load_checkpoint(str(tmp_path), Args(), DistInfo())[0]["step"] == 1
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")  # killed between the two renames
    assert load_checkpoint(str(tmp_path), Args(), DistInfo())[0]["step"] == 1
    with pytest.raises(ValueError, match="different settings: --lr 1.0 there, 2.0 here"):
        load_checkpoint(str(tmp_path), Args(lr=2.0), DistInfo())


def test_graceful_stop_first_signal_requests_second_ctrl_c_aborts():
    from minirlhf.stopping import GracefulStop
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before  # the old handlers are back
