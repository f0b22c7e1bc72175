"""Atomic writes: a file or a whole folder is written under a temporary name in the same directory and renamed into
place (`os.replace`: an atomic rename on POSIX and Windows), so a run killed at any moment never leaves a torn file:
the old version or the new one, whole. Every file minirlhf writes (metrics, summaries, adapters, heads, checkpoints)
goes through here.
"""
import io
import json
import os
import shutil
import tempfile

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
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the one written
            e.filename = path
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_torch_save(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def remove(path):
    """Remove a file or a folder tree; one that is already gone (say, removed by another process) is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def atomic_directory(path, write_fn):
    """Call write_fn(tmp_dir), then move tmp_dir onto `path`, replacing any old version.

    A folder cannot be swapped in one atomic rename, so it takes two: `path` -> `path.old`, then `path.tmp` -> `path`.
    At every moment one whole version exists: `path`, or, between the two renames, `path.old` (load_checkpoint falls
    back to it). A kill can leave either helper behind, and neither may break a later call:
      - `path.tmp` is always half-written: thrown away first;
      - `path.old` is a stale copy when `path` exists (removed before the first rename: renaming a folder onto a
        non-empty one fails with "Directory not empty"), or the last whole version when `path` does not (kept until
        the new version is in place)."""
    path = os.path.abspath(os.fspath(path))
    tmp, old = path + ".tmp", path + ".old"
    remove(tmp)
    os.makedirs(tmp)
    try:
        write_fn(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(path):
        remove(old)
        os.replace(path, old)
    os.replace(tmp, path)
    try:
        remove(old)
    except OSError:  # the new version is in place; the next call tries again
        pass
