"""minirlhf/mismatch.py against float64 references written out in plain Python; the losses' TIS weights (the default
None leaves them bit for bit as they were); truncated importance sampling's expected gradient by exact enumeration;
smoke runs of the three RL scripts with --tis-cap and --mismatch-mask-threshold, and the metrics on the default path."""
import json
import math
import os

import pytest
import torch

from minirlhf.cli import parse_args
from minirlhf.grpo import grpo_loss
from minirlhf.mismatch import (mismatch_keep, mismatch_stats, rollout_correction, sequence_log_ratio,
                               tis_weights)
from minirlhf.ppo import policy_loss
from minirlhf.reinforce import reinforce_loss
from minirlhf.rollout import old_logprobs_and_corrections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rollout(seed=0, B=5, R=7, scale=0.3, dtype=torch.float32):
    """Sampler log-probs, trainer log-probs off by `scale`-sized noise, a right-padded mask (one row 1 token long)."""
    g = torch.Generator().manual_seed(seed)
    sampler = -torch.rand(B, R, generator=g, dtype=torch.float64) * 3
    trainer = sampler + scale * torch.randn(B, R, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, R + 1, (B,), generator=g)
    lengths[0] = 1
    mask = torch.arange(R)[None] < lengths[:, None]  # (B, R)
    return sampler.to(dtype), trainer.to(dtype), mask


def reference_stats(sampler, trainer, mask):
    """The module docstring's table, token by token in Python floats (float64)."""
    deltas = [t - s for s, t, m in zip(sampler.flatten().tolist(), trainer.flatten().tolist(),
                                       mask.flatten().tolist()) if m]
    return {"mismatch/kl": sum(math.expm1(d) - d for d in deltas) / len(deltas),
            "mismatch/k1": sum(-d for d in deltas) / len(deltas),
            "mismatch/max_ratio": math.exp(max(deltas))}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [0.3, 1e-3])
def test_mismatch_stats_against_a_float64_reference(seed, scale):
    sampler, trainer, mask = rollout(seed, scale=scale)
    ours, ref = mismatch_stats(sampler, trainer, mask), reference_stats(sampler, trainer, mask)
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-300), key
    assert ours["mismatch/kl"] > 0


def test_float32_log_probs_a_rounding_apart_get_their_k3_from_float64():
    """log-probs 1e-5 apart, as the sampler's and the trainer's in float32: k3 ~ 5e-11, which float32's r - 1 (rounded
    by ~6e-8) cannot hold; computed from the same float32 inputs in float64, it matches the reference to 1e-9."""
    sampler, _, mask = rollout(3, scale=0.0)
    trainer = (sampler.double() + 1e-5 * torch.randn(sampler.shape, generator=torch.Generator().manual_seed(4),
                                                     dtype=torch.float64)).float()
    ours, ref = mismatch_stats(sampler, trainer, mask), reference_stats(sampler, trainer, mask)
    assert ours["mismatch/kl"] == pytest.approx(ref["mismatch/kl"], rel=1e-9)
    assert 1e-12 < ours["mismatch/kl"] < 1e-9
    r = torch.exp(trainer - sampler)  # the float32 way
    naive = ((r - 1) - (trainer - sampler))[mask].mean().item()
    assert abs(naive - ref["mismatch/kl"]) > 10 * ref["mismatch/kl"]  # rounding, not the KL


def test_mismatch_stats_padding_and_empty():
    sampler, trainer, mask = rollout(5)
    moved = trainer.masked_fill(~mask, 50.0)  # padding never counts, whatever it holds
    assert mismatch_stats(sampler, moved, mask) == mismatch_stats(sampler, trainer, mask)
    assert mismatch_stats(sampler, trainer, torch.zeros_like(mask)) == {
        "mismatch/kl": 0.0, "mismatch/k1": 0.0, "mismatch/max_ratio": 1.0}
    with pytest.raises(ValueError, match="one shape"):
        mismatch_stats(sampler, trainer[:, 1:], mask)


@pytest.mark.parametrize("cap", [1.0, 2.0, 1e9])
def test_tis_weights_against_a_float64_reference(cap):
    sampler, trainer, mask = rollout(6, scale=1.0, dtype=torch.float32)
    trainer.requires_grad_(True)
    w = tis_weights(trainer, sampler, mask, cap)
    assert w.dtype == torch.float32 and not w.requires_grad
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            expected = min(math.exp(trainer[i, j].item() - sampler[i, j].item()), cap) if mask[i, j] else 1.0
            assert w[i, j].item() == pytest.approx(expected, rel=1e-6)
    assert (w[mask] <= cap).all() and (w[mask] == cap).any() == (cap < 1e9)
    with pytest.raises(ValueError, match="cap must be > 0"):
        tis_weights(trainer, sampler, mask, 0.0)


def test_sequence_log_ratio_and_the_mask_against_a_reference():
    sampler, trainer, mask = rollout(7, scale=0.5)
    seq = sequence_log_ratio(trainer, sampler, mask)
    expected = [sum(t - s for s, t, m in zip(*rows) if m) for rows in zip(sampler.tolist(), trainer.tolist(),
                                                                          mask.tolist())]
    assert seq.dtype == torch.float64 and seq.tolist() == pytest.approx(expected, rel=1e-12)
    threshold = sorted(abs(x) for x in expected)[2]  # keeps exactly the three smallest |log ratio|
    keep = mismatch_keep(trainer, sampler, mask, threshold)
    assert keep.tolist() == [abs(x) <= threshold for x in expected] and int(keep.sum()) == 3


def test_rollout_correction_metrics_and_mask():
    sampler, trainer, mask = rollout(8, scale=0.5)
    weights, loss_mask, metrics = rollout_correction(sampler, trainer, mask)  # no flag: measured, nothing changed
    assert weights is None and loss_mask is mask and set(metrics) == {"mismatch/kl", "mismatch/k1",
                                                                      "mismatch/max_ratio"}
    weights, loss_mask, metrics = rollout_correction(sampler, trainer, mask, tis_cap=1.5, mask_threshold=0.6)
    keep = mismatch_keep(trainer, sampler, mask, 0.6)
    assert torch.equal(loss_mask, mask & keep[:, None])
    assert metrics["mismatch/masked_responses"] == int((~keep).sum()) > 0
    ratios = torch.exp(trainer - sampler)[mask]
    assert metrics["mismatch/tis_capped"] == pytest.approx((ratios > 1.5).double().mean().item())
    assert metrics["mismatch/tis_weight"] == pytest.approx(ratios.clamp(max=1.5).mean().item(), rel=1e-6)
    assert torch.equal(weights, tis_weights(trainer, sampler, mask, 1.5))


def loss_inputs(seed=9):
    sampler, trainer, mask = rollout(seed, scale=0.2)
    g = torch.Generator().manual_seed(seed)
    new = (trainer + 0.1 * torch.randn(trainer.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(trainer.shape, generator=g, dtype=torch.float64) * mask
    ref = trainer - 0.3 * torch.rand(trainer.shape, generator=g, dtype=torch.float64)
    return sampler, trainer, new, adv, ref, mask


def test_weights_none_leave_the_losses_as_they_were():
    """The default path's arithmetic is untouched: no multiplication by 1 anywhere (bit for bit)."""
    sampler, trainer, new, adv, ref, mask = loss_inputs()
    ones = torch.ones_like(new)
    for weighted, plain in [
            (policy_loss(new, trainer, adv, mask, 0.2, 9, ones)[0], policy_loss(new, trainer, adv, mask, 0.2, 9)[0]),
            (grpo_loss(new, trainer, ref, adv, mask, tis_weights=ones)[0], grpo_loss(new, trainer, ref, adv, mask)[0]),
            (reinforce_loss(new, adv[:, 0], mask, ones), reinforce_loss(new, adv[:, 0], mask))]:
        assert torch.equal(weighted, plain)


def test_the_losses_multiply_each_tokens_clipped_term_by_its_weight():
    """float64 reference: policy_loss and grpo_loss (beta 0: its KL term carries no weight) are the masked mean of
    w_t max(-A r, -A clip(r)) with r = pi / pi_trainer_old; reinforce_loss -(sum_t w_t log pi) A."""
    sampler, trainer, new, adv, ref, mask = loss_inputs()
    w = tis_weights(trainer, sampler, mask, 2.0)
    r = torch.exp(new - trainer)
    per_token = w * torch.max(-adv * r, -adv * r.clamp(0.8, 1.2))
    expected = per_token[mask].sum() / mask.sum()
    torch.testing.assert_close(policy_loss(new, trainer, adv, mask, 0.2, weights=w)[0], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grpo_loss(new, trainer, ref, adv, mask, beta=0.0, tis_weights=w)[0], expected,
                               rtol=1e-12, atol=0)
    kl_only = grpo_loss(new, trainer, ref, adv * 0, mask, beta=0.04, tis_weights=w)[0]  # A = 0: the KL term alone
    torch.testing.assert_close(kl_only, grpo_loss(new, trainer, ref, adv * 0, mask, beta=0.04)[0], rtol=0, atol=0)
    torch.testing.assert_close(reinforce_loss(new, adv[:, 0], mask, w), -(w * new * mask).sum(-1) * adv[:, 0],
                               rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(policy_loss(new, trainer, adv, mask, 0.2, weights=w)[0], new)
    (plain,) = torch.autograd.grad(policy_loss(new, trainer, adv, mask, 0.2)[0], new)
    torch.testing.assert_close(grad, w * plain, rtol=1e-12, atol=1e-15)


def test_uncapped_tis_turns_the_samplers_expected_gradient_into_the_trainers():
    """Exact enumeration over a 7-token vocabulary: tokens drawn from the sampler's pi_s, scored by the trainer's
    pi_t. E_{y~pi_s}[w(y) grad loss(y)] with w = pi_t / pi_s (cap never binding) equals E_{y~pi_t}[grad loss(y)] to
    1e-12; without the weight, or with a cap that binds, it does not."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_(True)
    logp_t = torch.log_softmax(theta, -1)  # the trainer's (with grad)
    logp_s = torch.log_softmax(theta.detach() + 0.3 * torch.randn(7, generator=g, dtype=torch.float64), -1)
    adv = torch.randn(7, generator=g, dtype=torch.float64)
    new, mask = logp_t[:, None], torch.ones(7, 1, dtype=torch.bool)  # each token a one-token response

    def expected_gradient(probs, cap=None):
        w = None if cap is None else tis_weights(logp_t.detach()[:, None], logp_s[:, None], mask, cap)
        loss = (probs.detach() * reinforce_loss(new, adv, mask, w)).sum()
        return torch.autograd.grad(loss, theta, retain_graph=True)[0]

    target = expected_gradient(logp_t.exp())  # on-policy for the trainer
    ratios = (logp_t.detach() - logp_s).exp()
    torch.testing.assert_close(expected_gradient(logp_s.exp(), cap=1e9), target, rtol=1e-12, atol=1e-14)
    assert (expected_gradient(logp_s.exp()) - target).norm() > 1e-3 * target.norm()
    assert ratios.max() > 1.05
    capped = expected_gradient(logp_s.exp(), cap=float(ratios.max()) * 0.9)  # binds on at least one token
    assert (capped - target).norm() > 1e-6 * target.norm()


def test_the_default_path_takes_the_samplers_log_probs_with_no_pass():
    """No --tis-cap, no --mismatch-mask-threshold, no trainer log-probs: the sampler's log-probs (that very tensor),
    no weights, batch["mask"] itself, no metrics (the script measures them on its first minibatch); the model is not
    called (None would fail)."""
    sampler, _, mask = rollout(10)
    batch = {"logprobs": torch.cat([torch.zeros(5, 3, dtype=sampler.dtype), sampler], 1), "P": 3, "mask": mask}

    class Args:
        tis_cap = mismatch_mask_threshold = None
        forward_batch_size = 4
    old, weights, loss_mask, metrics = old_logprobs_and_corrections(None, batch, None, Args)
    assert torch.equal(old, sampler) and old.data_ptr() == batch["logprobs"][:, 3:].data_ptr()
    assert weights is None and loss_mask is mask and metrics is None


def test_with_a_flag_the_trainers_log_probs_are_computed_and_become_the_old_ones(monkeypatch):
    """--tis-cap (or the mask): one trainer pass (rollout_logprobs, no value head) over the rollout; its log-probs are the
    old ones (GRPO's ratio, REINFORCE's KL), the weights and the metrics those of rollout_correction. PPO passes its
    own trainer log-probs: no pass at all."""
    import minirlhf.rollout as rollout_module
    sampler, trainer, mask = rollout(11, scale=0.5)
    batch = {"logprobs": torch.cat([torch.zeros(5, 3, dtype=sampler.dtype), sampler], 1), "P": 3, "mask": mask}
    calls = []

    def fake_rollout_logprobs(model, b, sampling, forward_batch_size, value_head=None):
        calls.append((b is batch, forward_batch_size, value_head))
        return trainer, None
    monkeypatch.setattr(rollout_module, "rollout_logprobs", fake_rollout_logprobs)

    class Args:
        tis_cap, mismatch_mask_threshold, forward_batch_size = 2.0, 0.6, 4
    old, weights, loss_mask, metrics = old_logprobs_and_corrections(None, batch, None, Args)
    assert calls == [(True, 4, None)] and old is trainer
    expected = rollout_correction(sampler, trainer, mask, 2.0, 0.6)
    assert torch.equal(weights, expected[0]) and torch.equal(loss_mask, expected[1]) and metrics == expected[2]
    old, *_ = old_logprobs_and_corrections(None, batch, None, Args, trainer_logprobs=trainer)  # PPO
    assert len(calls) == 1 and old is trainer


RL = ["--threads", "1", "--iterations", "2", "--rollout-size", "8", "--minibatch-size", "4", "--eval-prompts", "3",
      "--eval-samples", "1", "--max-new-tokens", "6", "--eval-every", "0", "--reward", "gold"]
MISMATCH = ("mismatch/kl", "mismatch/k1", "mismatch/max_ratio")
CORRECTED = ("mismatch/tis_capped", "mismatch/tis_weight", "mismatch/masked_responses")


@pytest.mark.parametrize("script,extra", [("train_ppo", []), ("train_grpo", ["--group-size", "4"]),
                                          ("train_reinforce", [])])
@pytest.mark.parametrize("flags", [[], ["--tis-cap", "2", "--mismatch-mask-threshold", "1e-6"]],
                         ids=["default", "tis+mask"])
def test_every_rl_script_logs_the_mismatch(script, extra, flags, tmp_path, monkeypatch):
    """Every iteration's row has the mismatch metrics, finite, and a float32 mismatch of rounding size; with the
    flags also the TIS and mask counts (a threshold of 1e-6 nats per response drops some of the 8 responses)."""
    monkeypatch.syspath_prepend(ROOT)
    module = __import__(script)
    out = str(tmp_path / script)
    module.main(parse_args(module.Args, RL + extra + flags + ["--out", out]))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 2
    for row in rows:
        keys = MISMATCH + (CORRECTED if flags else ())
        assert all(k in row and math.isfinite(row[k]) for k in keys), row
        assert 0 <= row["mismatch/kl"] < 1e-8 and 1 <= row["mismatch/max_ratio"] < 1.001
        assert (not flags) == ("mismatch/tis_weight" not in row)
        if flags:
            assert 0 <= row["mismatch/masked_responses"] <= 8 and abs(row["mismatch/tis_weight"] - 1) < 1e-3
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    if flags:
        assert sum(row["mismatch/masked_responses"] for row in rows) > 0


@pytest.mark.parametrize("argv,expected", [(["--tis-cap", "0.5"], "--tis-cap must be >= 1"),
                                           (["--mismatch-mask-threshold", "0"],
                                            "--mismatch-mask-threshold must be > 0"),
                                           (["--tis-cap", "nan"], "--tis-cap must be a finite number")])
def test_bad_mismatch_flags_end_in_one_line(argv, expected, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(ROOT)
    import train_grpo
    from minirlhf.errors import InputError
    args = parse_args(train_grpo.Args, argv + ["--out", str(tmp_path / "out")])
    with pytest.raises(InputError, match=expected.replace("(", r"\(")):
        train_grpo.check_args(args)
