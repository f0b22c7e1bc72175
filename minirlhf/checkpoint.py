"""Atomic file writes and full training checkpoints: an interrupted run never leaves a torn file, and resumes exactly.

Every write goes to a temporary name in the same directory and is then `os.replace`d onto the final name (an atomic
rename on POSIX and Windows). A checkpoint directory is written whole under `<dir>.tmp` and renamed into place.
"""
import dataclasses
import json
import os
import random
import shutil
import signal
import tempfile

import numpy as np
import torch


def atomic_write_bytes(path, data):
    """Write bytes to `path` atomically (temp file in the same directory + rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_torch_save(obj, path):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_directory(path, write_fn):
    """Call write_fn(tmp_dir) and then move tmp_dir onto `path`, replacing any old version."""
    path = os.path.abspath(os.fspath(path))
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_fn(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def rng_state():
    """Every random state a run depends on (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints: everything a run depends on, so that `--resume DIR` continues bit for bit.
#
#   DIR/checkpoint/trainer.pt = {
#       "step": optimizer steps done (PPO: iterations),  "world_size": processes that wrote it,
#       "args": the run's settings (a resume must use the same ones, RESUME_MAY_DIFFER aside),
#       "trainable": {parameter name: tensor} of every trainable model weight (LoRA A/B, or all of them),
#       "heads": {head name: state_dict},  "optimizer": AdamW's state_dict (moments and step counts),
#       "ranks": [one dict per rank: RNG states (python, numpy, torch), data position, per-rank extras],
#       + what the script adds (KL controller, baseline, the "before" evaluation, ...) }
# The learning-rate schedule is a pure function of the step (training.lr_at), so the step IS the scheduler state.
# ---------------------------------------------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"
RESUME_MAY_DIFFER = ("out", "resume", "threads", "device", "save_every")  # settings that do not change the result


def trainable_state(model):
    """{name: tensor} of every trainable parameter of `model` (a copy, on the CPU)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model, state, where):
    """Copy saved trainable parameters into `model`, which must have exactly the same trainable names and shapes."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"checkpoint {where} does not fit this model: {len(missing)} trainable weights missing "
                         f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})")
    for n, p in own.items():
        if p.shape != state[n].shape:
            raise ValueError(f"checkpoint {where} does not fit this model: {n} is {tuple(state[n].shape)} there, "
                             f"{tuple(p.shape)} here (a different model or LoRA rank?)")
        p.copy_(state[n])


def save_checkpoint(out_dir, state, rank_state, dist):
    """Write out_dir/checkpoint/trainer.pt atomically. `state` is the same on every rank (weights, optimizer,
    counters); `rank_state` is this rank's own (RNG, data position): it is gathered to rank 0, which writes."""
    rank_states = [rank_state]
    if dist.world_size > 1:
        import torch.distributed
        rank_states = [None] * dist.world_size
        torch.distributed.all_gather_object(rank_states, rank_state)
    if not dist.is_main:
        return None
    path = os.path.join(out_dir, CHECKPOINT_DIR)
    atomic_directory(path, lambda tmp: atomic_torch_save({**state, "world_size": dist.world_size,
                                                          "ranks": rank_states}, os.path.join(tmp, "trainer.pt")))
    return path


def load_checkpoint(run_dir, args, dist):
    """Read the checkpoint of the run in `run_dir` (its --out; or the checkpoint folder itself) and check that it
    fits: same settings (RESUME_MAY_DIFFER aside) and the same number of processes. Returns (state, this rank's
    rank_state). Any mismatch is a ValueError naming the settings that differ."""
    path = run_dir if os.path.isfile(os.path.join(run_dir, "trainer.pt")) else os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.exists(path) and os.path.isdir(path + ".old"):  # killed between atomic_directory's two renames
        path += ".old"
    file = os.path.join(path, "trainer.pt")
    if not os.path.isfile(file):
        raise ValueError(f"--resume {run_dir}: no checkpoint there (expected {file}; a run writes one every "
                         "--save-every steps, on Ctrl-C and at its end)")
    state = torch.load(file, map_location="cpu", weights_only=False)  # our own file: numpy RNG state is a tuple
    ours = {k: v for k, v in dataclasses.asdict(args).items() if k not in RESUME_MAY_DIFFER}
    theirs = {k: v for k, v in state["args"].items() if k not in RESUME_MAY_DIFFER}
    differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differ:
        raise ValueError(f"--resume {run_dir}: the checkpoint was trained with different settings: "
                         + ", ".join(f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {ours.get(k)!r} here"
                                     for k in differ) + "; resume with the checkpoint's settings")
    if state["world_size"] != dist.world_size:
        raise ValueError(f"--resume {run_dir}: the checkpoint was written by {state['world_size']} process(es), this "
                         f"run has {dist.world_size}; resume with the same torchrun --nproc_per_node")
    return state, state["ranks"][dist.rank]


class GracefulStop:
    """`with GracefulStop() as stop:` — the first Ctrl-C (SIGINT) or SIGTERM only sets `stop.requested`; the loop
    finishes its step, saves a checkpoint and exits cleanly. A second Ctrl-C aborts at once (KeyboardInterrupt).
    Outside the main thread (where signals cannot be caught) it does nothing."""

    def __enter__(self):
        self.requested, self._old = False, {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


def save_training(out_dir, dist, *, step, args, model, heads, optimizer, shared=None, local=None):
    """A script's checkpoint in one call: step, settings, trainable weights, heads ({name: module}), optimizer, the
    `shared` extras (identical on every rank) and this rank's RNG states plus its `local` extras (data position...)."""
    state = {"step": step, "args": dataclasses.asdict(args), "trainable": trainable_state(model),
             "heads": {name: head.state_dict() for name, head in heads.items()}, "optimizer": optimizer.state_dict(),
             **(shared or {})}
    return save_checkpoint(out_dir, state, {"rng": rng_state(), **(local or {})}, dist)


def restore_training(checkpoint, *, model, heads, optimizer):
    """Load what save_training wrote (`checkpoint` = load_checkpoint's (state, local)) into the freshly built model,
    heads and optimizer. The caller takes its counters from state/local and restores the RNG
    (set_rng_state(local["rng"])) last, right before its loop."""
    state, _ = checkpoint
    load_trainable_state(model, state["trainable"], state["args"]["out"])
    for name, head in heads.items():
        head.load_state_dict(state["heads"][name])
    optimizer.load_state_dict(state["optimizer"])


def end_of_step(stop, dist, step, total, save_every, save, out_dir, unit="step"):
    """The last lines of every training step: all ranks learn whether a Ctrl-C arrived anywhere (GracefulStop);
    `save()` writes a checkpoint then, at the last step and every save_every steps. True: the loop must stop."""
    from . import distributed
    stopping = distributed.any_rank(stop.requested, dist.world_size)
    if stopping or step == total or (save_every and step % save_every == 0):
        save()
    if stopping and dist.is_main:
        print(f"stopped at {unit} {step}: checkpoint in {os.path.join(out_dir, CHECKPOINT_DIR)}; continue with "
              f"--resume {out_dir}")
    return stopping
