"""unpad.py: a padded batch run packed gives every real token the hidden state it has when its row runs alone."""
import torch

from minirlhf import heads, unpad
from minirlhf.heads import final_hidden, trunk
from minirlhf.training import make_trainable


def _batch(rows, T, pad_id=0, seed=0):
    """rows: (left padding, real tokens) per row -> (B, T) ids and mask, real tokens random, the rest right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, (left, n) in enumerate(rows):
        ids[r, left:left + n] = torch.randint(3, 100, (n,), generator=g)
        mask[r, left:left + n] = 1
    return ids, mask


def test_plan_first_fit_decreasing_places_every_real_token_once():
    _, mask = _batch([(0, 6), (2, 3), (5, 1), (1, 2), (0, 4)], 8)
    p = unpad.plan(mask)
    S, L = p.position_ids.shape
    assert L == 12 and S == 2  # width 2 x 6: 6 + 4 + 2 | 3 + 1 (+ 8 filler): lengths 6, 4, 3, 2, 1, longest first
    assert sorted(p.src.tolist()) == mask.flatten().nonzero().flatten().tolist()
    assert len(set(p.dst.tolist())) == len(p.dst) == mask.sum()
    for r in range(5):  # each row's tokens keep their order, positions 0.. n-1, in one segment
        rows_dst = p.dst[(p.src // 8) == r]
        seg = p.segment.flatten()[rows_dst]
        assert (seg == r).all() and p.position_ids.flatten()[rows_dst].tolist() == list(range(len(rows_dst)))
    assert (p.segment.flatten()[[i for i in range(S * L) if i not in set(p.dst.tolist())]] == 5).all()  # filler


def test_plan_refuses_holes_and_empty_rows():
    assert unpad.plan(torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])) is None
    assert unpad.plan(torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])) is None
    assert not unpad.worth_packing(torch.ones(2, 4), None)


def test_block_causal_mask_against_a_loop():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = unpad.block_causal_mask(seg)
    assert m.shape == (1, 1, 6, 6)
    want = [[int(seg[0, q] == seg[0, k] and k <= q) for k in range(6)] for q in range(6)]
    assert m[0, 0].int().tolist() == want


def test_packed_states_and_gradients_equal_each_row_alone(tiny_llama):
    model = tiny_llama
    params = make_trainable(model, "policy", lora_r=4, lora_alpha=8, lora_targets=["all-linear"])
    torch.manual_seed(0)
    for p in params:
        p.data.normal_(0, 0.05)  # a non-trivial adapter: B != 0
    ids, mask = _batch([(4, 8), (0, 12), (9, 2), (2, 5), (6, 6)], 12)
    p = unpad.plan(mask)
    assert unpad.worth_packing(mask, p)
    packed = unpad.packed_forward(trunk(model), ids, mask, p)  # (B, T, H)
    packed[mask.bool()].square().sum().backward()
    grads = [q.grad.clone() for q in params]
    for q in params:
        q.grad = None
    for r in range(len(ids)):  # the reference: each row's real tokens alone, no padding at all
        real = ids[r][mask[r].bool()][None]
        alone = trunk(model)(input_ids=real, use_cache=False).last_hidden_state[0]
        torch.testing.assert_close(packed[r][mask[r].bool()], alone, atol=2e-5, rtol=1e-4)
        alone.square().sum().backward()
        assert (packed[r][~mask[r].bool()] == 0).all()
    for got, want in zip(grads, [q.grad for q in params]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_final_hidden_packs_only_a_padded_batch_and_matches_the_padded_pass(tiny_llama, monkeypatch):
    calls = []
    real_forward = unpad.packed_forward
    monkeypatch.setattr(unpad, "packed_forward", lambda *a: calls.append(1) or real_forward(*a))
    ids, mask = _batch([(0, 3), (0, 12), (7, 5), (1, 2)], 12)
    with torch.no_grad():
        got = final_hidden(tiny_llama, ids, mask)
        want = trunk(tiny_llama)(input_ids=ids, attention_mask=mask, position_ids=heads.position_ids_from_mask(mask),
                                 use_cache=False).last_hidden_state
    assert calls == [1]
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=1e-4)
    full = torch.ones(3, 10, dtype=torch.long)
    with torch.no_grad():
        final_hidden(tiny_llama, ids[:3, :10], full)
    assert calls == [1]  # nothing to gain: the padded pass
