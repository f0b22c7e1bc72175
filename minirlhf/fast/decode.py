"""The sampler's fast path: a hand-written forward of the Llama family over a preallocated KV cache.

transformers' generic forward, as generate and the HF engine of sampling.py call it, grows its DynamicCache by
concatenation (every layer's keys and values copied at every step: 35 % of generate's CPU time on the embedded tiny
model at batch 64, as much as all the matrix products), computes the prompt's padding positions like real ones, and
rebuilds masks, cache objects and output dataclasses at every step. This file does only the arithmetic of one pre-norm
decoder layer (Touvron et al. 2023, "LLaMA", Sec. 2.2; in the order of transformers' models/llama/modeling_llama.py,
LlamaDecoderLayer.forward):

    h = h + o_proj(Attention(RoPE(q_proj(x)), RoPE(k_proj(x)), v_proj(x)))     x = input_layernorm(h)
    h = h + mlp(post_attention_layernorm(h))                                    mlp = down(act(gate(x)) * up(x))
    logits = lm_head(norm(h))    at the last position only

Attention(q, k, v) = softmax(q kᵀ / sqrt(D) + mask) v (Vaswani et al. 2017, Eq. 1), by torch's
scaled_dot_product_attention; RoPE (Su et al. 2021, "RoFormer", Eq. 34) as transformers' apply_rotary_pos_emb:
x·cos + rotate_half(x)·sin, with cos/sin from the model's own rotary_emb. Every linear, norm and MLP is the model's
own submodule, CALLED, so a LoRA adapter (lora.LoRALinear: the active one, or none for the reference), a
bitsandbytes 4/8-bit layer and torch.autocast (precision.py) work here exactly as in the HF forward.

The cache holds, per layer, keys and values (B, K, L, D) for L = P + max_new_tokens positions, allocated once and
written in place: the prompt's P columns at prefill, one column per decode step. Prompts are LEFT-padded (as the
sampler's), so a decode step writes the same column in every row; position ids come from the mask (cumsum - 1,
clamped at 0), as sampling.py and heads.py compute them.
Legend: B batch, P prompt length, L cache length, N tokens computed in a pass (the real prompt tokens at prefill, B at
a decode step), E hidden size, H attention heads, K key/value heads (GQA: each serves G = H / K query heads),
D head dim, V vocab.
Used by sampling.sample when the switch fast.FAST_DECODE is on and `supports(model)`; otherwise the sampler runs
transformers' forward (sampling.HFForward), which computes the same logits up to float rounding.
"""
import torch
import torch.nn.functional as F

from ..lora import LoRALinear, quantized_bits
from .unpad import has_sliding_window

SUPPORTED = ("llama", "mistral", "qwen2")  # the model_types sharing LlamaDecoderLayer's structure
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only: one table serves all


def unsupported_reason(model):
    """Why `model` cannot run on this forward (a short text), or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        return f"model_type {model_type!r} is not one of {SUPPORTED}"
    trunk = getattr(model, "model", None)
    if not all(hasattr(trunk, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(model, "lm_head"):
        return "not a *ForCausalLM with .model.{embed_tokens, layers, norm, rotary_emb} and .lm_head"
    if has_sliding_window(config):
        return "sliding-window attention"
    if getattr(trunk.rotary_emb, "rope_type", "default") not in STATIC_ROPE:
        return f"rope type {trunk.rotary_emb.rope_type!r} (cos/sin that change with the sequence length)"
    attn = trunk.layers[0].self_attn
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return "q_norm / k_norm in attention (Qwen3-style)"
    mlp = trunk.layers[0].mlp
    if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return "an MLP other than down_proj(act_fn(gate_proj(x)) * up_proj(x))"
    if any(m._forward_hooks or m._forward_pre_hooks for m in (model, trunk, *(layer.mlp for layer in trunk.layers))):
        return "a forward hook on the model, its trunk or an MLP (this path never calls their forward)"
    return None


# merged_lora_weights' budget for the merged copies. Merging pays where a step is many small operations (the tiny
# model: dev/sampler.py's GRPO rollout 242 -> 172 ms); a large model's LoRA branch costs r / d of its matmuls, and
# a copy of every adapted weight would cost gigabytes: such a model keeps calling its LoRA layers.
MERGE_LIMIT_BYTES = 64 * 2**20


def merged_lora_weights(model):
    """{LoRA layer: W + (alpha/r)·B·A} for every lora.LoRALinear with an active adapter over a plain (not quantized)
    base, so that sampling runs one matmul per layer instead of three plus a scale and an add (Hu et al. 2021, Sec.
    4.1: "we can explicitly compute and store W = W0 + BA and perform inference as usual"); {} when the copies would
    exceed MERGE_LIMIT_BYTES or some layer cannot be merged. Made at every sample() call: the policy changes between
    rollouts. The same function as calling the layer, up to float rounding."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.active in m.lora_A]
    if not layers or any(quantized_bits(m.base_layer) for m in layers) or \
            sum(m.base_layer.weight.nbytes for m in layers) > MERGE_LIMIT_BYTES:
        return {}
    return {m: m.merged_weight(m.active) for m in layers}


def supports(model):
    """True when `model` can run on this forward; otherwise the sampler keeps transformers' forward."""
    return unsupported_reason(model) is None


def rotate_half(x):
    """(..., D) -> (..., D): (x1, x2) -> (-x2, x1) over the two halves of the head dim (transformers' rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x (N, heads, D), cos / sin (N, D) at each token's position -> x rotated by its angles (RoFormer Eq. 34)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Decoder:
    """Prefill a left-padded prompt batch, then decode one token per row per step; inference only (no attention
    dropout: call it under torch.no_grad on a model in eval mode, as sampling.sample does).

        decoder = Decoder(model, attention_mask, max_new_tokens)
        logits = decoder.prefill(input_ids)   # (B, V) next-token logits after the prompt
        logits = decoder.step(tokens)         # tokens (B,) -> (B, V), at most max_new_tokens - 1 times

    Between attentions every operation is per token, so states are kept as (N, E), one row per token that needs
    computing: the N real prompt tokens at prefill (padding is never computed; the cache holds zeros there, masked),
    the B new tokens at a decode step. Only attention sees the (B, ., L, D) layout of the cache.
    """

    def __init__(self, model, attention_mask, max_new_tokens, merged=None):
        """merged: merged_lora_weights(model) when the caller has them already (prefill's decoder of the distinct
        prompts); None: computed here."""
        self.model, self.trunk = model, model.model
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads  # H, K
        self.head_dim = self.trunk.layers[0].self_attn.head_dim  # D
        self.scale = self.trunk.layers[0].self_attn.scaling  # 1 / sqrt(D)
        B, P = attention_mask.shape
        self.length = P + max_new_tokens  # L
        real = attention_mask.bool()  # (B, P)
        # key_mask[b, j]: may a query of row b attend to cache column j? A real prompt token or a token generated
        # so far: yes; prompt padding, and the columns no step has written yet: no.
        self.key_mask = torch.cat([real, real.new_zeros(B, max_new_tokens)], dim=1)  # (B, L)
        self.rows, self.cols = real.nonzero(as_tuple=True)  # (N,) each: the cache cell of each real prompt token
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P) 0.. over the real tokens
        self.prompt_positions = positions[self.rows, self.cols]  # (N,)
        self.last = real.sum(-1).cumsum(0) - 1  # (B,) each row's last prompt token among the N (it is in column P-1)
        self.next_position = positions[:, -1] + 1  # (B,) the first generated token's position
        self.filled = 0  # cache columns written so far
        self.rows_kept = torch.arange(B, device=attention_mask.device)  # (b,) the rows still computed (step)
        self.keys, self.values = [], []  # per layer (B, K, L, D), allocated at prefill in the keys' dtype
        self.merged = merged_lora_weights(model) if merged is None else merged

    def prefill(self, input_ids):
        """(B, P) the prompt -> (B, V) logits of the token after it. Fills cache columns 0..P-1.

        A prompt that appears in several rows (GRPO samples each prompt G times, RLOO k times, the evaluation twice)
        is computed once: the distinct rows are prefilled, then their cache rows and logits are copied to every row
        that has that prompt."""
        real = self.key_mask[:, :input_ids.shape[1]]  # (B, P)
        distinct, inverse = torch.unique(input_ids.masked_fill(~real, -1), dim=0, return_inverse=True)  # (U, P), (B,)
        if len(distinct) == len(input_ids):
            return self._prefill(input_ids)
        first = torch.full((len(distinct),), len(input_ids), device=input_ids.device).scatter_reduce(
            0, inverse, torch.arange(len(input_ids), device=input_ids.device), "amin")  # (U,) a row of each prompt
        once = Decoder(self.model, real[first].long(), self.length - input_ids.shape[1], merged=self.merged)
        logits = once._prefill(input_ids[first])  # (U, V)
        self.keys, self.values = [k[inverse] for k in once.keys], [v[inverse] for v in once.values]  # (B, K, L, D)
        self.cos, self.sin, self.filled = once.cos, once.sin, once.filled
        return logits[inverse]  # (B, V)

    def _prefill(self, input_ids):
        P = input_ids.shape[1]
        h = self.trunk.embed_tokens(input_ids[self.rows, self.cols])  # (N, E) the real tokens only
        # cos/sin of every position the cache will hold: (L, D) each, in h's dtype (as the HF forward gets them)
        cos, sin = self.trunk.rotary_emb(h, torch.arange(self.length, device=h.device)[None])
        self.cos, self.sin = cos[0], sin[0]
        # Causal and padding mask (B, 1, P, P): query i sees key j <= i when j is a real token. A padding query
        # (never computed, its q is 0) would see no key at all, and SDPA returns NaN for such a row; harmless, as
        # the row is dropped, but every position also sees itself so that nothing anywhere is NaN.
        causal = torch.ones(P, P, dtype=torch.bool, device=h.device).tril()  # (P, P)
        mask = (causal & self.key_mask[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=h.device)
        cos, sin = self.cos[self.prompt_positions], self.sin[self.prompt_positions]  # (N, D) each
        cells = (self.rows, slice(None), self.cols)  # index of the N tokens' (N, K, D) in a (B, K, L, D) cache
        self.filled = P
        for i, layer in enumerate(self.trunk.layers):
            if i < len(self.trunk.layers) - 1:
                h = self._layer(i, layer, h, cos, sin, cells, prompt_mask=mask)
            else:  # only the logits of each row's last token are wanted: the last layer's queries, o_proj and MLP
                # run at those B tokens alone (their keys and values are needed at every token, for the steps)
                h = self._layer(i, layer, h, cos, sin, cells, queries=self.last)
        return self._logits(h)

    def step(self, tokens, running=None):
        """tokens (B,) the newest token of each row -> (B, V) logits of the one after it. Fills one cache column.

        running (B,) bool: the rows still sampling (None: all). A row that has stopped needs no more logits, and in
        an RL rollout most rows stop long before max_new_tokens (the toy's responses: 5-13 tokens of 24), so once at
        most half of the rows computed are still running, the stopped ones leave the batch (`_drop_stopped`): from
        then on a step costs what its running rows cost. A stopped row's logits are zeros (the sampler pads it)."""
        if running is not None:
            self._drop_stopped(running)
        h = self.trunk.embed_tokens(tokens[self.rows_kept])  # (b, E): the b rows still computed
        cos, sin = self.cos[self.next_position], self.sin[self.next_position]  # (b, D) each
        cells = (slice(None), slice(None), self.filled)  # the next column of every row: (b, K, D)
        self.key_mask[:, self.filled] = True
        self.filled += 1
        for i, layer in enumerate(self.trunk.layers):
            h = self._layer(i, layer, h, cos, sin, cells)
        self.next_position = self.next_position + 1
        logits = self._logits(h)  # (b, V)
        if len(self.rows_kept) == len(tokens):
            return logits
        return logits.new_zeros(len(tokens), logits.shape[-1]).index_copy(0, self.rows_kept, logits)  # (B, V)

    def _drop_stopped(self, running):
        """Keep only the running rows in the cache, once they are at most half of the rows computed (each drop
        copies the cache, so it happens at most log2(B) times: at most one cache copy in all)."""
        keep = running[self.rows_kept]  # (b,) bool
        n = int(keep.sum())
        if n == 0 or 2 * n > len(keep):
            return
        self.rows_kept, self.key_mask = self.rows_kept[keep], self.key_mask[keep]
        self.next_position = self.next_position[keep]
        self.keys = [k[keep] for k in self.keys]  # (b, K, L, D) each
        self.values = [v[keep] for v in self.values]

    def _logits(self, h):
        """(B, E) last layer's states at each row's newest token -> (B, V) logits."""
        return self.model.lm_head(self.trunk.norm(h)[:, None])[:, 0]  # (B, 1, E) -> (B, 1, V), as the HF forward

    def _layer(self, i, layer, h, cos, sin, cells, queries=None, prompt_mask=None):
        """Decoder layer i on h (N, E), the states of N tokens at rotary cos/sin (N, D); their keys and values go to
        `cells` of the cache. queries: indices of the N' <= N tokens whose output is wanted (None: all) -> (N', E).
        prompt_mask: attention of the prefill's (N, H, D) queries over the prompt; None: one query per row, its
        newest token (a decode step, and the prefill's last layer)."""
        attn, N, D = layer.self_attn, h.shape[0], self.head_dim
        x = layer.input_layernorm(h)  # (N, E)
        k = apply_rope(self._linear(attn.k_proj, x).view(N, self.kv_heads, D), cos, sin)  # (N, K, D)
        v = self._linear(attn.v_proj, x).view(N, self.kv_heads, D)  # (N, K, D)
        if i == len(self.keys):  # first pass: allocate this layer's cache (zeros: padding's keys stay finite)
            B = self.key_mask.shape[0]
            self.keys.append(k.new_zeros(B, self.kv_heads, self.length, D))  # (B, K, L, D)
            self.values.append(v.new_zeros(B, self.kv_heads, self.length, D))
        self.keys[i][cells], self.values[i][cells] = k, v
        if queries is not None:  # only these tokens' outputs are wanted
            h, x, cos, sin = h[queries], x[queries], cos[queries], sin[queries]  # (N', E), (N', E), (N', D)
        q = apply_rope(self._linear(attn.q_proj, x).view(h.shape[0], self.heads, D), cos, sin)  # (N', H, D)
        out = self._attend_last(i, q) if prompt_mask is None else self._attend_prompt(i, q, prompt_mask)
        h = h + self._linear(attn.o_proj, out)  # (N', E)
        x, mlp = layer.post_attention_layernorm(h), layer.mlp  # the gated MLP: down(act(gate(x)) * up(x))
        gated = mlp.act_fn(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x)  # (N', intermediate)
        return h + self._linear(mlp.down_proj, gated)  # (N', E)

    def _linear(self, layer, x):
        """layer(x), with a LoRA layer's merged weight when there is one (merged_lora_weights)."""
        weight = self.merged.get(layer)
        return layer(x) if weight is None else F.linear(x, weight, layer.base_layer.bias)

    def _attend_last(self, i, q):
        """q (B, H, D): each row's newest query -> (B, H·D) attention over layer i's cache up to that query.

        It runs over all L columns, those not written yet masked (they hold zeros): on the strided slice [:n] of
        the cache, torch's CPU attention kernel was slower despite reading fewer columns (tiny model, batch 64,
        one thread: 757 µs a call at n = 43 against 511 µs over L = 56; 23 steps 200 ms against 169-175 ms). When
        max_new_tokens is much longer than the prompt, the early steps read many empty columns (at most ~2x the
        attention work of reading only the written ones)."""
        B, D, G = q.shape[0], self.head_dim, self.heads // self.kv_heads
        keys, values = self.keys[i], self.values[i]  # (B, K, L, D)
        mask = self.key_mask[:, None, None, :]  # (B, 1, 1, L): the real keys written so far
        # the G query heads sharing a key/value head are G query rows of it (head h = k·G + g, as repeat_kv orders)
        out = F.scaled_dot_product_attention(q.view(B, self.kv_heads, G, D), keys, values, attn_mask=mask,
                                             scale=self.scale)  # (B, K, G, D)
        return out.reshape(B, self.heads * D)

    def _attend_prompt(self, i, q, mask):
        """q (N, H, D) the prompt tokens' queries -> (N, H·D), causal attention over the prompt's P columns."""
        P, G = mask.shape[-1], self.heads // self.kv_heads
        grid = q.new_zeros(self.key_mask.shape[0], self.heads, P, self.head_dim)  # (B, H, P, D)
        grid[self.rows, :, self.cols] = q
        keys = self.keys[i][:, :, :P].repeat_interleave(G, dim=1)  # (B, H, P, D) transformers' repeat_kv
        values = self.values[i][:, :, :P].repeat_interleave(G, dim=1)
        out = F.scaled_dot_product_attention(grid, keys, values, attn_mask=mask, scale=self.scale)  # (B, H, P, D)
        return out[self.rows, :, self.cols].reshape(q.shape[0], self.heads * self.head_dim)  # (N, H·D)
