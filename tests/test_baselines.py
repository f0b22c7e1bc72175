"""baselines.py: hand-checked sequences, a brute-force running mean, per-group statistics (float64, tol 1e-12)."""
import statistics

import pytest
import torch

from minirlhf.baselines import MovingAverageBaseline, group_advantages


def test_moving_average_hand_checked_across_calls():
    baseline = MovingAverageBaseline()
    # rewards 1, 3 | 2: running means 1, 2 | 2, advantages taken after each own update: 0, 1 | 0
    assert baseline.advantages(torch.tensor([1.0, 3.0])).tolist() == [0.0, 1.0]
    assert baseline.advantages(torch.tensor([2.0])).tolist() == [0.0]
    assert baseline.state_dict() == {"mean": 2.0, "count": 3}
    # then 6, -2: means (1 + 3 + 2 + 6) / 4 = 3 and (12 - 2) / 5 = 2, advantages 3 and -4
    assert baseline.advantages(torch.tensor([6.0, -2.0])).tolist() == [3.0, -4.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moving_average_matches_brute_force_and_ignores_batching(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(37, generator=g, dtype=torch.float64)
    seen = rewards.tolist()
    expected = [seen[i] - statistics.fmean(seen[: i + 1]) for i in range(len(seen))]
    one_call = MovingAverageBaseline().advantages(rewards)
    torch.testing.assert_close(one_call, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    chunked = MovingAverageBaseline()
    pieces = [chunked.advantages(chunk) for chunk in rewards.split([5, 1, 13, 18])]
    torch.testing.assert_close(torch.cat(pieces), one_call, rtol=0, atol=0)


def test_moving_average_state_round_trip_and_dtype():
    a = MovingAverageBaseline()
    a.advantages(torch.tensor([0.5, 2.5, -1.0]))
    b = MovingAverageBaseline()
    b.load_state_dict(a.state_dict())
    nxt = torch.tensor([4.0, 0.25], dtype=torch.float32)
    out = a.advantages(nxt)
    assert torch.equal(out, b.advantages(nxt)) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="1-D"):
        a.advantages(torch.zeros(2, 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("G", [2, 5, 8])
def test_group_advantages_match_per_group_formula(seed, G):
    g = torch.Generator().manual_seed(seed)
    rewards = 2 * torch.randn(3 * G, generator=g, dtype=torch.float64) + 1
    out = group_advantages(rewards, G)
    expected = []
    for k in range(3):
        group = rewards[k * G:(k + 1) * G].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)  # stdev: unbiased, as TRL
        expected += [(r - mean) / (std + 1e-4) for r in group]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    exact = group_advantages(rewards, G, eps=0.0).view(3, G)
    torch.testing.assert_close(exact.mean(1), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(exact.std(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_zero_variance_groups_give_exact_zeros():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.2, 7.0, 7.0, 7.0], dtype=torch.float64)  # 0.1 * 3 / 3 != 0.1
    out = group_advantages(rewards, 3)
    assert (out[:3] == 0).all() and (out[6:] == 0).all() and (out[3:6] != 0).all()
    assert torch.equal(group_advantages(torch.tensor([1.0, 2.0]), 1), torch.zeros(2))  # G = 1: no signal, no NaN
    assert torch.equal(group_advantages(torch.full((6,), 0.7, dtype=torch.float64), 3, eps=0.0), torch.zeros(6))


def test_group_advantages_bad_input_raises():
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(8), 4, eps=-1.0)
