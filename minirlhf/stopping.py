"""Stopping a run between two steps: the first Ctrl-C (or SIGTERM) lets the step finish, every process learns of it,
and a checkpoint is saved before the loop ends; a second Ctrl-C aborts at once.
"""
import os
import signal

from . import distributed
from .checkpoint import CHECKPOINT_DIR


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


def end_of_step(stop, dist, step, total, save_every, save, out_dir, unit="step"):
    """The last lines of every training step: all ranks learn whether a Ctrl-C arrived anywhere (GracefulStop);
    `save()` writes a checkpoint then, at the last step and every save_every steps. True: the loop must stop."""
    stopping = distributed.any_rank(stop.requested, dist.world_size)
    if stopping or step == total or (save_every and step % save_every == 0):
        save()
    if stopping and dist.is_main:
        print(f"stopped at {unit} {step}: checkpoint in {os.path.join(out_dir, CHECKPOINT_DIR)}; continue with "
              f"--resume {out_dir}")
    return stopping
