"""A hand-written sampler with a KV cache: what `model.generate(do_sample=True)` does, in one readable loop.

Legend: B batch, P prompt length, R response length, V vocab.
Each step turns the last position's logits into a distribution and draws one token per sequence:
    logits / temperature  ->  top-k filter  ->  top-p (nucleus) filter  ->  softmax  ->  multinomial
(the order transformers uses; top-p: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", Sec. 3.1).
The log-prob returned for a token is under exactly that distribution, so PPO's old_logprobs match what was sampled.
`sampling_logits` is that one chain (plus min_new_tokens' ban on stopping early), written once: the sampler draws from
it and heads.py scores tokens under it (`SamplingSettings`), so the ratio, the KL and the loss see the distribution
that was actually sampled from, not the unfiltered softmax (the StackLLaMA write-up's negative-KL warning;
docs/negative_kl.md measures it). A row stops at EOS, at a stop token or when its text contains a stop string.
Prompts are LEFT-padded, so every row's next token goes in the same column; position ids come from the mask.
The next-token logits come from transformers' own forward with its DynamicCache (`HFForward`: prefill the prompts,
then one forward per new token, the cache holding everything before it). By default a faster engine computes the
same logits up to float rounding (log-probs within ~1e-6) where it supports the model: minirlhf/fast/decode.py, a
hand-written Llama-family forward over a preallocated KV cache that also stops computing rows that have stopped
(on the embedded tiny model, one CPU thread, 1.2-1.5x generate's speed at batch 64 and 2.3x in a GRPO rollout:
docs/benchmarks.md); fast.FAST_DECODE, --no-fast-decode, turns it off.
"""
import contextlib
import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import fast
from .fast import decode
from .errors import Diverged
from .precision import autocast


class Samples(NamedTuple):
    response_ids: torch.Tensor   # (B, R) generated tokens, pad_token_id after the stop token
    response_mask: torch.Tensor  # (B, R) 1 on generated tokens up to and including the stop token, 0 after
    logprobs: torch.Tensor       # (B, R) log-prob of each generated token where it was sampled from; 0 on padding
    ended: torch.Tensor = None   # (B,) bool: the row stopped (EOS, a stop token or a stop string), not cut off at
    #                              max_new_tokens: what --missing-eos-penalty reads


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


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled, and so the distribution their log-probs must be taken under (heads.py).

    temperature > 0 divides the logits; top_k = 0 and top_p = 1 are off; at response steps < min_new_tokens the
    stop_token_ids (EOS first) are forbidden; stop_strings end a row but do not change any token's probability, so
    only the sampler reads them. The defaults are the plain softmax at temperature 1."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    stop_token_ids: tuple = ()
    stop_strings: tuple = ()

    @property
    def filtered(self):
        """True when some token can get probability 0 (log-prob -inf: heads._chunk_logprobs says how it is scored)."""
        return self.top_k > 0 or self.top_p < 1.0 or (self.min_new_tokens > 0 and len(self.stop_token_ids) > 0)

    @classmethod
    def from_args(cls, args, eos_token_id):
        """The settings of a script's Args (--temperature, --top-k, --top-p, --min-new-tokens, --stop-strings)."""
        return cls(args.temperature, args.top_k, args.top_p, args.min_new_tokens, (eos_token_id,),
                   tuple(args.stop_strings or ()))


def as_settings(sampling):
    """A SamplingSettings, or a plain temperature (float) meaning the unfiltered softmax at that temperature."""
    return sampling if isinstance(sampling, SamplingSettings) else SamplingSettings(temperature=float(sampling))


def sampling_logits(logits, settings, steps):
    """(..., V) next-token logits -> (..., V) the logits of the distribution sampled from: log_softmax of the result
    is the log-prob of every token under it (-inf for a token it cannot draw). steps: the response step each row
    predicts (0 = the first response token), an int or a (...) tensor; before settings.min_new_tokens the stop tokens
    are forbidden. Then logits / temperature -> top-k -> top-p, the sampler's order. temperature 0 (greedy) leaves
    the logits unscaled and unfiltered: a point mass has no useful log-prob, the model's own is kept."""
    if settings.min_new_tokens > 0 and settings.stop_token_ids:
        early = torch.as_tensor(steps, device=logits.device) < settings.min_new_tokens  # () or (...)
        stop = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # (V,)
        stop[list(settings.stop_token_ids)] = True
        logits = logits.masked_fill(early[..., None] & stop, float("-inf"))  # not allowed to stop yet
    if settings.temperature == 0:
        return logits
    return top_p_filter(top_k_filter(logits / settings.temperature, settings.top_k), settings.top_p)


class StopStrings:
    """Ends a row when the token just sampled completes one of `strings` in the row's decoded text (decoded as
    evaluation.generate decodes it, special tokens skipped). The response keeps every token up to and including the
    one that completed the string, so its text may run a few characters past the string (to that token's end).

    Each step decodes, for every row still running, only its last W tokens twice (with and without the new token):
    W = the longest string's UTF-8 bytes + 1, since every token of a byte-level (or byte-fallback) vocabulary brings
    at least one byte, and the one token more in front keeps the leading space a SentencePiece decode drops from the
    first token of a text (special tokens, decoded to nothing, could stretch a string past W). So the cost is
    O(running rows x W) characters a step, not the O(R) of decoding the whole response again. A string completed
    before min_new_tokens does not count (the sampler does not check then), as a stop token is forbidden then."""

    def __init__(self, tokenizer, strings):
        if not strings or not all(strings):
            raise ValueError(f"stop strings must be non-empty texts, got {strings!r}")
        self.tokenizer, self.strings = tokenizer, tuple(strings)
        self.window = max(len(s.encode("utf-8")) for s in self.strings) + 1  # tokens decoded per row and step

    def _occurrences(self, ids):
        """How many times (overlaps counted) each stop string occurs in the text of the token ids."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return [sum(text.startswith(s, i) for i in range(len(text))) for s in self.strings]

    def __call__(self, response_ids, running):
        """response_ids (B, t): the tokens so far, the newest last; running (B,) bool: the rows to check -> (B,) bool,
        True where the newest token completed a stop string (one more occurrence with it than without it)."""
        hit = torch.zeros_like(running)
        for row in running.nonzero().flatten().tolist():
            ids = response_ids[row, -self.window:].tolist()
            hit[row] = any(now > before for now, before in zip(self._occurrences(ids), self._occurrences(ids[:-1])))
        return hit


@torch.no_grad()
def sample(model, input_ids, attention_mask, max_new_tokens, *, eos_token_id, pad_token_id, temperature=1.0,
           top_k=0, top_p=1.0, min_new_tokens=0, stop_token_ids=(), stop_strings=None, generator=None,
           engine="auto"):
    """Sample up to max_new_tokens after each left-padded prompt (input_ids, attention_mask: (B, P)) -> Samples.

    A row stops at EOS or at any of stop_token_ids (the stop token is part of the response); before min_new_tokens
    those tokens are forbidden. stop_strings (a StopStrings, or None) also stops a row whose newest token completed
    one of its strings, from step min_new_tokens on. The loop ends when every row has stopped, so R <= max_new_tokens.
    Samples.ended marks the rows that stopped by any of these, rather than at max_new_tokens.
    temperature = 0 is greedy; its logprobs are then the model's own log-probs (temperature 1, unfiltered), since the
    distribution it "samples" from is a point mass.
    engine: "hf" always computes the logits with transformers' forward (HFForward); "auto" does too unless the switch
    fast.FAST_DECODE is on and decode.supports(model) (Llama / Mistral / Qwen2 without sliding windows): then with
    fast/decode.py's forward."""
    if pad_token_id == eos_token_id:
        raise ValueError(f"pad_token_id == eos_token_id == {eos_token_id}: padding would hide the real EOS; "
                         "use a distinct pad token (models.load_tokenizer adds one)")
    if max_new_tokens < 1 or min_new_tokens < 0:
        raise ValueError(f"need max_new_tokens >= 1 and min_new_tokens >= 0, got {max_new_tokens}, {min_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if engine not in ("auto", "hf"):
        raise ValueError(f"engine must be 'auto' or 'hf', got {engine!r}")
    if not attention_mask.bool().any(-1).all():
        raise ValueError("a prompt has no real token (its attention_mask row is all 0)")
    if attention_mask.shape[1] > 1 and not attention_mask[:, -1].bool().all():
        raise ValueError("prompts must be left-padded: the last column of attention_mask must be all 1")
    with eval_mode(model), autocast(model):  # the compute dtype of training's passes (precision.py)
        settings = SamplingSettings(temperature, top_k, top_p, min_new_tokens, (eos_token_id, *stop_token_ids))
        forward = HFForward(model, attention_mask)  # transformers' forward, one new token at a time
        if engine == "auto" and fast.FAST_DECODE and decode.supports(model):
            forward = decode.Decoder(model, attention_mask, max_new_tokens)  # the fast path (fast/decode.py)
        return _sample(forward, input_ids, attention_mask, max_new_tokens, pad_token_id, settings, stop_strings,
                       generator)


def _sample(forward, input_ids, attention_mask, max_new_tokens, pad_token_id, settings, stop_strings, generator):
    """The sampling loop over `forward` (an HFForward, or fast/decode.py's Decoder): the module docstring's chain per
    step."""
    device = input_ids.device
    stop_ids = torch.tensor(settings.stop_token_ids, device=device)  # EOS and the stop tokens
    next_logits = forward.prefill(input_ids)  # (B, V)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)  # (B,)
    tokens, logprobs, masks = [], [], []
    for step in range(max_new_tokens):
        logits = next_logits.float()  # (B, V)
        if not torch.isfinite(logits).all():  # a diverged policy: say so instead of multinomial's traceback
            raise Diverged("the policy's next-token logits are not finite (NaN or inf): its weights have diverged; "
                           "lower the learning rate (--lr) or check non-finite settings")
        logits = sampling_logits(logits, settings, step)  # (B, V) what we sample from
        logp = torch.log_softmax(logits, -1)  # (B, V)
        if settings.temperature == 0:  # greedy
            token = logits.argmax(-1)  # (B,)
        else:
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)  # (B,)
        token_logp = logp.gather(-1, token[:, None]).squeeze(-1)  # (B,)
        tokens.append(token.masked_fill(done, pad_token_id))  # rows that already stopped get padding
        logprobs.append(token_logp.masked_fill(done, 0.0))
        masks.append(~done)
        stops = torch.isin(token, stop_ids)  # (B,)
        if stop_strings is not None and step >= settings.min_new_tokens:
            stops = stops | stop_strings(torch.stack(tokens, 1), ~done & ~stops)  # only rows still running
        done = done | stops
        if done.all() or step == max_new_tokens - 1:
            break
        next_logits = forward.step(tokens[-1], running=~done)  # (B, V); rows that stopped may be skipped
    return Samples(torch.stack(tokens, 1), torch.stack(masks, 1).to(attention_mask.dtype), torch.stack(logprobs, 1),
                   done)


class HFForward:
    """The next-token logits from transformers' own forward and its DynamicCache: prefill(input_ids (B, P)) -> (B, V),
    then step(tokens (B,)) -> (B, V) once per new token (the interface _sample calls; fast/decode.py's Decoder has
    it too)."""

    def __init__(self, model, attention_mask):
        self.model, self.attention_mask, self.cache = model, attention_mask, None
        # Ask for the last position's logits only, when the model allows it: a prompt never builds (B, P, V).
        keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last_only = {"logits_to_keep": 1} if keep else {}

    def prefill(self, input_ids):
        position_ids = (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P) 0.. over real tokens
        out = self.model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                         use_cache=True, **self.last_only)
        self.cache, self.next_position = out.past_key_values, position_ids[:, -1:] + 1  # (B, 1) the next position
        return out.logits[:, -1, :]

    def step(self, tokens, running=None):
        # Feed the new token; the cache holds keys/values of everything before it. (Every row is computed, running
        # or not: a DynamicCache is not cut down here.)
        mask = self.attention_mask
        self.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (B, n + 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                         position_ids=self.next_position, past_key_values=self.cache, use_cache=True)
        self.cache, self.next_position = out.past_key_values, self.next_position + 1
        return out.logits[:, -1, :]


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
