"""Data parallelism: under `torchrun --nproc_per_node 2` (gloo, CPU) with a per-process batch b, a script
ends with the same weights as one process with batch 2b and the same seed: the data is sharded from one shared
permutation (training.epoch_order) and the gradients are averaged (distributed.all_reduce_mean_grads). PPO, whose
rollouts are per process, must run to completion. Only rank 0 writes.

The two runs cannot be bit-identical: a gradient summed over 2b rows in one matmul and the mean of two b-row sums
round differently (~1e-7 relative). AdamW's first steps divide each gradient by its own magnitude, so where a
gradient is near zero that rounding becomes a visible fraction of an lr-sized step: at the scripts' default
learning rates (1e-3, 2e-3) four steps differ by up to ~3e-6 - 8e-6 (measured), at lr 1e-4 by ~5e-7. Since forward
passes run packed (fast/unpad.py: rows share a prompt's positions with the other rows of their batch, so a row's sums
depend on its companions, in the last bits), a batch of b and one of 2b also round differently in the forward pass:
at lr 1e-4, 1.1e-6 (DPO) and 2.0e-6 (reward) after four steps (measured). The test uses lr 1e-4, a 4e-6 tolerance,
and checks that the weights moved by more than 25x that.
"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# name -> (script, arguments with the PER-PROCESS batch flag last, the 2-process batch)
STEPS = ["--max-steps", "4", "--warmup-steps", "1", "--lr", "1e-4", "--threads", "1"]
RUNS = {
    "reward": ("train_reward.py", STEPS + ["--eval-every", "4", "--max-eval-pairs", "8", "--batch-size"], 4),
    "dpo": ("train_dpo.py", STEPS + ["--max-eval-pairs", "8", "--eval-prompts", "4", "--eval-samples", "1",
                                     "--max-new-tokens", "4", "--batch-size"], 4),
    "sft": ("train_sft.py", STEPS + ["--block-size", "64", "--batch-size"], 2),
}


def run(cmd, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run((launcher if nproc > 1 else [sys.executable]) + cmd, capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def trained(out):
    state = torch.load(os.path.join(out, "checkpoint", "trainer.pt"), weights_only=False)
    return state, {**state["trainable"], **{f"head.{k}": v for h in state["heads"].values() for k, v in h.items()}}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(name, tmp_path):
    script, args, b = RUNS[name]
    two = run([os.path.join(ROOT, script), *args, str(b), "--out", str(tmp_path / "two")], nproc=2)
    run([os.path.join(ROOT, script), *args, str(2 * b), "--out", str(tmp_path / "one")])
    assert f"{2 * b} " in two.stdout  # the effective batch is reported
    state2, w2 = trained(tmp_path / "two")
    state1, w1 = trained(tmp_path / "one")
    assert state2["world_size"] == 2 and state1["world_size"] == 1 and state2["step"] == state1["step"] == 4
    assert w1.keys() == w2.keys()
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff <= 1e-5, f"max abs difference {diff:.2e}"  # packed forwards of b and 2b rows round differently:
    # 1e-6 to 4.2e-6 seen after four steps at lr 1e-4
    # ...and training moved them well beyond that tolerance (equal but untrained weights would prove nothing)
    moved = max(v.abs().max().item() for k, v in w1.items() if "lora_B" in k)
    assert moved > 1e-4
    # every rank kept its own data position and RNG; the two ranks saw different examples
    orders = [rank["state"]["order"] for rank in state2["ranks"]]  # run.Run saves each rank's `state` objects
    assert len(orders) == 2 and orders[0] != orders[1]


def test_ppo_runs_under_torchrun_and_a_checkpoint_resumes_only_with_as_many_processes(tmp_path):
    out = tmp_path / "ppo"
    args = [os.path.join(ROOT, "train_ppo.py"), "--iterations", "2", "--rollout-size", "8", "--minibatch-size", "4",
            "--max-new-tokens", "6", "--eval-every", "0", "--eval-prompts", "4", "--eval-samples", "1",
            "--threads", "1", "--out", str(out)]
    proc = run(args, nproc=2)
    assert "16 responses (2 process(es) x 8)" in proc.stdout
    import json
    summary = json.load(open(out / "summary.json"))
    assert summary["train/finished"] and summary["train/iterations"] == 2 and summary["params/frozen_unchanged"]
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["world_size"] == 2
    g0, g1 = (r["state"]["generator"] for r in state["ranks"])
    assert not torch.equal(g0, g1)  # each process samples its own rollouts
    # a 2-process checkpoint cannot continue in 1 process (the data shards would change): one clear line
    proc = subprocess.run([sys.executable, *args, "--resume", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "written by 2 process(es), this run has 1" in proc.stderr.strip().splitlines()[-1]


# ---- distributed.setup without a real process group: the calls it makes, in order (NCCL cannot run here)
class FakeDist:
    """Stands in for torch.distributed and torch.cuda.set_device; records the calls in order."""

    def __init__(self):
        self.calls, self.started = [], False

    def set_device(self, device):
        self.calls.append(("set_device", device))

    def init_process_group(self, backend, **kwargs):
        self.calls.append(("init_process_group", backend, kwargs))
        self.started = True

    def is_initialized(self):
        return self.started


@pytest.fixture
def fake_dist(monkeypatch):
    from minirlhf import distributed
    fake = FakeDist()
    for name in ("init_process_group", "is_initialized"):
        monkeypatch.setattr(distributed.dist, name, getattr(fake, name))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", fake.set_device)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second GPU of the second node
    return fake


def test_nccl_selects_the_processs_gpu_before_starting_and_binds_the_group_to_it(fake_dist):
    from minirlhf import distributed
    info = distributed.setup("cuda")
    assert fake_dist.calls == [("set_device", 1),
                               ("init_process_group", "nccl", {"device_id": torch.device("cuda", 1)})]
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (3, 4, 1, False)


def test_gloo_starts_without_a_device(fake_dist):
    from minirlhf import distributed
    info = distributed.setup("cpu")
    assert fake_dist.calls == [("init_process_group", "gloo", {})]
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)


def test_without_torchrun_nothing_is_started(fake_dist, monkeypatch):
    from minirlhf import distributed
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup("cuda") == distributed.DistInfo() and fake_dist.calls == []


def test_init_process_group_takes_device_id():
    import inspect
    assert "device_id" in inspect.signature(torch.distributed.init_process_group).parameters
