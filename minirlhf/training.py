"""The few pieces every training script shares: what to train, the optimizer, the learning-rate schedule, batch order.

Kept deliberately thin: the loop itself lives in each script and reads top to bottom.
"""
import contextlib
import math

import torch

from . import distributed, lora
from .errors import Diverged, InputError


def make_trainable(model, adapter, *, full_finetune=False, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                   lora_targets=("all-linear",)):
    """Either every base weight trains (full fine-tuning, float bases only) or a fresh LoRA adapter named `adapter`
    does (and nothing else). Returns the list of trainable parameters (heads are added by the caller).

    Full fine-tuning trains float32 weights: a 16-bit base is upcast here, and its forward passes still compute in
    16 bits under autocast (precision.py). That is mixed precision's fp32 master copy without a second copy: weights
    4 bytes, gradients 4, AdamW's two moments 8, 16 bytes per parameter (vs 2 for a frozen bf16 base); a pure-bf16
    AdamW would lose every update smaller than 2^-8 of its weight."""
    if full_finetune:
        if any(lora.quantized_bits(m) for m in model.modules()):
            raise ValueError("--full-finetune needs a float base; a 4-bit/8-bit base trains through LoRA only")
        model.float()  # fp32 master weights (a no-op for an fp32 base); the compute dtype stays (autocast)
        model.requires_grad_(True)
        return [p for p in model.parameters() if p.requires_grad]
    targets = "all-linear" if list(lora_targets) == ["all-linear"] else list(lora_targets)
    problem = lora.targets_problem(model, targets)  # checked on the skeleton already where its config was at hand
    if problem:
        raise InputError(f"--lora-targets {problem}")
    lora.add_lora(model, targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, adapter=adapter)
    lora.set_active_adapter(model, adapter)
    return lora.lora_parameters(model, adapter)


def optimizer_step(optimizer, params, *, loss, grad_clip, step, world_size=1, scaler=None):
    """The tail of every training step: average the gradients over processes, unscale them (fp16's loss scaling:
    precision.LossScaler), clip their global norm, check that the loss and the gradient are finite, step. Returns
    the gradient norm before clipping.

    A non-finite loss or gradient norm raises errors.Diverged BEFORE optimizer.step(): the weights in memory are
    still those of the last good step and nothing has been written, so no NaN ever reaches an adapter or checkpoint.
    Under fp16 an overflowing gradient is expected now and then: the scaler skips that step and lowers its scale
    (Diverged only if the scale collapses). All processes decide together (a NaN on one rank reaches every rank's
    averaged gradient anyway)."""
    distributed.all_reduce_mean_grads(params, world_size)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    loss = float(loss)
    bad_loss = distributed.any_rank(not math.isfinite(loss), world_size)
    bad_grad = distributed.any_rank(not torch.isfinite(grad_norm), world_size)
    if bad_loss or (bad_grad and (scaler is None or not scaler.enabled)):
        raise Diverged(f"step {step + 1}: the loss is {loss:.4g} and the gradient norm {grad_norm.item():.4g}: "
                       "training diverged; the step was not applied and nothing after it was saved. Likely cause: "
                       "the learning rate (--lr) is too high for this model, or the data holds extreme values")
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer, not bad_grad, step)
    return grad_norm


@contextlib.contextmanager
def lora_dropout_active(model):
    """Inside: the LoRA adapters' own dropout (--lora-dropout) is on, every other module keeps its mode. For a training
    step of a model that models.dropout_off set to no dropout at all (DPO): the policy pass of the step is regularised
    as asked, while the reference pass, evaluation and sampling stay deterministic. Run the backward inside too: a
    gradient-checkpointed block recomputes its forward there, and must draw its dropout the same way."""
    drops = [d for m in model.modules() if isinstance(m, lora.LoRALinear) for d in m.lora_dropout.values()]
    modes = [d.training for d in drops]
    for d in drops:
        d.train()
    try:
        yield model
    finally:
        for d, mode in zip(drops, modes):
            d.train(mode)


def make_optimizer(params, lr, weight_decay=0.0, betas=(0.9, 0.999)):
    """AdamW; weight decay on matrices only (never on norms, biases or heads' biases), as nanoGPT."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def lr_at(step, lr, total_steps, warmup_steps=0, min_lr_ratio=0.1):
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to lr * min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class EpochOrder:
    """One process's position in the data: the next example indices, a fresh shared permutation every epoch.

    take(k) returns the next k indices; when fewer than k are left in the epoch, the rest are dropped and the next
    epoch's order starts (epoch_order: the same on every machine, rank r taking every world_size-th index). When one
    epoch holds fewer than k indices (an RL rollout larger than its prompt file), epochs are chained: take(k) always
    returns k indices, cycling through the data, every index once before any twice.
    state_dict() / load_state_dict() let a checkpoint continue exactly here."""

    def __init__(self, n, seed, rank=0, world_size=1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.order = 0, []
        if self.epoch_length() < 1:
            raise ValueError(f"{n} examples for {world_size} processes: rank {rank} would have none")

    def epoch_length(self):
        """Indices this rank sees per epoch."""
        return len(range(self.rank, self.n, self.world_size))

    def take(self, k):
        if len(self.order) < k:
            if self.epoch_length() >= k:
                self.order = []  # the rest of this epoch is dropped
            while len(self.order) < k:
                self.order = self.order + epoch_order(self.n, self.epoch, self.seed, self.rank, self.world_size)
                self.epoch += 1
        idx, self.order = self.order[:k], self.order[k:]
        return idx

    def state_dict(self):
        return {"epoch": self.epoch, "order": list(self.order)}

    def load_state_dict(self, state):
        self.epoch, self.order = state["epoch"], list(state["order"])


def epoch_order(n, epoch, seed, rank=0, world_size=1):
    """The example indices this rank sees in `epoch`: one seeded permutation of range(n) shared by all ranks,
    rank r taking every world_size-th index starting at r (so ranks never overlap). Identical on every machine."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return order[rank::world_size]


def steps_per_epoch(n, per_step, what, fix="lower --batch-size or --grad-accum", source=None):
    """Optimizer steps in one pass over n rows (`what`, e.g. "training pairs"), the last partial step dropped; one
    InputError line, naming the data (`source`, e.g. "--data-files pairs.jsonl [train]"), when the data cannot fill a
    single step."""
    if n < per_step:
        raise InputError(f"{source + ': ' if source else ''}{n} {what} do not fill one optimizer step of {per_step}; "
                         f"{fix}, or give more data")
    return n // per_step
