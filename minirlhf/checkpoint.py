"""Training checkpoints: everything a run depends on, so that `--resume DIR` continues bit for bit, and the checks of an
output folder (an interrupted run in it needs --resume or --overwrite). The checkpoint folder is written whole with
atomic.atomic_directory (under `<dir>.tmp`, then renamed into place).

A checkpoint is read with `torch.load(..., weights_only=True)`: torch's restricted unpickler, which builds tensors,
numbers, strings, lists, tuples and dicts and refuses everything else. A plain `torch.load` runs pickle, and a pickle
can call any Python function while it loads, so a crafted trainer.pt would run code on `--resume`. That is why
everything saved here is first turned into tensors and plain Python values (`_loadable`, `rng_state`).
"""
import collections
import dataclasses
import errno
import inspect
import json
import os
import pickle
import random
import socket
import sys
import tempfile

import numpy as np
import torch

try:
    import fcntl  # POSIX: the --out folder's lock (lock_out_dir)
except ImportError:  # Windows: runs are not locked
    fcntl = None

from .atomic import atomic_directory, atomic_torch_save, remove
from .errors import InputError


# ---------------------------------------------------------------------------------------------------------------
# Random states as tensors and plain numbers. python's random.getstate() is a tuple of 625 ints, numpy's get_state()
# holds a uint32 ndarray (which weights_only=True refuses): both are stored as int64 tensors, which hold every uint32
# exactly, and turned back into the very same tuples, so the restored streams continue bit for bit.
# ---------------------------------------------------------------------------------------------------------------
def rng_state():
    """Every random state a run depends on (python, numpy, torch CPU and CUDA), as tensors and plain numbers."""
    version, internal, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "numpy": {"algorithm": str(algorithm), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _decode_rng(state):
    """rng_state()'s dict -> (python tuple, numpy tuple, torch ByteTensor, list of CUDA ByteTensors or None), checked
    on the way: a damaged state is a ValueError here rather than a strange error (or a wrong stream) later."""
    try:
        py, npy, cpu = state["python"], state["numpy"], state["torch"]
        internal = py["internal"]
        if not (isinstance(internal, torch.Tensor) and internal.shape == (625,)
                and isinstance(py["gauss_next"], (float, type(None)))):
            raise ValueError("its python part is malformed")
        python = (int(py["version"]), tuple(internal.tolist()), py["gauss_next"])
        keys = npy["keys"]
        if not (isinstance(keys, torch.Tensor) and keys.shape == (624,) and 0 <= int(npy["pos"]) <= 624):
            raise ValueError("its numpy part is malformed")
        numpy = (str(npy["algorithm"]), keys.numpy().astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
                 float(npy["cached_gaussian"]))
        if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8
                and cpu.shape == torch.get_rng_state().shape):
            raise ValueError("its torch part is malformed")
        cuda = state.get("cuda")
        if cuda is not None and not (isinstance(cuda, (list, tuple))
                                     and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)):
            raise ValueError("its cuda part is malformed")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        detail = f"no {e} entry" if isinstance(e, KeyError) else str(e) if type(e) is ValueError else repr(e)
        raise ValueError(f"its random state is damaged: {detail}") from None
    return python, numpy, cpu, cuda


def set_rng_state(state):
    """Restore what rng_state() returned: the python, numpy and torch streams continue exactly where they were."""
    python, numpy, cpu, cuda = _decode_rng(state)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints: everything a run depends on, so that `--resume DIR` continues bit for bit.
#
#   DIR/checkpoint/trainer.pt = {
#       "step": optimizer steps done (PPO: iterations),  "world_size": processes that wrote it,
#       "args": the run's settings (a resume must use the same ones, RESUME_MAY_DIFFER aside),
#       "script": the script that wrote it (script_of: "train_ppo.py"), named when another one is asked to resume it,
#       "trainable": {parameter name: tensor} of every trainable model weight (LoRA A/B, or all of them),
#       "heads": {head name: state_dict},  "optimizer": AdamW's state_dict (moments and step counts),
#       "ranks": [one dict per rank: RNG states (python, numpy, torch), data position, per-rank extras],
#       + what the script adds (KL controller, baseline, the "before" evaluation, ...) }
# Only tensors and plain Python values (numbers, strings, None, lists, tuples, dicts) go in: it is loaded with
# weights_only=True. The learning-rate schedule is a pure function of the step (training.lr_at), so the step IS the
# scheduler state.
# ---------------------------------------------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"
RESUME_MAY_DIFFER = ("out", "resume", "threads", "device", "save_every", "overwrite", "cost_per_hour", "report_to",
                     "deterministic")  # they don't change the result
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, torch.Tensor,
          torch.nn.Parameter)  # exact types: a subclass (numpy.float64 is a float) is pickled by its class name


def _loadable(obj, where="state"):
    """A copy of `obj` that torch.load(weights_only=True) can read back: numpy scalars become Python numbers; tensors,
    plain values and containers of them pass. Anything else is a TypeError naming where it sits, raised at the first
    save, rather than a checkpoint that cannot be resumed."""
    if type(obj) in _PLAIN:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {_loadable(k, where): _loadable(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return collections.OrderedDict(out) if isinstance(obj, collections.OrderedDict) else out
    if isinstance(obj, (list, tuple, set)):
        items = [_loadable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items) if isinstance(obj, tuple) else set(items)
    raise TypeError(f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds "
                    "only tensors and plain Python values (it is loaded with torch.load(weights_only=True))")


def trainable_state(model):
    """{name: tensor} of every trainable parameter of `model` (a copy, on the CPU)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model, state, where):
    """Copy saved trainable parameters into `model`, which must have exactly the same trainable names and shapes
    (InputError otherwise: the checkpoint `where` belongs to another model)."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{where} is not a readable minirlhf checkpoint (its trainable weights are not a dict of "
                         "tensors)")
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise InputError(f"checkpoint {where} does not fit this model: {len(missing)} trainable weights missing "
                         f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})")
    for n, p in own.items():
        if p.shape != state[n].shape:
            raise InputError(f"checkpoint {where} does not fit this model: {n} is {tuple(state[n].shape)} there, "
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
    full = _loadable({**state, "world_size": dist.world_size, "ranks": rank_states})
    atomic_directory(path, lambda tmp: atomic_torch_save(full, os.path.join(tmp, "trainer.pt")))
    return path


def _unreadable(file, reason):
    return f"{file} is not a readable minirlhf checkpoint ({reason})"


def read_checkpoint_file(file, mmap=False):
    """torch.load(weights_only=True) of a trainer.pt, and a check of the structure every checkpoint has. Any damage
    (empty, truncated, random bytes, pickled objects, another structure) is an InputError saying so in one line.
    mmap=True maps the tensors instead of reading them: a look at the step costs milliseconds, whatever the size."""
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InputError(_unreadable(file, f"it cannot be read: {e.strerror}")) from None
    if not head:
        raise InputError(_unreadable(file, "the file is empty"))
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise InputError(_unreadable(file, "it is not a file written by torch.save"))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # weights_only met something other than tensors and plain values
        raise InputError(_unreadable(file, "it holds pickled Python objects, which are never loaded: a crafted file, "
                                           "or a checkpoint written by an older minirlhf")) from None
    except Exception:  # a torn zip archive: RuntimeError, EOFError, ... depending on where it was cut
        raise InputError(_unreadable(file, "it is truncated or damaged")) from None
    problem = _structure_problem(state)
    if problem:
        raise InputError(_unreadable(file, problem))
    return state


def _structure_problem(state):
    """What is wrong with a loaded checkpoint's top level, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    missing = [k for k in ("step", "args", "world_size", "ranks") if k not in state]
    if missing:
        return "no " + ", ".join(repr(k) for k in missing) + " in it"
    if type(state["step"]) is not int or state["step"] < 0:
        return f"its 'step' is {state['step']!r}, not a step count"
    if not isinstance(state["args"], dict):
        return f"its 'args' is a {type(state['args']).__name__}, not a dict of settings"
    if type(state["world_size"]) is not int or state["world_size"] < 1:
        return f"its 'world_size' is {state['world_size']!r}, not a number of processes"
    ranks = state["ranks"]
    if not isinstance(ranks, (list, tuple)) or len(ranks) != state["world_size"]:
        count = len(ranks) if isinstance(ranks, (list, tuple)) else type(ranks).__name__
        return f"its 'ranks' holds {count} rank state(s) for {state['world_size']} process(es)"
    if not all(isinstance(r, dict) for r in ranks):
        return "its 'ranks' entries are not dicts"
    return None


def load_checkpoint(run_dir, args, dist):
    """Read the checkpoint of the run in `run_dir` (its --out; or the checkpoint folder itself) and check that it
    fits: same settings (RESUME_MAY_DIFFER aside) and the same number of processes. Returns (state, this rank's
    rank_state); state["loaded_from"] is the file read. A missing, damaged or ill-fitting checkpoint is an InputError
    (one line naming the file or the settings that differ)."""
    path = run_dir if os.path.isfile(os.path.join(run_dir, "trainer.pt")) else os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.exists(path) and os.path.isdir(path + ".old"):  # killed between atomic_directory's two renames
        path += ".old"
    file = os.path.join(path, "trainer.pt")
    if not os.path.isfile(file):
        raise InputError(f"--resume {run_dir}: no checkpoint there (expected {file}; a run writes one every "
                         "--save-every steps, on Ctrl-C and at its end)")
    try:
        state = read_checkpoint_file(file)
        local = state["ranks"][dist.rank] if dist.rank < state["world_size"] else {}
        if "rng" in local:
            _decode_rng(local["rng"])
    except (InputError, ValueError) as e:
        problem = e if isinstance(e, InputError) else _unreadable(file, e)
        raise InputError(f"--resume {run_dir}: {problem}; it cannot be resumed: start over with --out {run_dir} "
                         "--overwrite instead of --resume") from None
    ours = {k: v for k, v in dataclasses.asdict(args).items() if k not in RESUME_MAY_DIFFER}
    theirs = {k: v for k, v in state["args"].items() if k not in RESUME_MAY_DIFFER}
    script, writer = script_of(args), state.get("script")
    if isinstance(writer, str) and writer != script and ours != theirs:  # (a renamed copy of the script may resume)
        raise InputError(f"--resume {run_dir} was written by {writer}; resume it with python {writer} --resume "
                         f"{run_dir} and the settings in {os.path.join(run_dir, 'args.json')} (this is {script})")
    if set(ours) != set(theirs):  # another script's settings (a checkpoint that does not name its script)
        only = sorted(set(theirs) - set(ours))
        raise InputError(f"--resume {run_dir} was written by another script than {script}: its settings have "
                         + (_first(["--" + k.replace("_", "-") for k in only], 5) + f", which {script} has not"
                            if only else f"fewer flags than {script}'s")
                         + "; resume it with the script that wrote it")
    differ = [k for k in sorted(ours) if ours[k] != theirs[k]]
    if differ:
        raise InputError(f"--resume {run_dir}: the checkpoint was trained with different settings: "
                         + _first([f"--{k.replace('_', '-')} {theirs[k]!r} there, {ours[k]!r} here" for k in differ],
                                  5) + "; resume with the checkpoint's settings")
    if state["world_size"] != dist.world_size:
        raise InputError(f"--resume {run_dir}: the checkpoint was written by {state['world_size']} process(es), this "
                         f"run has {dist.world_size}; resume with the same torchrun --nproc_per_node")
    state["loaded_from"] = file
    return state, state["ranks"][dist.rank]


def _first(items, n):
    """The first n items joined with ", ", and how many more there are."""
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def script_of(args):
    """The script whose settings `args` are, e.g. "train_ppo.py": the file that defines its class (run as a script,
    imported or run by runpy alike); sys.argv[0]'s name when that cannot be told."""
    try:
        return os.path.basename(inspect.getfile(type(args)))
    except (TypeError, OSError):
        return os.path.basename(sys.argv[0])


def save_training(out_dir, dist, *, step, args, model, heads, optimizer, shared=None, local=None):
    """A script's checkpoint in one call: step, settings, trainable weights, heads ({name: module}), optimizer, the
    `shared` extras (identical on every rank) and this rank's RNG states plus its `local` extras (data position...).
    Extras are tensors and plain Python values (numbers, strings, None, lists, dicts): see _loadable."""
    state = {"step": step, "args": dataclasses.asdict(args), "script": script_of(args),
             "trainable": trainable_state(model),
             "heads": {name: head.state_dict() for name, head in heads.items()}, "optimizer": optimizer.state_dict(),
             **(shared or {})}
    return save_checkpoint(out_dir, state, {"rng": rng_state(), **(local or {})}, dist)


def restore_training(checkpoint, *, model, heads, optimizer):
    """Load what save_training wrote (`checkpoint` = load_checkpoint's (state, local)) into the freshly built model,
    heads and optimizer; a checkpoint that does not fit them is an InputError. The caller takes its counters from
    state/local and restores the RNG (set_rng_state(local["rng"])) last, right before its loop."""
    state, _ = checkpoint
    where = state.get("loaded_from") or state["args"].get("out")
    missing = [k for k in ("trainable", "heads", "optimizer") if k not in state]
    missing += [f"heads[{name!r}]" for name in heads if name not in state.get("heads", {})]
    if missing:
        raise InputError(_unreadable(where, "no " + ", ".join(missing) + " in it"))
    load_trainable_state(model, state["trainable"], where)
    for name, head in heads.items():
        try:
            head.load_state_dict(state["heads"][name])
        except (RuntimeError, TypeError, AttributeError) as e:  # names or shapes differ
            raise InputError(f"checkpoint {where} does not fit this model: its {name} head differs "
                             f"({_first_line(e)})") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"checkpoint {where} does not fit this optimizer ({_first_line(e)})") from None
    for group in optimizer.param_groups:  # AdamW's moments must have their parameter's shape
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise InputError(f"checkpoint {where} does not fit this optimizer: an {key} of shape "
                                     f"{tuple(value.shape)} for a parameter of shape {tuple(p.shape)}")


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


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
