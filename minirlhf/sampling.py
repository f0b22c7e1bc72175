"""A hand-written sampler with a KV cache: what `model.generate(do_sample=True)` does, in one readable loop.

Legend: B batch, P prompt length, R response length, V vocab.
Each step turns the last position's logits into a distribution and draws one token per sequence:
    logits / temperature  ->  top-k filter  ->  top-p (nucleus) filter  ->  softmax  ->  multinomial
(the order transformers uses; top-p: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", Sec. 3.1).
The log-prob returned for a token is under exactly that distribution, so PPO's old_logprobs match what was sampled.
Prompts are LEFT-padded, so every row's next token goes in the same column; position ids come from the mask.
"""
import contextlib
import inspect
from typing import NamedTuple

import torch

from .errors import Diverged
from .precision import autocast


class Samples(NamedTuple):
    response_ids: torch.Tensor   # (B, R) generated tokens, pad_token_id after the stop token
    response_mask: torch.Tensor  # (B, R) 1 on generated tokens up to and including the stop token, 0 after
    logprobs: torch.Tensor       # (B, R) log-prob of each generated token where it was sampled from; 0 on padding


def top_k_filter(logits, k):
    """(..., V) -> (..., V): keep the k largest logits, set the rest to -inf. k = 0 keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest logit
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """(..., V) -> (..., V): keep the smallest set of most likely tokens whose probability adds up to >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # (..., V) probability of the tokens ranked above this one
    drop_sorted = mass_before >= p  # already reached p without this token (the top token is always kept)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample(model, input_ids, attention_mask, max_new_tokens, *, eos_token_id, pad_token_id, temperature=1.0,
           top_k=0, top_p=1.0, min_new_tokens=0, stop_token_ids=(), generator=None):
    """Sample up to max_new_tokens after each left-padded prompt (input_ids, attention_mask: (B, P)) -> Samples.

    A row stops at EOS or at any of stop_token_ids (the stop token is part of the response); before min_new_tokens
    those tokens are forbidden. The loop ends when every row has stopped, so R <= max_new_tokens.
    temperature = 0 is greedy; its logprobs are then the model's own log-probs (temperature 1, unfiltered), since the
    distribution it "samples" from is a point mass."""
    if pad_token_id == eos_token_id:
        raise ValueError(f"pad_token_id == eos_token_id == {eos_token_id}: padding would hide the real EOS; "
                         "use a distinct pad token (models.load_tokenizer adds one)")
    if max_new_tokens < 1 or min_new_tokens < 0:
        raise ValueError(f"need max_new_tokens >= 1 and min_new_tokens >= 0, got {max_new_tokens}, {min_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if not attention_mask.bool().any(-1).all():
        raise ValueError("a prompt has no real token (its attention_mask row is all 0)")
    if attention_mask.shape[1] > 1 and not attention_mask[:, -1].bool().all():
        raise ValueError("prompts must be left-padded: the last column of attention_mask must be all 1")
    with eval_mode(model), autocast(model):  # the compute dtype of training's passes (precision.py)
        return _sample(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, temperature,
                       top_k, top_p, min_new_tokens, stop_token_ids, generator)


@contextlib.contextmanager
def eval_mode(model):
    """Run `model` in eval mode, then put EVERY module back in the mode it was in (not `model.train(was_training)`,
    which would switch back on a dropout that models.dropout_off had turned off inside a training-mode model)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _sample(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
            min_new_tokens, stop_token_ids, generator):
    device = input_ids.device
    stop_ids = torch.tensor([eos_token_id, *stop_token_ids], device=device)
    # Ask for the last position's logits only, when the model allows it: a prompt never builds (B, P, V).
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P) 0.. over real tokens
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **last_only)
    next_position = position_ids[:, -1:] + 1  # (B, 1) the first generated token's position
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)  # (B,)
    tokens, logprobs, masks = [], [], []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()  # (B, V)
        if not torch.isfinite(logits).all():  # a diverged policy: say so instead of multinomial's traceback
            raise Diverged("the policy's next-token logits are not finite (NaN or inf): its weights have diverged; "
                           "lower the learning rate (--lr) or check non-finite settings")
        if step < min_new_tokens:
            logits[:, stop_ids] = float("-inf")  # not allowed to stop yet
        if temperature == 0:
            token = logits.argmax(-1)  # (B,)
            logp = torch.log_softmax(logits, -1)  # (B, V)
        else:
            logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)  # (B, V) what we sample from
            logp = torch.log_softmax(logits, -1)
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)  # (B,)
        token_logp = logp.gather(-1, token[:, None]).squeeze(-1)  # (B,)
        tokens.append(token.masked_fill(done, pad_token_id))  # rows that already stopped get padding
        logprobs.append(token_logp.masked_fill(done, 0.0))
        masks.append(~done)
        done = done | torch.isin(token, stop_ids)
        if done.all() or step == max_new_tokens - 1:
            break
        # Feed the new token; the cache holds keys/values of everything before it.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        out = model(input_ids=tokens[-1][:, None], attention_mask=attention_mask, position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True)
        next_position = next_position + 1
    return Samples(torch.stack(tokens, 1), torch.stack(masks, 1).to(attention_mask.dtype), torch.stack(logprobs, 1))
