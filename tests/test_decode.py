"""minirlhf/fast/decode.py, the sampler's hand-written Llama-family forward over a preallocated KV cache, against
transformers: greedy tokens equal to model.generate, per-token log-probs equal to the HF-forward path and to
heads.response_logprobs (1e-5) with a LoRA adapter on and off, step logits equal to a full recompute, no NaN under
heavy padding, and the fallback to transformers' forward for every model it does not support."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_gpt2, make_tiny_llama
from minirlhf import lora
from minirlhf.fast import decode
from minirlhf.assets import TINY_LLAMA
from minirlhf.heads import response_logprobs
from minirlhf.models import reference
from minirlhf.precision import set_compute_dtype
from minirlhf.sampling import sample
from test_sampling import PAD, left_padded_prompts

LENGTHS = [5, 3, 9, 1, 6, 9, 2]  # left-padded prompts of different lengths, one of a single token


def random_model(model_type="llama", seed=0, **overrides):
    """A small random model of the Llama family built from its config (no hub): GQA (4 heads, 2 KV heads), hidden 32,
    head dim 8; a wide init (0.2) gives peaked next-token distributions: float32 greedy decoding meets no near-ties."""
    from transformers import AutoConfig
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=101, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  tie_word_embeddings=False, initializer_range=0.2,
                                  **{"sliding_window": None, **overrides})  # Mistral's default window: 4096
    return AutoModelForCausalLM.from_config(config).eval()


def both_engines(model, ids, mask, max_new_tokens, **kw):
    """sample() with fast/decode.py's forward and with transformers', same settings and seed."""
    assert decode.supports(model), decode.unsupported_reason(model)
    return [sample(model, ids, mask, max_new_tokens, pad_token_id=PAD, engine=engine,
                   generator=torch.Generator().manual_seed(0), **kw) for engine in ("auto", "hf")]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])  # qwen2: q/k/v biases
def test_greedy_equals_generate_with_gqa(model_type):
    model = random_model(model_type)
    ids, mask = left_padded_prompts(LENGTHS)
    fast, hf = both_engines(model, ids, mask, 12, eos_token_id=100, temperature=0)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            eos_token_id=100, pad_token_id=PAD)[:, ids.shape[1]:]
    assert torch.equal(fast.response_ids, theirs) and torch.equal(hf.response_ids, theirs)
    torch.testing.assert_close(fast.logprobs, hf.logprobs, atol=1e-5, rtol=0)


def test_greedy_equals_generate_on_the_embedded_tiny_llama():
    """The shipped model (hidden 192, 6 heads, vocab 512) on 7 built-in chat prompts of 15-19 tokens."""
    from transformers import AutoTokenizer
    from minirlhf.data import load_prompt_dataset
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
             for row in load_prompt_dataset("builtin", split="test").select(range(7))]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask, eos, pad = enc["input_ids"], enc["attention_mask"], tokenizer.eos_token_id, tokenizer.pad_token_id
    assert decode.supports(model) and len(set(mask.sum(1).tolist())) > 2
    fast = sample(model, ids, mask, 16, eos_token_id=eos, pad_token_id=pad, temperature=0)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16, eos_token_id=eos,
                            pad_token_id=pad)[:, ids.shape[1]:]
    assert torch.equal(fast.response_ids, theirs)
    assert fast.ended.any() and not fast.ended.all()  # some rows stopped at EOS, some ran to the end


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_the_hf_path_and_response_logprobs_with_lora_on_and_off(temperature):
    model = random_model(seed=3)
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter="policy")
    for p in lora.lora_parameters(model, "policy"):
        torch.nn.init.normal_(p, std=0.3)  # B != 0: the adapter changes every projection
    ids, mask = left_padded_prompts(LENGTHS, seed=3)
    results = {}
    for name, context in (("policy", lora.use_adapter(model, "policy")), ("reference", reference(model))):
        with context:
            # temperature 1 draws: when the logits agree to float precision both engines make the same draws
            fast, hf = both_engines(model, ids, mask, 10, eos_token_id=2, temperature=temperature)
            assert torch.equal(fast.response_ids, hf.response_ids) and torch.equal(fast.ended, hf.ended)
            # rtol: the fast path samples with the adapter merged into the weights (decode.merged_lora_weights), a
            # different rounding of the same function (1.2e-5 on a log-prob of -3.6 with this large adapter)
            torch.testing.assert_close(fast.logprobs, hf.logprobs, atol=1e-5, rtol=1e-5)
            full_ids = torch.cat([ids, fast.response_ids], 1)
            full_mask = torch.cat([mask, fast.response_mask], 1)
            resp_mask = torch.cat([torch.zeros_like(mask), fast.response_mask], 1)
            with torch.no_grad():
                lp = response_logprobs(model, full_ids, full_mask, resp_mask, temperature=temperature)
            torch.testing.assert_close(lp[:, ids.shape[1]:], fast.logprobs, atol=1e-5, rtol=1e-5)
            results[name] = fast
    assert not torch.equal(results["policy"].response_ids, results["reference"].response_ids)  # the adapter acts


def test_step_logits_equal_a_full_recompute_under_heavy_padding():
    """Each row's logits at every step equal a fresh forward of that row alone, without padding (so no NaN and no
    leak between rows): 12 rows, 10 of them a single real token in 20 columns."""
    model = random_model(seed=2)
    ids, mask = left_padded_prompts([20, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 7], seed=2)
    tokens = torch.randint(3, 101, (12, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        decoder = decode.Decoder(model, mask, 6)
        logits = [decoder.prefill(ids)] + [decoder.step(tokens[:, t]) for t in range(5)]  # (B, V) each
        assert all(torch.isfinite(c).all() for c in decoder.keys + decoder.values)
        for row in range(12):
            alone = torch.cat([ids[row, mask[row] == 1], tokens[row, :5]])[None]  # (1, n + 5)
            fresh = model(input_ids=alone).logits[0, -6:]  # (6, V) the predictions after the prompt, then each token
            torch.testing.assert_close(torch.stack([l[row] for l in logits]), fresh, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.15), (torch.float16, 0.02)])
def test_16_bit_autocast_is_as_close_to_float32_as_the_hf_path(dtype, tol):
    """Under the sampler's autocast (precision.py; the base stored in 16 bits) both forwards compute in 16 bits, so
    greedy tokens may part at near-ties: each engine's log-probs are compared with float32 ones of its own tokens.
    bf16 keeps 8 significant bits, fp16 11: log-probs ~3 in size after 16-bit matmuls were off by up to 0.06 (bf16)
    and 0.008 (fp16) with either engine over 4 seeds; tolerance 0.15 / 0.02."""
    import copy
    model = random_model(seed=4)
    exact = copy.deepcopy(model)  # float32
    set_compute_dtype(model.to(dtype), dtype)
    ids, mask = left_padded_prompts(LENGTHS, seed=4)
    for engine in ("auto", "hf"):
        out = sample(model, ids, mask, 8, eos_token_id=2, pad_token_id=PAD, temperature=0, engine=engine)
        resp_mask = torch.cat([torch.zeros_like(mask), out.response_mask], 1)
        with torch.no_grad():
            lp = response_logprobs(exact, torch.cat([ids, out.response_ids], 1),
                                   torch.cat([mask, out.response_mask], 1), resp_mask)[:, ids.shape[1]:]
        torch.testing.assert_close(out.logprobs, lp, atol=tol, rtol=0)


def unsupported_models():
    yield "gpt2", make_tiny_gpt2()
    yield "sliding window", random_model("mistral", sliding_window=8)
    yield "dynamic rope", random_model(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    yield "qwen3 (q_norm, k_norm)", random_model("qwen3", head_dim=8)
    hooked = make_tiny_llama()
    hooked.register_forward_hook(lambda *a: None)
    yield "forward hook", hooked


def test_unsupported_models_fall_back_to_the_hf_forward(monkeypatch):
    assert decode.supports(make_tiny_llama())
    monkeypatch.setattr(decode, "Decoder", None)  # any use of the fast path would fail
    ids, mask = left_padded_prompts([4, 2, 6])
    for name, model in unsupported_models():
        assert not decode.supports(model), name
        auto, hf = [sample(model, ids, mask, 5, eos_token_id=2, pad_token_id=PAD, engine=engine,
                           generator=torch.Generator().manual_seed(0)) for engine in ("auto", "hf")]
        assert torch.equal(auto.response_ids, hf.response_ids) and torch.equal(auto.logprobs, hf.logprobs), name
    with pytest.raises(ValueError, match="engine"):
        sample(make_tiny_llama(), ids, mask, 5, eos_token_id=2, pad_token_id=PAD, engine="fast")


def test_rows_that_stopped_leave_the_batch_and_change_nothing(monkeypatch):
    """The embedded tiny Llama, 64 chat prompts sampled at temperature 1: most responses end long before 24 tokens,
    so the decoder drops the stopped rows (down to a few); tokens, log-probs and `ended` stay those of the HF path,
    which computes every row to the end (the same random draws: multinomial's draws for the other rows do not
    depend on a stopped row's logits)."""
    from transformers import AutoTokenizer
    from minirlhf.data import load_prompt_dataset
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
             for row in load_prompt_dataset("builtin", split="train").select(range(64))]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    kept = []
    drop = decode.Decoder._drop_stopped
    monkeypatch.setattr(decode.Decoder, "_drop_stopped", lambda self, running: (drop(self, running),
                                                                                kept.append(len(self.rows_kept))))
    fast, hf = both_engines(model, batch["input_ids"], batch["attention_mask"], 24,
                            eos_token_id=tokenizer.eos_token_id, temperature=1.0)
    assert min(kept) <= 8 < 64 == kept[0]  # rows left the batch
    assert torch.equal(fast.response_ids, hf.response_ids) and torch.equal(fast.ended, hf.ended)
    torch.testing.assert_close(fast.logprobs, hf.logprobs, atol=1e-5, rtol=0)


def test_a_repeated_prompt_is_prefilled_once_and_samples_as_before(monkeypatch):
    """GRPO's layout: 3 prompts x 4 copies. The decoder prefills 3 rows, not 12; the samples (temperature 1, one
    seed) and their log-probs are those of the HF path, which prefills all 12."""
    model = random_model()
    ids, mask = left_padded_prompts([5, 2, 7])
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # (12, P), each prompt 4 times in a row
    prefilled = []
    inner = decode.Decoder._prefill
    monkeypatch.setattr(decode.Decoder, "_prefill", lambda self, x: prefilled.append(len(x)) or inner(self, x))
    fast, hf = both_engines(model, ids, mask, 10, eos_token_id=100, temperature=1.0)
    assert prefilled == [3]
    assert torch.equal(fast.response_ids, hf.response_ids)
    assert len({tuple(r) for r in fast.response_ids.tolist()}) > 3  # the copies still sample apart
    torch.testing.assert_close(fast.logprobs, hf.logprobs, atol=1e-5, rtol=0)


def test_lora_layers_are_merged_for_sampling_within_the_budget(monkeypatch):
    """merged_lora_weights: W + (alpha/r)·B·A of the active adapter, one matmul equal to calling the layer; none
    without an active adapter (the reference) or above MERGE_LIMIT_BYTES."""
    model = random_model(seed=4)
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter="policy")
    for p in lora.lora_parameters(model, "policy"):
        torch.nn.init.normal_(p, std=0.1)
    merged = decode.merged_lora_weights(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.linear(x, merged[layer]), layer(x), atol=1e-5, rtol=1e-5)
    assert len(merged) == 7 * 2  # q k v o gate up down, 2 layers
    with reference(model):
        assert decode.merged_lora_weights(model) == {}
    monkeypatch.setattr(decode, "MERGE_LIMIT_BYTES", 1000)
    assert decode.merged_lora_weights(model) == {}
