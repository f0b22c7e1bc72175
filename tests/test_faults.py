"""What the run plumbing guarantees when the world around a run goes wrong: a second run started into a live run's
folder, data smaller than the work asked of it, a disk that fills up during a save. Each ends in one line (or runs
correctly), and nothing written before is lost: a resumed run continues exactly.

Runs are in this process (runpy of the script's __main__, as tests/test_bad_inputs.py does) on the embedded tiny
model, a few steps each; a second process only where two processes are the point.
"""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minirlhf import atomic, outdir
from test_bad_inputs import run_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SFT = ["--threads", "1", "--max-steps", "2", "--batch-size", "2", "--block-size", "32", "--eval-every", "1",
       "--max-eval-blocks", "2", "--log-every", "1"]


def assert_one_line(code, script, *expected):
    assert isinstance(code, str), f"expected a one-line error, got exit code {code!r}"
    assert "\n" not in code and code.startswith(f"{script}: error: "), code
    for text in expected:
        assert text in code, code


def files_in(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


# ---- one run per folder ------------------------------------------------------------------------------------------
HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from minirlhf.outdir import lock_out_dir; "
        "lock_out_dir({out!r}); print('locked', flush=True); time.sleep(120)")


def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, out=str(out))], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = files_in(out)
        for flags in (["--out", str(out)], ["--out", str(out), "--overwrite"], ["--resume", str(out)]):
            code = run_in_process("train_sft.py", [*SFT, *flags], monkeypatch)
            assert_one_line(code, "train_sft.py", str(out), "in use by another run", f"pid {holder.pid} on host")
            assert files_in(out) == before  # nothing written, nothing removed
    finally:
        holder.kill()
        holder.wait()
    # the holder died without a word: its lock file stays, naming a dead pid; the next run takes it over
    assert files_in(out) == [outdir.LOCK_FILE]
    assert run_in_process("train_sft.py", [*SFT, "--out", str(out)], monkeypatch) is None
    assert os.path.isfile(out / "summary.json") and not os.path.exists(out / outdir.LOCK_FILE)  # released


def test_a_stale_lock_file_is_taken_over_and_a_live_one_refuses_a_command_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / outdir.LOCK_FILE).write_text("pid 999999999 on host elsewhere\n")  # no process holds it
    assert run_in_process("train_sft.py", [*SFT, "--out", str(out)], monkeypatch) is None
    assert not os.path.exists(out / outdir.LOCK_FILE)
    outdir.lock_out_dir(str(out))  # this process holds it now: a command line in another process is refused
    try:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), *SFT, "--resume", str(out)],
                              capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    finally:
        outdir.release_out_dir(str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"train_sft.py: error: --resume {out} is in use by another run (pid {os.getpid()} "), line


# ---- data smaller than the work asked of it ----------------------------------------------------------------------
RL = ["--threads", "1", "--iterations", "2", "--rollout-size", "8", "--minibatch-size", "4", "--eval-prompts", "1",
      "--eval-samples", "1", "--max-new-tokens", "4", "--dataset", "juyoungml/HelpSteer2-binarized"]


def rows_file(tmp_path, n):
    """The first n rows of the HelpSteer2 fixture as a file of their own."""
    with open(os.path.join(FIXTURES, "helpsteer2_binarized.jsonl")) as f:
        lines = f.readlines()[:n]
    path = tmp_path / f"{n}_rows.jsonl"
    path.write_text("".join(lines))
    return str(path)


@pytest.mark.parametrize("script,rows,extra", [("train_ppo.py", 1, []), ("train_reinforce.py", 3, []),
                                               ("train_grpo.py", 1, ["--group-size", "4"])])
def test_rl_prompts_fewer_than_a_rollout_cycle_and_every_sample_counted_was_drawn(script, rows, extra, tmp_path,
                                                                                 monkeypatch, capsys):
    out = tmp_path / "run"
    code = run_in_process(script, [*RL, *extra, "--data-files", rows_file(tmp_path, rows), "--out", str(out)],
                          monkeypatch)
    assert code is None
    assert f"[train]: {rows} prompt(s), fewer than the" in capsys.readouterr().err  # one warning line says so
    drawn = load_file(str(out / "last_rollout.safetensors"))["scores"].shape[0]
    summary = json.loads((out / "summary.json").read_text())
    assert drawn == 8 and summary["train/samples"] == summary["train/episodes"] == 2 * drawn


def test_epoch_order_chains_epochs_when_one_is_shorter_than_a_take():
    from minirlhf.training import EpochOrder, epoch_order
    order = EpochOrder(3, seed=0)
    taken = [order.take(8) for _ in range(3)]
    assert all(len(t) == 8 for t in taken)
    flat = sum(taken, [])
    assert flat == sum((epoch_order(3, e, 0) for e in range(8)), [])  # epoch after epoch, nothing dropped
    again = EpochOrder(3, seed=0)
    again.take(8)
    resumed = EpochOrder(3, seed=0)
    resumed.load_state_dict(again.state_dict())
    assert resumed.take(8) == taken[1]
    # an epoch that holds a whole take: as always, its rest is dropped when it cannot fill the next one
    order = EpochOrder(10, seed=1)
    assert order.take(4) + order.take(4) == epoch_order(10, 0, 1)[:8] and order.take(4) == epoch_order(10, 1, 1)[:4]
    with pytest.raises(ValueError, match="rank 1 would have none"):
        EpochOrder(1, seed=0, rank=1, world_size=2)


@pytest.mark.parametrize("script,extra", [("train_dpo.py", []), ("train_reward.py", []),
                                          ("train_sft.py", ["--no-packing"])])
def test_pairs_fewer_than_one_optimizer_step_are_one_line_before_the_model_loads(script, extra, tmp_path,
                                                                                monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("minirlhf.models.load_model", no_model)
    data = rows_file(tmp_path, 1)
    code = run_in_process(script, ["--threads", "1", "--dataset", "juyoungml/HelpSteer2-binarized", "--data-files",
                                   data, *extra, "--out", str(tmp_path / "run")], monkeypatch)
    assert_one_line(code, script, f"--data-files {data} [train]: 1 training ", "do not fill one optimizer step")
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


# ---- a full disk -------------------------------------------------------------------------------------------------
NOISY = ("perf/", "time/", "memory/", "train/samples")  # wall clock; what this process ran itself


def fail_writes(monkeypatch, name, at, err=errno.ENOSPC):
    """The `at`-th atomic.atomic_write_bytes of a file called `name` fails as a full disk fails it: its write()
    raises OSError(err), naming no file. Returns the real function, to put back."""
    real, real_fdopen, seen = atomic.atomic_write_bytes, os.fdopen, []

    class Full:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(err, os.strerror(err))

    def write(path, data):
        if os.path.basename(path) == name:
            seen.append(path)
            if len(seen) == at:
                with monkeypatch.context() as m:
                    m.setattr(os, "fdopen", Full)
                    return real(path, data)
        return real(path, data)
    monkeypatch.setattr(atomic, "atomic_write_bytes", write)
    return real


def outcome(out):
    """The final checkpoint's weights and optimizer, the adapter's bytes, the logged rows, the summary's numbers."""
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)
    rows = [{k: v for k, v in json.loads(line).items() if not k.startswith(NOISY)}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if not k.startswith(NOISY)}
    return (state["step"], state["trainable"], state["optimizer"]["state"], rows, summary,
            (out / "adapter" / "adapter_model.safetensors").read_bytes())


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b, (a, b)


@pytest.mark.parametrize("name,at,err,kept", [("trainer.pt", 3, errno.ENOSPC, 2),   # the third checkpoint
                                              ("summary.json", 1, errno.EDQUOT, 4)])  # after the last one
def test_a_full_disk_is_one_line_and_the_run_resumes_exactly(name, at, err, kept, tmp_path, monkeypatch):
    flags = [*SFT[:3], "4", *SFT[4:], "--save-every", "1"]  # --max-steps 4, a checkpoint after each step
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_in_process("train_sft.py", [*flags, "--out", str(full)], monkeypatch) is None
    real = fail_writes(monkeypatch, name, at, err)
    code = run_in_process("train_sft.py", [*flags, "--out", str(cut)], monkeypatch)
    what = "no space left on the device" if err == errno.ENOSPC else "the disk quota is exceeded"
    assert_one_line(code, "train_sft.py", f"{what} while writing ", name,
                    f"kept: the last whole checkpoint, step {kept}, in {cut / 'checkpoint'}",
                    f"continue with --resume {cut}")
    assert not [f for f in files_in(cut) if ".tmp" in f]  # no half-written file left behind
    monkeypatch.setattr(atomic, "atomic_write_bytes", real)  # space freed
    assert run_in_process("train_sft.py", [*flags, "--resume", str(cut)], monkeypatch) is None
    assert_same(outcome(cut), outcome(full))
