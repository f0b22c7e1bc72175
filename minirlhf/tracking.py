"""The output contract every script honours: args.json, metrics.jsonl, summary.json, curves.png.

`RunLog(out_dir, args)` writes args.json at once; `.log(step, metrics)` appends one JSON object per logging step
(namespaced keys such as "train/loss"); `.summary(final)` writes summary.json atomically and draws curves.png when
matplotlib is installed.

With `report_to="tensorboard"` (the scripts' --report-to tensorboard) every number logged is also written, with
torch's own SummaryWriter, into out/tensorboard/ beside metrics.jsonl (same keys, x axis = step). Watch a run with
`tensorboard --logdir OUT/tensorboard` (needs `pip install tensorboard`; run.Run checks it before anything loads).
"""
import dataclasses
import json
import os
import shutil
import time

from minirlhf.atomic import atomic_write_bytes, atomic_write_json


TENSORBOARD_DIR = "tensorboard"  # out/tensorboard/: the event files of --report-to tensorboard


class RunLog:
    def __init__(self, out_dir, args, enabled=True, resume_step=None, report_to="none"):
        """resume_step: continuing a run from its checkpoint at this step keeps the metrics.jsonl rows up to it
        (rows logged after the checkpoint by the interrupted process are dropped: they will be logged again).

        A new run (resume_step None) starts metrics.jsonl afresh and removes the summary.json of the run that was in
        the folder before: its "train/finished": true would otherwise vouch for this run's checkpoints, and
        outdir.prepare_out_dir would let a later run start over an interrupted one without --overwrite.

        report_to "tensorboard": the rows also go to out/tensorboard/ (enabled, i.e. rank 0, only), by the same
        rules: a new run removes the old event files, a resumed one hides the events after resume_step (the
        SummaryWriter's purge_step)."""
        self.out_dir, self.enabled, self.start = out_dir, enabled, time.time()
        self.history, self.tensorboard = [], None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            if resume_step is None and os.path.isfile(os.path.join(out_dir, "summary.json")):
                os.remove(os.path.join(out_dir, "summary.json"))
            atomic_write_json(os.path.join(out_dir, "args.json"), dataclasses.asdict(args))
            self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
            if resume_step is not None and os.path.isfile(self.metrics_path):
                with open(self.metrics_path) as f:
                    rows = [_parse(line) for line in f]  # a line torn by a kill parses to None
                self.history = [r for r in rows if r is not None and r["step"] <= resume_step]
            atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history).encode())
            if report_to == "tensorboard":
                self.tensorboard = tensorboard_writer(out_dir, resume_step)

    def log(self, step, metrics):
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.enabled:
            try:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")  # a line torn by a full disk is dropped on --resume
            except OSError as e:
                e.filename = e.filename or self.metrics_path  # a failed write names no file (cli.run_script's line)
                raise
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()  # a watched run shows each row at once (and a kill loses none)

    def summary(self, final):
        final = {"time/total_seconds": round(time.time() - self.start, 2), **{k: _plain(v) for k, v in final.items()}}
        if self.enabled:
            atomic_write_json(os.path.join(self.out_dir, "summary.json"), final)
            plot_curves(self.history, os.path.join(self.out_dir, "curves.png"))
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        return final


def tensorboard_writer(out_dir, resume_step=None):
    """torch's SummaryWriter on out/tensorboard/. A new run (resume_step None) starts the folder afresh; a resumed
    one writes a new event file whose purge_step hides the events the interrupted process logged after its
    checkpoint (TensorBoard drops the older events at steps >= resume_step + 1)."""
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (pip install tensorboard)
    folder = os.path.join(out_dir, TENSORBOARD_DIR)
    if resume_step is None and os.path.isdir(folder):
        shutil.rmtree(folder)
    return SummaryWriter(folder, purge_step=None if resume_step is None else resume_step + 1)


def _parse(line):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def plot_curves(history, path):
    """One small panel per numeric metric against step; silently skipped without matplotlib. Drawn on a bare Figure
    with fixed margins (no pyplot, no tight_layout): 0.6 s instead of 2.3 s for the ~30 panels of an RL run, paid
    at the end of every run."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    keys = sorted({k for row in history for k, v in row.items() if k != "step" and isinstance(v, (int, float))})
    if not keys:
        return
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.3 / cols, right=1 - 0.05 / cols, bottom=0.3 / rows, top=1 - 0.25 / rows,
                        wspace=0.35, hspace=0.45)  # room for the tick labels and the titles, in inches per panel
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            e.filename = e.filename or path
        raise
