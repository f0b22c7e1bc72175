"""Data parallelism on PyTorch's own engine, as small as it can be.

Under `torchrun --nproc_per_node N script.py ...` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; `setup()`
then starts a process group (gloo on CPU, NCCL on GPU). Without torchrun everything is a no-op and world_size is 1.
Only rank 0 logs, evaluates and writes (`is_main`). Gradients are averaged with `all_reduce_mean_grads`, which is
exactly what DDP does, written out so the reader sees it.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0


def setup(device_type="cpu"):
    """Join the torchrun process group (a no-op DistInfo() without torchrun). On CUDA each process first selects its
    own GPU, LOCAL_RANK, and then starts NCCL bound to it (`device_id`): NCCL creates its communicator for that GPU
    at once instead of guessing the device at the first collective (which, before set_device, is GPU 0 for every
    process: all ranks' buffers and contexts would land there), and barrier() knows which device to use."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def all_reduce_mean_grads(params, world_size):
    """Average .grad of `params` over ranks: what DDP does after backward, written out. The gradients travel as one
    flat buffer (DDP's bucketing, with a single bucket): one collective call instead of one per tensor."""
    if world_size == 1:
        return
    for p in params:
        if p.grad is None:  # every rank must send the same buffer layout
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def any_rank(flag, world_size):
    """True on every rank if `flag` is true on any rank (e.g. a Ctrl-C seen by one process: all stop together)."""
    if world_size == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_mean(value, world_size):
    """Mean of a python float or tensor over ranks."""
    if world_size == 1:
        return value
    t = torch.as_tensor(value, dtype=torch.float64).clone().to(_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size).item() if t.dim() == 0 else (t / world_size).cpu()


def _device():
    """Where a collective's tensors must live: NCCL only moves CUDA tensors."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
