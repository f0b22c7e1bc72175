"""Mixed precision as the best trainers do it: what trains stays float32, the big matrix products run in 16 bits.

    --dtype    frozen base stored in   forward passes (torch.autocast)   trainable weights   loss scaling
    float32    fp32                    fp32 (no autocast)                 fp32                none
    bfloat16   bf16                    bf16                               fp32                none (bf16 has fp32's range)
    float16    fp16                    fp16                               fp32                GradScaler
    auto       bf16 on a GPU that computes it natively (compute capability >= 8: Ampere, Hopper), fp16 on older
               GPUs (bf16 there is emulated and slow; torch.cuda.is_bf16_supported() counts emulation), fp32 on the
               CPU: exact toy numbers; on this machine's AVX-512 CPU bf16 autocast runs about as fast as fp32 (tiny
               model forward 0.17 s vs 0.27 s, 1 thread) but fp16 is 4-50x slower (no fp16 matmul kernels)

Micikevicius et al. 2018, "Mixed Precision Training": keep an fp32 master copy of every weight that is updated
(an update lr·grad ≈ 1e-5 of a weight rounds away in bf16's 8-bit mantissa), compute in 16 bits, and for fp16 scale
the loss so small gradients do not flush to zero (Sec. 3.2). Here:
- LoRA adapters and heads are created in fp32 (lora.py, heads.py); full fine-tuning turns a 16-bit base into fp32
  weights (training.make_trainable): AdamW updates fp32 numbers in every case;
- the frozen base is stored in the compute dtype (half the memory of fp32), and a 4-bit / 8-bit base computes in it;
- every forward pass runs under `autocast(model)`: heads.final_hidden, the LM head (heads.lm_logits) and the sampler
  call it, so no script has to; heads read the trunk's states in fp32 and losses are computed in fp32;
- LossScaler does fp16's loss scaling (a no-op for the other dtypes); training.optimizer_step unscales, clips and
  skips a step whose gradients overflowed.
The compute dtype is stored on the model (set_compute_dtype, by models.load_model) so that every pass finds it.
"""
import contextlib

import torch

from .errors import Diverged

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_LOSS_SCALE = 2.0 ** 10  # LossScaler's starting scale (its docstring says why not torch's 2^16)
MIN_LOSS_SCALE = 1.0  # below this, fp16 gradients overflow whatever the scale: the run has diverged


def resolve_dtype(name, device):
    """The compute dtype that --dtype `name` means on `device` (the table above)."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def set_compute_dtype(model, dtype):
    """Record on `model` the dtype its forward passes compute in (read by `autocast`)."""
    model.minirlhf_compute_dtype = dtype
    return model


def compute_dtype(model):
    """The dtype `model`'s forward passes compute in; float32 for a model nobody set one on."""
    return getattr(model, "minirlhf_compute_dtype", torch.float32)


def autocast(model):
    """Context: torch.autocast in the model's compute dtype on its device; nothing for float32. Matrix products run in
    16 bits, reductions (softmax, norms, losses) in fp32, as torch's autocast op lists say."""
    dtype = compute_dtype(model)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype)


class LossScaler:
    """fp16's dynamic loss scaling (torch.amp.GradScaler): the loss is multiplied by S before backward, so gradients
    smaller than fp16's 6e-8 survive; optimizer_step divides them by S again before clipping. A step whose
    gradients overflowed (inf / NaN) is skipped and S halves; S doubles after 2000 good steps. S starts at
    INIT_LOSS_SCALE = 2^10, not torch's 2^16: at 2^16 the first three steps of 1024-token QLoRA rows overflowed and
    were skipped (dev/real_shapes.py, CPU fp16), and a recipe of 8 steps cannot spend three finding its scale;
    LoRA gradients (~1e-6 and up) still clear fp16's underflow by far at 2^10. Below MIN_LOSS_SCALE
    the gradients overflow at any scale: errors.Diverged. Disabled (a plain backward) unless the model computes in
    float16. state_dict() / load_state_dict() for checkpoints (the scale is part of an exact resume)."""

    def __init__(self, model):
        device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(device.type, init_scale=INIT_LOSS_SCALE,
                                           enabled=compute_dtype(model) == torch.float16)

    @property
    def enabled(self):
        return self.scaler.is_enabled()

    def backward(self, loss):
        """loss.backward(), of the scaled loss under fp16."""
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer):
        """Divide the gradients of `optimizer`'s parameters by S (before clipping); no-op when disabled."""
        if self.enabled:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer, finite, step):
        """optimizer.step() unless the gradients overflowed (`finite` False: the scaler skips it), then update S."""
        if not self.enabled:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped by the scaler itself if unscale_ found inf / NaN
        self.scaler.update()
        if not finite and self.scaler.get_scale() < MIN_LOSS_SCALE:
            raise Diverged(f"step {step + 1}: the fp16 gradients overflow even at loss scale "
                           f"{self.scaler.get_scale():.3g}: training diverged; nothing after the last good step was "
                           "saved. Likely cause: the learning rate (--lr) is too high, or fp16's range is too small "
                           "for this model: try --dtype bfloat16 (on a GPU that supports it) or float32")

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        if state:
            self.scaler.load_state_dict(state)
