"""Forward passes without padding, and without computing a shared prompt twice: pack a padded batch's rows into fewer,
fuller rows, run the trunk once, and put every token's final hidden state back where it sat in the padded grid, so
nothing downstream changes.

Legend: B rows, T padded width, N real tokens, S packed rows, L packed width (the longest row's length, or up to
twice that for short rows: SHORT_ROWS), H hidden.
Two kinds of waste in the batches RLHF runs through its model:
- padding: a rollout is padded on both sides (prompts on the left to the longest prompt, responses on the right to
  the longest response), a DPO / reward batch to its longest row: the toy GRPO run's last rollout is 64 x 43 with
  54 % real tokens;
- repeated prompts: GRPO samples each prompt G times, RLOO k times, a DPO or reward-model pair is one prompt with two
  responses, the held-out evaluation samples each prompt twice. A causal model's states at a prompt's tokens do not
  depend on what follows, so they are the same in every row that starts with that prompt.
So the rows are sorted (rows that start alike become neighbours), and each is laid into a packed row after its
neighbour, sharing the slots of their common prefix: a packed row holds a tree of token sequences (a trie). Each
slot keeps its position in its row (0, 1, 2, ...: the same in every row sharing it) and attends exactly to the slots
of its own row up to itself:

    attend[s, 0, q, k] = slot k lies on the path of slot q's row(s), at or before q     (S, 1, L, L), True = attend

(a block-diagonal causal mask when no rows share a prefix), so every real token sees exactly the tokens it saw in its
padded row, and its state is the same up to float rounding (tests/test_unpad.py: each row run alone; gradients too:
the states of a shared slot are gathered into every row that has it, and its gradient is their sum). It is SFT's
packing of documents (data/packing.py) with the attention kept apart, as in Krell et al. 2021 ("Efficient Sequence
Packing without Cross-contamination"), plus prefix sharing, as tree attention does for speculative decoding
(Miao et al. 2024, "SpecInfer": tree-based parallel decoding).

Used by heads.final_hidden (`packing_for`) when the switch fast.FAST_FORWARD is on, packing saves work
(`worth_packing`) and the model runs SDPA attention without sliding windows (`supports`): SDPA takes the boolean 4-D
mask as given (transformers passes a 4-D mask through unchanged; an eager attention would add it, so it is left
alone, as is flash attention, which has a variable-length kernel of its own; a sliding window would be lost in the
explicit mask).
"""
from typing import NamedTuple

import torch

# A packed row is as wide as the longest row or, for short rows, up to twice that within SHORT_ROWS positions: wider
# rows fit the short rows more tightly (DPO batches of the built-in world, 64 % real tokens, packed without prefix
# sharing: 81 % of their padded positions at the longest row's width, 69 % at twice that), and at these widths
# attention is a small part of a layer (4·L·H FLOPs a token against ~24·H² for the projections). Longer rows keep
# their width: attention grows with it.
SHORT_ROWS = 128
# Pack when the packed rows hold at most this share of the padded grid's positions: below it the shorter pass pays for
# building the mask and moving states; a batch that is nearly full runs as it is.
MAX_PACKED_SHARE = 0.8


def has_sliding_window(config):
    """True when some layer of the model attends through a sliding window (transformers builds that window into the
    mask it makes; decode.py's and this file's own masks have none)."""
    return any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()) or bool(
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


def supports(model):
    """True when the model takes packed rows as they are: SDPA attention (it reads the boolean 4-D mask as given) and
    no sliding-window layer (an explicit mask would replace the window transformers builds for it)."""
    return getattr(model.config, "_attn_implementation", None) == "sdpa" and not has_sliding_window(model.config)


class Packing(NamedTuple):
    """Where each of the N real tokens goes: `src` its flat index in the padded (B * T) grid, `dst` in the packed
    (S * L) one (rows sharing a prefix share its dst slots); the packed rows' position ids (S, L) and attention mask
    (S, 1, L, L). A slot after the last sequence of a packed row is filler: position 0, attending to itself only."""
    src: torch.Tensor           # (N,)
    dst: torch.Tensor           # (N,)
    position_ids: torch.Tensor  # (S, L)
    attend: torch.Tensor        # (S, 1, L, L) bool


def _common_prefix(a, b):
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plan(input_ids, attention_mask):
    """(B, T) ids and 0/1 mask of a padded batch (padding on either side or both) -> Packing, or None when some row's
    real tokens are not one contiguous run (or a row has none): such a batch is not packed.

    Rows in lexicographic order of their tokens; each goes into the current packed row after the previous one,
    sharing the slots of their common prefix (in sorted order the previous row has the longest one any earlier row
    has), or opens a new packed row when its new tokens do not fit."""
    mask = attention_mask.bool()
    B, T = mask.shape
    lengths = mask.sum(-1).tolist()
    first = mask.float().argmax(-1).tolist()  # (B,) first real column of each row
    last = (T - 1 - mask.flip(-1).float().argmax(-1)).tolist()  # (B,) last real column
    if min(lengths) == 0 or any(n != b - a + 1 for n, a, b in zip(lengths, first, last)):
        return None
    tokens = [ids[a:a + n] for ids, a, n in zip(input_ids.tolist(), first, lengths)]
    L = max(max(lengths), min(2 * max(lengths), SHORT_ROWS))  # the packed width
    fill, slots, packed_row, prev = [], [None] * B, [None] * B, None  # slots: each row's path of slot indices
    for row in sorted(range(B), key=lambda r: tokens[r]):
        shared = _common_prefix(tokens[prev], tokens[row]) if prev is not None else 0
        if prev is None or fill[-1] + lengths[row] - shared > L:  # a new packed row
            fill.append(0)
            shared = 0
        s = len(fill) - 1
        slots[row] = (slots[prev][:shared] if shared else []) + list(range(fill[s], fill[s] + lengths[row] - shared))
        packed_row[row], fill[s], prev = s, fill[s] + lengths[row] - shared, row
    S, L, device = len(fill), max(fill), attention_mask.device  # no packed row uses the columns after max(fill)
    position_ids = torch.zeros(S, L, dtype=torch.long)
    attend = torch.eye(L, dtype=torch.bool).repeat(S, 1, 1)  # (S, L, L): filler sees itself
    src, dst = [], []
    for row in range(B):
        s, path, n = packed_row[row], torch.tensor(slots[row]), lengths[row]
        src.append(torch.arange(row * T + first[row], row * T + first[row] + n))
        dst.append(s * L + path)
        position_ids[s, path] = torch.arange(n)
        attend[s][path[:, None], path[None, :]] |= torch.ones(n, n, dtype=torch.bool).tril()  # its own causal path
    return Packing(torch.cat(src).to(device), torch.cat(dst).to(device), position_ids.to(device),
                   attend[:, None].to(device))


def worth_packing(attention_mask, packing):
    """True when there is a packing and its rows hold at most MAX_PACKED_SHARE of the padded positions."""
    if packing is None:
        return False
    S, L = packing.position_ids.shape
    return S * L <= MAX_PACKED_SHARE * attention_mask.numel()


def packing_for(model, input_ids, attention_mask):
    """The Packing heads.final_hidden runs a (B, T) batch with, or None when it runs padded: one row, a model this
    file does not support, a batch it cannot pack, or one where packing does not save enough."""
    if input_ids.shape[0] < 2 or not supports(model):
        return None
    packing = plan(input_ids, attention_mask)
    return packing if worth_packing(attention_mask, packing) else None


def pack(input_ids, packing):
    """(B, T) padded token ids -> (S, L) packed ids (filler slots hold the first real token's id: any id will do)."""
    S, L = packing.position_ids.shape
    packed = input_ids.flatten()[packing.src[:1]].repeat(S * L)  # (S * L,)
    packed[packing.dst] = input_ids.flatten()[packing.src]  # a shared slot is written once per row: the same token
    return packed.view(S, L)


def unpack(hidden, packing, B, T):
    """(S, L, H) packed states -> (B, T, H) on the padded grid, zeros at padding (differentiable: a gather, whose
    backward adds up a shared slot's gradients from every row that has it, and an index_copy)."""
    H = hidden.shape[-1]
    states = hidden.reshape(-1, H)[packing.dst]  # (N, H)
    return states.new_zeros(B * T, H).index_copy(0, packing.src, states).view(B, T, H)


def packed_forward(trunk, input_ids, attention_mask, packing):
    """(B, T) ids and mask -> (B, T, H): trunk's last hidden states computed on the packed rows."""
    B, T = input_ids.shape
    out = trunk(input_ids=pack(input_ids, packing), attention_mask=packing.attend,
                position_ids=packing.position_ids, use_cache=False)
    return unpack(out.last_hidden_state, packing, B, T)
