"""Reproducibility: the same seed gives the same numbers, and a resumed run continues bit for bit.

- seed_everything: one seed for python's, numpy's and torch's global generators (run.Run, at the start of a run);
- rng_state / set_rng_state: every random state a run depends on, captured as tensors and plain numbers (so that a
  checkpoint holds them and loads with weights_only=True: checkpoint.py) and restored exactly;
- use_deterministic: --deterministic, CUDA kernels without nondeterminism of their own.
"""
import os
import random

import numpy as np
import torch


def seed_everything(seed):
    """One seed for python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def decode_rng_state(state):
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
    python, numpy, cpu, cuda = decode_rng_state(state)
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def use_deterministic():
    """--deterministic: the same seed gives the same numbers on CUDA too, so a resumed run continues bit for bit
    there as it does on the CPU (set_rng_state restores the RNG states; this removes the kernels' own
    nondeterminism). Must run before the first cuBLAS call (Run() is the first line of every script):
    - torch.use_deterministic_algorithms(True): deterministic kernels everywhere; an op that has none raises a
      RuntimeError naming it instead of silently varying.
    - CUBLAS_WORKSPACE_CONFIG=:4096:8 (unless set): cuBLAS reduces in a fixed order only with a fixed workspace
      (CUDA >= 10.2); read when cuBLAS first initialises, hence before any matmul.
    - cudnn.benchmark off: no per-shape autotuning that can pick different kernels from run to run.
    Cost: on CUDA, slower backward of scatter / index_add / gather-style ops (embedding backward, cumsum) that
    otherwise use atomic adds, and 8 cuBLAS workspaces of 4 MiB per stream (~32 MiB of GPU memory); the step-time
    cost on a GPU is not measured here yet (no GPU was available). On the CPU, where these kernels are deterministic
    already, nothing measurable: `train_dpo.py --max-steps 5 --threads 1` trained 5.04 s without, 5.03 s with, to
    bit-identical weights."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
