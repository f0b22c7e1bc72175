"""The sampling flags (--top-k, --top-p, --min-new-tokens, --stop-strings) and the log-probs of the distribution
actually sampled from (sampling.sampling_logits, heads._chunk_logprobs; docs/negative_kl.md).

- the sampler's own log-probs == the training side's recomputed ones (heads.response_logprobs given the
  SamplingSettings), to 1e-5, with top-k, top-p and min-new-tokens on; and the unfiltered ones differ (so it can fail);
- the training side against an independent float64 Python reference (sort, cut, renormalise by hand);
- a token outside the new policy's filter: its unfiltered log-prob, finite PPO / GRPO losses and gradients;
- chunked (heads.LOGITS_CHUNK) == one piece with the filters on, gradients included;
- the defaults are the plain softmax (bit for bit);
- stop strings: one spanning two tokens, the tokens kept, `ended`, --missing-eos-penalty, min-new-tokens, and the
  windowed check against decoding the whole response every step;
- bad flag values: one line each; the four scripts run with the flags (PPO with --top-k 1: every old log-prob is 0).
"""
import json
import math
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from minirlhf import heads
from minirlhf.assets import TINY_LLAMA
from minirlhf.cli import parse_args
from minirlhf.evaluation import generate
from minirlhf.grpo import grpo_loss
from minirlhf.heads import response_logprobs
from minirlhf.models import load_tokenizer
from minirlhf.ppo import policy_loss
from minirlhf.sampling import SamplingSettings, StopStrings, sample, sampling_logits
from minirlhf.token_rewards import missing_eos_penalty
from test_sampling import Scripted, left_padded_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 0
# (temperature, top_k, top_p, min_new_tokens): each filter alone, and all together
FILTERS = [(1.0, 5, 1.0, 0), (0.7, 0, 0.8, 0), (1.0, 0, 1.0, 4), (0.8, 7, 0.9, 3)]


def likely_eos(model, ids, mask):
    """The token with the largest mean probability at the first step: used as EOS, so that forbidding it
    (min_new_tokens) moves real probability mass."""
    with torch.no_grad():
        return int(model(input_ids=ids, attention_mask=mask).logits[:, -1].softmax(-1).mean(0).argmax())


def sampled_batch(model, settings, seed, lengths=(6, 2, 4, 5, 3, 7), max_new_tokens=10):
    """Sample with `settings` (its stop_token_ids[0] is EOS) -> (Samples, (B, T) ids, attention and response masks)."""
    ids, mask = left_padded_prompts(list(lengths), seed=seed)
    t, k, p, m = settings.temperature, settings.top_k, settings.top_p, settings.min_new_tokens
    out = sample(model, ids, mask, max_new_tokens, eos_token_id=settings.stop_token_ids[0], pad_token_id=PAD,
                 temperature=t, top_k=k, top_p=p, min_new_tokens=m, generator=torch.Generator().manual_seed(seed))
    full = torch.cat([ids, out.response_ids], 1), torch.cat([mask, out.response_mask], 1)
    return out, (*full, torch.cat([torch.zeros_like(mask), out.response_mask], 1))


@pytest.mark.parametrize("t,k,p,m", FILTERS)
def test_sampler_logprobs_equal_training_side_logprobs_under_the_filter(t, k, p, m):
    model = make_tiny_llama(seed=3)
    ids, mask = left_padded_prompts([6, 2, 4, 5, 3, 7], seed=3)
    settings = SamplingSettings(t, k, p, m, stop_token_ids=(likely_eos(model, ids, mask) if m else 2,))
    diffs = []
    for seed in range(3):
        out, (full_ids, full_mask, resp_mask) = sampled_batch(model, settings, seed)
        P = full_ids.shape[1] - out.response_ids.shape[1]
        with torch.no_grad():
            ours = response_logprobs(model, full_ids, full_mask, resp_mask, temperature=settings)[:, P:]
            plain = response_logprobs(model, full_ids, full_mask, resp_mask, temperature=t)[:, P:]
        torch.testing.assert_close(ours, out.logprobs, atol=1e-5, rtol=0)
        diffs.append((plain - out.logprobs)[out.response_mask.bool()].abs().max())
    # the unfiltered softmax is NOT what was sampled from: it misses the filtered-out mass (log Z < 0)
    assert max(diffs) > 1e-2, diffs


def reference_logprob(logits, target, step, settings):
    """log q(target) for one position, in float64 plain Python: q = softmax(logits / T) with the stop tokens removed
    before min_new_tokens, cut to its k most likely tokens, then to the smallest prefix reaching p, renormalised."""
    probs = (logits.double() / settings.temperature).softmax(-1).tolist()
    if step < settings.min_new_tokens:
        probs = [0.0 if i in settings.stop_token_ids else q for i, q in enumerate(probs)]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = order[:settings.top_k] if settings.top_k else order
    total = sum(probs[i] for i in keep)
    kept, mass = [], 0.0
    for i in keep:  # nucleus over the renormalised top-k distribution
        if mass >= settings.top_p:
            break
        kept.append(i)
        mass += probs[i] / total
    return math.log(probs[target] / sum(probs[i] for i in kept)) if target in kept else float("-inf")


@pytest.mark.parametrize("t,k,p,m", FILTERS)
def test_filtered_logprobs_against_a_float64_python_reference(t, k, p, m):
    model = make_tiny_llama(seed=5, dtype=torch.float64)
    ids, mask = left_padded_prompts([6, 2, 4, 5, 3, 7], seed=5)
    settings = SamplingSettings(t, k, p, m, stop_token_ids=(likely_eos(model, ids, mask) if m else 2,))
    out, (full_ids, full_mask, resp_mask) = sampled_batch(model, settings, seed=0)
    with torch.no_grad():
        ours = response_logprobs(model, full_ids, full_mask, resp_mask, temperature=settings)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits  # (B, T, V)
    P = full_ids.shape[1] - out.response_ids.shape[1]
    checked = 0
    for b in range(full_ids.shape[0]):
        for step in range(int(out.response_mask[b].sum())):
            tok = P + step
            want = reference_logprob(logits[b, tok - 1], int(full_ids[b, tok]), step, settings)
            assert abs(ours[b, tok].item() - want) < 1e-10, (b, step, ours[b, tok].item(), want)
            checked += 1
    assert checked >= 20


def test_a_token_outside_the_new_filter_gets_its_unfiltered_logprob_and_finite_gradients():
    """Random response tokens (not sampled): with top-k 3 most fall outside the filter (their filtered log-prob is
    -inf). They are scored by the unfiltered log-prob at the temperature; kept tokens by the filtered one (larger);
    PPO's and GRPO's losses and every gradient stay finite."""
    model = make_tiny_llama(seed=6)
    ids = torch.randint(3, 101, (4, 11), generator=torch.Generator().manual_seed(0))
    attention, response = torch.ones_like(ids), torch.zeros_like(ids)
    response[:, 4:] = 1
    settings = SamplingSettings(0.9, top_k=3, stop_token_ids=(2,))
    with torch.no_grad():
        positions = torch.arange(11).expand(4, -1)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits  # (4, 11, V)
        filtered = torch.log_softmax(sampling_logits(logits[:, :-1], settings, 0), -1).gather(
            -1, ids[:, 1:, None]).squeeze(-1)  # (4, 10): -inf outside the top 3
    out_of_set = torch.isinf(filtered[:, 3:])  # the response positions 4..10
    assert out_of_set.sum() >= 10 and (~out_of_set).sum() >= 1
    new = response_logprobs(model, ids, attention, response, temperature=settings)[:, 4:]  # with grad
    plain = response_logprobs(model, ids, attention, response, temperature=0.9)[:, 4:].detach()
    assert torch.isfinite(new).all()
    assert torch.equal(new.detach()[out_of_set], plain[out_of_set])
    assert torch.all(new.detach()[~out_of_set] > plain[~out_of_set])  # renormalised: log p - log Z > log p
    mask, g = torch.ones_like(new, dtype=torch.bool), torch.Generator().manual_seed(1)
    old, adv = plain - 0.1, torch.randn(plain.shape, generator=g)
    ref = plain + 0.2 * torch.randn(plain.shape, generator=g)
    loss = policy_loss(new, old, adv, mask)[0] + grpo_loss(new, old, ref, adv, mask, beta=0.1)[0]
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0


from test_memory import logprob_inputs  # noqa: E402


def test_chunked_filtered_logprobs_entropies_and_gradients_equal_one_piece(monkeypatch):
    """heads.LOGITS_CHUNK (and its checkpointing) with top-k, top-p and min-new-tokens on, float64: chunks of 5 of
    the 18 response positions give the one-piece log-probs, entropies and gradients (random tokens: some outside the
    filter, so the unfiltered fallback goes through the checkpoint too)."""
    model, ids, attention, response = logprob_inputs()  # 3 padded rows, 18 response positions (test_memory.py)
    ids[:, 6] = 2  # EOS at response step 1, forbidden there by min_new_tokens = 3
    settings = SamplingSettings(0.7, top_k=6, top_p=0.9, min_new_tokens=3, stop_token_ids=(2,))

    def run():
        model.zero_grad(set_to_none=True)
        logprobs, entropy = response_logprobs(model, ids, attention, response, temperature=settings,
                                              return_entropy=True)
        (logprobs * torch.linspace(-1, 2, 12)).sum().backward()
        return [logprobs.detach(), entropy] + [p.grad.clone() for p in model.parameters()]

    whole = run()
    monkeypatch.setattr(heads, "LOGITS_CHUNK", 5)
    chunked = run()
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    assert all(torch.isfinite(t).all() for t in whole)


def test_defaults_are_the_plain_softmax_bit_for_bit(monkeypatch):
    logits = torch.randn(7, 123, generator=torch.Generator().manual_seed(0))
    for t in (1.0, 0.7):
        settings = SamplingSettings(temperature=t, stop_token_ids=(2,))
        assert not settings.filtered
        assert torch.equal(sampling_logits(logits, settings, torch.arange(7)), logits / t)
    model = make_tiny_llama(seed=2)
    out, batch = sampled_batch(model, SamplingSettings(0.8, stop_token_ids=(2,)), seed=0)
    with torch.no_grad():
        a = response_logprobs(model, *batch, temperature=0.8, return_entropy=True)
        b = response_logprobs(model, *batch, temperature=SamplingSettings(0.8, stop_token_ids=(2,)),
                              return_entropy=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    monkeypatch.syspath_prepend(ROOT)
    for script in ("train_ppo", "train_grpo", "train_reinforce", "train_distill", "train_dpo"):  # default: off
        module = __import__(script)
        assert not SamplingSettings.from_args(parse_args(module.Args, []), 1).filtered


# ---------------------------------------------------------------------------------------------- stop strings
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_LLAMA)


def scripted_generate(tokenizer, texts, max_new_tokens, **kwargs):
    """generate() with a model that emits each row's text token by token (greedy), padded with EOS-free filler."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    filler = tokenizer(" x")["input_ids"]
    script = [(r + filler * max_new_tokens)[:max_new_tokens] for r in rows]
    model = Scripted(script, alt=filler[0], vocab=len(tokenizer))
    prompts = [tokenizer("Say it.")["input_ids"]] * len(texts)
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0, **kwargs)


def test_a_stop_string_spanning_two_tokens_ends_the_row_and_counts_as_ended(tokenizer):
    eos = tokenizer.eos_token
    texts = ["That is tricky, I do not know.", "It is 7." + eos, "It is blue and blue and blue"]
    assert [tokenizer.decode(i) for i in tokenizer(" do not")["input_ids"]] == [" do", " not"]
    batch = scripted_generate(tokenizer, texts, 12, stop_strings=("o n",))  # "o n": the end of " do", " n" of " not"
    assert batch["texts"][:2] == ["That is tricky, I do not", "It is 7."]
    assert batch["response_mask"].sum(1).tolist() == [7, 6, 12]  # 7 tokens: up to and including " not"
    assert batch["ended"].tolist() == [True, True, False]  # the string, EOS, cut off at 12 tokens
    penalised = missing_eos_penalty(torch.zeros(3), batch["ended"], 1.0)
    assert penalised.tolist() == [0.0, 0.0, -1.0]  # --missing-eos-penalty: only the row cut off
    nothing = scripted_generate(tokenizer, texts, 12)  # no stop string: row 0 runs to its EOS-free end
    assert nothing["texts"][0].startswith("That is tricky, I do not know.") and not nothing["ended"][0]


def test_a_stop_string_completed_before_min_new_tokens_does_not_count(tokenizer):
    text = "I do not know, I do not know"
    ids = tokenizer(text)["input_ids"]
    batch = scripted_generate(tokenizer, [text], 14, stop_strings=("o n",), min_new_tokens=4)
    assert batch["texts"] == ["I do not know, I do not"] and batch["ended"].tolist() == [True]  # the 2nd one
    assert batch["response_mask"].sum().item() == ids.index(tokenizer(" not")["input_ids"][0], 4) + 1
    early = scripted_generate(tokenizer, [text], 14, stop_strings=("o n",))
    assert early["texts"] == ["I do not"]


def test_windowed_stop_check_equals_decoding_the_whole_response(tokenizer):
    """StopStrings decodes only the last W tokens; a brute force decodes the whole response at every step. Random
    byte-level token sequences, ASCII strings and a 2-byte character (é: split over byte tokens)."""
    strings = ("e", "th", " a", "o n", ", I", "é", "a b c")
    stop = StopStrings(tokenizer, strings)
    rng = random.Random(0)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in specials]
    single = [i for i in vocab if len(tokenizer.decode([i])) == 1]  # one-character tokens: strings over many tokens
    e_acute = tokenizer("é")["input_ids"]
    assert len(e_acute) == 2  # two byte tokens
    spelled = [i for ch in " a b c" for i in tokenizer(ch)["input_ids"]]
    assert len(spelled) == 6  # " a b c" one character per token: a string over 6 tokens
    hits = 0
    for _ in range(300):
        ids = [rng.choice(single if rng.random() < 0.7 else vocab) for _ in range(12)]
        if rng.random() < 0.3:
            ids[:6] = spelled
        if rng.random() < 0.5:
            at = rng.randrange(10)
            ids[at:at + 2] = e_acute
        for step in range(12):
            full = [tokenizer.decode(ids[:n], skip_special_tokens=True) for n in (step, step + 1)]
            counts = [[sum(t.startswith(s, i) for i in range(len(t))) for s in strings] for t in full]
            want = any(now > before for before, now in zip(*counts))
            got = stop(torch.tensor([ids[:step + 1]]), torch.tensor([True]))[0].item()
            assert got == want, (ids[:step + 1], full)
            hits += want
    assert hits > 100


# ---------------------------------------------------------------------------------------------- the scripts
from test_bad_inputs import run_in_process  # noqa: E402  (script's __main__ in-process: the one-line exit)


BAD = [(["--top-k", "-1"], "--top-k must be >= 0, got -1"),
       (["--top-p", "0"], "--top-p must lie in (0, 1], got 0.0"),
       (["--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
       (["--top-p", "nan"], "--top-p must be a finite number"),
       (["--min-new-tokens", "-1"], "--min-new-tokens must be >= 0, got -1"),
       (["--min-new-tokens", "25"], "--min-new-tokens must lie in [0, --max-new-tokens 24], got 25"),
       (["--stop-strings", ".", ""], "--stop-strings must be non-empty texts")]


@pytest.mark.parametrize("script", ["train_ppo.py", "train_grpo.py", "train_reinforce.py", "train_distill.py",
                                    "train_dpo.py"])
@pytest.mark.parametrize("argv,expected", BAD)
def test_bad_sampling_flags_end_in_one_line(script, argv, expected, monkeypatch, tmp_path):
    code = run_in_process(script, argv + ["--out", str(tmp_path / "out")], monkeypatch)
    assert isinstance(code, str) and "\n" not in code and code.startswith(f"{script}: error: "), code
    assert expected in code, code
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


RL = ["--threads", "1", "--iterations", "1", "--rollout-size", "8", "--minibatch-size", "4", "--eval-prompts", "3",
      "--eval-samples", "1", "--max-new-tokens", "8", "--eval-every", "0"]


def test_ppo_with_top_k_1_samples_a_point_mass_and_its_old_logprobs_are_zero(tmp_path, monkeypatch):
    """--top-k 1: the sampled distribution puts all its mass on one token, so the policy's log-prob of every sampled
    token is log 1 = 0 (the unfiltered softmax would give < 0), and the k1 KL of the rollout, 0 - log π_ref >= 0."""
    monkeypatch.syspath_prepend(ROOT)
    import train_ppo
    out = str(tmp_path / "ppo")
    train_ppo.main(parse_args(train_ppo.Args, RL + ["--top-k", "1", "--out", out]))
    last = load_file(os.path.join(out, "last_rollout.safetensors"))
    mask = last["response_mask"][:, -last["logprobs"].shape[1]:].bool()
    assert mask.sum() > 8 and torch.all(last["logprobs"][mask] == 0)
    assert torch.all(last["ref_logprobs"][mask] < 0)
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert row["objective/kl"] > 0 and math.isfinite(row["loss/total"])


@pytest.mark.parametrize("script,extra", [
    ("train_grpo", ["--group-size", "4"]), ("train_reinforce", []),
    ("train_distill", ["--teacher", os.path.join(ROOT, "minirlhf", "assets", "reward-model")]),  # a filtered student
    ("train_dpo", None)])
def test_scripts_run_with_every_sampling_flag(script, extra, tmp_path, monkeypatch):
    """--top-k 5 --top-p 0.9 --min-new-tokens 3 --stop-strings . and: the run finishes with finite numbers, and no
    held-out response is shorter than min_new_tokens + 1 tokens."""
    monkeypatch.syspath_prepend(ROOT)
    module = __import__(script)
    flags = ["--top-k", "5", "--top-p", "0.9", "--min-new-tokens", "3", "--stop-strings", ".", "and"]
    if extra is None:  # DPO: its evaluation samples with the flags
        argv = ["--threads", "1", "--batch-size", "4", "--max-steps", "1", "--max-train-pairs", "8",
                "--max-eval-pairs", "4", "--eval-prompts", "3", "--eval-samples", "1", "--max-new-tokens", "8"]
    else:
        argv = RL + extra
    out = str(tmp_path / script)
    summary = module.main(parse_args(module.Args, argv + flags + ["--out", out]))
    assert summary["eval/length_before"] >= 4 and summary["eval/length_after"] >= 4
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
