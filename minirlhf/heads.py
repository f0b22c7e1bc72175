"""What we read off the shared trunk's final hidden states: token log-probs (the LM head) and scalar / rating heads;
for on-policy distillation, the per-token divergence between two adapters' next-token distributions
(response_divergence).

Legend: B batch, T tokens (prompt + response), H hidden size, V vocab, K rating classes, N response tokens in a batch.
Two padding traps live here, and both are handled by looking at the attention mask, never at token ids:
- position ids come from the mask (cumsum - 1), so a left-padded prompt starts at position 0 like an unpadded one;
- a sequence's score is read at its LAST REAL token (`last_token_index`), never at a padding slot, on either side.
And one off-by-one: the hidden state at position t - 1 predicts token t. `predicting_states` is the only place that
shift is written; after it, log-probs, values and per-token KLs all sit at their token's own position in (B, T).
Every one of these passes is `final_hidden`: the model's trunk on the padded batch, as transformers runs it. (By
default a batch with much padding or a shared prompt runs packed instead: minirlhf/fast/unpad.py, the same states up
to float rounding; fast.FAST_FORWARD, --no-fast-forward, turns it off.)
Heads are saved and loaded by formats.py (save_head, load_head).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import fast
from .distill import token_divergence
from .fast import unpad
from .lora import use_adapter
from .ops import entropy_from_logits, gather_logprobs
from .precision import autocast
from .sampling import as_settings, sampling_logits

# Response positions whose logits exist at once (_token_logprobs, evaluation.sequence_kl). A chunk's fp32 logits are
# LOGITS_CHUNK x V x 4 bytes: 200 MB for SmolLM2's 49152 tokens, 525 MB for Llama 3's 128256 (a backward or an
# entropy holds 2-3 such tensors), where the 8 x 1000 response tokens of a minibatch at once would take 1.6 GB / 4 GB.
# 1024 rows still make a large matrix product (1024 x 576 x 49152 is 58 GFLOP for SmolLM2): the LM head runs at full
# speed. Measured: one SFT step of 4 x 1024 tokens on the SmolLM2-135M shape (LoRA, fp32, CPU) peaks 6.0 GiB above
# the loaded model instead of 12.3 GiB. A row's logits are its own row of the matrix product, so chunking changes at
# most the order of a sum (a trained LM head's gradient, full fine-tuning); the toy runs are bit-identical.
LOGITS_CHUNK = 1024


def trunk(model):
    """The decoder stack without the LM head, e.g. LlamaForCausalLM.model."""
    return getattr(model, model.base_model_prefix)


def position_ids_from_mask(attention_mask):
    """(B, T) -> (B, T): 0, 1, 2, ... over the real tokens; padding slots get 0 (they are masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def final_hidden(model, input_ids, attention_mask):
    """(B, T) token ids -> (B, T, H) final hidden states of the trunk (after its last norm), computed under autocast
    in the model's compute dtype (precision.py), so 16-bit for a 16-bit run. Position ids come from the mask, so the
    padding may be on either side; a padding slot's state means nothing (the fast path leaves zeros there)."""
    with autocast(model):
        if fast.FAST_FORWARD and (packing := unpad.packing_for(model, input_ids, attention_mask)) is not None:
            return unpad.packed_forward(trunk(model), input_ids, attention_mask, packing)  # the fast path (fast/)
        out = trunk(model)(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def in_row_chunks(fn, n, size):
    """fn(rows) for consecutive slices `rows` of range(n) of at most `size` rows each, the outputs (a tensor, or a
    tuple of tensors / None) concatenated along dim 0: a pass over n rows whose memory is bounded by `size` rows
    (--forward-batch-size), whatever n is. One chunk (n <= size) is fn(slice(0, n)) itself. For passes without
    gradient: with gradient every chunk's graph would be kept until backward (the RL update splits its minibatch into
    micro-batches with a backward each instead)."""
    if size < 1:
        raise ValueError(f"in_row_chunks: size must be >= 1, got {size}")
    parts = [fn(slice(i, min(i + size, n))) for i in range(0, max(n, 1), size)]  # n = 0: one empty chunk
    if len(parts) == 1:
        return parts[0]
    if not isinstance(parts[0], tuple):
        return torch.cat(parts)
    return tuple(None if outs[0] is None else torch.cat(outs) for outs in zip(*parts))


def lm_logits(model, states):
    """(..., H) states -> (..., V) logits in float32 (or float64 for a float64 model): the LM head under autocast (a
    16-bit matmul in a 16-bit run), then at least fp32 for the softmax: log-probs, entropies and KLs are never taken
    in 16 bits."""
    with autocast(model):
        logits = model.get_output_embeddings()(states)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def last_token_index(attention_mask):
    """(B, T) -> (B,): position of the last real token of each row, whether the padding is on the left or the right."""
    if not attention_mask.bool().any(-1).all():
        raise ValueError("attention_mask has a row with no real token")
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return (positions * attention_mask.bool()).argmax(-1)  # (B,) the largest position whose mask is set


def predicting_states(hidden, response_mask):
    """(B, T, H) final hidden states -> (B, T, H) states on the grid of the tokens they predict.

    THE next-token shift of minirlhf, written here and nowhere else. A causal LM's output at position t - 1 has seen
    tokens < t and predicts token t, so states[:, t] = hidden[:, t - 1]: the state s_t in which token t is chosen.
    After the shift, a token's log-prob (LM head on states[:, t], scored against input_ids[:, t]), its value (value
    head on states[:, t]) and its KL all sit at the token's own position t, picked out by the same response_mask.
    states[:, 0] is zeros: nothing predicts the first token, so response_mask[:, 0] must be 0."""
    if response_mask[:, 0].bool().any():
        raise ValueError("response_mask is set on the first token, which has no context to predict it from")
    # Shift: hidden[:, t-1] predicts token t, so move every state one position right, zeros at position 0.
    return F.pad(hidden[:, :-1], (0, 0, 1, 0))  # (B, T-1, H) -> (B, T, H)


def to_token_grid(values, response_mask):
    """(N,) one value per response token, in response_mask's row-major order -> (B, T), 0 off the response."""
    mask = response_mask.bool()
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def _chunk_logprobs(model, states, targets, steps, sampling, return_entropy):
    """(n, H) states, the (n,) tokens they predict and their (n,) response steps -> ((n,) log-probs,) or ((n,)
    log-probs, (n,) entropies): the LM head on one chunk of response positions, (n, V) float32 logits, turned into
    the sampled distribution's (sampling.sampling_logits: temperature, then the filters recomputed from these logits).

    A token that filter gives probability 0 has log-prob -inf. The sampler never draws one, so the OLD policy's
    log-probs are finite; but the NEW policy of an update can push an old sample out of its top-k / top-p set, and
    -inf would make PPO's ratio 0 with no gradient and GRPO's k3 (exp(ref - new) - 1 - ...) infinite. Rule: such a token
    is scored by its UNFILTERED log-prob at the same temperature instead: finite, with a gradient, and never above
    the value it would have if the filter kept it (filtering renormalises: log p - log Z >= log p). (A constant floor
    of -30 was tried: one dropped token made GRPO's loss/kl 2e10 on the built-in world.)"""
    logits = lm_logits(model, states)  # (n, H) -> (n, V), float32
    sampled = sampling_logits(logits, sampling, steps)  # (n, V): / temperature, -inf where the filter drops a token
    logprobs = _sampled_logprobs(logits, sampled, targets, sampling)  # (n,)
    if not return_entropy:
        return (logprobs,)
    # for logging: detached, so the (n, V) softmax intermediates are not kept for backward
    return logprobs, entropy_from_logits(sampled.detach())  # (n,), (n,): of the sampled distribution


def _sampled_logprobs(logits, sampled, targets, sampling):
    """(n,) log-probs of the (n,) targets under the sampled distribution's (n, V) logits `sampled`; a token its
    filter dropped (-inf) gets its unfiltered log-prob at the same temperature from the raw (n, V) `logits` (the rule
    of _chunk_logprobs)."""
    logprobs = gather_logprobs(sampled, targets)  # (n,)
    if sampling.filtered:  # -inf where the filter dropped the token -> its unfiltered log-prob
        unfiltered = gather_logprobs(logits / sampling.temperature, targets)  # (n,)
        logprobs = torch.where(torch.isfinite(logprobs), logprobs, unfiltered)
    return logprobs


def _token_logprobs(model, states, input_ids, response_mask, sampling, return_entropy):
    """(B, T) log-probs of the response tokens (and, with return_entropy, detached (B, T) entropies) from
    predicting_states' grid, under the distribution `sampling` (a temperature or a SamplingSettings) describes.
    Only the N response positions go through the LM head: prompt positions never build a (B, T, V) tensor; and at
    most LOGITS_CHUNK positions at a time, so no pass holds more than one chunk's (chunk, V) logits. With gradient,
    each chunk is checkpointed (torch.utils.checkpoint): its logits are recomputed in the backward pass instead of
    being kept, so the backward too holds one chunk's at a time. N <= LOGITS_CHUNK is one plain chunk."""
    sampling = as_settings(sampling)
    if sampling.temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {sampling.temperature}")
    predicts = response_mask.bool()  # (B, T): True where token t is a response token, predicted by states[:, t]
    states, targets = states[predicts], input_ids[predicts]  # (N, H), (N,)
    steps = (response_mask.long().cumsum(-1) - 1)[predicts]  # (N,) 0 for a response's first token, 1, 2, ...
    if states.shape[0] <= LOGITS_CHUNK:
        outs = _chunk_logprobs(model, states, targets, steps, sampling, return_entropy)
    else:
        plain = not torch.is_grad_enabled()  # without gradient nothing is kept for a backward: no checkpoint
        parts = [_chunk_logprobs(model, s, t, k, sampling, return_entropy) if plain else
                 checkpoint(_chunk_logprobs, model, s, t, k, sampling, return_entropy, use_reentrant=False)
                 for s, t, k in zip(states.split(LOGITS_CHUNK), targets.split(LOGITS_CHUNK),
                                    steps.split(LOGITS_CHUNK))]
        outs = [torch.cat(chunks) for chunks in zip(*parts)]  # (N,) each
    grids = [to_token_grid(out, response_mask) for out in outs]  # (N,) -> (B, T) each
    return tuple(grids) if return_entropy else grids[0]


def response_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0, return_entropy=False):
    """log π(token_t | tokens_<t) at every response token, under softmax(logits / temperature).

    input_ids, attention_mask, response_mask: (B, T), prompt + response, any padding side. Returns (B, T) aligned with
    input_ids (0 where response_mask is 0), and with return_entropy also the (B, T) entropy of that distribution
    (detached: for logging).
    The trunk runs once over all tokens; the LM head runs only at the N positions that predict a response token, so
    prompt positions never build a (B, T, V) tensor. The temperature must be the sampler's, or the PPO ratio is off;
    `temperature` may also be the sampler's whole sampling.SamplingSettings: the log-probs are then those of the
    filtered distribution it drew from (top-k, top-p, min_new_tokens; _chunk_logprobs' rule for a filtered-out token).
    Assumes logits = get_output_embeddings()(hidden) (true for Llama, Qwen, Mistral, SmolLM; not for soft-capped or
    scaled logits, e.g. Gemma 2)."""
    states = predicting_states(final_hidden(model, input_ids, attention_mask), response_mask)  # (B, T, H)
    return _token_logprobs(model, states, input_ids, response_mask, temperature, return_entropy)


def response_logprobs_and_states(model, input_ids, attention_mask, response_mask, temperature=1.0):
    """One trunk pass for PPO's policy AND value: (logprobs, entropy, states), aligned with input_ids.

    logprobs, entropy (B, T): as response_logprobs(..., return_entropy=True) (the entropy is detached: PPO here has
    no entropy bonus, and its graph would hold three (N, V) tensors until backward). states (B, T, H): states[:, t] is
    the hidden state that PREDICTS token t (predicting_states: the state s_t in which action t is chosen), so a value
    head on it gives V(s_t) on the same grid as the log-probs; states[:, 0] is zeros (no state predicts it)."""
    states = predicting_states(final_hidden(model, input_ids, attention_mask), response_mask)  # (B, T, H)
    logprobs, entropy = _token_logprobs(model, states, input_ids, response_mask, temperature, return_entropy=True)
    return logprobs, entropy, states


def _chunk_divergence(model, teacher, states, teacher_states, targets, steps, sampling, kind, beta):
    """One chunk of response_divergence: the student's (n, H) states and the teacher's, the (n,) tokens they predict
    and their (n,) response steps -> (n,) divergences (with grad to the student), (n,) the student's log-probs of the
    tokens and (n,) its entropies (both detached)."""
    logits = lm_logits(model, states)  # (n, V) the student's (the active adapter's)
    sampled = sampling_logits(logits, sampling, steps)  # (n, V): the distribution it samples from
    with torch.no_grad(), use_adapter(model, teacher):  # (the LM head carries the teacher's LoRA if it was adapted)
        teacher_logits = lm_logits(model, teacher_states) / sampling.temperature  # (n, V): unfiltered, detached
    divergence = token_divergence(sampled, teacher_logits, torch.ones_like(targets, dtype=torch.bool), kind, beta)
    sampled = sampled.detach()
    return divergence, _sampled_logprobs(logits.detach(), sampled, targets, sampling), entropy_from_logits(sampled)


def response_divergence(model, teacher, input_ids, attention_mask, response_mask, sampling, kind="reverse-kl",
                        beta=0.5):
    """On-policy distillation's per-token loss at every response position (distill.token_divergence), between the
    student (the active adapter) and the teacher (adapter `teacher`, frozen), with grad to the student when called
    with grad. input_ids, attention_mask, response_mask: (B, T), any padding side. Returns three (B, T) tensors on
    input_ids' grid, 0 off the response: the divergence, the student's log-probs of the response tokens and its
    entropies (both detached: for logging).

    The student's distribution is the one it samples from (`sampling`, a SamplingSettings or a temperature:
    sampling.sampling_logits, the temperature then the top-k / top-p / min-new-tokens filter); the teacher's is its
    unfiltered softmax at the same temperature (as the reference's: rollout.reference_logprobs). Two trunk passes,
    the teacher's without grad (only its (N, H) states at the response positions are kept), then the LM head on at
    most LOGITS_CHUNK positions at a time, each chunk checkpointed with grad (as _token_logprobs): the two (chunk, V)
    logits of one chunk exist at a time, in the forward and in the backward."""
    sampling = as_settings(sampling)
    predicts = response_mask.bool()  # (B, T)
    with torch.no_grad(), use_adapter(model, teacher):
        teacher_states = predicting_states(final_hidden(model, input_ids, attention_mask), response_mask)[predicts]
    states = predicting_states(final_hidden(model, input_ids, attention_mask), response_mask)[predicts]  # (N, H)
    targets = input_ids[predicts]  # (N,)
    steps = (response_mask.long().cumsum(-1) - 1)[predicts]  # (N,) 0 for a response's first token, 1, 2, ...
    plain = not torch.is_grad_enabled() or states.shape[0] <= LOGITS_CHUNK  # nothing to gain from a checkpoint
    parts = [_chunk_divergence(model, teacher, *chunk, sampling, kind, beta) if plain else
             checkpoint(_chunk_divergence, model, teacher, *chunk, sampling, kind, beta, use_reentrant=False)
             for chunk in zip(*(x.split(LOGITS_CHUNK) for x in (states, teacher_states, targets, steps)))]
    return tuple(to_token_grid(torch.cat(outs), response_mask) for outs in zip(*parts))  # (N,) -> (B, T) each


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
    """(..., H) -> (..., K): logits over K rating classes (the distributional reward model of the SmolLM2 + HelpSteer2
    setup).

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
