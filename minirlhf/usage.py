"""What a run used, for summary.json: the peak memory of each phase, the samples it trained and their rate, and with
--cost-per-hour what they cost.
"""
import resource
import sys

import torch


def peak_rss_bytes():
    """The process's peak resident set so far, in bytes (getrusage: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class PhaseMemory:
    """Peak memory per phase of a run, for summary.json. The phases follow the scripts' Run calls:

        setup    Run() .. the end of run.start    load the model, data and optimizer; restore a checkpoint
        before   .. the first step                 the evaluation before training (run.once("before", ...))
        train    the steps of run.steps()
        after    the end of the loop .. finish     save, evaluate after training

    On CUDA torch's peak-allocation counter is read and reset at each boundary (mark): memory/cuda_peak_bytes/<phase>
    is the most memory PyTorch's tensors held on the GPU during that phase (what the caching allocator handed out,
    not the cache it reserved, nor other processes), memory/cuda_peak_bytes the largest of them. On every device:
    memory/peak_rss_bytes, the process's peak host memory (its whole life: getrusage cannot be reset).
    `cuda` is torch.cuda or a stand-in with max_memory_allocated(device) and reset_peak_memory_stats(device)."""

    def __init__(self, device, cuda=torch.cuda):
        self.device, self.phase, self.peaks = device, "setup", {}  # peaks: phase -> bytes
        self.cuda = cuda if device.type == "cuda" else None
        if self.cuda is not None:
            self.cuda.reset_peak_memory_stats(device)

    def mark(self, phase):
        """End the current phase (its CUDA peak read, the counter reset) and start `phase`."""
        if self.cuda is not None:
            peak = self.cuda.max_memory_allocated(self.device)
            self.peaks[self.phase] = max(peak, self.peaks.get(self.phase, 0))
            self.cuda.reset_peak_memory_stats(self.device)
        self.phase = phase

    def summary(self):
        """The summary keys (the phase still running is read too)."""
        self.mark(self.phase)
        out = {"memory/peak_rss_bytes": peak_rss_bytes()}
        if self.peaks:
            out.update({f"memory/cuda_peak_bytes/{phase}": peak for phase, peak in self.peaks.items()})
            out["memory/cuda_peak_bytes"] = max(self.peaks.values())
        return out


def throughput(steps_run, samples_per_step, train_seconds, cost_per_hour, wall_seconds):
    """What one process's training did and cost (a resumed run counts only the steps it ran itself):
    time/train_seconds   train_seconds: wall time inside run.steps() (steps, logging, checkpoints, evaluations
                         between steps)
    train/samples        steps_run x samples_per_step (run.start), all processes
    perf/samples_per_second   train/samples / time/train_seconds
    cost/usd_total       cost_per_hour (--cost-per-hour) x wall_seconds (the process's wall time from Run() to now)
                         / 3600: the instance's price for the whole run (loading and evaluations included), as the
                         multi-adapter PPO setup reports it
    cost/usd_per_sample  cost/usd_total / train/samples
    The train/ and perf/ keys need samples_per_step, the cost/ keys cost_per_hour (usd_per_sample both)."""
    out = {"time/train_seconds": round(train_seconds, 2)}
    samples = None
    if samples_per_step is not None:
        samples = out["train/samples"] = steps_run * samples_per_step
        if train_seconds > 0:
            out["perf/samples_per_second"] = samples / train_seconds
    if cost_per_hour is not None:
        out["cost/usd_total"] = cost_per_hour * wall_seconds / 3600
        if samples:
            out["cost/usd_per_sample"] = out["cost/usd_total"] / samples
    return out
