"""minirlhf.fast's two switches. Switched on, each fast path computes what transformers' plain path computes (log-probs
and their LoRA gradients, reward scores, sampled tokens and their log-probs), on the tiny test Llama, the embedded
tiny Llama and a Llama of SmolLM2-135M's shape; switched off, the fast code is never called; every script's
--no-fast-forward / --no-fast-decode reach the switches."""
import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import make_tiny_llama
from minirlhf import fast
from minirlhf.assets import TINY_LLAMA
from minirlhf.outdir import release_out_dir
from minirlhf.cli import parse_args
from minirlhf.fast import decode, unpad
from minirlhf.heads import ScalarHead, response_logprobs, sequence_scores
from minirlhf.run import Run
from minirlhf.sampling import sample
from minirlhf.training import make_trainable
from test_sampling import PAD, left_padded_prompts

# SmolLM2-135M-Instruct's config.json, as LlamaConfig arguments
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000,
                    tie_word_embeddings=True, max_position_embeddings=8192)
SCRIPTS = ["train_sft", "train_reward", "train_dpo", "train_ppo", "train_grpo", "train_reinforce", "train_online_dpo",
           "train_distill"]


def smollm2_shape(layers=2):
    """SmolLM2-135M's shape with random weights (no download) and 2 of its 30 decoder layers: its width (576), head
    dim (64), GQA (9 query heads on 3 key/value heads), MLP (1536), tied 49152-token vocabulary and RoPE base."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2,
                         pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


MODELS = {"tiny": make_tiny_llama,
          "embedded": lambda: AutoModelForCausalLM.from_pretrained(TINY_LLAMA).eval(),
          "smollm2_shape": smollm2_shape}


def with_adapter(model, seed=0):
    """A LoRA adapter "policy" on every linear layer, A and B random (B != 0: it changes every projection)."""
    params = make_trainable(model, "policy", lora_r=4, lora_alpha=8)
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return params


def rollout(seed=0):
    """GRPO's layout: 3 prompts (left-padded) x 4 responses of 1-6 tokens (right-padded) -> ids, mask, response mask."""
    ids, mask = left_padded_prompts([7, 3, 5], seed=seed)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # (12, P)
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, 7, (12,), generator=g)
    resp_mask = (torch.arange(6)[None] < lengths[:, None]).long()  # (12, 6)
    resp_ids = torch.randint(3, 101, (12, 6), generator=g).masked_fill(resp_mask == 0, PAD)
    return (torch.cat([ids, resp_ids], 1), torch.cat([mask, resp_mask], 1),
            torch.cat([torch.zeros_like(mask), resp_mask], 1))


@pytest.mark.parametrize("name", MODELS)
def test_fast_forward_switch_gives_the_plain_forwards_numbers(name, monkeypatch):
    """Response log-probs, their gradient on every LoRA weight and a reward head's scores, with the switch on (the
    batch runs packed: unpad.packed_forward is called) and off (it never is): equal to float rounding."""
    model = MODELS[name]()
    params = with_adapter(model)
    head = ScalarHead(model.config.hidden_size)
    ids, mask, resp = rollout()
    packed = []
    real = unpad.packed_forward
    monkeypatch.setattr(unpad, "packed_forward", lambda *a: packed.append(1) or real(*a))
    weights = torch.randn(resp.shape, generator=torch.Generator().manual_seed(2))
    got = {}
    for on in (True, False):
        fast.enable(forward=on)
        before = len(packed)
        for p in params:
            p.grad = None
        logprobs = response_logprobs(model, ids, mask, resp)  # (B, T)
        (logprobs * weights).sum().backward()
        with torch.no_grad():
            scores = sequence_scores(model, head, ids, mask)  # (B,)
        got[on] = logprobs.detach(), [p.grad for p in params], scores
        assert (len(packed) > before) if on else (len(packed) == before)
    (lp_fast, grads_fast, scores_fast), (lp_plain, grads_plain, scores_plain) = got[True], got[False]
    torch.testing.assert_close(lp_fast, lp_plain, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(scores_fast, scores_plain, atol=2e-5, rtol=1e-5)
    for a, b in zip(grads_fast, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_fast_decode_switch_gives_the_plain_decoders_samples(name, monkeypatch):
    """sample() at temperature 1, one seed, a LoRA adapter on: with the switch on (decode.Decoder is built) and off
    (it never is), the same tokens, the same stops and the same log-probs to float rounding."""
    model = MODELS[name]()
    with_adapter(model, seed=1)
    ids, mask = left_padded_prompts([5, 3, 8, 1], seed=1)
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)  # each prompt twice
    built = []
    real = decode.Decoder
    monkeypatch.setattr(decode, "Decoder", lambda *a, **kw: built.append(1) or real(*a, **kw))
    out = {}
    for on in (True, False):
        fast.enable(decode=on)
        before = len(built)
        out[on] = sample(model, ids, mask, 10, eos_token_id=2, pad_token_id=PAD,
                         generator=torch.Generator().manual_seed(0))
        assert (len(built) > before) if on else (len(built) == before)
    assert torch.equal(out[True].response_ids, out[False].response_ids)
    assert torch.equal(out[True].response_mask, out[False].response_mask)
    assert torch.equal(out[True].ended, out[False].ended)
    torch.testing.assert_close(out[True].logprobs, out[False].logprobs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_command_line_flags_reach_the_switches(script, tmp_path):
    """Every script's --no-fast-forward / --no-fast-decode (settings.MachineArgs) turn its switch off in Run(args); the
    defaults turn both on again."""
    Args = importlib.import_module(script).Args
    for i, (flags, want) in enumerate([(["--no-fast-forward"], (False, True)), (["--no-fast-decode"], (True, False)),
                                       (["--no-fast-forward", "--no-fast-decode"], (False, False)), ([], (True, True)),
                                       (["--fast-forward", "--fast-decode"], (True, True))]):
        out = str(tmp_path / str(i))
        args = parse_args(Args, ["--out", out, "--device", "cpu", "--threads", "1", *flags])
        fast.enable(forward=not want[0], decode=not want[1])  # Run must set them, whatever they were
        try:
            Run(args)
        finally:
            release_out_dir(out)
        assert (fast.FAST_FORWARD, fast.FAST_DECODE) == want, flags
