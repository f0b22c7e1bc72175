"""Rollout bookkeeping (minirlhf/rollout.py) against independent references: Python loops, hand-computed numbers,
float64 torch. Tolerances: exact (== or atol 1e-6) for placement and float32 arithmetic, 1e-5 for model outputs.

Also heads.response_logprobs_and_states (PPO's one trunk pass for log-probs, entropy and value states) against the
Hugging Face model's own forward pass."""
import math

import pytest
import torch
import torch.nn.functional as F

from minirlhf.gae import gae
from minirlhf.heads import response_logprobs, response_logprobs_and_states
from minirlhf.rollout import minibatches
from minirlhf.token_rewards import (last_real_index, missing_eos_penalty, per_token_kl, sequence_logprobs,
                                    token_rewards, whiten_advantages, whiten_rewards)

EOS, PAD = 2, 0


def responses(lengths, R, ended, seed=0):
    """Right-padded response ids (B, R) and mask: row i has lengths[i] real tokens, the last one EOS if ended[i]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), R), PAD)
    for i, (n, e) in enumerate(zip(lengths, ended)):
        ids[i, :n] = torch.randint(3, 50, (n,), generator=g)
        if e:
            ids[i, n - 1] = EOS
    mask = torch.zeros(len(lengths), R, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def garbage_padding(x, mask, value=float("nan")):
    """x with every padding slot overwritten: results must not depend on what padding holds."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_on_last_real_token_with_and_without_eos(seed):
    # 7 responses of 11 columns: some end with EOS early, some are cut at max length (no EOS, mask all 1)
    lengths, ended = [1, 4, 11, 7, 11, 2, 9], [True, True, False, True, True, False, False]
    ids, mask = responses(lengths, 11, ended, seed)
    scores = torch.randn(7, generator=torch.Generator().manual_seed(seed))
    logprobs = garbage_padding(-torch.rand(7, 11), mask)
    rewards, kl = token_rewards(scores, logprobs, logprobs.clone(), mask, kl_coef=0.3)
    for i, n in enumerate(lengths):  # Python reference: the score sits at column n - 1 and nowhere else
        expected = [0.0] * 11
        expected[n - 1] = scores[i].item()
        assert rewards[i].tolist() == pytest.approx(expected, abs=0)
        if ended[i]:
            assert ids[i, n - 1] == EOS  # with an EOS, the score is on the EOS itself, never on the padding after it
    assert last_real_index(mask).tolist() == [n - 1 for n in lengths]
    assert not torch.isnan(rewards).any() and not torch.isnan(kl).any()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_is_zero_when_policy_is_reference(estimator):
    _, mask = responses([3, 6, 1, 6], 6, [True] * 4)
    logprobs = -torch.rand(4, 6, generator=torch.Generator().manual_seed(3))
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0])
    rewards, kl = token_rewards(scores, logprobs, logprobs.clone(), mask, kl_coef=10.0, estimator=estimator)
    assert torch.equal(kl, torch.zeros_like(kl))
    assert torch.equal(rewards.sum(-1), scores)  # only the scores remain


def test_token_rewards_hand_computed():
    # two responses, R = 3: lengths 2 and 3; kl_coef 0.5; k1 = logprob - ref_logprob
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, -0.5, -3.0]])  # 9.0 sits on padding
    ref = torch.tensor([[-1.5, -1.0, -7.0], [-0.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = token_rewards(scores, logprobs, ref, mask, kl_coef=0.5, estimator="k1")
    # row 0: k1 = [0.5, -1.0, (pad)] -> -0.5*k1 = [-0.25, 0.5, 0] ; + 2.0 on column 1 -> [-0.25, 2.5, 0]
    # row 1: k1 = [0.0, 0.5, -2.0]  -> [0, -0.25, 1.0] ; - 1.0 on column 2 -> [0, -0.25, 0.0]
    assert rewards.tolist() == [[-0.25, 2.5, 0.0], [0.0, -0.25, 0.0]]
    assert kl.tolist() == [[0.5, -1.0, 0.0], [0.0, 0.5, -2.0]]
    # k3 = (r - 1) - log r with r = exp(ref - logprob); k2 = (logprob - ref)^2 / 2
    _, kl3 = token_rewards(scores, logprobs, ref, mask, kl_coef=0.5, estimator="k3")
    assert kl3[0, 0].item() == pytest.approx(math.exp(-0.5) - 1 + 0.5, abs=1e-6)
    _, kl2 = token_rewards(scores, logprobs, ref, mask, kl_coef=0.5, estimator="k2")
    assert kl2[1, 2].item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_sum_of_token_rewards_is_score_minus_kl_of_sequence(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 13, 8, 13]
    _, mask = responses(lengths, 13, [True, True, False, True, False])
    logprobs, ref = -torch.rand(5, 13, generator=g, dtype=torch.float64), -torch.rand(5, 13, generator=g,
                                                                                     dtype=torch.float64)
    scores = torch.randn(5, generator=g, dtype=torch.float64)
    rewards, _ = token_rewards(scores, garbage_padding(logprobs, mask), ref, mask, kl_coef=0.2)
    for i, n in enumerate(lengths):  # float64 Python sum over the real tokens only
        expected = scores[i].item() - 0.2 * sum(logprobs[i, t].item() - ref[i, t].item() for t in range(n))
        assert rewards[i].sum().item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_are_zero_on_padding_and_ignore_it(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 1, 6, 9, 4, 2]
    _, mask = responses(lengths, 9, [True] * 7)
    logprobs, ref, values = (torch.randn(7, 9, generator=g) for _ in range(3))
    scores = torch.randn(7, generator=g)
    rewards, _ = token_rewards(scores, logprobs, ref, mask, kl_coef=0.1, estimator="k3")
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    white = whiten_advantages(advantages, mask)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all() and (white[mask == 0] == 0).all()
    # the same rollout with garbage in every padding slot gives the same advantages
    rewards2, _ = token_rewards(scores, garbage_padding(logprobs, mask, 1e6), garbage_padding(ref, mask, -1e6), mask,
                                kl_coef=0.1, estimator="k3")
    advantages2, _ = gae(rewards2, garbage_padding(values, mask, 1e6), mask, gamma=1.0, lam=0.95)
    assert torch.equal(advantages, advantages2)
    real = white[mask.bool()].double()
    assert real.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased std, as ops.masked_var


def test_whiten_rewards_keeps_the_mean_and_sign():
    _, mask = responses([4, 2, 5], 5, [True] * 3)
    rewards = garbage_padding(torch.tensor([[1.0, 2, 3, 4, 0], [5, 6, 0, 0, 0], [7, 8, 9, 10, 11]]), mask)
    out = whiten_rewards(rewards, mask)
    real = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], dtype=torch.float64)
    expected = (real - real.mean()) / real.std() + real.mean()  # float64 reference
    assert out[mask.bool()].double().tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert (out[mask == 0] == 0).all()


def test_missing_eos_penalty_only_hits_unfinished_responses():
    scores = torch.tensor([1.0, 1.0, -2.0])
    out = missing_eos_penalty(scores, torch.tensor([True, False, False]), 0.5)
    assert out.tolist() == [1.0, 0.5, -2.5]


def test_sequence_logprobs_and_per_token_kl_match_loops():
    g = torch.Generator().manual_seed(4)
    lengths = [2, 7, 5]
    _, mask = responses(lengths, 7, [True] * 3)
    logprobs, ref = -torch.rand(3, 7, generator=g), -torch.rand(3, 7, generator=g)
    seq = sequence_logprobs(garbage_padding(logprobs, mask), mask)
    kl = per_token_kl(garbage_padding(logprobs, mask), ref, mask, "k1")
    for i, n in enumerate(lengths):
        assert seq[i].item() == pytest.approx(sum(logprobs[i, :n].tolist()), abs=1e-5)
        assert kl[i, :n].tolist() == pytest.approx((logprobs[i, :n] - ref[i, :n]).tolist(), abs=1e-6)
        assert (kl[i, n:] == 0).all()


def test_minibatches_cover_every_index_once():
    batches = minibatches(37, 8, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
    assert sorted(torch.cat(batches).tolist()) == list(range(37))
    with pytest.raises(ValueError):
        minibatches(4, 5)


def test_group_minibatches_hold_whole_groups_in_order():
    G = 4
    batches = minibatches(24, 8, torch.Generator().manual_seed(0), group_size=G)  # 6 groups, 2 per minibatch
    assert [len(b) for b in batches] == [8, 8, 8]
    assert sorted(torch.cat(batches).tolist()) == list(range(24))
    for b in batches:
        for group in b.view(-1, G):  # each block of G rows is one whole group, its rows in order
            assert group.tolist() == list(range(group[0].item(), group[0].item() + G)) and group[0] % G == 0
    assert [b[0].item() for b in batches] != [0, 8, 16]  # the groups are shuffled (this seed moves them)
    with pytest.raises(ValueError, match="groups of 4"):
        minibatches(22, 8, group_size=G)


def test_bad_masks_are_refused():
    with pytest.raises(ValueError, match="contiguous"):
        last_real_index(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="at least one real token"):
        last_real_index(torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="estimator"):
        per_token_kl(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "k4")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_and_states_match_the_hf_forward(tiny_llama, temperature):
    """Left-padded prompt + right-padded response, as generate() lays them out."""
    model = tiny_llama
    input_ids = torch.tensor([[0, 0, 5, 6, 7, 8, 2, 0], [3, 4, 5, 6, 9, 10, 11, 2]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    response_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
    logprobs, entropy, states = response_logprobs_and_states(model, input_ids, attention_mask, response_mask,
                                                             temperature)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=True)
    logp = F.log_softmax(out.logits.double() / temperature, -1)  # (B, T, V), float64 reference
    for b in range(2):
        for t in range(1, 8):
            if response_mask[b, t]:  # token t is predicted by position t - 1
                assert logprobs[b, t].item() == pytest.approx(logp[b, t - 1, input_ids[b, t]].item(), abs=1e-5)
                assert entropy[b, t].item() == pytest.approx(-(logp[b, t - 1].exp() * logp[b, t - 1]).sum().item(),
                                                             abs=1e-5)
                assert torch.allclose(states[b, t], out.hidden_states[-1][b, t - 1], atol=1e-5)
            else:
                assert logprobs[b, t] == 0 and entropy[b, t] == 0
    assert torch.equal(states[:, 0], torch.zeros_like(states[:, 0]))
    assert torch.allclose(logprobs, response_logprobs(model, input_ids, attention_mask, response_mask, temperature),
                          atol=1e-6)
