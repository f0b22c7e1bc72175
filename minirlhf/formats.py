"""What minirlhf reads and writes on disk besides data sets: PEFT-format LoRA adapters and head files.

The math of LoRA is in lora.py and the heads in heads.py; this module only moves their tensors to and from files:
- a LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors, keys
  `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`), so peft.PeftModel.from_pretrained(base, path)
  loads what save_adapter writes and load_adapter loads what PEFT writes;
- a head as head_config.json + head.safetensors, which can sit in the same folder as an adapter (a reward_model/).
A folder is checked (folders.py) before its tensors are read, and every problem with a folder or file the user gave
is one InputError line naming the flag (or the folder) and the file, what is wrong, and what is expected. Every file
is written to a temporary name and renamed into place, so a reader sees the old file or the new one, never half of
one.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from .atomic import atomic_write_bytes, atomic_write_json
from .errors import InputError
from .folders import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_CONFIG, HEAD_WEIGHTS, check_adapter_dir, first_line,
                      read_head_config, safetensors_problem, who)
from .heads import RatingHead, ScalarHead
from .lora import check_adapter, find_targets, lora_layers, adapter_names, add_lora


# ---------------------------------------------------------------- reading tensors the user points us at
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


# ---------------------------------------------------------------- LoRA adapters in PEFT's format
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (a LoraModel) .model (the transformer)


def _atomic(path, write):
    try:
        write(tmp := f"{path}.tmp{os.getpid()}")
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:  # a full disk, a kill: no half-written temporary file is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(model, path, adapter="default"):
    """Write `adapter` as PEFT does: path/adapter_config.json + path/adapter_model.safetensors."""
    check_adapter(model, adapter)
    layers = lora_layers(model, adapter)
    m, names = layers[0][1], {n for n, _ in layers}
    short = sorted({n.rpartition(".")[2] for n in names})  # ["q_proj", "v_proj"] when that picks exactly these
    targets = short if {n for n, _ in find_targets(model, short)} == names else sorted(names)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=m.r[adapter], lora_alpha=m.lora_alpha[adapter],
                  lora_dropout=getattr(m.lora_dropout[adapter], "p", 0.0), target_modules=targets, bias="none",
                  fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
                  inference_mode=True, base_model_name_or_path=getattr(model, "name_or_path", None) or None)
    tensors = {f"{PREFIX}{n}.{ab}.weight": getattr(m, ab)[adapter].weight.detach().cpu().contiguous()
               for n, m in layers for ab in ("lora_A", "lora_B")}  # no adapter name in the key, as PEFT
    Path(path).mkdir(parents=True, exist_ok=True)
    _atomic(os.path.join(path, "adapter_model.safetensors"), lambda f: save_file(tensors, f, {"format": "pt"}))
    _atomic(os.path.join(path, "adapter_config.json"), lambda f: Path(f).write_text(json.dumps(config, indent=2)))


def load_adapter(model, path, adapter="default", trainable=False, flag=None):
    """Load a PEFT-format LoRA adapter as `adapter` (added if absent), checked against the model; frozen by default.
    A missing, broken or mismatched file is an InputError naming `flag` (e.g. "--sft-adapter") or the folder."""
    cfg, name = check_adapter_dir(path, flag), who(path, flag, "adapter folder")
    state = read_safetensors(Path(path, ADAPTER_WEIGHTS), name, f"the adapter weights written with {ADAPTER_CONFIG}")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    want = {}  # tensor name -> the shape this model needs: A (r, in), B (out, r) on every targeted module
    for n, m in find_targets(model, cfg["target_modules"]):
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
    elif sorted((n, m.r[adapter]) for n, m in lora_layers(model, adapter)) != [(n, r) for n in names]:
        raise ValueError(f"{path}: adapter {adapter!r} exists with other modules or rank; load it under a new name")
    for n, m in lora_layers(model, adapter):
        m.lora_alpha[adapter], m.scaling[adapter] = alpha, alpha / r
        for ab in ("lora_A", "lora_B"):
            w = getattr(m, ab)[adapter].weight
            w.data.copy_(state[f"{PREFIX}{n}.{ab}.weight"])
            w.requires_grad_(trainable)
    return model


# ---------------------------------------------------------------- heads
def save_head(head, path, base=None):
    """Write path/head.safetensors and path/head_config.json (kind, hidden_size, num_classes), each atomically.
    base: the precision of the base model the head was trained on, {"quantization": "none" | "8bit" | "4bit",
    "dtype": its compute dtype} (models.base_precision), recorded as "base" so that a reward model put on a base of
    another precision can say so (models.load_reward_model)."""
    kinds = {ScalarHead: "scalar", RatingHead: "rating"}
    if type(head) not in kinds:
        raise TypeError(f"save_head saves a ScalarHead or a RatingHead, got a {type(head).__name__}")
    path, kind = os.fspath(path), kinds[type(head)]
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"cannot save a head in {path!r}: it is a file, not a folder")
    config = {"kind": kind, "hidden_size": head.linear.in_features, "bias": head.linear.bias is not None,
              "num_classes": head.linear.out_features if kind == "rating" else None}
    if base is not None:
        config["base"] = {"quantization": base["quantization"], "dtype": base["dtype"]}
    state = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write_bytes(os.path.join(path, HEAD_WEIGHTS), save(state))
    atomic_write_json(os.path.join(path, HEAD_CONFIG), config)


def load_head(path, hidden_size=None, kind=None, flag=None):
    """Read a head written by save_head; if hidden_size (or kind) is given, check it matches, with a clear error.
    A missing, truncated or corrupt file is an InputError naming `flag` (e.g. "--reward-model") or the folder, and
    the file."""
    path = os.fspath(path)
    name, config = who(path, flag, "head folder"), read_head_config(path, flag)
    if kind is not None and config["kind"] != kind:
        raise InputError(f"{name}: the head there is a {config['kind']} head, expected a {kind} head")
    if hidden_size is not None and config["hidden_size"] != hidden_size:
        raise InputError(f"{name}: the {config['kind']} head in {HEAD_CONFIG} expects hidden size "
                         f"{config['hidden_size']} but the model has {hidden_size}; expected a head trained on this "
                         "base model")
    if config["kind"] == "scalar":
        head = ScalarHead(config["hidden_size"], bias=config.get("bias", True))
    else:
        head = RatingHead(config["hidden_size"], config["num_classes"])
    state = read_safetensors(os.path.join(path, HEAD_WEIGHTS), name, f"the head weights written with {HEAD_CONFIG}")
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != shapes:
        raise InputError(f"{name}: weights in {os.path.join(path, HEAD_WEIGHTS)} do not match {HEAD_CONFIG} "
                         f"(expected shapes {shapes})")
    head.load_state_dict(state)
    return head
