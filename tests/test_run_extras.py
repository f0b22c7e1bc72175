"""What run.Run adds around every script: peak memory per phase (PhaseMemory, CUDA faked), samples, rate
and cost (--cost-per-hour, a resumed run counting only its own steps), --deterministic, --report-to tensorboard
(tracking.RunLog's event files read back with TensorBoard's own reader) and the checks made before anything loads.
Run is driven here by a tiny nn.Module through the same calls a script makes."""
import dataclasses
import os
import typing

import pytest
import torch

from minirlhf import run as runmod
from minirlhf.errors import InputError
from minirlhf.run import Run
from minirlhf.tracking import RunLog
from minirlhf.usage import PhaseMemory


@dataclasses.dataclass
class Args:
    out: str = ""
    resume: typing.Optional[str] = None
    overwrite: bool = False
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    save_every: int = 1
    cost_per_hour: typing.Optional[float] = None
    report_to: str = "none"
    deterministic: bool = False


class FakeCuda:
    """torch.cuda's peak counter: `allocated` now, `peak` since the last reset."""

    def __init__(self):
        self.allocated = self.peak = 0
        self.resets = 0

    def use(self, n, keep=False):
        """Allocate n bytes (and free them again unless keep)."""
        self.allocated += n
        self.peak = max(self.peak, self.allocated)
        if not keep:
            self.allocated -= n

    def max_memory_allocated(self, device):
        assert device.type == "cuda"
        return self.peak

    def reset_peak_memory_stats(self, device):
        self.peak, self.resets = self.allocated, self.resets + 1


class Clock:
    """run.py's time module, advanced by hand."""

    def __init__(self, now):
        self.now = now

    def time(self):
        return self.now


def script(args, steps=3, samples_per_step=8, cuda=None, clock=None, interrupt_at=None):
    """A script's Run calls on a 2-layer module (the first layer frozen). `cuda`: FakeCuda calls per phase;
    `clock`: advanced 10 s per step and 5 s after the loop; interrupt_at: leave the loop when this step begins
    (as a kill would: the steps before it are checkpointed, no summary)."""
    run = Run(args)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    if cuda:
        cuda.use(100, keep=True)  # setup: the weights stay, a loading buffer does not
        cuda.use(50)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run.start(steps, model=model, optimizer=optimizer, samples_per_step=samples_per_step)
    run.once("before", lambda: cuda.use(70) if cuda else None)
    for step in run.steps():
        if step == interrupt_at:
            return None
        if cuda:
            cuda.use(300)
        if clock:
            clock.now += 10
        loss = model(torch.randn(2, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.log(step, {"train/loss": loss.item()})
    if cuda:
        cuda.use(20)
    if clock:
        clock.now += 5
    return run.finish({"train/loss": loss.item()})


# ---------------------------------------------------------------------------------------- memory per phase
def test_each_phase_gets_its_own_cuda_peak(tmp_path, monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setattr(runmod, "PhaseMemory", lambda device: PhaseMemory(torch.device("cuda"), cuda=cuda))
    summary = script(Args(out=str(tmp_path)), cuda=cuda)
    # every phase's peak includes the 100 bytes of weights held throughout, plus its own temporary
    assert {k: v for k, v in summary.items() if k.startswith("memory/cuda")} == {
        "memory/cuda_peak_bytes/setup": 150, "memory/cuda_peak_bytes/before": 170,
        "memory/cuda_peak_bytes/train": 400, "memory/cuda_peak_bytes/after": 120, "memory/cuda_peak_bytes": 400}
    assert cuda.resets == 5  # at Run(), after start, at the loop, after it, at finish


def test_on_the_cpu_only_the_peak_rss_is_reported(tmp_path):
    rss_before = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS:")).split()[1]) * 1024
    summary = script(Args(out=str(tmp_path)))
    assert not [k for k in summary if k.startswith("memory/cuda")]
    # bytes, not KiB: at least the RSS before, give or take the kernel's per-thread RSS counter caches (which made
    # getrusage's peak read 76 KiB below an earlier VmRSS once)
    assert rss_before - 2 ** 20 <= summary["memory/peak_rss_bytes"] < 64 * 2 ** 30


# ------------------------------------------------------------------------------------- samples and cost
def test_samples_rate_and_cost_per_sample(tmp_path, monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(runmod, "time", clock)
    summary = script(Args(out=str(tmp_path), cost_per_hour=3.6), steps=3, samples_per_step=8, clock=clock)
    assert summary["train/samples"] == 24 and summary["time/train_seconds"] == 30  # 3 steps of 10 s
    assert summary["perf/samples_per_second"] == pytest.approx(24 / 30)
    assert summary["cost/usd_total"] == pytest.approx(3.6 * 35 / 3600)  # from Run() to finish: 30 s + 5 s after
    assert summary["cost/usd_per_sample"] == pytest.approx(3.6 * 35 / 3600 / 24)


def test_a_resumed_run_counts_and_prices_only_its_own_steps(tmp_path, monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(runmod, "time", clock)
    assert script(Args(out=str(tmp_path), cost_per_hour=3.6), steps=4, clock=clock, interrupt_at=3) is None
    clock.now = 5000.0  # the second process starts later
    summary = script(Args(out=str(tmp_path), resume=str(tmp_path), cost_per_hour=3.6), steps=4, clock=clock)
    assert summary["train/steps"] == 4 and summary["train/samples"] == 16  # steps 3 and 4, 8 samples each
    assert summary["time/train_seconds"] == 20
    assert summary["cost/usd_per_sample"] == pytest.approx(3.6 * 25 / 3600 / 16)


def test_without_a_price_or_a_sample_count_those_keys_are_absent(tmp_path):
    summary = script(Args(out=str(tmp_path)), samples_per_step=None)
    assert not [k for k in summary if k.startswith(("cost/", "perf/samples", "train/samples"))]
    assert summary["time/train_seconds"] >= 0


@pytest.mark.parametrize("price", [-1.0, float("nan"), float("inf")])
def test_a_bad_price_is_one_line_before_anything_happens(tmp_path, price):
    with pytest.raises(InputError, match="--cost-per-hour"):
        Run(Args(out=str(tmp_path / "new"), cost_per_hour=price))
    assert not os.path.exists(tmp_path / "new")


# ------------------------------------------------------------------------------------------ --deterministic
@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = benchmark


def test_deterministic_switches_on_deterministic_kernels(tmp_path, restore_determinism):
    Run(Args(out=str(tmp_path / "a")))
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    torch.backends.cudnn.benchmark = True
    Run(Args(out=str(tmp_path / "b"), deterministic=True))
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.backends.cudnn.benchmark is False


# ------------------------------------------------------------------------------------ --report-to tensorboard
def read_scalars(folder):
    """{tag: [(step, value)]} as TensorBoard itself reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def f32(x):
    return torch.tensor(x, dtype=torch.float32).item()  # TensorBoard stores float32


def test_tensorboard_gets_every_logged_number(tmp_path):
    pytest.importorskip("tensorboard")
    log = RunLog(str(tmp_path), Args(out=str(tmp_path)), report_to="tensorboard")
    rows = {1: {"train/loss": 0.6931, "train/tokens": 120, "eval/acc": torch.tensor(0.25)},
            2: {"train/loss": 0.5123, "train/tokens": 96, "train/finished": False, "note": "text", "x": None}}
    for step, row in rows.items():
        log.log(step, row)
    log.summary({})
    assert log.tensorboard is None  # closed
    assert read_scalars(tmp_path / "tensorboard") == {
        "train/loss": [(1, f32(0.6931)), (2, f32(0.5123))], "train/tokens": [(1, 120.0), (2, 96.0)],
        "eval/acc": [(1, 0.25)]}  # booleans, strings and None are not plotted


def test_a_resumed_run_hides_the_events_logged_after_its_checkpoint_and_a_new_run_starts_afresh(tmp_path):
    pytest.importorskip("tensorboard")
    args = Args(out=str(tmp_path))
    log = RunLog(str(tmp_path), args, report_to="tensorboard")
    for step in range(1, 5):  # killed after logging step 4; its checkpoint is at step 2
        log.log(step, {"train/loss": float(step)})
    log = RunLog(str(tmp_path), args, resume_step=2, report_to="tensorboard")
    for step in (3, 4):
        log.log(step, {"train/loss": 10.0 * step})
    log.summary({})
    assert read_scalars(tmp_path / "tensorboard") == {"train/loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}
    log = RunLog(str(tmp_path), args, report_to="tensorboard")  # a new run in the same folder
    log.log(1, {"train/loss": 7.0})
    log.summary({})
    assert read_scalars(tmp_path / "tensorboard") == {"train/loss": [(1, 7.0)]}


def test_only_rank_0_writes_events(tmp_path):
    log = RunLog(str(tmp_path / "rank1"), Args(), enabled=False, report_to="tensorboard")
    log.log(1, {"train/loss": 1.0})
    log.summary({})
    assert not os.path.exists(tmp_path / "rank1")


def test_a_run_writes_tensorboard_events_beside_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    summary = script(Args(out=str(tmp_path), report_to="tensorboard"), steps=2)
    scalars = read_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2] and summary["train/finished"]


def test_tensorboard_asked_without_the_package_is_one_line_before_anything_happens(tmp_path, monkeypatch):
    find_spec = runmod.importlib.util.find_spec
    monkeypatch.setattr(runmod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(InputError) as error:
        Run(Args(out=str(tmp_path / "new"), report_to="tensorboard"))
    assert "--report-to" in str(error.value) and "pip install tensorboard" in str(error.value)
    assert "\n" not in str(error.value) and not os.path.exists(tmp_path / "new")
    with pytest.raises(InputError, match="--report-to: expected none or tensorboard, got 'wandb'"):
        Run(Args(out=str(tmp_path / "new"), report_to="wandb"))


def test_a_script_without_the_new_settings_runs_as_before(tmp_path):
    """Run reads the new fields with getattr: an Args without them (an older script) still works."""
    @dataclasses.dataclass
    class OldArgs:
        out: str = str(tmp_path)
        resume: typing.Optional[str] = None
        overwrite: bool = False
        device: str = "cpu"
        threads: int = 1
        seed: int = 0
        save_every: int = 0
    summary = script(OldArgs())
    assert summary["train/samples"] == 24 and "cost/usd_total" not in summary

