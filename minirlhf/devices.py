"""Which torch.device a --device names: `auto` (this process's CUDA device when there is one, else the CPU), "cpu",
"cuda" or "cuda:N", checked against the machine."""
import torch

from .errors import InputError


def get_device(device="auto", flag="--device"):
    """torch.device: `auto` is the current CUDA device when there is one, else the CPU; else "cpu", "cuda" or
    "cuda:N". InputError naming `flag` for anything else, or for CUDA asked for where there is none."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} {device}: must be auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {device}: no CUDA device is available here (torch.cuda.is_available() is False); "
                             "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise InputError(f"{flag} {device}: this machine has {n} CUDA device{'s' * (n != 1)} (cuda:0 to "
                             f"cuda:{n - 1}); use --device cuda:N with N < {n}, cuda or auto")
    return dev
