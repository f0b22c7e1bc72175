"""Where an RL run's time goes: generation, scoring, log-probs, update, evaluation.

    run.phase("generation")      # from here on the clock charges "generation" (until the next phase or the step's end)
    batch = sample_rollout(...)
    run.phase("scoring")
    ...
    with clock.during("evaluation"):   # a phase inside another: the outer one resumes after it

Each iteration's seconds per phase are the metrics time/<phase> of its metrics.jsonl row; their totals over the run
(this process's part of it, for a resumed run) are time/<phase>_seconds in summary.json, and the scripts print them,
so a profile starts from numbers. On a GPU, kernels run after the Python that launched them returns: each phase
boundary waits for the device (one torch.cuda.synchronize per boundary, a handful per iteration), so a phase is
charged for its own kernels, not the next one's.
"""
import contextlib
import time

import torch

PHASES = ("generation", "scoring", "logprobs", "update", "evaluation")


class PhaseClock:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.current, self.since = None, None
        self.step, self.total = {}, {}  # seconds per phase: this iteration's, the run's

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, name):
        """Close the running phase (if any) and charge the time from now on to `name` (None: to no phase)."""
        now = self._now()
        if self.current is not None:
            seconds = now - self.since
            self.step[self.current] = self.step.get(self.current, 0.0) + seconds
            self.total[self.current] = self.total.get(self.current, 0.0) + seconds
        self.current, self.since = name, now

    def stop(self):
        self.start(None)

    @contextlib.contextmanager
    def during(self, name):
        """Charge the block to `name`, then go back to the phase that was running."""
        outer = self.current
        self.start(name)
        try:
            yield
        finally:
            self.start(outer)

    def take(self):
        """{time/<phase>: seconds} of the iteration (the running phase up to now); the clock stops, so what follows
        (writing the log) is charged to no phase, and the next iteration starts from zero."""
        self.stop()
        out, self.step = {f"time/{k}": v for k, v in self.step.items()}, {}
        return out

    def totals(self):
        """{time/<phase>_seconds: seconds} over the run, in PHASES' order."""
        self.start(self.current)
        return {f"time/{k}_seconds": round(self.total[k], 3) for k in sorted(self.total, key=_order)}


def _order(name):
    return PHASES.index(name) if name in PHASES else len(PHASES)


def format_totals(summary):
    """'generation 5.1 s, scoring 0.4 s, ...' from a summary's time/<phase>_seconds (the printed 'time:' line)."""
    return ", ".join(f"{k[len('time/'):-len('_seconds')]} {v:.1f} s" for k, v in summary.items()
                     if k.startswith("time/") and k.endswith("_seconds") and k[5:-8] in PHASES)
