"""Forward passes without padding: pack a padded batch's rows into fewer, fuller rows, run the trunk once, and put
every token's final hidden state back where it sat in the padded grid, so nothing downstream changes.

Legend: B rows, T padded width, N real tokens, S packed rows, L packed width (plan: the longest row's length, or up to
twice that for short rows), H hidden.
A rollout is padded on both sides (prompts on the left to the longest prompt, responses on the right to the longest
response) and a DPO / reward batch to its longest pair, so a forward pass computes many positions nobody reads:
the toy GRPO run's last rollout is 64 x 43 with 54 % real tokens. Here the real tokens of each row are laid end to
end (first-fit decreasing: the longest rows first, each into the first packed row with room), each keeps its own
positions 0, 1, 2, ... and attends only to itself: a block-diagonal causal mask

    mask[s, 0, q, k] = (segment[s, q] == segment[s, k]) and k <= q        (S, 1, L, L), True = attend

so every real token sees exactly the tokens it saw in the padded row, and its hidden state is the same up to float
rounding (tests/test_unpad.py). It is what SFT's packing does to documents (data/packing.py), with the attention kept
apart as in the "packing with position ids" of Krell et al. 2021 ("Efficient Sequence Packing without
Cross-contamination", Sec. 3).

Used by heads.final_hidden when it saves work (`worth_packing`) and the model runs SDPA attention, which takes the
boolean 4-D mask as given (transformers passes a 4-D mask through unchanged; an eager attention would add it, so it is
left alone, as is flash attention, which has a variable-length kernel of its own).
"""
from typing import NamedTuple

import torch

# A packed row is as wide as the longest row or, for short rows, up to twice that within SHORT_ROWS positions: wider
# rows fit the short rows more tightly (DPO batches of the built-in world, 64 % real tokens, pack into 81 % of their
# padded positions at the longest row's width, into 69 % at twice that), and at these widths attention is a small
# part of a layer (4·L·H FLOPs a token against ~24·H² for the projections). Longer rows keep their width: attention
# grows with it.
SHORT_ROWS = 128
# Pack when the packed rows hold at most this share of the padded grid's positions: below it the shorter pass pays for
# building the mask and moving states; a batch that is nearly full runs as it is.
MAX_PACKED_SHARE = 0.8


class Packing(NamedTuple):
    """Where each of the N real tokens goes: `src` its flat index in the padded (B * T) grid, `dst` in the packed
    (S * L) one; the packed rows' position ids and segment ids (S, L) (a slot after the last sequence of a packed row
    is filler: its own segment, position ids counting on)."""
    src: torch.Tensor           # (N,)
    dst: torch.Tensor           # (N,)
    position_ids: torch.Tensor  # (S, L)
    segment: torch.Tensor       # (S, L)


def plan(attention_mask):
    """(B, T) 0/1 mask of a padded batch (padding on either side or both) -> Packing, or None when some row's real
    tokens are not one contiguous run (or a row has none): such a batch is not packed."""
    mask = attention_mask.bool()
    B, T = mask.shape
    lengths = mask.sum(-1).tolist()
    first = mask.float().argmax(-1).tolist()  # (B,) first real column of each row
    last = (T - 1 - mask.flip(-1).float().argmax(-1)).tolist()  # (B,) last real column
    if min(lengths) == 0 or any(n != b - a + 1 for n, a, b in zip(lengths, first, last)):
        return None
    L = max(max(lengths), min(2 * max(lengths), SHORT_ROWS))  # the packed width
    fill = []  # tokens used in each packed row
    where = [None] * B  # (packed row, offset) of each padded row
    for row in sorted(range(B), key=lambda r: -lengths[r]):  # first-fit decreasing
        s = next((s for s, used in enumerate(fill) if used + lengths[row] <= L), len(fill))
        if s == len(fill):
            fill.append(0)
        where[row], fill[s] = (s, fill[s]), fill[s] + lengths[row]
    S, device = len(fill), attention_mask.device
    src, dst = [], []
    position_ids = torch.arange(L).repeat(S, 1)  # (S, L); real slots are overwritten below, filler counts on
    segment = torch.full((S, L), -1, dtype=torch.long)  # filler: -1 until its own id below
    for row, (s, offset) in enumerate(where):
        n = lengths[row]
        src.append(torch.arange(row * T + first[row], row * T + first[row] + n))
        dst.append(torch.arange(s * L + offset, s * L + offset + n))
        position_ids[s, offset:offset + n] = torch.arange(n)
        segment[s, offset:offset + n] = row
    segment[segment < 0] = B  # all filler: one segment (attends only to filler)
    position_ids[segment == B] = 0  # filler positions: any finite value; it is read by no real token
    return Packing(torch.cat(src).to(device), torch.cat(dst).to(device), position_ids.to(device), segment.to(device))


def worth_packing(attention_mask, packing):
    """True when there is a packing and its rows hold at most MAX_PACKED_SHARE of the padded positions."""
    if packing is None:
        return False
    S, L = packing.position_ids.shape
    return S * L <= MAX_PACKED_SHARE * attention_mask.numel()


def block_causal_mask(segment):
    """(S, L) segment ids -> (S, 1, L, L) bool: a position attends to the positions of its own segment up to itself."""
    L = segment.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment.device).tril()  # (L, L) k <= q
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # (S, 1, L, L)


def pack(input_ids, packing):
    """(B, T) padded token ids -> (S, L) packed ids (filler slots hold the first real token's id: any id will do)."""
    S, L = packing.position_ids.shape
    packed = input_ids.flatten()[packing.src[:1]].repeat(S * L)  # (S * L,)
    packed[packing.dst] = input_ids.flatten()[packing.src]
    return packed.view(S, L)


def unpack(hidden, packing, B, T):
    """(S, L, H) packed states -> (B, T, H) on the padded grid, zeros at padding (differentiable: a gather and an
    index_copy)."""
    H = hidden.shape[-1]
    states = hidden.reshape(-1, H)[packing.dst]  # (N, H)
    return states.new_zeros(B * T, H).index_copy(0, packing.src, states).view(B, T, H)


def packed_forward(trunk, input_ids, attention_mask, packing):
    """(B, T) ids and mask -> (B, T, H): trunk's last hidden states computed on the packed rows."""
    B, T = input_ids.shape
    out = trunk(input_ids=pack(input_ids, packing), attention_mask=block_causal_mask(packing.segment),
                position_ids=packing.position_ids, use_cache=False)
    return unpack(out.last_hidden_state, packing, B, T)
