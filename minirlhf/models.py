"""Load one frozen base model and serve every RLHF role from it: policy, reference, reward model, value function.

The only place transformers builds a model. A base loads in float32 / bfloat16 / 8-bit / 4-bit NF4 (QLoRA, Dettmers et
al. 2023) and comes back with every parameter frozen: all training happens in LoRA adapters (`lora.py`) and small heads
(`heads.py`). Where --model comes from is hub.py's question, k-bit loading quantization.py's, the adapter and head
files formats.py's and the checks of the folders a user names folders.py's. The roles share the one trunk in memory
(the multi-adapter PPO setup):
  policy     adapter "policy" active                   ->  heads.response_logprobs, sampling.sample
  reference  no adapter, or a frozen copy "reference"  ->  `with reference(model):`  (see below)
  reward     adapter "reward" + ScalarHead/RatingHead  ->  heads.sequence_scores  (load_reward_model puts it on)
  value      adapter "policy" + ScalarHead             ->  heads.response_logprobs_and_states -> head
"""
import contextlib
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from . import lora
from .devices import get_device
from .errors import InputError
from .folders import check_reward_model_dir, read_head_config, who
from .formats import load_adapter, load_head
from .hub import check_model_source, load_cache_first, resolve_model_source
from .padding import PAD_TOKEN, VOCAB_MULTIPLE, ensure_pad_token, resize_for_tokenizer
from .precision import DTYPES, compute_dtype, resolve_dtype, set_compute_dtype
from .quantization import (QUANTIZATIONS, keep_4bit_layout_on_cpu, prepare_for_kbit_training,
                           quantize_tensor_by_tensor, show_bitsandbytes_messages_once)


def load_tokenizer(name_or_path, trust_remote_code=False, flag="--model"):
    """AutoTokenizer with a pad token distinct from EOS. Every problem with `name_or_path` is an InputError naming
    `flag` (the scripts load the tokenizer first, so this is the first check of --model; see hub.load_cache_first for
    how a Hub id is found).

    If pad == EOS, masking padding also masks the real EOS that ends every response, so the model never learns to stop
    and a reward read "at the last real token" can land on padding. padding.ensure_pad_token then reuses an unused
    token the vocabulary already has (Llama 3.1's <|finetune_right_pad_id|>, a reserved token) or adds "<|pad|>"
    (the caller must resize the embeddings: `load_model(..., tokenizer=tok)` does, to a multiple of 64)."""
    check_model_source(name_or_path, flag, "tokenizer", trust_remote_code)
    name_or_path = resolve_model_source(name_or_path, flag)
    tok = load_cache_first(AutoTokenizer.from_pretrained, name_or_path, flag, "a tokenizer",
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
    load = AutoModelForCausalLM.from_pretrained if quantization == "none" else quantize_tensor_by_tensor
    model, info = load_cache_first(load, name_or_path, flag, "a model",
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
