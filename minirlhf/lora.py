"""LoRA by hand: y = base(x) + (alpha/r) * B A dropout(x)   (Hu et al. 2021, "LoRA", Eq. 3; alpha/r in Sec. 4.1).

W (out, in) stays frozen; only A (r, in) and B (out, r) train. A is Kaiming-uniform, B is zero, so a fresh adapter
reproduces the base exactly. The base may be a bitsandbytes 4-bit NF4 or 8-bit layer (QLoRA, Dettmers et al. 2023):
the frozen base runs in its own precision, the LoRA branch in the adapter dtype (float32 over a quantized base).
Several named adapters live on one layer (nn.ModuleDicts lora_A / lora_B keyed by name, as in PEFT); one is active
at a time, or none. Rules:
- add_lora freezes every non-LoRA parameter of the model (heads too); the new adapter is trainable, earlier adapters
  keep their requires_grad; load_adapter and copy_adapter add frozen adapters unless told `trainable=True`;
- the first adapter added to a model becomes active; adding more does not change the active one (as PEFT);
- merge_lora folds one adapter into the weights and drops the layer's other adapters;
- save/load use PEFT's on-disk format, so peft.PeftModel.from_pretrained(base, path) gives the same outputs.
Shapes: `...` any leading dims, `in`/`out` the layer's features, `r` the rank.
"""
import contextlib, json, math, os, sys
from pathlib import Path
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import InputError

PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (a LoraModel) .model (the transformer)


def _bits(layer):
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
        w = self.base_layer.weight  # LoRA dtype: float32 over a quantized or float32 base, else the base dtype
        dtype = torch.float32 if _bits(self.base_layer) or not w.is_floating_point() else w.dtype
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)  # A: (r, in)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)  # B: (out, r)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # as PEFT
        nn.init.zeros_(self.lora_B[name].weight)  # B = 0: B A = 0 at the start
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, alpha / r
        self.train(self.training)  # the new dropout follows the layer's train/eval mode

    def forward(self, x):  # x: (..., in)
        y = self.base_layer(x)  # (..., out), in the base's own precision
        if self.active not in self.lora_A:
            return y
        A, B = self.lora_A[self.active], self.lora_B[self.active]
        x = self.lora_dropout[self.active](x.to(A.weight.dtype))
        return y + (B(A(x)) * self.scaling[self.active]).to(y.dtype)  # (..., in) -> (..., r) -> (..., out)


def _layers(model, adapter=None):
    """(name, LoRALinear) pairs, only those holding `adapter` when it is given."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and (adapter is None or adapter in m.lora_A)]


def adapter_names(model):
    return sorted({a for _, m in _layers(model) for a in m.lora_A})


def _check(model, adapter):
    if adapter not in adapter_names(model):
        raise ValueError(f"unknown adapter {adapter!r}; the model has {adapter_names(model)}")


def active_adapter(model):
    return next((m.active for _, m in _layers(model)), None)


def set_active_adapter(model, name):
    """Make `name` the active adapter of every LoRA layer; None disables them all (the base model)."""
    if name is not None:
        _check(model, name)
    for _, m in _layers(model):
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
    _check(model, adapter)
    return [d[adapter].weight for _, m in _layers(model, adapter) for d in (m.lora_A, m.lora_B)]


def _find_targets(model, target_modules):
    """Linears named t or ending in '.t' for t in target_modules, or "all-linear": every linear but the LM head."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inner = {id(c) for _, m in _layers(model) for c in m.modules() if c is not m}  # base_layer, lora_A/B themselves

    def hit(n, m):
        if names == ["all-linear"]:
            return m is not head and getattr(m, "base_layer", None) is not head
        return any(n == t or n.endswith("." + t) for t in names)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LoRALinear)) and id(m) not in inner and hit(n, m)]


def add_lora(model, target_modules, r, alpha, dropout=0.0, adapter="default"):
    """Add adapter `adapter` to the targeted linears (wrapping them in LoRALinear if needed); freeze all but LoRA."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if adapter in adapter_names(model):
        raise ValueError(f"adapter {adapter!r} already exists; pick another name")
    targets = _find_targets(model, target_modules)
    if not targets:
        raise ValueError(f"no linear module matches target_modules={target_modules!r}")
    active = active_adapter(model) if adapter_names(model) else adapter  # the first adapter becomes active
    for name, m in targets:
        if not isinstance(m, LoRALinear):
            parent, _, leaf = name.rpartition(".")
            m = LoRALinear(m)
            setattr(model.get_submodule(parent), leaf, m)
        m.add_adapter(adapter, r, alpha, dropout)  # new A, B: requires_grad=True
    lora = {id(p) for _, m in _layers(model) for p in [*m.lora_A.parameters(), *m.lora_B.parameters()]}
    for p in model.parameters():
        if id(p) not in lora:
            p.requires_grad_(False)  # the base, and anything else that is not LoRA
    set_active_adapter(model, active)
    return model


def copy_adapter(model, src, dst, trainable=False):
    """Add adapter `dst` equal to `src` (same r, alpha, weights); frozen unless `trainable` (the PPO reference)."""
    _check(model, src)
    if dst in adapter_names(model):
        raise ValueError(f"adapter {dst!r} already exists; pick another name")
    for _, m in _layers(model, src):
        m.add_adapter(dst, m.r[src], m.lora_alpha[src], getattr(m.lora_dropout[src], "p", 0.0))
        for d in (m.lora_A, m.lora_B):
            d[dst].weight.data.copy_(d[src].weight.data)
            d[dst].weight.requires_grad_(trainable)
    return model


def merge_lora(model, adapter):
    """W <- W + (alpha/r) B A in each layer holding `adapter`; the LoRALinear becomes its plain merged Linear."""
    _check(model, adapter)
    layers = _layers(model, adapter)
    for name, m in layers:  # refuse before touching anything
        if _bits(m.base_layer):
            raise ValueError(f"cannot merge into a {_bits(m.base_layer)}-bit base ({name}); "
                             "load the base in float32/bfloat16 to merge")
    for name, m in layers:
        base, A, B = m.base_layer, m.lora_A[adapter].weight, m.lora_B[adapter].weight
        with torch.no_grad():
            base.weight += (m.scaling[adapter] * (B @ A)).to(base.weight.dtype)  # (out, r) @ (r, in) -> (out, in)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, base)  # the layer's other adapters are dropped
    return model


def _atomic(path, write):
    write(tmp := f"{path}.tmp{os.getpid()}")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def save_adapter(model, path, adapter="default"):
    """Write `adapter` as PEFT does: path/adapter_config.json + path/adapter_model.safetensors."""
    _check(model, adapter)
    layers = _layers(model, adapter)
    m, names = layers[0][1], {n for n, _ in layers}
    short = sorted({n.rpartition(".")[2] for n in names})  # ["q_proj", "v_proj"] when that picks exactly these
    targets = short if {n for n, _ in _find_targets(model, short)} == names else sorted(names)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=m.r[adapter], lora_alpha=m.lora_alpha[adapter],
                  lora_dropout=getattr(m.lora_dropout[adapter], "p", 0.0), target_modules=targets, bias="none",
                  fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
                  inference_mode=True, base_model_name_or_path=getattr(model, "name_or_path", None) or None)
    tensors = {f"{PREFIX}{n}.{ab}.weight": getattr(m, ab)[adapter].weight.detach().cpu().contiguous()
               for n, m in layers for ab in ("lora_A", "lora_B")}  # no adapter name in the key, as PEFT
    Path(path).mkdir(parents=True, exist_ok=True)
    _atomic(os.path.join(path, "adapter_model.safetensors"), lambda f: save_file(tensors, f, {"format": "pt"}))
    _atomic(os.path.join(path, "adapter_config.json"), lambda f: Path(f).write_text(json.dumps(config, indent=2)))


# ---------------------------------------------------------------- reading files the user points us at
# Every problem with a folder or file the user gave is one InputError line naming the flag (or the folder) and the
# file, what is wrong, and what is expected: never a KeyError, JSONDecodeError or safetensors traceback.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FOLDER = ("a LoRA adapter folder (adapter_config.json + adapter_model.safetensors, PEFT's format) as "
                  "train_sft.py writes in runs/sft/adapter")


def who(path, flag=None, noun="folder"):
    """How a message names what the user gave: "--sft-adapter 'runs/x'", or "adapter folder 'runs/x'" without a flag."""
    return f"{flag} {os.fspath(path)!r}" if flag else f"{noun} {os.fspath(path)!r}"


def first_line(error):
    """The first non-empty line of an exception's message (library messages run over several lines)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def read_json_object(file, name, expected):
    """The JSON object in `file`, or InputError "<name>: <file> is not valid JSON (line 1: ...); expected <expected>"
    (and for a missing or unreadable file, or JSON that is not an object)."""
    file = os.fspath(file)
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{name}: {file} is missing; expected {expected}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{name}: {file} is not valid JSON (line {e.lineno}: {e.msg}); expected {expected}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{name}: cannot read {file} ({first_line(e)}); expected {expected}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{name}: {file} holds a JSON {type(obj).__name__}, not an object; expected {expected}")
    return obj


def safetensors_problem(file):
    """None if `file` is a whole safetensors file, else what is wrong with it ("is missing", "is empty (0 bytes)",
    "is truncated or corrupt (...)", "holds no tensors"). Reads the header only (safetensors checks that it parses
    and that the tensors it lists cover the file exactly), so it is cheap for a multi-GB model file. A file of the
    right size whose tensor bytes were overwritten cannot be told from a good one (safetensors has no checksum)."""
    try:
        size = os.path.getsize(file)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({first_line(e)})"
    if os.path.isdir(file):
        return "is a folder, not a file"
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with safe_open(os.fspath(file), "pt") as f:
            if not list(f.keys()):
                return "holds no tensors"
    except (SafetensorError, OSError, ValueError) as e:
        return f"is truncated or corrupt (safetensors: {first_line(e)})"
    return None


def read_safetensors(file, name, expected):
    """load_file(file) on the CPU, or InputError "<name>: <file> <problem>; expected <expected>" when the file is
    missing, empty, truncated or corrupt, or holds NaN / inf (a diverged run's weights would score everything NaN)."""
    file = os.fspath(file)
    problem = safetensors_problem(file)
    if problem is None:
        try:
            state = load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            problem = f"is truncated or corrupt (safetensors: {first_line(e)})"
        else:
            bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
            if bad is None:
                return state
            problem = f"holds NaN or inf values (tensor {bad!r})"
    raise InputError(f"{name}: {file} {problem}; expected {expected}")


def _subfolders_with(path, marker):
    """path/x for each direct subfolder x holding `marker`, for "did you mean" hints."""
    try:
        return [os.path.join(path, d) for d in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, d, marker))]
    except OSError:
        return []


def check_adapter_dir(path, flag=None):
    """Check a LoRA adapter folder BEFORE any model is loaded (the scripts' validation: `check_adapter_dir(
    args.sft_adapter, "--sft-adapter")`): it exists, adapter_config.json is a plain-LoRA PEFT config (r, lora_alpha,
    target_modules), adapter_model.safetensors is a whole safetensors file (header only). Returns the config.
    InputError naming `flag` (or the folder) and the first missing or broken file otherwise."""
    name = who(path, flag, "adapter folder")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{name}: no such folder; expected {ADAPTER_FOLDER}")
    if not os.path.isdir(path):
        raise InputError(f"{name}: is a file, not a folder; expected {ADAPTER_FOLDER}")
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        inner = _subfolders_with(path, ADAPTER_CONFIG)
        full = os.path.isfile(os.path.join(path, "config.json"))
        hint = (f" (did you mean {inner[0]!r}?)" if inner else
                " (it holds a full model, not an adapter: pass it as --model instead)" if full else "")
        raise InputError(f"{name}: no {ADAPTER_CONFIG} in it{hint}; expected {ADAPTER_FOLDER}")
    cfg = read_json_object(os.path.join(path, ADAPTER_CONFIG), name, f"the {ADAPTER_CONFIG} that save_adapter or "
                           "PEFT writes")
    if cfg.get("peft_type") != "LORA" or cfg.get("bias", "none") != "none" or any(
            cfg.get(k) for k in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")):
        raise InputError(f"{name}: only plain LoRA adapters load here (no DoRA, rsLoRA, rank patterns or bias); "
                         f"{ADAPTER_CONFIG} has peft_type={cfg.get('peft_type')!r}")
    r, alpha, targets, dropout = (cfg.get(k) for k in ("r", "lora_alpha", "target_modules", "lora_dropout"))
    number = (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool))
    if not (number(r) and isinstance(r, int) and r > 0 and number(alpha) and targets
            and isinstance(targets, (str, list)) and (dropout is None or number(dropout) and 0 <= dropout < 1)):
        raise InputError(f"{name}: {os.path.join(path, ADAPTER_CONFIG)} needs r (an int > 0), lora_alpha (a number), "
                         f"target_modules (module names) and lora_dropout in [0, 1); got r={r!r}, lora_alpha={alpha!r}"
                         f", target_modules={targets!r}, lora_dropout={dropout!r}")
    problem = safetensors_problem(os.path.join(path, ADAPTER_WEIGHTS))
    if problem:
        raise InputError(f"{name}: {os.path.join(path, ADAPTER_WEIGHTS)} {problem}; expected the adapter weights "
                         f"written with {ADAPTER_CONFIG} (save or copy the adapter again)")
    return cfg


def load_adapter(model, path, adapter="default", trainable=False, flag=None):
    """Load a PEFT-format LoRA adapter as `adapter` (added if absent), checked against the model; frozen by default.
    A missing, broken or mismatched file is an InputError naming `flag` (e.g. "--sft-adapter") or the folder."""
    cfg, name = check_adapter_dir(path, flag), who(path, flag, "adapter folder")
    state = read_safetensors(Path(path, ADAPTER_WEIGHTS), name, f"the adapter weights written with {ADAPTER_CONFIG}")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    want = {}  # tensor name -> the shape this model needs: A (r, in), B (out, r) on every targeted module
    for n, m in _find_targets(model, cfg["target_modules"]):
        want[f"{PREFIX}{n}.lora_A.weight"], want[f"{PREFIX}{n}.lora_B.weight"] = (r, m.in_features), (m.out_features, r)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:  # one check covers unknown modules, missing modules, a wrong r and wrong layer sizes
        bad = [(k, got.get(k), want.get(k)) for k in sorted(got.keys() | want.keys()) if got.get(k) != want.get(k)]
        raise InputError(f"{name}: does not fit this model (r={r}, target_modules={cfg['target_modules']}); "
                         f"(tensor, shape in file, shape wanted): {bad[:2]}; expected an adapter trained on this "
                         "base model")
    names = sorted(k[len(PREFIX):].rsplit(".", 2)[0] for k in state if k.endswith("lora_A.weight"))
    if adapter not in adapter_names(model):
        add_lora(model, names, r, alpha, cfg.get("lora_dropout", 0.0), adapter)
    elif sorted((n, m.r[adapter]) for n, m in _layers(model, adapter)) != [(n, r) for n in names]:
        raise ValueError(f"{path}: adapter {adapter!r} exists with other modules or rank; load it under a new name")
    for n, m in _layers(model, adapter):
        m.lora_alpha[adapter], m.scaling[adapter] = alpha, alpha / r
        for ab in ("lora_A", "lora_B"):
            w = getattr(m, ab)[adapter].weight
            w.data.copy_(state[f"{PREFIX}{n}.{ab}.weight"])
            w.requires_grad_(trainable)
    return model
