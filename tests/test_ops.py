"""ops.py against direct computation on the selected entries (float64, tolerance 1e-12) and torch.distributions."""
import pytest
import torch
from torch.distributions import Categorical

from minirlhf.ops import entropy_from_logits, gather_logprobs, masked_mean, masked_sum, masked_var, masked_whiten

TOL = dict(rtol=1e-12, atol=1e-12)


def _batch(seed, B=7, T=13):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full row
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) right padding, some rows empty
    return x, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_mean_sum_var_match_selected_entries(seed):
    x, mask = _batch(seed)
    torch.testing.assert_close(masked_sum(x, mask), x[mask].sum(), **TOL)
    torch.testing.assert_close(masked_mean(x, mask), x[mask].mean(), **TOL)
    torch.testing.assert_close(masked_var(x, mask), x[mask].var(unbiased=True), **TOL)
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), x[mask].var(unbiased=False), **TOL)
    row_means = masked_mean(x, mask, dim=1)  # (B,)
    for b in range(x.shape[0]):
        expected = x[b][mask[b]].mean() if mask[b].any() else torch.tensor(0.0, dtype=x.dtype)  # empty row -> 0
        torch.testing.assert_close(row_means[b], expected, **TOL)


@pytest.mark.parametrize("garbage", [1e9, float("inf"), float("nan")])
def test_padding_never_changes_masked_mean_or_its_gradient(garbage):
    x, mask = _batch(3)
    x_garbage = torch.where(mask, x, torch.full_like(x, garbage)).requires_grad_(True)
    x = x.clone().requires_grad_(True)
    for fn in (lambda t: masked_mean(t, mask), lambda t: masked_mean(t, mask, dim=1).sum(),
               lambda t: masked_var(t, mask), lambda t: masked_whiten(t, mask).pow(2).sum()):
        clean, dirty = fn(x), fn(x_garbage)
        torch.testing.assert_close(dirty, clean, **TOL)
        (g_clean,), (g_dirty,) = torch.autograd.grad(clean, x), torch.autograd.grad(dirty, x_garbage)
        torch.testing.assert_close(g_dirty, g_clean, **TOL)
        assert (g_dirty[~mask] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_direct(seed, shift_mean):
    x, mask = _batch(seed)
    x = 3.0 * x + 5.0
    sel = x[mask]
    mean, var = sel.mean(), sel.var(unbiased=True)
    expected = (sel - mean) / torch.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(out[mask], expected, **TOL)
    assert (out[~mask] == 0).all()
    if shift_mean:
        torch.testing.assert_close(out[mask].mean(), torch.tensor(0.0, dtype=x.dtype), rtol=0, atol=1e-12)
        torch.testing.assert_close(out[mask].std(), torch.tensor(1.0, dtype=x.dtype), rtol=0, atol=1e-6)  # eps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_logprobs_matches_log_softmax_gather(seed):
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(3, 7, 13, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 7), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(logits, labels), expected, **TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_matches_torch_distributions(seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(3, 7, 13, generator=g, dtype=torch.float64)
    torch.testing.assert_close(entropy_from_logits(logits), Categorical(logits=logits).entropy(), **TOL)


def test_gradcheck():
    logits = torch.randn(2, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 10])
    assert torch.autograd.gradcheck(lambda z: gather_logprobs(z, labels), (logits,))
    assert torch.autograd.gradcheck(entropy_from_logits, (logits,))


def test_entropy_with_masked_out_vocabulary_is_finite():
    """-inf logits (a top-k / top-p filtered distribution) are zero-probability tokens, contributing 0 to H."""
    logits = torch.randn(5, 11, dtype=torch.float64)
    logits[:, ::3] = float("-inf")
    expected = Categorical(logits=logits).entropy()
    out = entropy_from_logits(logits)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(out, entropy_from_logits(logits[:, [i for i in range(11) if i % 3]]), **TOL)
