"""A checksum of every frozen value of a model, cheap enough for an 8B base: `params/frozen_unchanged` in summary.json.

FrozenCheck(model, *modules) computes it at run.start and `.unchanged()` again at run.finish; equal lists mean the
frozen base (and the frozen modules) still hold exactly the values they held before training.

What is summed: every parameter with requires_grad=False and, for bitsandbytes weights, the state that gives the
stored bytes their meaning. A 4-bit weight's value is its packed NF4 codes AND its block scales: the packed bytes, the
quantization state's absmax and, with double quantization, the nested state2.absmax and the offset. An 8-bit weight
adds its row scales (SCB), wherever bitsandbytes keeps them: on the weight until the layer's first forward, then on
the layer's `state` (Linear8bitLt.init_8bit_state moves them there and sets weight.SCB to None; reading only the
weight made an untouched 8-bit base look changed).

How (memory bounded by the number of tensors, not their size): for each tensor t of n values w_1..w_n (row-major
order) two float64 numbers,

    S0 = Σ_i w_i        S1 = Σ_i i·w_i        (i = 1..n)

S0 sees any change of one value; S1 also sees two values swapped. They are computed ON THE TENSOR'S DEVICE, a chunk
of CHUNK[device] values at a time, each chunk copied into one float64 buffer allocated once per call (next to one
index vector 1..CHUNK), and each chunk's sums are added to a float64 pair that stays on the device. Only the pairs
reach the host, once per device at the end: 16 bytes per tensor. A chunk's S1 is Σ_j j·w_(s+j) + s·Σ_j w_(s+j)
for the chunk starting after s values, so one index vector 1..CHUNK serves every chunk.

Host memory (tests/test_fingerprint.py): < 10 MB whatever the model (0.14 MB measured on a 135M-parameter model).
The version this replaces copied each whole tensor to the host in float64, next to a float64 index vector and
their product: 24 bytes per value of the largest tensor, 648 MB measured on the 135M model, ~12.6 GB for
Llama-3-8B's embedding matrix. Reusing one buffer rather than converting each chunk into a fresh tensor matters
too: glibc carves small allocations out of a freed chunk-sized block, the next chunk no longer fits there, and the
heap grew by up to 70 MB over the 135M model.
"""
import torch

CHUNK = {"cpu": 2 ** 16, "cuda": 2 ** 22}  # values per chunk: 0.5 MB / 32 MB of float64 (other devices: CPU's)


def frozen_tensors(model):
    """Every tensor whose values the frozen part of `model` consists of (see the module docstring), in a fixed
    order: each frozen parameter (shared ones once), then its quantization state."""
    layer_state = {id(m.weight): m.state for m in model.modules()  # 8-bit layers: where SCB goes after a forward
                   if getattr(m, "state", None) is not None and hasattr(m.state, "SCB") and hasattr(m, "weight")}
    for p in model.parameters():
        if p.requires_grad:
            continue
        yield p
        state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit
        if state is not None:
            yield state.absmax
            if state.state2 is not None:  # double quantization: absmax is itself 8-bit, with its own scales
                yield state.state2.absmax
                yield state.offset
        scb = getattr(p, "SCB", None)  # bitsandbytes 8-bit row scales: on the weight, or on its layer's state
        if scb is None and id(p) in layer_state:
            scb = layer_state[id(p)].SCB
        if scb is not None:
            yield scb


@torch.no_grad()
def frozen_fingerprint(model):
    """[S0, S1] of every tensor of frozen_tensors(model), flattened: 2 python floats per tensor."""
    pairs, work = [], {}  # work: device -> (index 1..CHUNK, buffer), float64, shared by every tensor on that device
    for t in frozen_tensors(model):
        t = t.detach()
        if t.device not in work:
            chunk = CHUNK.get(t.device.type, CHUNK["cpu"])
            work[t.device] = (torch.arange(1, chunk + 1, dtype=torch.float64, device=t.device),
                              torch.empty(chunk, dtype=torch.float64, device=t.device))
        acc = torch.zeros(2, dtype=torch.float64, device=t.device)  # [S0, S1], stays on the device
        _accumulate(t, 0, acc, *work[t.device])
        pairs.append(acc)
    return _to_host(pairs)


class FrozenCheck:
    """The frozen-weight check of a run: the frozen values of `model` and `modules` (e.g. a reward head) recorded now;
    `.unchanged()` is True while they hold exactly those values, bit for bit."""

    def __init__(self, model, *modules):
        self.modules = (model, *modules)
        self.before = self.fingerprint()

    def fingerprint(self):
        """frozen_fingerprint of every module, concatenated in order."""
        return [x for m in self.modules for x in frozen_fingerprint(m)]

    def unchanged(self):
        return self.fingerprint() == self.before


def _accumulate(t, start, acc, index, buffer):
    """acc += [Σ w_i, Σ (start + i)·w_i] over t's values in row-major order, len(index) values at a time, each
    chunk converted to float64 in `buffer`."""
    chunk = len(index)
    if t.numel() == 0:
        return
    if t.dim() <= 1 or t.is_contiguous():
        flat = t.reshape(-1)  # a view: nothing is copied
        for s in range(0, flat.numel(), chunk):
            n = min(chunk, flat.numel() - s)
            part = buffer[:n].copy_(flat[s:s + n])  # (n,) float64
            total = part.sum()
            acc[0] += total
            acc[1] += torch.dot(part, index[:n]) + (start + s) * total
        return
    # a strided view (rare for weights): one row, or a block of rows, at a time; never the whole tensor copied
    row = t[0].numel()
    if row >= chunk:
        for a in range(t.shape[0]):
            _accumulate(t[a], start + a * row, acc, index, buffer)
    else:
        rows = chunk // row
        for a in range(0, t.shape[0], rows):
            _accumulate(t[a:a + rows].reshape(-1), start + a * row, acc, index, buffer)  # a copy of <= chunk values


def _to_host(pairs):
    """The (2,) device pairs as one flat list of floats, in order: one transfer per device."""
    values = [None] * len(pairs)
    by_device = {}
    for i, pair in enumerate(pairs):
        by_device.setdefault(pair.device, []).append(i)
    for positions in by_device.values():
        for i, pair in zip(positions, torch.stack([pairs[i] for i in positions]).tolist()):
            values[i] = pair
    return [x for pair in values for x in pair]
