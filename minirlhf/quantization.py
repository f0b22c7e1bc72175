"""A base quantized to 8-bit (LLM.int8) or 4-bit (NF4, QLoRA) with bitsandbytes: loaded tensor by tensor so that its
peak memory stays below the float load's, made ready for LoRA training, and kept clear of bitsandbytes' CPU quirks
(a 4-bit weight repacked under the run, wrong dequantization of short rows, a log line at every call).
"""
import contextlib
import ctypes
import json
import logging
import os

import torch
from transformers import AutoModelForCausalLM

from .hub import cached_snapshot


QUANTIZATIONS = ("none", "8bit", "4bit")


def quantize_tensor_by_tensor(name_or_path, **kwargs):
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
    folder = name_or_path if os.path.isdir(name_or_path) else cached_snapshot(name_or_path)
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
