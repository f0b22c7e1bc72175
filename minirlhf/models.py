"""Load one frozen base model and serve every RLHF role from it: policy, reference, reward model, value function.

The only place transformers builds a model. A base loads in float32 / bfloat16 / 8-bit / 4-bit NF4 (QLoRA, Dettmers et
al. 2023) and comes back with every parameter frozen: all training happens in LoRA adapters (`lora.py`) and small heads
(`heads.py`, re-exported here). The roles share the one trunk in memory (seed 003):
  policy     adapter "policy" active                   ->  response_logprobs, sample
  reference  no adapter, or a frozen copy "reference"  ->  `with reference(model):`  (see below)
  reward     adapter "reward" + ScalarHead/RatingHead  ->  sequence_scores
  value      adapter "policy" + ScalarHead             ->  final_hidden -> head
"""
import contextlib
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import lora
from .heads import (RatingHead, ScalarHead, final_hidden, last_token_index, load_head,  # noqa: F401 (re-exported)
                    response_logprobs, save_head, sequence_scores, trunk)

QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PAD_TOKEN = "<|pad|>"


def get_device(device="auto"):
    """torch.device: `auto` is the current CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _bf16_ok(device):
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _check_source(name_or_path, what="model"):
    """A local directory (with a config.json for a model), or something shaped like a Hub id ("org/name")."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        if what == "model" and not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ValueError(f"model directory {name_or_path!r} has no config.json (not a Hugging Face model folder)")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ValueError(f"{what} {name_or_path!r} is neither an existing local directory nor a valid Hub id") from None


def load_tokenizer(name_or_path, trust_remote_code=False):
    """AutoTokenizer with a pad token distinct from EOS.

    If pad == EOS, masking padding also masks the real EOS that ends every response, so the model never learns to stop
    and a reward read "at the last real token" can land on padding. We add "<|pad|>" instead (the caller must resize
    the embeddings: `load_model(..., tokenizer=tok)` does)."""
    _check_source(name_or_path, what="tokenizer")
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
        print(f"tokenizer {name_or_path}: added pad token {PAD_TOKEN!r} (id {tok.pad_token_id}) distinct from EOS")
    return tok


def load_model(name_or_path, quantization="none", dtype="auto", device="auto", tokenizer=None,
               gradient_checkpointing=False, trust_remote_code=False):
    """AutoModelForCausalLM from a Hub id or local folder, every parameter frozen.

    quantization: "none" | "8bit" (LLM.int8) | "4bit" (NF4 + double quantization, QLoRA Sec. 3).
    dtype: "auto" = bfloat16 on a CUDA device that supports it, else float32 (bf16 on the CPU is ~10x slower).
    The 4-bit compute dtype follows the same rule. k-bit models go through prepare_for_kbit_training."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {tuple(DTYPES)}, got {dtype!r}")
    _check_source(name_or_path)
    device = get_device(device)
    best = torch.bfloat16 if _bf16_ok(device) else torch.float32
    kwargs = dict(dtype=best if dtype == "auto" else DTYPES[dtype], trust_remote_code=trust_remote_code)
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=best)
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quantization != "none":
        kwargs["device_map"] = {"": device}  # bitsandbytes quantizes while placing the weights on their device
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if quantization == "none":
        model.to(device)
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    if quantization != "none":
        prepare_for_kbit_training(model)
    if quantization == "4bit" and device.type == "cpu":
        keep_4bit_layout_on_cpu(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def prepare_for_kbit_training(model):
    """Get a quantized base ready for LoRA training (what peft.prepare_model_for_kbit_training does, by hand).

    - freeze every base parameter (the quantized weights cannot be trained anyway);
    - keep small non-quantized float parameters (norm weights, biases: ndim <= 1) in float32, as the QLoRA code does
      for norms: RMSNorm in bf16 loses precision; embeddings and the LM head keep their dtype to save memory;
    - make the input embeddings' output require grad, so checkpointed blocks over a frozen embedding still see an
      input that needs grad and the LoRA weights inside them get gradients."""
    for p in model.parameters():
        p.requires_grad_(False)
        if p.is_floating_point() and p.ndim <= 1 and p.dtype != torch.float32:
            p.data = p.data.float()
    model.enable_input_require_grads()
    return model


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


def load_reward_model(model, path, adapter="reward"):
    """Put a reward_model/ folder written by train_reward.py on the shared base: its LoRA adapter (frozen, named
    `adapter`; the folder of a fully fine-tuned reward model has none) and its head, checked against the model's
    hidden size. Returns (adapter name or None, head); the active adapter is left as it was."""
    head = load_head(path, hidden_size=model.config.hidden_size).to(model.get_input_embeddings().weight.device)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return None, head
    lora.load_adapter(model, path, adapter=adapter)
    return adapter, head


def _numel(p):
    """Number of values a parameter stands for: a bitsandbytes Params4bit packs two 4-bit values per uint8 byte."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def count_parameters(model):
    """(trainable, total) numbers of values, counting 4-bit weights at their real (unpacked) size."""
    params = list(model.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def parameter_report(model):
    """One line, as peft's print_trainable_parameters (seed 003)."""
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
