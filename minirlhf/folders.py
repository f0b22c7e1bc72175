"""Cheap checks of the folders and files a user names (--model, --sft-adapter, --reward-model), run by the scripts'
validation before any model is loaded: each folder holds the files it should, JSON that parses with the fields each
file needs, and safetensors files whose headers are whole (headers only: cheap for a multi-GB model).

Every problem with a folder or file the user gave is one InputError line naming the flag (or the folder) and the
file, what is wrong, and what is expected: never a KeyError, JSONDecodeError or safetensors traceback. The names of
the files each folder holds are here too; formats.py reads and writes the tensors in them.
"""
import json
import os

from safetensors import SafetensorError, safe_open

from .errors import InputError


# ---------------------------------------------------------------- naming what the user gave, reading its files
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


def _subfolders_with(path, marker):
    """path/x for each direct subfolder x holding `marker`, for "did you mean" hints."""
    try:
        return [os.path.join(path, d) for d in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, d, marker))]
    except OSError:
        return []


# ---------------------------------------------------------------- LoRA adapter folders (PEFT's format)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FOLDER = ("a LoRA adapter folder (adapter_config.json + adapter_model.safetensors, PEFT's format) as "
                  "train_sft.py writes in runs/sft/adapter")


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


# ---------------------------------------------------------------- head folders
HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head_config.json"
HEAD_FILES = f"{HEAD_CONFIG} + {HEAD_WEIGHTS}, as save_head writes (train_reward.py: runs/reward/reward_model)"


def read_head_config(path, flag=None):
    """head_config.json of a head folder, checked: kind scalar|rating, hidden_size an int > 0, num_classes an int >= 2
    for a rating head, bias a bool, and base (optional: without it there is no precision check) an object of two
    strings, quantization and dtype. InputError naming `flag` (or the folder) and the file otherwise. Cheap: for the
    scripts' validation before any model is loaded (check_reward_model_dir)."""
    path = os.fspath(path)
    name, file = who(path, flag, "head folder"), os.path.join(path, HEAD_CONFIG)
    if not os.path.isfile(file):
        raise InputError(f"{name}: no {HEAD_CONFIG} in it: not a saved head; expected {HEAD_FILES}")
    config = read_json_object(file, name, f"the {HEAD_CONFIG} that save_head writes")
    kind, hidden, classes = config.get("kind"), config.get("hidden_size"), config.get("num_classes")
    positive = (lambda x, least: isinstance(x, int) and not isinstance(x, bool) and x >= least)
    if kind not in ("scalar", "rating"):
        raise InputError(f"{name}: unknown head kind {kind!r} in {file}; expected \"scalar\" or \"rating\"")
    if not positive(hidden, 1) or (kind == "rating" and not positive(classes, 2)) or not isinstance(
            config.get("bias", True), bool):
        raise InputError(f"{name}: {file} needs hidden_size (an int > 0), bias (true/false) and, for a rating head, "
                         f"num_classes (an int >= 2); got hidden_size={hidden!r}, bias={config.get('bias')!r}, "
                         f"num_classes={classes!r}")
    base = config.get("base")
    if base is not None and not (isinstance(base, dict) and all(isinstance(base.get(k), str)
                                                                for k in ("quantization", "dtype"))):
        raise InputError(f"{name}: {file} has base={base!r}; expected the precision of the base model the head was "
                         'trained on, e.g. {"quantization": "4bit", "dtype": "float32"}, or no base at all')
    return config


# ---------------------------------------------------------------- model and reward-model folders
MODEL_FOLDER = ("a Hugging Face model folder (config.json + model.safetensors, as save_pretrained writes) or a Hub id "
                "(org/name)")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
REWARD_FOLDER = ("a reward_model/ folder written by train_reward.py (e.g. runs/reward/reward_model): "
                 "adapter_config.json + adapter_model.safetensors + head_config.json + head.safetensors, or "
                 "config.json + model.safetensors + the head files for a fully fine-tuned one")


def check_model_config(path, flag="--model", trust_remote_code=False):
    """The config.json of a local model folder: a JSON object with a model_type this transformers knows. Returns it;
    InputError naming `flag` and the file otherwise."""
    name, file = who(path, flag), os.path.join(path, "config.json")
    if not os.path.isfile(file):
        hint = (" (it holds a LoRA adapter: pass its base model as --model, and this folder as --sft-adapter or "
                "--reward-model)" if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) else "")
        raise InputError(f"{name}: the folder has no config.json, so it is not a Hugging Face model folder{hint}; "
                         f"expected {MODEL_FOLDER}")
    config = read_json_object(file, name, "the config.json that save_pretrained writes")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InputError(f'{name}: {file} has no "model_type" (e.g. "llama"); expected the config.json that '
                         "save_pretrained writes")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in config):
        remote = " (or, as it brings its own code in auto_map, trust_remote_code)" if "auto_map" in config else ""
        raise InputError(f"{name}: {file} has model_type {model_type!r}, which transformers "
                         f"{transformers.__version__} does not know; expected one of its architectures (llama, "
                         f"qwen2, mistral, gpt2, ...){remote}, or a newer transformers")
    return config


def _weights_problem(path, name):
    """(file, problem) for the weights transformers would load from folder `path`, or None when they look whole
    (headers only: cheap for a multi-GB model). Its order: model.safetensors, a sharded index, pytorch_model.bin."""
    for weights in WEIGHT_FILES:
        file = os.path.join(path, weights)
        if not os.path.exists(file):
            continue
        if weights.endswith(".index.json"):
            index = read_json_object(file, name, f"the {weights} that save_pretrained writes")
            shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(
                index.get("weight_map"), dict) else []
            if not shards:
                return file, "lists no weight files (no weight_map)"
            files = [os.path.join(path, shard) for shard in shards]
        else:
            files = [file]
        for f in files:
            if f.endswith(".safetensors"):
                problem = safetensors_problem(f)
            else:
                problem = "is missing" if not os.path.isfile(f) else "is empty (0 bytes)" if not os.path.getsize(f) \
                    else None
            if problem:
                return f, problem
        return None
    return path, "holds no model weights (no model.safetensors, model.safetensors.index.json or pytorch_model.bin)"


def check_model_dir(path, flag="--model", trust_remote_code=False):
    """Check a local model folder BEFORE loading it: it exists, config.json is valid (check_model_config) and its
    weights are whole (safetensors headers: not missing, empty, truncated or corrupt). Returns the config.
    InputError naming `flag` and the first missing or broken file otherwise."""
    name, path = who(path, flag), os.fspath(path)
    if not os.path.isdir(path):
        raise InputError(f"{name}: " + ("is a file, not a folder" if os.path.exists(path) else "no such folder")
                         + f"; expected {MODEL_FOLDER}")
    config = check_model_config(path, flag, trust_remote_code)
    bad = _weights_problem(path, name)
    if bad:
        file, problem = bad
        expected = MODEL_FOLDER if file == path else "the weights save_pretrained wrote (copy or download them again)"
        raise InputError(f"{name}: {file} {problem}; expected {expected}")
    return config


def check_reward_model_dir(path, flag="--reward-model"):
    """Check a reward_model/ folder written by train_reward.py BEFORE any model is loaded (the scripts' validation).

    Needs head_config.json + head.safetensors, and what the head reads: a LoRA adapter (adapter_config.json +
    adapter_model.safetensors) or, for a fully fine-tuned reward model, the model itself (config.json + weights). A
    folder with a head but neither is refused: the head alone on the bare base scores with the wrong model. File
    contents are checked too (JSON, the head's fields, safetensors headers: missing, empty, truncated, corrupt).
    Returns "adapter" or "full"; InputError naming `flag` and the first missing or broken file otherwise."""
    name, path = who(path, flag), os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{name}: not a reward model folder (no such folder); expected {REWARD_FOLDER}")
    if not os.path.isdir(path):
        raise InputError(f"{name}: not a reward model folder (it is a file); expected {REWARD_FOLDER}")
    if not os.path.isfile(os.path.join(path, HEAD_CONFIG)):
        inner = [os.path.join(path, d) for d in sorted(os.listdir(path))
                 if os.path.isfile(os.path.join(path, d, HEAD_CONFIG))]
        hint = f" (did you mean {inner[0]!r}?)" if inner else ""
        raise InputError(f"{name}: not a reward model folder (no {HEAD_CONFIG} in it{hint}); expected {REWARD_FOLDER}")
    read_head_config(path, flag)
    problem = safetensors_problem(os.path.join(path, HEAD_WEIGHTS))
    if problem:
        raise InputError(f"{name}: {os.path.join(path, HEAD_WEIGHTS)} {problem}; expected the head weights written "
                         f"with {HEAD_CONFIG} (train the reward model again or copy the whole folder)")
    if any(os.path.exists(os.path.join(path, f)) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)):
        if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            raise InputError(f"{name}: no {ADAPTER_CONFIG} beside {ADAPTER_WEIGHTS}; expected {REWARD_FOLDER}")
        check_adapter_dir(path, flag)
        return "adapter"
    if os.path.isfile(os.path.join(path, "config.json")):
        check_model_dir(path, flag)
        return "full"
    raise InputError(f"{name}: no {ADAPTER_CONFIG} in it: it holds a head ({HEAD_CONFIG}, {HEAD_WEIGHTS}) but "
                     f"neither the LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) nor the fully fine-tuned model "
                     f"(config.json + model.safetensors) that the head reads; expected {REWARD_FOLDER}")
