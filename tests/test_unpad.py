"""minirlhf/fast/unpad.py: a padded batch run packed (padding dropped, shared prefixes computed once) gives every real
token the hidden state, and every LoRA weight the gradient, it has when each row runs alone."""
import torch

from minirlhf import heads
from minirlhf.fast import unpad
from minirlhf.heads import final_hidden, trunk
from minirlhf.training import make_trainable


def _batch(rows, T, pad_id=0):
    """rows: (left padding, token list) per row -> (B, T) ids and mask, the rest of each row right padding."""
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, (left, tokens) in enumerate(rows):
        ids[r, left:left + len(tokens)] = torch.tensor(tokens)
        mask[r, left:left + len(tokens)] = 1
    return ids, mask


def _random_rows(seed=0):
    """GRPO-like: two prompts, each with 3 responses (one response repeated: a duplicate row), plus two lone rows,
    with left padding on some rows (as rollouts) and right padding on all."""
    g = torch.Generator().manual_seed(seed)
    tok = lambda n: torch.randint(3, 100, (n,), generator=g).tolist()  # noqa: E731
    p1, p2, r = tok(6), tok(4), tok(3)
    rows = [(2, p1 + tok(4)), (2, p1 + r), (0, p2 + tok(5)), (2, p1 + tok(2)), (4, p2 + tok(1)), (0, tok(9)),
            (1, p2 + r), (2, p1 + r), (0, tok(3))]
    return _batch(rows, 12)


def _rows_alone(model, ids, mask):
    """Each row's real tokens run alone, without any padding: the reference."""
    return [trunk(model)(input_ids=ids[r][mask[r].bool()][None], use_cache=False).last_hidden_state[0]
            for r in range(len(ids))]


def test_plan_shares_prefixes_and_places_every_real_token():
    ids, mask = _batch([(0, [5, 6, 7, 8]), (1, [5, 6, 9]), (0, [5, 6, 7, 8]), (2, [4, 4]), (0, [5, 6, 7, 1])], 5)
    p = unpad.plan(ids, mask)
    S, L = p.position_ids.shape
    assert (S, L) == (1, 8)  # sorted: [4 4] [5 6 7 1] [5 6 7 8] [5 6 7 8] [5 6 9]: 2 + 4 + 1 + 0 + 1 = 8 slots
    assert sorted(p.src.tolist()) == mask.flatten().nonzero().flatten().tolist()
    assert len(set(p.dst.tolist())) == 8 < mask.sum()  # 15 real tokens in 8 slots
    packed = unpad.pack(ids, p).flatten()
    for r in range(5):  # each row's tokens, in order, at positions 0..n-1, attending to its own path only
        path = p.dst[(p.src // 5) == r]
        assert packed[path].tolist() == ids[r][mask[r].bool()].tolist()
        assert p.position_ids.flatten()[path].tolist() == list(range(len(path)))
        att = p.attend[0, 0]
        for q in range(len(path)):
            assert att[path[q]].nonzero().flatten().tolist() == sorted(path[:q + 1].tolist())


def test_plan_refuses_holes_and_empty_rows():
    ones = torch.ones(2, 4, dtype=torch.long)
    assert unpad.plan(ones, torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])) is None
    assert unpad.plan(ones, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])) is None
    assert not unpad.worth_packing(ones, None)


def test_plan_opens_a_new_packed_row_when_the_next_one_does_not_fit():
    ids, mask = _batch([(0, [9] * 70), (0, [8] * 70), (0, [7] * 5)], 70)
    p = unpad.plan(ids, mask)
    # width 128, 2 x 70 > 128: the 70-token rows in two packed rows, the 5 before one; cut to the fullest, 75
    assert p.position_ids.shape == (2, 75)
    block = p.attend[0, 0]  # sorted: [7]*5, then [8]*70 in the first packed row, [9]*70 in the second
    assert not block[5:75, :5].any() and torch.equal(block[5:75, 5:75], torch.ones(70, 70, dtype=torch.bool).tril())


def test_packed_states_and_gradients_equal_each_row_alone(tiny_llama):
    model = tiny_llama
    params = make_trainable(model, "policy", lora_r=4, lora_alpha=8, lora_targets=["all-linear"])
    torch.manual_seed(0)
    for p in params:
        p.data.normal_(0, 0.05)  # a non-trivial adapter: B != 0
    ids, mask = _random_rows()
    p = unpad.plan(ids, mask)
    assert unpad.worth_packing(mask, p) and len(set(p.dst.tolist())) < mask.sum()  # prefixes were shared
    packed = unpad.packed_forward(trunk(model), ids, mask, p)  # (B, T, H)
    weights = torch.randn(packed.shape, generator=torch.Generator().manual_seed(1))
    (packed * weights)[mask.bool()].sum().backward()
    grads = [q.grad.clone() for q in params]
    for q in params:
        q.grad = None
    for r, alone in enumerate(_rows_alone(model, ids, mask)):
        torch.testing.assert_close(packed[r][mask[r].bool()], alone, atol=2e-5, rtol=1e-4)
        (alone * weights[r][mask[r].bool()]).sum().backward()
        assert (packed[r][~mask[r].bool()] == 0).all()
    for got, want in zip(grads, [q.grad for q in params]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_final_hidden_packs_only_when_it_saves_work_and_matches_the_padded_pass(tiny_llama, monkeypatch):
    calls = []
    real_forward = unpad.packed_forward
    monkeypatch.setattr(unpad, "packed_forward", lambda *a: calls.append(1) or real_forward(*a))
    ids, mask = _random_rows(seed=3)
    with torch.no_grad():
        got = final_hidden(tiny_llama, ids, mask)
        want = trunk(tiny_llama)(input_ids=ids, attention_mask=mask, position_ids=heads.position_ids_from_mask(mask),
                                 use_cache=False).last_hidden_state
    assert calls == [1]
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=1e-4)
    distinct = torch.arange(30).view(3, 10) + 3  # three full rows, nothing shared: nothing to gain
    with torch.no_grad():
        final_hidden(tiny_llama, distinct, torch.ones(3, 10, dtype=torch.long))
    assert calls == [1]


def test_only_sdpa_models_without_sliding_windows_are_packed():
    from transformers import AutoConfig, AutoModelForCausalLM

    def model(**kw):
        config = AutoConfig.for_model("mistral", vocab_size=101, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, **kw)
        return AutoModelForCausalLM.from_config(config)
    assert unpad.supports(model(sliding_window=None))
    assert not unpad.supports(model(sliding_window=16))  # the window lives in the mask transformers builds
    assert not unpad.supports(model(sliding_window=None, attn_implementation="eager"))  # eager adds masks
