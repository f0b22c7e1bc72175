"""The output folder of a run (--out, or the run folder --resume names): checked and locked before anything is
loaded, so that a bad --out fails in a second rather than after training, a new run never silently writes over an
interrupted one (whose checkpoint is the only way to continue it), and two runs never share a folder.

The rules, for every script (run.Run applies them first):
- --resume DIR continues the run in DIR (DIR/checkpoint/ itself names the same run: resume_folder).
- --out DIR must be a directory this process can write to; one holding an interrupted run (a checkpoint and no
  finished summary.json) needs --resume or --overwrite; --overwrite removes the old checkpoint folders at once.
- the folder is locked for the life of the process (lock_out_dir); cli.run_script releases it however the run ends.
- a full disk while the run writes into its folder is one line saying what was kept (out_of_space).
"""
import errno
import json
import os
import socket
import tempfile

try:
    import fcntl  # POSIX: the --out folder's lock (lock_out_dir)
except ImportError:  # Windows: runs are not locked
    fcntl = None

from .atomic import remove
from .checkpoint import CHECKPOINT_DIR, read_checkpoint_file
from .errors import InputError


def resume_folder(path):
    """The run folder a --resume names: `path` itself, or the folder above it when `path` is its checkpoint/ folder."""
    resume = os.path.normpath(path)
    return os.path.dirname(resume) if os.path.basename(resume) == CHECKPOINT_DIR else resume


CHECKPOINT_FOLDERS = (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".tmp")  # see atomic_directory


def prepare_out_dir(out, resume, overwrite):
    """Check the output folder of a run and make it ready; call it first (run.Run does).

    - The folder (--out; with --resume, the resumed run's folder) must be a directory this process can write to: it
      is created, and a probe file is written and removed. A resumed folder is not created (load_checkpoint says
      that it has no checkpoint).
    - A new run (no --resume) in a folder that holds an interrupted run, i.e. a checkpoint and no summary.json with
      "train/finished": true, is refused unless `overwrite`: that checkpoint is the only way to continue the old run.
    - `overwrite` removes the old checkpoint folders (checkpoint, checkpoint.old, checkpoint.tmp) at once, so that a
      later --resume of this folder can never pick up the old run's checkpoint; the new run replaces the rest.
    - A finished run's folder, or an empty or new one, is used as it is (a command that then fails on another
      setting leaves a finished run untouched); the new run's first checkpoint replaces the old one, and its RunLog
      drops the old summary.json (whose "train/finished" must not vouch for the new run's checkpoint).
    - The folder is locked for the life of the run (lock_out_dir): a second run started into it, by --out or
      --resume, while the first one lives, is refused with one line naming the folder and the owner's pid.
    Every rank may call it (only rank 0 takes the lock). It reads at most the checkpoint's step (memory-mapped), so
    it takes milliseconds."""
    if resume and overwrite:
        raise InputError("--overwrite starts the run in --out over and --resume continues it: pass one of them")
    flag, folder = ("--resume", resume) if resume else ("--out", out)
    folder = os.fspath(folder) if folder is not None else ""
    if not folder:
        raise InputError(f"{flag} must name a directory, got {folder!r}")
    if resume and not os.path.exists(folder):
        return
    _check_writable(folder, flag)
    if os.environ.get("RANK", "0") == "0":  # torchrun: the ranks of one run share rank 0's lock
        lock_out_dir(folder, flag)
    if resume:
        return
    file = _checkpoint_file(folder)
    if file and not overwrite and not _finished(folder):
        try:
            what = f"checkpoint at step {read_checkpoint_file(file, mmap=True)['step']}"
            fix = f"continue it with --resume {folder}, or pass --overwrite to start over"
        except InputError:
            what = f"its checkpoint {file} is unreadable, so it cannot be resumed"
            fix = "pass --overwrite to start over"
        raise InputError(f"--out {folder} holds an interrupted run ({what}): {fix}")
    if overwrite:
        for name in CHECKPOINT_FOLDERS:
            remove(os.path.join(folder, name))


def _check_writable(folder, flag):
    """InputError unless `folder` is (or can be made) a directory this process can write to."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"{flag} {folder} is a file, not a directory: pass "
                         + ("the output folder of the run to continue" if flag == "--resume"
                            else "a directory (it is created if missing)"))
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # some folder on the way is a file
        parent = os.path.dirname(os.path.abspath(folder))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        raise InputError(f"{flag} {folder} cannot be created: {parent} is a file, not a directory") from None
    except OSError as e:
        raise InputError(f"{flag} {folder} cannot be created: {e.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        with os.fdopen(fd, "wb") as f:
            f.write(b"minirlhf")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{flag} {folder} is not writable ({e.strerror}): pass a directory you can write to") \
            from None


def _checkpoint_file(folder):
    """The trainer.pt a --resume of `folder` would read (checkpoint/, or checkpoint.old/ left by a kill between
    atomic_directory's two renames), or None."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        file = os.path.join(folder, name, "trainer.pt")
        if os.path.isfile(file):
            return file
    return None


def _finished(folder):
    """Whether the run in `folder` ended: its summary.json says "train/finished": true."""
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            return json.load(f).get("train/finished") is True
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# One run per folder: two runs writing into one --out would interleave their metrics.jsonl rows and overwrite each
# other's checkpoints. The lock is flock(2) on DIR/.minirlhf.lock, which holds the owner's pid and host for the
# message. The kernel drops a flock when its process ends, however it ends (exit, error, Ctrl-C, SIGTERM, SIGKILL,
# a crash), so a lock file left by a dead process is stale by construction: the next run takes it over. A normal
# exit (cli.run_script) also removes the file. Within one process the lock is re-entrant (a test or notebook that
# runs script after script in one folder).
# ---------------------------------------------------------------------------------------------------------------
LOCK_FILE = ".minirlhf.lock"
_locks = {}  # real path of a locked folder -> the open lock file (holding the flock)


def lock_out_dir(folder, flag="--out"):
    """Lock `folder` for this process (see above): return at once if this process holds it already; InputError
    naming the folder and the owner's pid (and host) if another live process does. Filesystems without locks
    (some network mounts) run unlocked, with one warning line."""
    key = os.path.realpath(folder)
    if key in _locks or fcntl is None:
        return
    path = os.path.join(folder, LOCK_FILE)
    while True:
        try:
            f = open(path, "a+")
        except OSError as e:  # a folder (or anything but a file) by that name
            raise InputError(f"{flag} {folder}: its lock file {path} cannot be opened ({e.strerror}): remove what is "
                             "there (no run of minirlhf makes it a folder)") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _lock_owner(f)
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(f"{flag} {folder} is in use by another run ({owner}): two runs in one folder would "
                                 "mix their metrics and checkpoints; wait for it to end, or pass another --out") \
                    from None
            from .validation import warn
            warn(f"{flag} {folder}: cannot lock the folder ({e.strerror}): nothing stops a second run from writing "
                 "into it while this one runs")
            return
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except FileNotFoundError:  # its owner removed the file between our open and our flock
            same = False
        if same:
            break
        f.close()  # locked a file another process had just unlinked: take the new one
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    _locks[key] = f


def _lock_owner(f):
    """What a lock file says of its owner ("pid 123 on host h"), or a stand-in when it is empty or unreadable."""
    try:
        f.seek(0)
        return f.read().strip() or "a process that has not written its pid yet"
    except OSError:
        return "a process whose pid cannot be read"


def release_out_dir(folder=None):
    """Remove and unlock this process's lock file of `folder` (every folder it locked when None). The file is
    removed while the lock is held, so no other process can lock it in between."""
    keys = list(_locks) if folder is None else [os.path.realpath(folder)]
    for key in keys:
        f = _locks.pop(key, None)
        if f is None:
            continue
        try:
            os.remove(os.path.join(key, LOCK_FILE))
        except OSError:
            pass
        f.close()


def out_of_space(error, args):
    """The one line for a full disk or quota (OSError ENOSPC / EDQUOT) met while a run wrote into its folder: what
    happened, what was kept, how to continue. Every write is atomic (atomic.py), so whatever was being written is
    simply not there and everything written before is whole; the last checkpoint on disk is read for its step."""
    what = "no space left on the device" if error.errno == errno.ENOSPC else "the disk quota is exceeded"
    if error.filename:
        what += f" while writing {error.filename}"
    out = getattr(args, "out", None)
    if not hasattr(args, "resume") or not out or not os.path.isdir(out):  # not a run folder (compare's --out file)
        return f"{what}; nothing of it was kept: free space, then run the command again"
    file = _checkpoint_file(out)
    try:
        step = read_checkpoint_file(file, mmap=True)["step"] if file else None
    except InputError:
        step = None
    if step is None:
        return (f"{what}; {out} holds no whole checkpoint, so the run cannot be resumed: free space, then start it "
                f"again (with --overwrite if a checkpoint was left unreadable)")
    return (f"{what}; kept: the last whole checkpoint, step {step}, in {os.path.dirname(file)} (everything written "
            f"before is whole): free space, then continue with --resume {out}")
