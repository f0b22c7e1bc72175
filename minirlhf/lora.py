"""LoRA by hand: y = base(x) + (alpha/r) * B A dropout(x)   (Hu et al. 2021, "LoRA", Eq. 3; alpha/r in Sec. 4.1).

W (out, in) stays frozen; only A (r, in) and B (out, r) train. A is Kaiming-uniform, B is zero, so a fresh adapter
reproduces the base exactly. The base may be a bitsandbytes 4-bit NF4 or 8-bit layer (QLoRA, Dettmers et al. 2023):
the frozen base runs in its own precision. Adapters are always created in float32, whatever the base's dtype: they are
what AdamW updates, and an update of lr·grad ≈ 1e-5 of a weight rounds away in bfloat16 (precision.py); under
autocast their matmuls still run in the 16-bit compute dtype.
Several named adapters live on one layer (nn.ModuleDicts lora_A / lora_B keyed by name, as in PEFT); one is active
at a time, or none. Rules:
- add_lora freezes every non-LoRA parameter of the model (heads too); the new adapter is trainable, earlier adapters
  keep their requires_grad; copy_adapter (and formats.load_adapter) add frozen adapters unless told `trainable=True`;
- the first adapter added to a model becomes active; adding more does not change the active one (as PEFT);
- merge_lora folds one adapter into the weights and drops the layer's other adapters;
- saving and loading adapters (PEFT's on-disk format) is formats.py's job: no file is read or written here.
Shapes: `...` any leading dims, `in`/`out` the layer's features, `r` the rank.
"""
import contextlib, math, sys
import torch
import torch.nn as nn


def quantized_bits(layer):
    """4 or 8 for a bitsandbytes Linear4bit / Linear8bitLt (both subclass nn.Linear), else None. bitsandbytes is only
    imported when something else already loaded it (a k-bit model did): no quantized layer can exist otherwise, and
    importing it costs seconds at every start."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    return next((bits for cls, bits in ((bnb.nn.Linear4bit, 4), (bnb.nn.Linear8bitLt, 8)) if isinstance(layer, cls)),
                None)


class LoRALinear(nn.Module):
    """A linear-like `base_layer` plus named low-rank adapters; `active` names the one in use (None: base only)."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer, self.active, self.training = base_layer, None, base_layer.training  # eval stays eval
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r, self.lora_alpha, self.scaling = {}, {}, {}

    def add_adapter(self, name, r, alpha, dropout=0.0):
        w = self.base_layer.weight  # float32 adapters over a 16-bit or quantized base (float64 stays: the tests)
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)  # A: (r, in)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)  # B: (out, r)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # as PEFT
        nn.init.zeros_(self.lora_B[name].weight)  # B = 0: B A = 0 at the start
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, alpha / r
        self.train(self.training)  # the new dropout follows the layer's train/eval mode

    def merged_weight(self, name):
        """(out, in): W + (alpha/r) B A of adapter `name`, in the base weight's dtype: the one weight that computes what
        the layer computes with that adapter (merge_lora writes it into the layer; the sampler's fast/decode.py
        uses it)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
        W = self.base_layer.weight
        return W + (self.scaling[name] * (B @ A)).to(W.dtype)  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x):  # x: (..., in)
        y = self.base_layer(x)  # (..., out), in the base's own precision
        if self.active not in self.lora_A:
            return y
        A, B = self.lora_A[self.active], self.lora_B[self.active]
        if not torch.is_autocast_enabled(x.device.type):  # (under autocast the matmuls cast for themselves)
            x = x.to(A.weight.dtype)
        x = self.lora_dropout[self.active](x)
        # scaled at rank r, not at the output's width: (alpha/r)·B(Ax) = B((alpha/r)·Ax), r/out of the multiplications
        # (bit for bit the same when alpha/r is a power of two, as every default here: 2)
        return y + B(A(x) * self.scaling[self.active]).to(y.dtype)  # (..., in) -> (..., r) -> (..., out)


def lora_layers(model, adapter=None):
    """(name, LoRALinear) pairs, only those holding `adapter` when it is given."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and (adapter is None or adapter in m.lora_A)]


def adapter_names(model):
    return sorted({a for _, m in lora_layers(model) for a in m.lora_A})


def check_adapter(model, adapter):
    """ValueError naming the adapters the model has, unless it has `adapter`."""
    if adapter not in adapter_names(model):
        raise ValueError(f"unknown adapter {adapter!r}; the model has {adapter_names(model)}")


def active_adapter(model):
    return next((m.active for _, m in lora_layers(model)), None)


def set_active_adapter(model, name):
    """Make `name` the active adapter of every LoRA layer; None disables them all (the base model)."""
    if name is not None:
        check_adapter(model, name)
    for _, m in lora_layers(model):
        m.active = name


@contextlib.contextmanager
def use_adapter(model, name):
    """Run with adapter `name` active (None: none); the previous choice comes back on exit, so these nest."""
    previous = active_adapter(model)
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        set_active_adapter(model, previous)


def adapters_disabled(model):
    """The exact base model, every LoRA branch skipped (the reference when the policy is an adapter)."""
    return use_adapter(model, None)


def lora_parameters(model, adapter):
    """A and B of one adapter across the model, e.g. torch.optim.AdamW(lora_parameters(model, "policy"))."""
    check_adapter(model, adapter)
    return [d[adapter].weight for _, m in lora_layers(model, adapter) for d in (m.lora_A, m.lora_B)]


def find_targets(model, target_modules):
    """Linears named t or ending in '.t' for t in target_modules, or "all-linear": every linear but the LM head."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inner = {id(c) for _, m in lora_layers(model) for c in m.modules() if c is not m}  # base_layer, lora_A/B themselves

    def hit(n, m):
        if names == ["all-linear"]:
            return m is not head and getattr(m, "base_layer", None) is not head
        return any(n == t or n.endswith("." + t) for t in names)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LoRALinear)) and id(m) not in inner and hit(n, m)]


def targets_problem(model, target_modules, name="the model"):
    """Why `target_modules` cannot be adapted in `model` (None when every entry matches a linear module): each entry
    must match at least one, "all-linear" needs one besides the LM head. Used on the meta-device skeleton before
    anything loads (validation.check_lora_targets) and by add_lora."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    missing = [t for t in names if not find_targets(model, [t])]
    if not missing:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    leaves = list(dict.fromkeys(n.rpartition(".")[2] for n, m in model.named_modules()
                                if isinstance(m, nn.Linear) and m is not head and "lora_" not in n))
    have = (f"its linear modules end in {', '.join(leaves)} (or pass all-linear)" if leaves
            else "it has no linear module besides its LM head")
    return f"{' '.join(missing)} match{'es' if len(missing) == 1 else ''} no linear module of {name}: {have}"


def add_lora(model, target_modules, r, alpha, dropout=0.0, adapter="default"):
    """Add adapter `adapter` to the targeted linears (wrapping them in LoRALinear if needed); freeze all but LoRA."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if adapter in adapter_names(model):
        raise ValueError(f"adapter {adapter!r} already exists; pick another name")
    problem = targets_problem(model, target_modules)
    if problem:
        raise ValueError(f"target_modules {problem}")
    targets = find_targets(model, target_modules)
    active = active_adapter(model) if adapter_names(model) else adapter  # the first adapter becomes active
    for name, m in targets:
        if not isinstance(m, LoRALinear):
            parent, _, leaf = name.rpartition(".")
            m = LoRALinear(m)
            setattr(model.get_submodule(parent), leaf, m)
        m.add_adapter(adapter, r, alpha, dropout)  # new A, B: requires_grad=True
    lora = {id(p) for _, m in lora_layers(model) for p in [*m.lora_A.parameters(), *m.lora_B.parameters()]}
    for p in model.parameters():
        if id(p) not in lora:
            p.requires_grad_(False)  # the base, and anything else that is not LoRA
    set_active_adapter(model, active)
    return model


def copy_adapter(model, src, dst, trainable=False):
    """Add adapter `dst` equal to `src` (same r, alpha, weights); frozen unless `trainable` (the PPO reference)."""
    check_adapter(model, src)
    if dst in adapter_names(model):
        raise ValueError(f"adapter {dst!r} already exists; pick another name")
    for _, m in lora_layers(model, src):
        m.add_adapter(dst, m.r[src], m.lora_alpha[src], getattr(m.lora_dropout[src], "p", 0.0))
        for d in (m.lora_A, m.lora_B):
            d[dst].weight.data.copy_(d[src].weight.data)
            d[dst].weight.requires_grad_(trainable)
    return model


def merge_lora(model, adapter):
    """W <- W + (alpha/r) B A in each layer holding `adapter`; the LoRALinear becomes its plain merged Linear."""
    check_adapter(model, adapter)
    layers = lora_layers(model, adapter)
    for name, m in layers:  # refuse before touching anything
        if quantized_bits(m.base_layer):
            raise ValueError(f"cannot merge into a {quantized_bits(m.base_layer)}-bit base ({name}); "
                             "load the base in float32/bfloat16 to merge")
    for name, m in layers:
        base = m.base_layer
        with torch.no_grad():
            base.weight.copy_(m.merged_weight(adapter))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, base)  # the layer's other adapters are dropped
    return model
