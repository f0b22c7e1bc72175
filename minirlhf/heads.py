"""What we read off the shared trunk's final hidden states: token log-probs (the LM head) and scalar / rating heads.

Legend: B batch, T tokens (prompt + response), H hidden size, V vocab, K rating classes, N response tokens in a batch.
Two padding traps live here, and both are handled by looking at the attention mask, never at token ids:
- position ids come from the mask (cumsum - 1), so a left-padded prompt starts at position 0 like an unpadded one;
- a sequence's score is read at its LAST REAL token (`last_token_index`), never at a padding slot, on either side.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save

from .checkpoint import atomic_write_bytes, atomic_write_json
from .errors import InputError
from .lora import read_json_object, read_safetensors, who
from .ops import entropy_from_logits, gather_logprobs


def trunk(model):
    """The decoder stack without the LM head, e.g. LlamaForCausalLM.model."""
    return getattr(model, model.base_model_prefix)


def position_ids_from_mask(attention_mask):
    """(B, T) -> (B, T): 0, 1, 2, ... over the real tokens; padding slots get 0 (they are masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def final_hidden(model, input_ids, attention_mask):
    """(B, T) token ids -> (B, T, H) final hidden states of the trunk (after its last norm)."""
    out = trunk(model)(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def last_token_index(attention_mask):
    """(B, T) -> (B,): position of the last real token of each row, whether the padding is on the left or the right."""
    if not attention_mask.bool().any(-1).all():
        raise ValueError("attention_mask has a row with no real token")
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return (positions * attention_mask.bool()).argmax(-1)  # (B,) the largest position whose mask is set


def response_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0, return_entropy=False):
    """log π(token_t | tokens_<t) at every response token, under softmax(logits / temperature).

    input_ids, attention_mask, response_mask: (B, T), prompt + response, any padding side. Returns (B, T) aligned with
    input_ids (0 where response_mask is 0), and with return_entropy also the (B, T) entropy of that distribution
    (detached: for logging).
    The trunk runs once over all tokens; the LM head runs only at the N positions that predict a response token, so
    prompt positions never build a (B, T, V) tensor. The temperature must be the sampler's, or the PPO ratio is off.
    Assumes logits = get_output_embeddings()(hidden) (true for Llama, Qwen, Mistral, SmolLM; not for soft-capped or
    scaled logits, e.g. Gemma 2)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if response_mask[:, 0].bool().any():
        raise ValueError("response_mask is set on the first token, which has no context to predict it from")
    hidden = final_hidden(model, input_ids, attention_mask)  # (B, T, H)
    # Shift: the hidden state at position t predicts token t+1, so token t is scored from hidden[t-1].
    predicts = response_mask[:, 1:].bool()  # (B, T-1): True where hidden[t] predicts a response token t+1
    logits = model.get_output_embeddings()(hidden[:, :-1][predicts])  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 -> fp32 for softmax
    logprobs = gather_logprobs(logits, input_ids[:, 1:][predicts])  # (N,)

    def to_grid(values):  # (N,) -> (B, T): put back at the token's own position, 0 elsewhere
        grid = torch.zeros(predicts.shape, dtype=values.dtype, device=values.device).masked_scatter(predicts, values)
        return F.pad(grid, (1, 0))  # (B, T-1) -> (B, T): position 0 is never a response token

    if return_entropy:  # for logging: detached, so the (N, V) softmax intermediates are not kept for backward
        return to_grid(logprobs), to_grid(entropy_from_logits(logits.detach()))
    return to_grid(logprobs)


def response_logprobs_and_states(model, input_ids, attention_mask, response_mask, temperature=1.0):
    """One trunk pass for PPO's policy AND value: (logprobs, entropy, states), aligned with input_ids.

    logprobs, entropy (B, T): as response_logprobs(..., return_entropy=True) (the entropy is detached: PPO here has
    no entropy bonus, and its graph would hold three (N, V) tensors until backward). states (B, T, H): states[:, t] is the
    hidden state that PREDICTS token t (the trunk's output at t - 1: the state s_t in which action t is chosen), so a
    value head on it gives V(s_t) on the same grid as the log-probs; states[:, 0] is zeros (no state predicts it)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if response_mask[:, 0].bool().any():
        raise ValueError("response_mask is set on the first token, which has no context to predict it from")
    hidden = final_hidden(model, input_ids, attention_mask)  # (B, T, H)
    states = F.pad(hidden[:, :-1], (0, 0, 1, 0))  # (B, T, H): shift right by one, the off-by-one of the LM head
    predicts = response_mask.bool()  # (B, T): True where token t is a response token, predicted by states[:, t]
    logits = model.get_output_embeddings()(states[predicts])  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logprobs = gather_logprobs(logits, input_ids[predicts])  # (N,)
    entropy = entropy_from_logits(logits.detach())  # (N,), for logging: no graph (it would hold 3 (N, V) tensors)

    def to_grid(values):  # (N,) -> (B, T), 0 off the response
        return torch.zeros(predicts.shape, dtype=values.dtype, device=values.device).masked_scatter(predicts, values)
    return to_grid(logprobs), to_grid(entropy), states


class ScalarHead(nn.Module):
    """(..., H) -> (...): one number per position; the Bradley-Terry reward or the PPO value.

    init_std=None (reward): weight ~ N(0, 1/(H+1)), as the reward head of Ziegler et al. 2019 (lm-human-preferences),
    so initial rewards are O(1) and differ between sequences. init_std=0 (value): weight zero, so every initial value
    is 0 (the bias is zero too) and the first advantages are the rewards themselves, not noise from a random head.
    bias=False for a Bradley-Terry reward: its loss sees only r_c - r_r, so a bias has no true gradient, only rounding
    noise that Adam would normalise into lr-sized random steps (transformers' Llama score head has no bias either)."""

    def __init__(self, hidden_size, init_std=None, bias=True):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=bias)
        nn.init.normal_(self.linear.weight, std=(hidden_size + 1) ** -0.5 if init_std is None else init_std)
        if bias:
            nn.init.zeros_(self.linear.bias)

    def forward(self, hidden):
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)  # (..., H) -> (..., 1) -> (...)


class RatingHead(nn.Module):
    """(..., H) -> (..., K): logits over K rating classes (seed 002's distributional reward model).

    Weight ~ N(0, 1/(H+1)), bias zero: initial class distributions are close to uniform but not identical."""

    def __init__(self, hidden_size, num_classes=10):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_classes)
        nn.init.normal_(self.linear.weight, std=(hidden_size + 1) ** -0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden):
        return self.linear(hidden.to(self.linear.weight.dtype))  # (..., H) -> (..., K)


def sequence_scores(model, head, input_ids, attention_mask):
    """(B, T) -> (B,) for a ScalarHead or (B, K) for a RatingHead, read at each sequence's last real token."""
    hidden = final_hidden(model, input_ids, attention_mask)  # (B, T, H)
    last = last_token_index(attention_mask)  # (B,)
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])  # (B, H) -> (B,) or (B, K)


HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head_config.json"
HEAD_FILES = f"{HEAD_CONFIG} + {HEAD_WEIGHTS}, as save_head writes (train_reward.py: runs/reward/reward_model)"


def save_head(head, path):
    """Write path/head.safetensors and path/head_config.json (kind, hidden_size, num_classes), each atomically."""
    kinds = {ScalarHead: "scalar", RatingHead: "rating"}
    if type(head) not in kinds:
        raise TypeError(f"save_head saves a ScalarHead or a RatingHead, got a {type(head).__name__}")
    path, kind = os.fspath(path), kinds[type(head)]
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"cannot save a head in {path!r}: it is a file, not a folder")
    config = {"kind": kind, "hidden_size": head.linear.in_features, "bias": head.linear.bias is not None,
              "num_classes": head.linear.out_features if kind == "rating" else None}
    state = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write_bytes(os.path.join(path, HEAD_WEIGHTS), save(state))
    atomic_write_json(os.path.join(path, HEAD_CONFIG), config)


def read_head_config(path, flag=None):
    """head_config.json of a head folder, checked: kind scalar|rating, hidden_size an int > 0, num_classes an int >= 2
    for a rating head, bias a bool. InputError naming `flag` (or the folder) and the file otherwise. Cheap: for the
    scripts' validation before any model is loaded (models.check_reward_model_dir)."""
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
    return config


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
