"""gae.py against a brute-force double loop over Eq. 16's explicit sum (float64, tolerance 1e-10)."""
import pytest
import torch

from minirlhf.gae import gae

TOL = dict(rtol=1e-10, atol=1e-10)


def _batch(seed, B=7, T=13):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1  # a full row, a one-token row, the rest random (maybe empty)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()  # (B, T), padded tails of different lengths
    return rewards, values, mask, lengths.tolist()


def brute_force_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_{k=t}^{n-1} (gamma lam)^(k-t) delta_k, delta_k = r_k + gamma V_{k+1} - V_k, V_n = 0: plain floats."""
    B, T = rewards.shape
    advantages = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        r, v = rewards[b].tolist(), values[b].tolist()
        for t in range(n):
            for k in range(t, n):
                v_next = v[k + 1] if k + 1 < n else 0.0
                delta = r[k] + gamma * v_next - v[k]
                advantages[b][t] += (gamma * lam) ** (k - t) * delta
    return torch.tensor(advantages, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.5), (1.0, 1.0), (0.7, 0.0)])
def test_gae_matches_brute_force(seed, gamma, lam):
    rewards, values, mask, lengths = _batch(seed)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = brute_force_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected, **TOL)
    torch.testing.assert_close(returns, (expected + values) * mask, **TOL)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_lam_one_is_discounted_return_to_go_minus_value(seed):
    rewards, values, mask, lengths = _batch(seed)
    gamma = 0.9
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            return_to_go = sum(gamma ** (k - t) * rewards[b, k].item() for k in range(t, n))
            assert abs(returns[b, t].item() - return_to_go) < 1e-10
            assert abs(advantages[b, t].item() - (return_to_go - values[b, t].item())) < 1e-10


@pytest.mark.parametrize("seed", [0, 1])
def test_lam_zero_is_one_step_td_error(seed):
    rewards, values, mask, lengths = _batch(seed)
    gamma = 0.8
    advantages, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    v_next = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # V_{t+1}, 0 after end
    delta = (rewards + gamma * v_next - values) * mask
    torch.testing.assert_close(advantages, delta, **TOL)


@pytest.mark.parametrize("garbage", [1e9, -1e9, float("inf"), float("nan")])
def test_padding_values_never_change_real_tokens(garbage):
    rewards, values, mask, _ = _batch(4)
    clean = gae(rewards, values, mask)
    pad = mask == 0
    dirty = gae(rewards.masked_fill(pad, garbage), values.masked_fill(pad, garbage), mask)
    for c, d in zip(clean, dirty):
        torch.testing.assert_close(d, c, rtol=0, atol=0)  # bit-identical, padding included (0)


def test_terminal_reward_only_propagates_back_discounted():
    """One response of 4 tokens, reward only on the last, V = 0: A_t = (gamma lam)^(3 - t) * r, by hand."""
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.float64)
    advantages, returns = gae(rewards, torch.zeros_like(rewards), mask, gamma=0.5, lam=0.5)
    expected = torch.tensor([[2.0 / 64, 2.0 / 16, 2.0 / 4, 2.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(returns, expected, rtol=0, atol=1e-15)


def test_bool_mask_and_float32_work():
    rewards, values, mask, lengths = _batch(5)
    adv32, _ = gae(rewards.float(), values.float(), mask.bool())
    expected = brute_force_gae(rewards, values, lengths, 1.0, 0.95)
    assert adv32.dtype == torch.float32
    torch.testing.assert_close(adv32.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_input_raises():
    rewards, values, mask, _ = _batch(0)
    with pytest.raises(ValueError, match="share one"):
        gae(rewards, values[:, :-1], mask)
    with pytest.raises(ValueError, match="gamma and lam"):
        gae(rewards, values, mask, lam=1.5)
    holey = torch.ones_like(mask)
    holey[0, 3] = 0
    with pytest.raises(ValueError, match="contiguous"):
        gae(rewards, values, holey)
