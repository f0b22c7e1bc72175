"""The run plumbing every script shares, so that a script shows its algorithm and only a few marked lines of this.

    run = Run(args, check_args)                            # settings, --out / --resume, torchrun, threads, seeds
    ...build the model, the data and the optimizer exactly as a fresh run would...
    run.start(total_steps, model=model, heads={"value": value_head}, optimizer=optimizer,
              state={"order": order, "recent": recent})    # restore them if resuming; metrics.jsonl
    before = run.once("before", evaluate)                  # computed once; a resumed run reads it back
    for step in run.steps():                               # 1..total; Ctrl-C and checkpoints between steps
        ...one step of the algorithm...
        run.log(step, metrics)                             # rank 0 writes metrics.jsonl
    run.save("policy", lambda folder: save_adapter(model, folder, "policy"))   # atomically, rank 0
    summary = run.finish({...final numbers...})            # summary.json, curves.png, params/*, frozen check

What it takes care of; each piece lives in the module named for it (outdir.py the --out folder, checkpoint.py the
checkpoint's file, determinism.py seeds and random states, stopping.py Ctrl-C, usage.py memory, throughput and cost,
fingerprint.py the frozen-weight check, distributed.py the collectives):
- torchrun: joins the process group; only rank 0 prints, logs and writes (`run.is_main`).
- resume: the checkpoint is read and its settings checked in Run(args), before anything is loaded; run.start puts
  back the trainable weights, heads, optimizer and every object in `state`, and the RNG states right before the
  first step; a resumed run continues bit for bit.
- checkpoints every --save-every steps, at the last step and on the first Ctrl-C (the step finishes first); a second
  Ctrl-C aborts.
- the output contract (tracking.RunLog): args.json, metrics.jsonl, summary.json with time/total_seconds,
  params/trainable, params/total and params/frozen_unchanged (the frozen base and frozen heads, bit for bit:
  fingerprint.FrozenCheck), data/prompts_truncated (+ data/responses_truncated, data/pairs_skipped for pairs:
  what the data's length limits cut, tokenize.report_cuts); --report-to tensorboard: the same rows in
  out/tensorboard/ too.
- memory and cost in summary.json: the peak memory of each phase (usage.PhaseMemory), the samples trained and their
  rate, and with --cost-per-hour what they cost (usage.throughput).
- time per phase of an RL iteration: run.phase("generation") charges what follows to that phase (phases.py):
  the metrics time/<phase> and time/<phase>_seconds in the summary.
- GPU settings: each torchrun process on its own GPU (distributed.setup); --deterministic
  (determinism.use_deterministic).
- the fast paths' switches, --fast-forward and --fast-decode (minirlhf/fast/).
`state` objects: anything with state_dict() / load_state_dict() (training.EpochOrder, kl.AdaptiveKLController,
baselines.RunningMeanBaseline), a torch.Generator, or a list (metrics gathered since the last log line). Each is
saved per process (every rank has its own data position and samplers).
"""
import importlib.util
import os
import time

import torch
from tqdm import tqdm

from . import distributed, fast
from .atomic import atomic_directory
from .checkpoint import load_checkpoint, restore_training, save_training
from .cli import format_args
from .data.tokenize import reset_truncation_summary, truncation_summary
from .determinism import seed_everything, set_rng_state, use_deterministic
from .devices import get_device
from .errors import InputError
from .fingerprint import FrozenCheck
from .models import count_parameters
from .outdir import prepare_out_dir, resume_folder
from .phases import PhaseClock
from .stopping import GracefulStop, end_of_step
from .tracking import RunLog
from .settings import MachineArgs
from .usage import PhaseMemory, throughput
from .validation import check_value


def check_run_settings(args):
    """The settings Run itself acts on, checked before anything loads (one InputError line naming the flag): the
    --report-to choice and its package here (scripts' check_common does not repeat it), --cost-per-hour with the range
    settings.MachineArgs states for it. Missing fields take their defaults, so scripts without them run as
    before."""
    report_to = getattr(args, "report_to", "none")
    if report_to not in ("none", "tensorboard"):
        raise InputError(f"--report-to: expected none or tensorboard, got {report_to!r}")
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise InputError("--report-to tensorboard: the tensorboard package is not installed; pip install tensorboard")
    check_value("--cost-per-hour", getattr(args, "cost_per_hour", None), MachineArgs.RANGES["cost_per_hour"])


class Run:
    def __init__(self, args, check=None):
        """The first lines of every script: check(args) (the script's validation: a bad setting fails before anything
        else happens) and check_run_settings(args), --deterministic (use_deterministic, before any CUDA work), check
        --out (writable; a folder holding an interrupted run needs --resume or --overwrite), join
        the torchrun process group (if any), read the checkpoint to resume and check its settings BEFORE anything is
        loaded (a resumed run continues in its own folder), print the settings (rank 0), set torch's threads and
        the fast paths' switches (--fast-forward, --fast-decode: minirlhf/fast/), seed everything."""
        if check is not None:
            check(args)
        check_run_settings(args)
        if getattr(args, "deterministic", False):
            use_deterministic()
        self.started = time.time()  # --cost-per-hour: the instance is paid from here
        if args.resume:  # the run folder (also when given its checkpoint/ folder itself)
            args.resume = args.out = resume_folder(args.resume)
        prepare_out_dir(args.out, args.resume, args.overwrite)
        self.args = args
        self.dist = distributed.setup(get_device(args.device).type)
        self.device = get_device(args.device)  # after setup: "auto" is now this process's own GPU (LOCAL_RANK)
        self.memory = PhaseMemory(self.device)
        self.clock = PhaseClock(self.device)  # seconds per phase of an RL iteration (phases.py)
        self.steps_run, self.train_seconds, self.samples_per_step = 0, 0.0, None
        self.is_main = self.dist.is_main
        self.checkpoint = load_checkpoint(args.resume, args, self.dist) if args.resume else None
        self.print(format_args(args))
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        fast.enable(forward=getattr(args, "fast_forward", None), decode=getattr(args, "fast_decode", None))
        seed_everything(args.seed)
        reset_truncation_summary()  # this run's data cuts: summary.json's data/* (tokenize.report_cuts)
        self.step, self.total, self.log_file, self.saved_once = 0, None, None, {}

    def print(self, *lines):
        """print() on rank 0 only."""
        if self.is_main:
            print(*lines, sep="\n")

    def start(self, total, *, model, optimizer, heads=None, frozen=(), state=None, samples_per_step=None):
        """Register what a checkpoint holds and, when resuming, put it back: the trainable weights of `model`, the
        `heads` ({name: module}, trained), the optimizer and the `state` objects. `frozen`: modules that are counted
        and checked like the frozen base (e.g. a reward head). Opens metrics.jsonl (cut back to the checkpoint's
        step when resuming) and records the frozen fingerprint and the parameter counts for the summary.
        samples_per_step: training samples one step consumes, all processes together (pairs, sequences, rollout
        responses): train/samples, perf/samples_per_second and cost/usd_per_sample in the summary."""
        self.total, self.model, self.optimizer = total, model, optimizer
        self.samples_per_step = samples_per_step
        self.heads, self.frozen, self.state = heads or {}, list(frozen), state or {}
        modules = list(self.heads.values()) + self.frozen
        trainable, total_params = count_parameters(model)
        self.params = {"params/trainable": trainable + sum(p.numel() for m in modules for p in m.parameters()
                                                          if p.requires_grad),
                       "params/total": total_params + sum(p.numel() for m in modules for p in m.parameters())}
        self.frozen_check = FrozenCheck(model, *self.frozen)
        if self.checkpoint:
            restore_training(self.checkpoint, model=model, heads=self.heads, optimizer=optimizer)
            saved, local = self.checkpoint
            self.step, self.saved_once = saved["step"], saved.get("once", {})
            for name, obj in self.state.items():
                _load(obj, local["state"][name])
            self.print(f"resumed {self.args.resume} at step {self.step}")
        self.log_file = RunLog(self.args.out, self.args, enabled=self.is_main,
                               resume_step=self.step if self.checkpoint else None,
                               report_to=getattr(self.args, "report_to", "none"))
        self.memory.mark("before")

    def once(self, name, compute, default=None):
        """compute() on rank 0, once per run: a resumed run gets the value its first process computed (e.g. the
        evaluation before training). Other ranks get `default`."""
        if name not in self.saved_once:
            self.saved_once[name] = compute() if self.is_main else default
        return self.saved_once[name]

    def steps(self, desc=None, unit="step"):
        """Yield the step numbers 1..total still to run (from the checkpoint's step when resuming), with a progress
        bar named `desc`; `unit` names a step in messages ("stopped at iteration 7"). After each step:
        all ranks learn whether a Ctrl-C arrived anywhere, and a checkpoint is written then, every --save-every steps
        and after the last one. The RNG states of a resumed run are restored here, right before the first step."""
        bar = tqdm(total=self.total, initial=self.step, desc=desc or unit, disable=not self.is_main, mininterval=5)
        self.memory.mark("train")
        loop_started = time.time()
        with GracefulStop() as stop:
            if self.checkpoint:
                set_rng_state(self.checkpoint[1]["rng"])
            while self.step < self.total:
                self.step_started = time.time()  # for the step's timings (metrics time/*, perf/*)
                yield self.step + 1
                self.clock.stop()
                self.step += 1
                self.steps_run += 1  # this process's steps (a resumed run counts only its own)
                bar.update(1)
                if end_of_step(stop, self.dist, self.step, self.total, self.args.save_every, self._save_checkpoint,
                               self.args.out, unit=unit):
                    break
        bar.close()
        self.train_seconds += time.time() - loop_started
        self.memory.mark("after")

    def phase(self, name):
        """From here on, charge the time to phase `name` (generation, scoring, logprobs, update, evaluation) until the
        next phase or the step's end: the metrics time/<phase> and the summary's time/<phase>_seconds (phases.py)."""
        self.clock.start(name)

    def _save_checkpoint(self):
        return save_training(self.args.out, self.dist, step=self.step, args=self.args, model=self.model,
                             heads=self.heads, optimizer=self.optimizer, shared={"once": self.saved_once},
                             local={"state": {name: _state(obj) for name, obj in self.state.items()}})

    def log(self, step, metrics):
        """One row of metrics.jsonl (rank 0)."""
        self.log_file.log(step, metrics)

    def save(self, name, write):
        """write(folder) into out/name atomically (a kill never leaves a torn folder); rank 0 only."""
        if self.is_main:
            atomic_directory(os.path.join(self.args.out, name), write)

    def finish(self, final):
        """summary.json (rank 0): `final` plus the time, the parameter counts, train/steps, train/finished and
        params/frozen_unchanged (a key of `final` wins: SFT checks the base before --merge rewrites it), the memory
        of each phase (PhaseMemory.summary), the throughput and cost (throughput()) and what the data's length
        limits cut (tokenize.truncation_summary); curves.png.
        Leaves the process group. Returns the summary (None on other ranks)."""
        summary = None
        if self.is_main:
            summary = self.log_file.summary({**self.params, "train/steps": self.step,
                                             "train/finished": self.step == self.total,
                                             "params/frozen_unchanged": self.frozen_unchanged(),
                                             **self.memory.summary(), **self.throughput(),
                                             **truncation_summary(), **final})
        distributed.cleanup()
        return summary

    def throughput(self):
        """What this process's training did and cost, a resumed run counting only the steps it ran itself
        (usage.throughput): time/train_seconds, train/samples, perf/samples_per_second, cost/usd_total (the wall time
        from Run() to now at --cost-per-hour), cost/usd_per_sample."""
        return throughput(self.steps_run, self.samples_per_step, self.train_seconds,
                          getattr(self.args, "cost_per_hour", None), time.time() - self.started)

    def frozen_unchanged(self):
        """True if the frozen base (and the frozen modules) hold exactly the values they held at run.start."""
        return self.frozen_check.unchanged()


def _state(obj):
    """What a checkpoint keeps of one `state` object."""
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, list):
        return list(obj)
    return obj.state_dict()


def _load(obj, saved):
    if isinstance(obj, torch.Generator):
        obj.set_state(saved)
    elif isinstance(obj, list):
        obj[:] = saved
    else:
        obj.load_state_dict(saved)
