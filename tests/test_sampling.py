"""The hand-written sampler against transformers' generate, a no-cache recompute, exact distributions and scripts."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import make_tiny_gpt2, make_tiny_llama
from minirlhf.heads import response_logprobs
from minirlhf.sampling import sample, top_k_filter, top_p_filter

PAD, EOS = 0, 2


def left_padded_prompts(lengths, vocab=101, seed=0):
    """Random prompts of the given lengths, left-padded with PAD: (B, P) ids and mask."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def greedy_eos(model, ids, mask):
    """A token that greedy decoding emits at step 3 of row 0, used as EOS so rows stop at different steps."""
    out = sample(model, ids, mask, 6, eos_token_id=100, pad_token_id=PAD, temperature=0)
    return int(out.response_ids[0, 3])


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2])
def test_greedy_matches_transformers_generate(make_model):
    model = make_model()
    ids, mask = left_padded_prompts([5, 3, 7, 1, 6])
    eos = greedy_eos(model, ids, mask)
    ours = sample(model, ids, mask, 12, eos_token_id=eos, pad_token_id=PAD, temperature=0)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            eos_token_id=eos, pad_token_id=PAD)[:, ids.shape[1]:]
    assert ours.response_mask[0].sum() == 4 and ours.response_ids[0, 3] == eos  # row 0 really stops at EOS
    assert theirs.shape == ours.response_ids.shape
    assert torch.equal(ours.response_ids, theirs)  # token for token, and PAD after each EOS in both
    for row, m in zip(ours.response_ids, ours.response_mask):
        n = int(m.sum())
        assert torch.all(m[:n] == 1) and torch.all(m[n:] == 0) and torch.all(row[n:] == PAD)
        if (row[:n] == eos).any():  # a row that stopped has exactly one EOS, its last real token
            assert row[n - 1] == eos and (row[:n] == eos).sum() == 1


def test_top_k_1_equals_greedy():
    model = make_tiny_llama(seed=1)
    ids, mask = left_padded_prompts([4, 2, 6], seed=1)
    greedy = sample(model, ids, mask, 10, eos_token_id=EOS, pad_token_id=PAD, temperature=0)
    top1 = sample(model, ids, mask, 10, eos_token_id=EOS, pad_token_id=PAD, temperature=1.3, top_k=1,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.response_ids, top1.response_ids)
    assert torch.allclose(top1.logprobs, torch.zeros_like(top1.logprobs))  # a one-token distribution: log 1 = 0


def test_kv_cache_step_logits_equal_full_recompute():
    model = make_tiny_llama(seed=2)
    ids, mask = left_padded_prompts([3, 7, 5], seed=2)
    seen = []  # the last-position logits of every forward call the sampler makes
    hook = model.register_forward_hook(lambda mod, args, out: seen.append(out.logits[:, -1].detach().clone()))
    out = sample(model, ids, mask, 8, eos_token_id=EOS, pad_token_id=PAD, temperature=0.9, min_new_tokens=8,
                 generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert len(seen) == 8
    for step, cached in enumerate(seen):
        full_ids = torch.cat([ids, out.response_ids[:, :step]], 1)
        full_mask = torch.cat([mask, torch.ones(3, step, dtype=torch.long)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            fresh = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions, use_cache=False)
        torch.testing.assert_close(cached, fresh.logits[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_response_logprobs(temperature):
    model = make_tiny_llama(seed=3)
    ids, mask = left_padded_prompts([6, 2, 4, 5], seed=3)
    out = sample(model, ids, mask, 10, eos_token_id=EOS, pad_token_id=PAD, temperature=temperature,
                 generator=torch.Generator().manual_seed(1))
    full_ids = torch.cat([ids, out.response_ids], 1)  # left-padded prompt + right-padded response
    full_mask = torch.cat([mask, out.response_mask], 1)
    resp_mask = torch.cat([torch.zeros_like(mask), out.response_mask], 1)
    with torch.no_grad():
        lp = response_logprobs(model, full_ids, full_mask, resp_mask, temperature=temperature)
    torch.testing.assert_close(lp[:, ids.shape[1]:], out.logprobs, atol=1e-5, rtol=0)
    assert torch.all(out.logprobs[out.response_mask == 0] == 0)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])
    kept = lambda p: set(torch.nonzero(top_p_filter(probs.log(), p) > float("-inf")).flatten().tolist())
    assert kept(0.45) == {1}  # 0.5 alone reaches 0.45
    assert kept(0.65) == {1, 3}  # 0.5 + 0.2 = 0.7 >= 0.65
    assert kept(0.75) == {1, 3, 4}  # 0.85
    assert kept(0.9) == {1, 3, 4, 2}  # 0.95
    assert kept(0.99) == {0, 1, 2, 3, 4}
    assert kept(1.0) == {0, 1, 2, 3, 4}
    dyadic = torch.tensor([0.125, 0.5, 0.25, 0.125]).log()  # exact in float32: mass exactly at p is enough
    assert torch.equal(top_p_filter(dyadic, 0.5) > float("-inf"), torch.tensor([False, True, False, False]))
    assert torch.equal(top_p_filter(dyadic, 0.75) > float("-inf"), torch.tensor([False, True, True, False]))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 123, generator=g, dtype=torch.float64) * 2
    for p in (0.1, 0.5, 0.93):  # against a Python loop over the sorted probabilities
        got = top_p_filter(logits, p) > float("-inf")
        for row, keep in zip(logits.softmax(-1), got):
            order, total, want = row.argsort(descending=True).tolist(), 0.0, set()
            for i in order:
                if total >= p:
                    break
                want.add(i)
                total += row[i].item()
            assert set(torch.nonzero(keep).flatten().tolist()) == want


def test_top_k_filter_keeps_k_largest():
    logits = torch.randn(7, 123, generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 122):
        kept = top_k_filter(logits, k) > float("-inf")
        assert torch.equal(kept.sum(-1), torch.full((7,), k))
        assert torch.all(logits[kept].view(7, k).min(-1).values >= logits[~kept].view(7, -1).max(-1).values)
    assert torch.equal(top_k_filter(logits, 0), logits)


class FixedLogits(nn.Module):
    """A toy 'model' whose next-token logits are always the same vector (V,), whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], input_ids.shape[1], -1),
                               past_key_values=None)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 4, 1.0), (1.0, 0, 0.7),
                                                     (0.8, 5, 0.9)])
def test_sampled_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7, -2.0, 0.3])  # V = 10, EOS = index 2
    # the expected distribution, written independently in float64 and plain Python
    probs = (logits.double() / temperature).softmax(-1).tolist()
    order = sorted(range(10), key=lambda i: -probs[i])
    keep = order[:top_k] if top_k else order
    probs = [probs[i] / sum(probs[j] for j in keep) if i in keep else 0.0 for i in range(10)]  # renormalised top-k
    mass, nucleus = 0.0, []
    for i in keep:
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += probs[i]
    expected = torch.zeros(10, dtype=torch.float64)
    expected[nucleus] = torch.tensor([probs[i] for i in nucleus], dtype=torch.float64) / mass
    n = 20_000
    out = sample(FixedLogits(logits), torch.ones(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long), 1,
                 eos_token_id=EOS, pad_token_id=PAD, temperature=temperature, top_k=top_k, top_p=top_p,
                 generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out.response_ids[:, 0], minlength=10).double() / n
    assert 0.5 * (freq - expected).abs().sum() < 0.02  # total variation
    assert torch.all(expected[out.response_ids[:, 0]] > 0)  # never a filtered-out token
    torch.testing.assert_close(out.logprobs[:, 0].double(), expected[out.response_ids[:, 0]].log(), atol=1e-5,
                               rtol=0)


class Scripted(nn.Module):
    """A toy model that puts logit 10 on script[b][step] and logit 5 on token `alt`, so greedy follows the script
    unless the scripted token is forbidden (min_new_tokens), and then takes `alt`."""

    def __init__(self, script, alt=7, vocab=16):
        super().__init__()
        self.script, self.alt, self.vocab, self.calls = torch.tensor(script), alt, vocab, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        logits[:, -1, self.alt] = 5.0
        logits[torch.arange(B), -1, self.script[:, self.calls]] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_eos_and_stop_tokens_end_rows_and_pad_after():
    script = [[5, EOS, 9, 9, 9], [6, 8, 9, 10, 11], [EOS, 3, 3, 3, 3], [4, 4, 4, 4, 4]]
    ids, mask = torch.ones(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long)
    out = sample(Scripted(script), ids, mask, 5, eos_token_id=EOS, pad_token_id=PAD, temperature=0,
                 stop_token_ids=(9,))
    assert out.response_ids.tolist() == [[5, EOS, PAD, PAD, PAD], [6, 8, 9, PAD, PAD], [EOS, PAD, PAD, PAD, PAD],
                                         [4, 4, 4, 4, 4]]
    assert out.response_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert out.ended.tolist() == [True, True, True, False]  # stopped by EOS / the stop token; row 3 was cut off
    # all rows done after 2 steps -> the loop stops early
    early = sample(Scripted(script[:3]), ids[:3], mask[:3], 5, eos_token_id=EOS, pad_token_id=PAD, temperature=0,
                   stop_token_ids=(9,))
    assert early.response_ids.shape == (3, 3)


def test_min_new_tokens_forbids_stopping_early():
    script = [[EOS, EOS, EOS, EOS], [3, 9, 4, EOS]]
    ids, mask = torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)
    out = sample(Scripted(script), ids, mask, 4, eos_token_id=EOS, pad_token_id=PAD, temperature=0,
                 min_new_tokens=2, stop_token_ids=(9,))
    assert out.response_ids.tolist() == [[7, 7, EOS, PAD], [3, 7, 4, EOS]]  # EOS / stop token 9 replaced by alt 7
    model = make_tiny_llama(seed=4)
    ids, mask = left_padded_prompts([3, 5], seed=4)
    out = sample(model, ids, mask, 6, eos_token_id=EOS, pad_token_id=PAD, min_new_tokens=6,
                 generator=torch.Generator().manual_seed(0))
    assert out.response_mask.sum() == 12 and not torch.isin(out.response_ids, torch.tensor([EOS])).any()


def test_bad_arguments_raise_one_line_errors():
    model = make_tiny_llama()
    ids, mask = left_padded_prompts([3, 2])
    with pytest.raises(ValueError, match="pad_token_id == eos_token_id"):
        sample(model, ids, mask, 4, eos_token_id=EOS, pad_token_id=EOS)
    right_padded = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, ids, right_padded, 4, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        sample(model, ids, mask, 4, eos_token_id=EOS, pad_token_id=PAD, top_p=0.0)


def test_sampler_restores_training_mode():
    model = make_tiny_llama().train()
    ids, mask = left_padded_prompts([3, 2])
    sample(model, ids, mask, 3, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert model.training
