"""Training checkpoints: everything a run depends on, so that `--resume DIR` continues bit for bit. The checkpoint
folder is written whole with atomic.atomic_directory (under `<dir>.tmp`, then renamed into place); the rules of the
folder it goes into (--out, --resume, --overwrite, the lock) are outdir.py's.

A checkpoint is read with `torch.load(..., weights_only=True)`: torch's restricted unpickler, which builds tensors,
numbers, strings, lists, tuples and dicts and refuses everything else. A plain `torch.load` runs pickle, and a pickle
can call any Python function while it loads, so a crafted trainer.pt would run code on `--resume`. That is why
everything saved here is first turned into tensors and plain Python values (`_loadable`, determinism.rng_state).
"""
import collections
import dataclasses
import inspect
import os
import pickle
import sys

import numpy as np
import torch

from .atomic import atomic_directory, atomic_torch_save
from .determinism import decode_rng_state, rng_state
from .errors import InputError


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


def same_setting(ours, theirs):
    """Whether a setting of this run equals the checkpoint's: a flag that takes one value or several (--reward-model)
    given one value is the same setting as a list, ["x"] == "x"."""
    return ours == theirs or _single(ours) == _single(theirs)


def _single(value):
    return value[0] if isinstance(value, list) and len(value) == 1 else value


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
            decode_rng_state(local["rng"])
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
    differ = [k for k in sorted(ours) if not same_setting(ours[k], theirs[k])]
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
