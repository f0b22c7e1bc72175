"""baselines.py: hand-checked sequences, a brute-force running mean, a brute-force leave-one-out loop, per-group and
per-batch statistics (float64, tol 1e-12), and exact zeros for groups with equal rewards under every option."""
import math
import statistics

import pytest
import torch

from minirlhf.baselines import RunningMeanBaseline, group_advantages, leave_one_out_advantages


def test_running_mean_hand_checked_across_calls():
    baseline = RunningMeanBaseline()
    # rewards 1, 3 | 2: running means 1, 2 | 2, advantages taken after each own update: 0, 1 | 0
    assert baseline.advantages(torch.tensor([1.0, 3.0])).tolist() == [0.0, 1.0]
    assert baseline.advantages(torch.tensor([2.0])).tolist() == [0.0]
    assert baseline.state_dict() == {"mean": 2.0, "count": 3}
    # then 6, -2: means (1 + 3 + 2 + 6) / 4 = 3 and (12 - 2) / 5 = 2, advantages 3 and -4
    assert baseline.advantages(torch.tensor([6.0, -2.0])).tolist() == [3.0, -4.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_running_mean_matches_brute_force_and_ignores_batching(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(37, generator=g, dtype=torch.float64)
    seen = rewards.tolist()
    expected = [seen[i] - statistics.fmean(seen[: i + 1]) for i in range(len(seen))]
    one_call = RunningMeanBaseline().advantages(rewards)
    torch.testing.assert_close(one_call, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    chunked = RunningMeanBaseline()
    pieces = [chunked.advantages(chunk) for chunk in rewards.split([5, 1, 13, 18])]
    torch.testing.assert_close(torch.cat(pieces), one_call, rtol=0, atol=0)


def test_running_mean_state_round_trip_and_dtype():
    a = RunningMeanBaseline()
    a.advantages(torch.tensor([0.5, 2.5, -1.0]))
    b = RunningMeanBaseline()
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


def test_leave_one_out_hand_checked():
    # group 1, 2, 6: the others' means 4, 3.5, 1.5; group 0, 0, 3: 1.5, 1.5, 0 (all exact in binary)
    out = leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    assert out.tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]
    assert leave_one_out_advantages(torch.tensor([5.0, 1.0]), 2).tolist() == [4.0, -4.0]  # k = 2: r_i - r_other


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_leave_one_out_matches_brute_force_and_closed_form(seed, k):
    g = torch.Generator().manual_seed(seed)
    rewards = 3 * torch.randn(4 * k, generator=g, dtype=torch.float64) - 1
    out = leave_one_out_advantages(rewards, k)
    r = rewards.tolist()
    expected = []
    for i in range(len(r)):  # the mean of the OTHER k - 1 rewards of i's group, by a loop
        group = range(i // k * k, i // k * k + k)
        expected.append(r[i] - statistics.fmean([r[j] for j in group if j != i]))
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    grouped = rewards.view(4, k)
    closed = k / (k - 1) * (grouped - grouped.mean(1, keepdim=True))  # = k/(k-1) (r_i - mean of the group)
    torch.testing.assert_close(out, closed.reshape(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.view(4, k).sum(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_leave_one_out_baseline_ignores_its_own_reward():
    """Unbiasedness: r_i's baseline does not depend on r_i, so moving r_i by d moves A_i by exactly d, its group's
    others by -d / (k - 1) each, and no other group."""
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.25, 3.0, 1.0, -2.0, 0.75], dtype=torch.float64)
    moved = rewards.clone()
    moved[1] += 0.5
    delta = leave_one_out_advantages(moved, 4) - leave_one_out_advantages(rewards, 4)
    torch.testing.assert_close(delta, torch.tensor([-0.5 / 3, 0.5, -0.5 / 3, -0.5 / 3, 0, 0, 0, 0],
                                                   dtype=torch.float64), rtol=0, atol=1e-12)


def test_leave_one_out_equal_rewards_exact_zeros_and_bad_input():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.2], dtype=torch.float64)  # (0.3 - 0.1) / 2 != 0.1 in floats
    out = leave_one_out_advantages(rewards, 3)
    assert (out[:3] == 0).all() and (out[3:] != 0).all()
    with pytest.raises(ValueError, match="k >= 2"):
        leave_one_out_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="k >= 2 dividing the batch size 10"):
        leave_one_out_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="1-D"):
        leave_one_out_advantages(torch.zeros(2, 4), 4)


def test_advantage_scales_hand_checked():
    rewards = torch.tensor([1.0, 3.0, 0.0, 4.0], dtype=torch.float64)  # group means 2, 2
    assert group_advantages(rewards, 2, scale="none").tolist() == [-1.0, 1.0, -2.0, 2.0]  # Dr. GRPO: no division
    # batch: one std for all four rewards, sqrt(((-1)^2 + 1 + 2^2 + 2^2) / 3) = sqrt(10 / 3) (unbiased)
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0], dtype=torch.float64) / (math.sqrt(10 / 3) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch"), expected, rtol=1e-12, atol=1e-12)
    # group: each group's own std, sqrt(2) and sqrt(8)
    expected = torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2), -2 / math.sqrt(8), 2 / math.sqrt(8)],
                            dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, 2, eps=0.0, scale="group"), expected, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("G", [2, 5])
def test_advantage_scales_match_statistics(seed, G):
    g = torch.Generator().manual_seed(seed)
    rewards = 2 * torch.randn(3 * G, generator=g, dtype=torch.float64) + 1
    r = rewards.tolist()
    batch_std = statistics.stdev(r)  # over the whole rollout
    centred = [x - statistics.fmean(r[i // G * G:i // G * G + G]) for i, x in enumerate(r)]
    for scale, divide in [("batch", batch_std + 1e-4), ("none", 1.0)]:
        expected = torch.tensor([c / divide for c in centred], dtype=torch.float64)
        torch.testing.assert_close(group_advantages(rewards, G, scale=scale), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(group_advantages(rewards, G, scale="group"), group_advantages(rewards, G))  # the default


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_reward_groups_give_exact_zeros_under_every_scale(scale):
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.2, 7.0, 7.0, 7.0], dtype=torch.float64)
    out = group_advantages(rewards, 3, scale=scale)
    assert (out[:3] == 0).all() and (out[6:] == 0).all() and (out[3:6] != 0).all()
    flat = group_advantages(torch.full((6,), 0.7, dtype=torch.float64), 3, eps=0.0, scale=scale)  # std 0 everywhere
    assert torch.equal(flat, torch.zeros(6, dtype=torch.float64))  # never NaN
    assert torch.equal(group_advantages(torch.tensor([2.0]), 1, scale=scale), torch.zeros(1))  # one reward
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(rewards, 3, scale="global")
