"""Memory bounded by flags, not by data size: --forward-batch-size bounds the rows of every model call,
heads.LOGITS_CHUNK the response positions whose logits exist at once, and splitting a pass (or an RL minibatch into
micro-batches) does not change what it computes.

- a spy on the trunk and the LM head of each of the seven scripts, run in this process with --forward-batch-size 2 and
  LOGITS_CHUNK 16: no call sees more rows (or positions) than that, and the calls did happen;
- chunked log-probs, entropies, their gradients and the exact KL against the same computed in one piece; a chunked
  backward keeps no (positions, V) tensor;
- an RL minibatch's loss computed in micro-batches by each RL script's own update step (minibatch_gradient: PPO policy
  + value, GRPO with each --policy-loss, REINFORCE with one advantage per response and, REINFORCE++, one per token,
  online DPO, distillation) against the whole minibatch in one piece: same gradient, same statistics;
- the rollout's no-grad passes (sampling merged from chunks, old and reference log-probs, values, reward scores) in
  chunks of 2 rows against one pass.
"""
import os
import sys
import types

import pytest
import torch

from minirlhf import heads, lora
from minirlhf.assets import ASSETS_DIR, TINY_LLAMA
from minirlhf.cli import parse_args
from minirlhf.evaluation import generate, sequence_kl
from minirlhf.formats import load_adapter
from minirlhf.heads import ScalarHead, in_row_chunks, response_logprobs
from minirlhf.models import load_model, load_tokenizer
from minirlhf.precision import LossScaler
from minirlhf.reinforce_pp import reinforce_pp_advantages
from minirlhf.roles import Reward
from minirlhf.rollout import merge_generated, reference_logprobs, rollout_logprobs
from minirlhf.token_rewards import per_token_kl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, CHUNK = 2, 16  # --forward-batch-size and heads.LOGITS_CHUNK in the spy runs

RL = ["--iterations", "1", "--rollout-size", "8", "--minibatch-size", "8", "--eval-prompts", "3", "--eval-samples", "1",
      "--max-new-tokens", "6", "--eval-every", "0"]
SCRIPTS = {  # script -> flags; each with-grad micro-batch is <= ROWS rows too (DPO / reward: 1 pair = 2 rows)
    "train_ppo": RL + ["--ppo-epochs", "1"],
    "train_grpo": RL + ["--group-size", "2", "--ppo-epochs", "1"],
    "train_reinforce": RL,
    "train_online_dpo": RL + ["--reward", "gold"],  # a micro-batch: 1 pair = 2 rows
    "train_distill": RL + ["--teacher", os.path.join(ASSETS_DIR, "reward-model")],  # an adapter on the same base
    "train_dpo": ["--max-steps", "1", "--batch-size", "1", "--max-train-pairs", "4", "--max-eval-pairs", "5",
                  "--precompute-ref", "--eval-prompts", "3", "--eval-samples", "1", "--max-new-tokens", "6"],
    "train_reward": ["--max-steps", "1", "--batch-size", "1", "--max-train-pairs", "4", "--max-eval-pairs", "5"],
    "train_sft": ["--max-steps", "1", "--batch-size", "2", "--block-size", "64", "--log-every", "1"],
}


@pytest.fixture(scope="module")
def asset_model():
    """The embedded tiny Llama (float32) and its tokenizer; the policy is a random LoRA adapter on it, so that the
    policy and the reference differ."""
    tokenizer = load_tokenizer(TINY_LLAMA)
    model = load_model(TINY_LLAMA, dtype="float32", device="cpu", tokenizer=tokenizer)
    torch.manual_seed(0)
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter="policy")
    for _, m in lora.lora_layers(model, "policy"):
        torch.nn.init.normal_(m.lora_B["policy"].weight, std=0.05)
    lora.set_active_adapter(model, "policy")
    return model.eval(), tokenizer


def rollout_batch(model, tokenizer, n=7):
    """A rollout of n prompts of different lengths, greedy (no random draws): the evaluation.generate layout."""
    from minirlhf.data import load_prompt_dataset
    from minirlhf.data.tokenize import tokenize_prompt_dataset
    data = tokenize_prompt_dataset(load_prompt_dataset("builtin", split="test").select(range(n)), tokenizer, 32)
    batch = generate(model, tokenizer, data["prompt_ids"], max_new_tokens=8, temperature=0.0)
    P = batch["input_ids"].shape[1] - batch["response_ids"].shape[1]
    return {**batch, "prompts": data["prompt"], "prompt_ids": data["prompt_ids"], "P": P,
            "mask": batch["response_mask"][:, P:].bool()}


# ---------------------------------------------------------------------------------------------- (a) the spy
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_no_model_call_sees_more_rows_than_the_flag(script, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    module = __import__(script)
    monkeypatch.setattr(heads, "LOGITS_CHUNK", CHUNK)
    seen = {"trunk": [], "lm_head rows": [], "lm_head positions": []}

    def trunk_hook(_, args, kwargs):
        seen["trunk"].append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0])

    def head_hook(_, args):
        x = args[0]  # (B, T, H) from the sampler, (n, H) response positions from heads._token_logprobs
        seen["lm_head rows" if x.dim() == 3 else "lm_head positions"].append(x.shape[0])

    def spied(load):
        def load_model(*a, **k):
            model = load(*a, **k)
            heads.trunk(model).register_forward_pre_hook(trunk_hook, with_kwargs=True)
            model.get_output_embeddings().register_forward_pre_hook(head_hook)
            return model
        return load_model
    rl = ("train_ppo", "train_grpo", "train_reinforce", "train_online_dpo", "train_distill")  # roles.load_policy's base
    owner = sys.modules["minirlhf.roles"] if script in rl else module
    monkeypatch.setattr(owner, "load_model", spied(owner.load_model))
    args = parse_args(module.Args, SCRIPTS[script] + ["--forward-batch-size", str(ROWS), "--threads", "1",
                                                      "--out", str(tmp_path / "out")])
    module.main(args)
    assert seen["trunk"] and max(seen["trunk"]) <= ROWS, seen["trunk"]
    if script != "train_reward":  # the reward model reads one hidden state: no LM head
        assert seen["lm_head positions"] and max(seen["lm_head positions"]) <= CHUNK, seen["lm_head positions"]
    if script not in ("train_reward", "train_sft"):  # the scripts that sample
        assert seen["lm_head rows"] and max(seen["lm_head rows"]) <= ROWS, seen["lm_head rows"]


# ------------------------------------------------------------------------ (b) chunked logits == one piece
def logprob_inputs():
    """A float64 tiny Llama (every weight trainable) and a batch of 3 rows of 12 tokens, left and right padding."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_tiny_llama
    model = make_tiny_llama(dtype=torch.float64)
    ids = torch.randint(3, 101, (3, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[0, 9:], attention[1, :2] = 0, 0  # row 0 right-padded, row 1 left-padded
    response = torch.zeros_like(ids)
    response[:, 5:] = 1
    response[0, 9:] = 0
    return model, ids, attention, response  # 4 + 7 + 7 = 18 response positions


def logprobs_and_grads(model, ids, attention, response):
    model.zero_grad(set_to_none=True)
    logprobs, entropy = response_logprobs(model, ids, attention, response, temperature=0.7, return_entropy=True)
    (logprobs * torch.linspace(-1, 2, 12)).sum().backward()  # a loss weighting every position differently
    return [logprobs.detach(), entropy] + [p.grad.clone() for p in model.parameters()]


def test_chunked_logprobs_entropies_and_gradients_equal_one_piece(monkeypatch):
    model, ids, attention, response = logprob_inputs()
    whole = logprobs_and_grads(model, ids, attention, response)
    saved = []  # the shapes of the tensors kept for the backward pass

    monkeypatch.setattr(heads, "LOGITS_CHUNK", 5)  # 18 positions: chunks of 5, 5, 5, 3
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        chunked = logprobs_and_grads(model, ids, attention, response)
    assert saved and not [s for s in saved if s[-1:] == (101,)], saved  # no logits kept: recomputed in backward
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert whole[0].abs().sum() > 1 and any(g.abs().sum() > 0 for g in whole[2:])  # not vacuous


def test_one_piece_keeps_the_whole_logits_for_backward():
    """The counterpart of the test above: in one piece, the (18, V) logits are kept (so that spy can see them)."""
    model, ids, attention, response = logprob_inputs()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        response_logprobs(model, ids, attention, response).sum()
    assert (18, 101) in saved


def test_chunked_exact_kl_equals_one_piece(asset_model, monkeypatch):
    model, tokenizer = asset_model
    batch = rollout_batch(model, tokenizer)
    args = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    whole = sequence_kl(model, *args)
    monkeypatch.setattr(heads, "LOGITS_CHUNK", 5)
    chunked = sequence_kl(model, *args)
    assert whole.min() > 1e-3  # the policy adapter differs from the reference
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_in_row_chunks():
    x = torch.arange(10.0)
    calls = []

    def fn(rows):
        calls.append(rows)
        return x[rows] * 2, None
    out, none = in_row_chunks(fn, 10, 4)
    assert torch.equal(out, x * 2) and none is None
    assert [(r.start, r.stop) for r in calls] == [(0, 4), (4, 8), (8, 10)]
    assert torch.equal(in_row_chunks(lambda rows: x[rows], 10, 10), x)
    with pytest.raises(ValueError):
        in_row_chunks(lambda rows: x[rows], 10, 0)


# --------------------------------------------------------------- (c) micro-batches == the whole minibatch
def rl_setup(asset_model):
    """The asset model with its policy adapter trainable, a value head, and a rollout with random old log-probs,
    advantages, values, returns and TIS weights, and REINFORCE++'s per-token advantages of random scores; the update's
    mask drops one response (--mismatch-mask-threshold)."""
    model, tokenizer = asset_model
    batch = rollout_batch(model, tokenizer, n=6)
    g = torch.Generator().manual_seed(3)
    B, R = batch["mask"].shape
    loss_mask = batch["mask"].clone()
    loss_mask[3] = False
    data = {"old": rollout_logprobs(model, batch, 1.0, 64)[0] + 0.1 * torch.randn(B, R, generator=g),
            "ref": reference_logprobs(model, batch, 1.0, 64), "adv": torch.randn(B, R, generator=g),
            "adv_seq": torch.randn(B, generator=g), "old_values": torch.randn(B, R, generator=g),
            "returns": torch.randn(B, R, generator=g), "tis": 0.5 + torch.rand(B, R, generator=g),
            "loss_mask": loss_mask}
    kl = per_token_kl(data["old"], data["ref"], batch["mask"])  # (B, R), k1
    data["adv_pp"] = reinforce_pp_advantages(torch.randn(B, generator=g), kl, batch["mask"], 0.3)[0]  # (B, R)
    torch.manual_seed(4)
    value_head = ScalarHead(model.config.hidden_size, init_std=0.1)
    params = lora.lora_parameters(model, "policy") + list(value_head.parameters())
    return model, batch, value_head, params, data


def minibatch_grads(script, model, batch, value_head, params, d, mb, rows, flags=(), advantages="adv_seq"):
    """The gradient and statistics of one minibatch `mb` by the script's own update step (its minibatch_gradient),
    with --forward-batch-size `rows`: micro-batches of that many rows, a backward each; `flags` added. advantages:
    REINFORCE's, "adv_seq" (B,) or "adv_pp" (B, R)."""
    for p in params:
        p.grad = None
    args = parse_args(script.Args, ["--forward-batch-size", str(rows), *flags])  # the script's defaults otherwise
    scaler = LossScaler(model)
    if script.__name__ == "train_ppo":
        stats = script.minibatch_gradient(model, value_head, batch, 1.0, mb, d["old"], d["old_values"], d["adv"],
                                          d["returns"], d["loss_mask"], d["tis"], args, scaler)
    elif script.__name__ == "train_online_dpo":  # the 6 rows as 3 pairs (one tied: weight 0); mb -> pairs
        pairs = mb[:len(mb) // 2] % 3  # [4, 0, 5] -> pairs [1, 0, 2]; mb[:5] -> [1, 0]
        chosen, rejected, weights = torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5]), torch.tensor([1.0, 0.0, 1.0])
        stats = script.minibatch_gradient(model, batch, 1.0, pairs, chosen, rejected, weights, d["old"], d["ref"],
                                          args, scaler)
    elif script.__name__ == "train_grpo":
        stats, logprobs = script.minibatch_gradient(model, batch, 1.0, mb, d["old"], d["ref"], d["adv"],
                                                    d["loss_mask"], d["tis"], args, scaler)
        stats = {**stats, "logprobs": logprobs}
    elif script.__name__ == "train_distill":  # the teacher: the embedded reward model's adapter, another distribution
        if script.TEACHER not in lora.adapter_names(model):
            load_adapter(model, os.path.join(ASSETS_DIR, "reward-model"), adapter=script.TEACHER)
        stats = script.minibatch_gradient(model, batch, 1.0, mb, d["old"], args, scaler)
    else:
        stats, logprobs = script.minibatch_gradient(model, batch, 1.0, mb, d["old"], d[advantages], d["loss_mask"],
                                                    d["tis"], args, scaler)
        stats = {**stats, "logprobs": logprobs}
    return [p.grad.clone() for p in params if p.grad is not None], stats


GSPO = ["--policy-loss", "gspo", "--clip-eps", "0.01", "--clip-high", "0.02"]  # a clip that binds on some responses


@pytest.mark.parametrize("script,flags", [("train_ppo", []), ("train_grpo", []), ("train_grpo", GSPO),
                                          ("train_grpo", GSPO + ["--loss-aggregation", "sequence"]),
                                          ("train_grpo", ["--policy-loss", "cispo", "--clip-high", "0.28"]),
                                          ("train_reinforce", []), ("train_reinforce/reinforce++", []),
                                          ("train_online_dpo", []), ("train_distill", [])])
def test_micro_batches_give_the_minibatch_gradient(asset_model, script, flags, monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    script, advantages = (script.split("/")[0], "adv_pp") if "/" in script else (script, "adv_seq")
    module = __import__(script)
    model, batch, value_head, params, data = rl_setup(asset_model)
    for p in params:
        p.requires_grad_(True)
    try:
        mb = torch.tensor([4, 0, 5, 3, 2, 1])  # a shuffled minibatch of the 6 rows
        def grads(rows, n):
            return minibatch_grads(module, model, batch, value_head, params, data, rows, n, flags, advantages)
        whole, whole_stats = grads(mb, len(mb))
        micro, micro_stats = grads(mb, 2)  # 2 + 2 + 2 rows
        via_flag, via_flag_stats = minibatch_grads(module, model, batch, value_head, params, data, mb, len(mb),
                                                   flags + ["--micro-batch-size", "2"], advantages)  # the same split
        odd, odd_stats = grads(mb[:5], 5)
        odd_micro, odd_micro_stats = grads(mb[:5], 2)
    finally:
        for p in params:
            p.requires_grad_(False)
    assert len(whole) == len(micro) == len(params) - (0 if script == "train_ppo" else 2)  # value head: PPO only
    assert sum(g.abs().sum() for g in whole) > 1e-3
    for (a, a_stats), (b, b_stats) in [((whole, whole_stats), (micro, micro_stats)),
                                       ((odd, odd_stats), (odd_micro, odd_micro_stats))]:  # 2 + 2 + 1 rows
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
        assert a_stats.keys() == b_stats.keys()
        for k in a_stats:
            torch.testing.assert_close(b_stats[k], a_stats[k], rtol=0, atol=1e-6)
    assert all(torch.equal(x, y) for x, y in zip(micro, via_flag)) and len(via_flag) == len(micro)
    assert all(torch.equal(micro_stats[k], via_flag_stats[k]) for k in micro_stats)  # --micro-batch-size splits it
    assert whole_stats["loss/total"] != 0 and whole_stats["policy/entropy"] > 0
    if "gspo" in flags:  # the clip binds on some responses, not all
        assert 0 < whole_stats["policy/clipfrac"] < 1, whole_stats["policy/clipfrac"]


# -------------------------------------------------------- (d) the rollout's passes in chunks == one pass
def test_rollout_passes_in_chunks_equal_one_pass(asset_model):
    model, tokenizer = asset_model
    batch = rollout_batch(model, tokenizer)  # 7 rows, one generate call
    # sampled in chunks of 2 (greedy: the same tokens) and merged: the same batch, the same layout
    parts = [generate(model, tokenizer, batch["prompt_ids"][i:i + 2], max_new_tokens=8, temperature=0.0)
             for i in range(0, 7, 2)]
    assert len({p["input_ids"].shape[1] for p in parts}) > 1  # the chunks' widths differ: the merge must re-pad
    merged = merge_generated(parts, tokenizer.pad_token_id)
    for k in ("input_ids", "attention_mask", "response_mask", "response_ids", "ended"):
        assert torch.equal(merged[k], batch[k]), k
    assert merged["texts"] == batch["texts"]
    torch.testing.assert_close(merged["logprobs"], batch["logprobs"], rtol=0, atol=1e-5)

    value_head = ScalarHead(model.config.hidden_size, init_std=0.1)
    for whole, chunked in [(rollout_logprobs(model, batch, 0.8, 64, value_head),
                            rollout_logprobs(model, batch, 0.8, 2, value_head)),
                           ((reference_logprobs(model, batch, 0.8, 64),), (reference_logprobs(model, batch, 0.8, 2),))]:
        for a, b in zip(whole, chunked):  # packed rows differ with the chunk (fast/unpad.py): fp32 rounding, ~2e-6 here
            assert a.shape == batch["mask"].shape
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)

    args = types.SimpleNamespace(reward="model", reward_model=[os.path.join(ASSETS_DIR, "reward-model")],
                                 reward_ensemble="mean", reward_ensemble_lambda=1.0, reward_transform="expected",
                                 reward_entropy_coef=0.1, dataset="builtin", forward_batch_size=64)
    reward = Reward(model, args)
    whole = reward.score(batch)
    reward.forward_batch_size = 2
    torch.testing.assert_close(reward.score(batch), whole, rtol=0, atol=1e-6)
    assert whole.std() > 0
