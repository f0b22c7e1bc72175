"""Loading (fp32 / bf16 / 8-bit / 4-bit), parameter counting, heads, the next-token shift and response log-probs, and
the roles on one base. (Saving and loading heads and adapters: tests/test_formats.py.)"""
import math

import pytest
import torch

from conftest import make_tiny_gpt2, make_tiny_llama
from minirlhf import lora
from minirlhf.heads import (RatingHead, ScalarHead, final_hidden, last_token_index, predicting_states,
                            response_logprobs, sequence_scores, trunk)
from minirlhf.models import count_parameters, load_model, load_tokenizer, parameter_report, reference, resident_bytes
from minirlhf.ops import masked_mean
from minirlhf.quantization import prepare_for_kbit_training

PAD = 0


def prompt_response_batch(spec, vocab=101, seed=0, prompt_padding="left"):
    """spec: [(prompt_len, response_len)] -> left-padded prompts + right-padded responses (as the sampler lays them
    out), or with prompt_padding="right" every row from position 0 and all its padding on the right; all (B, T):
    input_ids, attention_mask, response_mask."""
    g = torch.Generator().manual_seed(seed)
    P, R = max(p for p, _ in spec), max(r for _, r in spec)
    ids = torch.full((len(spec), P + R), PAD)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, r) in enumerate(spec):
        start = P - p if prompt_padding == "left" else 0  # where the row's prompt starts
        ids[i, start:start + p + r] = torch.randint(3, vocab, (p + r,), generator=g)
        attn[i, start:start + p + r] = 1
        resp[i, start + p:start + p + r] = 1
    return ids, attn, resp


BATCH = prompt_response_batch([(4, 5), (1, 3), (6, 6), (3, 1)])
FAMILIES = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}  # RoPE (relative) / learned absolute positions


# ---------------------------------------------------------------- the next-token shift and log-probs
@pytest.mark.parametrize("prompt_padding", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_predicting_states_is_the_next_token_shift(family, prompt_padding):
    """states[:, t] predicts token t: the LM head on it gives, in float64, the full logits at t - 1 of the row run alone
    with no padding (tolerance 1e-10), at every real position after the row's first; states[:, 0] is zeros."""
    model = FAMILIES[family](dtype=torch.float64)
    ids, attn, resp = prompt_response_batch([(4, 5), (1, 3), (6, 6), (3, 1)], prompt_padding=prompt_padding)
    with torch.no_grad():
        states = predicting_states(final_hidden(model, ids, attn), resp)  # (B, T, H)
        logits = model.get_output_embeddings()(states)  # (B, T, V): every position, for the test
        assert states.shape == (*ids.shape, model.config.hidden_size) and torch.all(states[:, 0] == 0)
        for i in range(len(ids)):
            real = attn[i].bool()
            want = model(ids[i][real][None]).logits[0]  # (n, V): row i alone, logits[t] predict token t + 1
            torch.testing.assert_close(logits[i][real][1:], want[:-1], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="first token"):
        predicting_states(states, torch.ones_like(resp))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("family", FAMILIES)
def test_response_logprobs_equal_full_log_softmax_per_unpadded_row(family, temperature):
    model = FAMILIES[family](dtype=torch.float64)
    ids, attn, resp = BATCH
    lm_head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: lm_head_rows.append(len(args[0])))
    got, ent = response_logprobs(model, ids, attn, resp, temperature=temperature, return_entropy=True)
    hook.remove()
    assert lm_head_rows == [int(resp.sum())]  # the LM head saw only the N response-predicting positions
    for i in range(len(ids)):  # reference: each row alone, no padding at all, full logits, Python loop
        real, is_resp = ids[i][attn[i].bool()], resp[i][attn[i].bool()]
        logp = torch.log_softmax(model(real[None]).logits[0] / temperature, -1)  # (n, V)
        want_lp, want_ent = torch.zeros(len(real), dtype=torch.float64), torch.zeros(len(real), dtype=torch.float64)
        for t in range(1, len(real)):
            if is_resp[t]:
                want_lp[t] = logp[t - 1, real[t]]
                want_ent[t] = -(logp[t - 1].exp() * logp[t - 1]).sum()
        torch.testing.assert_close(got[i][attn[i].bool()], want_lp, atol=1e-6, rtol=0)
        torch.testing.assert_close(ent[i][attn[i].bool()], want_ent, atol=1e-6, rtol=0)
    assert torch.all(got[resp == 0] == 0) and torch.all(ent[resp == 0] == 0)


def test_response_logprobs_rejects_bad_input():
    model = make_tiny_llama()
    ids, attn, resp = BATCH
    with pytest.raises(ValueError, match="temperature"):
        response_logprobs(model, ids, attn, resp, temperature=0.0)
    with pytest.raises(ValueError, match="first token"):
        response_logprobs(model, ids, attn, torch.ones_like(resp))


# ---------------------------------------------------------------- heads
def test_last_token_index_any_padding_side():
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        mask = torch.zeros(7, 13, dtype=torch.long)
        for row in mask:
            n = int(torch.randint(1, 14, (1,), generator=g))
            start = int(torch.randint(0, 14 - n, (1,), generator=g))  # left, right or both-side padding
            row[start:start + n] = 1
        want = [max(t for t in range(13) if row[t]) for row in mask.tolist()]
        assert last_token_index(mask).tolist() == want
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("family,head_cls", [("llama", ScalarHead), ("llama", RatingHead), ("gpt2", ScalarHead)])
def test_score_is_the_same_whatever_the_padding(family, head_cls):
    model = FAMILIES[family]()
    head = head_cls(32)
    x = torch.tensor([5, 9, 33, 7, 81, 12])
    with torch.no_grad():
        want = head(trunk(model)(x[None]).last_hidden_state[0, -1])  # unpadded, read at the last token
        lefts = [0, 3, 6, 2]  # left padding; right padding fills each row to 12: right-only, both, left-only
        ids = torch.stack([torch.cat([torch.full((l,), PAD), x, torch.full((6 - l,), PAD)]) for l in lefts])
        mask = torch.stack([torch.cat([torch.zeros(l), torch.ones(6), torch.zeros(6 - l)]) for l in lefts]).long()
        ids = torch.cat([ids, torch.randint(3, 101, (1, 12))])  # plus an unrelated full-length row
        mask = torch.cat([mask, torch.ones(1, 12, dtype=torch.long)])
        got = sequence_scores(model, head, ids, mask)
    assert got.shape == ((5,) if head_cls is ScalarHead else (5, 10))
    for score in got[:4]:
        torch.testing.assert_close(score, want, atol=1e-5, rtol=0)


def test_head_inits():
    torch.manual_seed(0)
    h = 4095
    assert torch.all(ScalarHead(h, init_std=0.0)(torch.randn(3, 7, h)) == 0)  # value head: V = 0 at the start
    std = ScalarHead(h).linear.weight.std().item()  # reward head: N(0, 1/(H+1))
    assert abs(std - 1 / math.sqrt(h + 1)) < 0.05 / math.sqrt(h + 1)


# ---------------------------------------------------------------- loading
def test_load_fp32_frozen_same_outputs(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    ids, attn, _ = BATCH
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=attn).logits,
                                   make_tiny_llama()(ids, attention_mask=attn).logits, atol=0, rtol=0)
    total = sum(p.numel() for p in make_tiny_llama().parameters())
    assert count_parameters(model) == (0, total)
    assert parameter_report(model) == f"trainable params: 0 || all params: {total:,d} || trainable%: 0.0000"
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert resident_bytes(model) == 4 * total + buffers
    assert load_model(tiny_llama_dir, dtype="bfloat16").model.norm.weight.dtype == torch.bfloat16


def test_load_errors_are_one_line_value_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_model(tiny_llama_dir, quantization="3bit")
    with pytest.raises(ValueError, match="dtype must be"):
        load_model(tiny_llama_dir, dtype="fp16")
    with pytest.raises(ValueError, match="neither an existing local directory nor a valid Hub id"):
        load_model(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(str(tmp_path))


def test_tokenizer_gets_a_distinct_pad_and_the_model_grows(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(98)}}  # 101 = the model's vocab
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(tmp_path)  # pad == EOS: the classic bug
    tok = load_tokenizer(tmp_path)  # a tokenizer-only folder (no config.json) is fine
    assert "added pad token '<|pad|>'" in capsys.readouterr().out
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 101 != tok.eos_token_id
    make_tiny_llama().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), tokenizer=tok)  # 102 tokens: the rows grow to a multiple of 64 (padding.py)
    assert model.get_input_embeddings().num_embeddings == model.get_output_embeddings().out_features == 128
    assert "embeddings resized 101 -> 128 rows" in capsys.readouterr().out
    assert model.config.pad_token_id == 101 and not any(p.requires_grad for p in model.parameters())


def nf4_bytes(n):
    """Bytes QLoRA's storage holds for one n-value weight with double quantization (blocks of 64, then of 256):
    packed 4-bit values, 8-bit absmax per block, the 16-value NF4 code, fp32 absmax per 256 blocks, the 256-value
    8-bit dynamic code (fp32) and the fp32 offset."""
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 16 * 4 + math.ceil(blocks / 256) * 4 + 256 * 4 + 4


WIDE = dict(hidden_size=64, intermediate_size=128)  # rows a multiple of the 64-value NF4 block (quantization.NF4_BLOCK)


@pytest.fixture(scope="module")
def tiny_llama64_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-64")
    make_tiny_llama(**WIDE).save_pretrained(path)
    return str(path)


def test_qlora_4bit_loads_trains_and_base_stays_fixed(tiny_llama64_dir):
    model = load_model(tiny_llama64_dir, quantization="4bit", gradient_checkpointing=True)
    fp32 = make_tiny_llama(**WIDE)
    quantized = [m.weight for m in model.modules() if type(m.weight if hasattr(m, "weight") else None).__name__
                 == "Params4bit"]
    assert len(quantized) == 14  # 7 linears per layer, 2 layers; embeddings and lm_head stay float
    assert model.model.norm.weight.dtype == torch.float32
    total = sum(p.numel() for p in fp32.parameters())
    assert count_parameters(model) == (0, total)  # packed 4-bit weights counted at their real size
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_floating_point())
    float_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    assert resident_bytes(model) == float_bytes + sum(nf4_bytes(w.quant_state.shape.numel()) for w in quantized)
    ids, attn, resp = BATCH
    import bitsandbytes as bnb
    dequantized = make_tiny_llama(**WIDE)
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):  # NF4 keeps each weight matrix to ~9 % relative error ...
            w_hat = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            w = dequantized.get_submodule(name).weight
            assert (w_hat - w).norm() / w.norm() < 0.12, name
            w.data = w_hat
    with torch.no_grad():  # ... and the 4-bit model computes exactly with those dequantized weights, in float32
        torch.testing.assert_close(model(ids, attention_mask=attn).logits,
                                   dequantized(ids, attention_mask=attn).logits, atol=1e-5, rtol=0)

    lora.add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, adapter="policy")
    lora_count = 2 * (4 * (64 + 64) + 4 * (64 + 32))  # 2 layers x r (in + out) for q_proj (64->64), v_proj (64->32)
    assert count_parameters(model) == (lora_count, total + lora_count)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    opt = torch.optim.AdamW(lora.lora_parameters(model, "policy"), lr=5e-2)
    model.train()
    losses = []
    for _ in range(5):  # SFT on one fixed batch: the NLL of the responses must drop
        loss = -masked_mean(response_logprobs(model, ids, attn, resp), resp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n


def test_4bit_bytes_stay_put_through_eval_forwards(tiny_llama64_dir):
    """bitsandbytes repacks a Linear4bit's bytes at its first eval/no-grad forward on AVX-512 BF16 CPUs
    (quantization.keep_4bit_layout_on_cpu switches that off): sampling and training must compute with the same bytes."""
    model = load_model(tiny_llama64_dir, quantization="4bit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, attn, _ = BATCH
    with torch.no_grad():
        eval_logits = model.eval()(ids, attention_mask=attn).logits
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    train_logits = model.train()(ids, attention_mask=attn).logits  # the training path, with grad enabled
    torch.testing.assert_close(eval_logits, train_logits.detach(), atol=1e-6, rtol=0)


def test_4bit_rows_off_the_nf4_block_are_dequantized_right_or_refused(tiny_llama_dir):
    """32-wide rows: bitsandbytes' AVX-512 dequantization gets them wrong (rel. error 0.37 instead of ~0.09); the
    loader refuses such a model there with one line; elsewhere it must load and dequantize within NF4's error."""
    import bitsandbytes as bnb
    try:
        model = load_model(tiny_llama_dir, quantization="4bit")
    except ValueError as e:
        assert torch.backends.cpu.get_cpu_capability() == "AVX512"
        assert "multiple of the 64-value NF4 block" in str(e)
        return
    reference_model = make_tiny_llama()
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w_hat = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            w = reference_model.get_submodule(name).weight
            assert (w_hat - w).norm() / w.norm() < 0.12, name


def test_prepare_for_kbit_training_on_a_bf16_model():
    model = prepare_for_kbit_training(make_tiny_llama(dtype=torch.bfloat16))
    assert not any(p.requires_grad for p in model.parameters())
    for name, p in model.named_parameters():  # everything keeps the compute dtype: no fp32 residual stream
        assert p.dtype == torch.bfloat16, name
    assert model.get_input_embeddings()(torch.tensor([[3, 4]])).requires_grad  # for checkpointed LoRA blocks


def test_8bit_loads_on_this_backend(tiny_llama_dir):
    import bitsandbytes as bnb
    try:  # does this bitsandbytes build quantize int8 on this device at all?
        bnb.functional.int8_vectorwise_quant(torch.randn(4, 4, dtype=torch.float16))
    except Exception as e:  # noqa: BLE001 - any backend failure means: not supported here
        pytest.skip(f"bitsandbytes {bnb.__version__} has no int8 quantization on the CPU: {e}")
    model = load_model(tiny_llama_dir, quantization="8bit")
    assert sum(type(p).__name__ == "Int8Params" for p in model.parameters()) == 14
    assert count_parameters(model) == (0, sum(p.numel() for p in make_tiny_llama().parameters()))
    ids, attn, _ = BATCH
    with torch.no_grad():
        want = make_tiny_llama()(ids, attention_mask=attn).logits
        err = (model(ids, attention_mask=attn).logits - want).abs().max()
    assert err < 0.1 * want.abs().max()  # LLM.int8 (int8 weights, fp16 activations): a few % of the logit scale


def test_8bit_on_the_cpu_shows_each_bitsandbytes_warning_once(tiny_llama_dir):
    """On the CPU LLM.int8's matmul logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during
    quantization" at every forward of every 8-bit layer (thousands of lines in a short run): after an 8-bit load it
    shows once in the process (a fresh one, so that no earlier test has shown it already)."""
    import subprocess
    import sys
    import bitsandbytes as bnb
    try:
        bnb.functional.int8_vectorwise_quant(torch.randn(4, 4, dtype=torch.float16))
    except Exception as e:  # noqa: BLE001 - any backend failure means: not supported here
        pytest.skip(f"bitsandbytes {bnb.__version__} has no int8 quantization on the CPU: {e}")
    code = ("import sys, torch; from minirlhf.models import load_model\n"
            "model = load_model(sys.argv[1], quantization='8bit', device='cpu')\n"
            "with torch.no_grad():\n"
            "    for _ in range(3):\n"
            "        model(torch.tensor([[5, 17, 42, 99]]))\n"
            "print('forwards done')\n")
    proc = subprocess.run([sys.executable, "-c", code, tiny_llama_dir], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "forwards done" in proc.stdout, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "MatMul8bitLt" in line]
    assert len(lines) == 1, f"{len(lines)} lines: {lines[:2]}"  # 14 8-bit layers x 3 forwards without the filter


@pytest.mark.parametrize("quantization, folder", [("4bit", "tiny_llama64_dir"), ("8bit", "tiny_llama_dir")])
def test_quantized_load_reads_tensor_by_tensor_to_the_same_model(quantization, folder, request):
    """load_model's quantized path (each tensor read on its own, not through a memory map) builds the model that
    from_pretrained builds from the folder: the same quantized bytes and float weights, the same name."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from minirlhf import quantization as kbit
    path = request.getfixturevalue(folder)
    if quantization == "8bit":
        import bitsandbytes as bnb
        try:
            bnb.functional.int8_vectorwise_quant(torch.randn(4, 4, dtype=torch.float16))
        except Exception as e:  # noqa: BLE001 - any backend failure means: not supported here
            pytest.skip(f"bitsandbytes {bnb.__version__} has no int8 quantization on the CPU: {e}")
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    reads = []
    read = kbit._ReadOnDemand.__getitem__
    kbit._ReadOnDemand.__getitem__ = lambda self, index: reads.append(1) or read(self, index)
    try:
        model = load_model(path, quantization=quantization, device="cpu")
    finally:
        kbit._ReadOnDemand.__getitem__ = read
    expected = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map={"": "cpu"},
                                                    dtype=torch.float32)
    from safetensors import safe_open
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        assert len(reads) == len(list(f.keys()))  # every tensor of the file read on its own
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert model.name_or_path == expected.name_or_path == path
    if quantization == "4bit":
        kbit.keep_4bit_layout_on_cpu(expected)  # as load_model does (no repacking at the first eval forward)
    ids, attn, _ = BATCH
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=attn).logits, expected(ids, attention_mask=attn).logits)


PEAK_RSS = """import json, os, sys, torch, bitsandbytes
from minirlhf.models import load_model
torch.set_num_threads(1)
def status(key):  # MiB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024
peaks = {}
for quantization in ("none", "8bit", "4bit"):  # each load in a process of its own, forked after the imports
    read, write = os.pipe()
    if os.fork() == 0:
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from here
        model = load_model(sys.argv[1], quantization=quantization, device="cpu")
        with torch.no_grad():
            model(torch.tensor([[5, 17, 42, 99, 7, 64, 3, 11]]))
        os.write(write, str(status("VmHWM") - before).encode())
        os._exit(0)
    os.close(write)
    os.wait()
    peaks[quantization] = float(os.read(read, 100))
print(json.dumps(peaks))
"""


def test_quantized_load_peaks_no_higher_than_float(tmp_path):
    """Peak RSS of load_model + one forward pass, each in a fresh process (forked after the imports, bitsandbytes'
    included; Linux's VmHWM, reset at the start) on a 25M-parameter Llama saved in float32 (100 MB): a 4-bit or
    8-bit load must not peak above the float one (5 % tolerance). A float load's weights are the memory-mapped file's
    pages, read at the first forward: the forward is part of the comparison. Quantizing weights read through the
    memory map (from_pretrained's own reading) peaks at the whole float file plus the quantized model and the freed
    float copies (measured: 8-bit 177-221 MiB, 4-bit 181-221 MiB against the float load's 143 MiB)."""
    import json
    import os
    import subprocess
    import sys
    from transformers import LlamaConfig, LlamaForCausalLM
    if not os.path.exists("/proc/self/clear_refs") or not hasattr(os, "fork"):
        pytest.skip("needs Linux's /proc/self/clear_refs and fork to measure each load's own peak")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout.splitlines()[-1])  # MiB above each process's size before its load
    assert peak["none"] > 95, peak  # the float weights (95 MiB) did count
    for quantization in ("8bit", "4bit"):
        assert peak[quantization] <= 1.05 * peak["none"], peak


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir):
    grads = []
    for checkpointing in (False, True):
        model = load_model(tiny_llama_dir, gradient_checkpointing=checkpointing).train()
        torch.manual_seed(0)
        lora.add_lora(model, ["q_proj", "down_proj"], r=4, alpha=8)
        for p in lora.lora_parameters(model, "default"):
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))  # B != 0: A gets grads too
        ids, attn, resp = BATCH
        (-masked_mean(response_logprobs(model, ids, attn, resp), resp)).backward()
        grads.append([p.grad for p in lora.lora_parameters(model, "default")])
    assert model.model.layers[0].gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_checkpointing_works_in_train_mode_without_dropout_and_not_in_eval(tiny_llama_dir):
    """transformers checkpoints blocks only in train mode: DPO's eval-mode model would silently store every
    activation. dropout_off keeps checkpointing on (far fewer tensors saved for backward) and dropout
    off (the same log-probs as eval mode)."""
    from minirlhf.models import dropout_off
    assert not dropout_off(load_model(tiny_llama_dir)).training  # not checkpointed: plain eval mode
    model = load_model(tiny_llama_dir, gradient_checkpointing=True)
    lora.add_lora(model, ["q_proj"], r=4, alpha=8, dropout=0.5)  # a dropout that must stay off
    ids, attn, resp = BATCH
    saved, values = {}, {}
    for mode in ("eval", "train_without_dropout"):
        model.eval() if mode == "eval" else dropout_off(model)
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp = response_logprobs(model, ids, attn, resp)
        logp.sum().backward()
        saved[mode], values[mode] = sum(sizes), logp.detach()
    assert saved["train_without_dropout"] < saved["eval"] / 4, saved  # blocks' activations not kept: checkpointed
    torch.testing.assert_close(values["eval"], values["train_without_dropout"], rtol=0, atol=0)  # no dropout


# ---------------------------------------------------------------- roles on one base
def sft_steps(model, adapter, steps=3, lr=3e-2, sign=-1.0):
    """A few optimizer steps on one adapter (sign -1: raise the batch's log-probs)."""
    opt = torch.optim.AdamW(lora.lora_parameters(model, adapter), lr=lr)
    ids, attn, resp = BATCH
    with lora.use_adapter(model, adapter):
        for _ in range(steps):
            loss = sign * response_logprobs(model, ids, attn, resp).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()


def logps(model):
    with torch.no_grad():
        return response_logprobs(model, *BATCH)


def test_reference_is_the_bare_base_and_stays_there():
    base_copy = make_tiny_llama()
    model = lora.add_lora(make_tiny_llama(), ["q_proj", "v_proj", "up_proj"], r=4, alpha=8, adapter="policy")
    want = logps(base_copy)
    with reference(model):
        torch.testing.assert_close(logps(model), want, atol=1e-6, rtol=0)
    sft_steps(model, "policy")
    with lora.use_adapter(model, "policy"):
        assert (logps(model) - want).abs().max() > 1e-2  # the policy moved
    with reference(model):
        torch.testing.assert_close(logps(model), want, atol=1e-6, rtol=0)  # the reference did not
    assert lora.active_adapter(model) == "policy"  # and the context manager put the policy back


def test_reward_adapter_switches_the_reward_and_nothing_leaks():
    model = lora.add_lora(make_tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, adapter="policy")
    lora.add_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, adapter="reward")
    head = ScalarHead(32)
    ids, attn, _ = BATCH
    base = logps(make_tiny_llama())

    def reward():
        with lora.use_adapter(model, "reward"), torch.no_grad():
            return sequence_scores(model, head, ids, attn)

    r0 = reward()
    sft_steps(model, "reward")  # train the reward adapter (any loss will do here)
    r1 = reward()
    assert (r1 - r0).abs().max() > 1e-3  # the reward adapter changes the reward
    with lora.adapters_disabled(model), torch.no_grad():
        torch.testing.assert_close(sequence_scores(model, head, ids, attn), r0, atol=1e-6, rtol=0)  # off = base
    with lora.use_adapter(model, "policy"):
        torch.testing.assert_close(logps(model), base, atol=1e-6, rtol=0)  # the policy saw nothing of it
    sft_steps(model, "policy")
    torch.testing.assert_close(reward(), r1, atol=1e-6, rtol=0)  # policy training leaves the reward alone
    with reference(model):
        torch.testing.assert_close(logps(model), base, atol=1e-6, rtol=0)


def test_reference_is_the_trained_starting_adapter_when_there_is_one():
    model = lora.add_lora(make_tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8, adapter="policy")
    sft_steps(model, "policy")  # the policy starts from a trained (SFT) adapter
    base = logps(make_tiny_llama())
    with lora.use_adapter(model, "policy"):
        start = logps(model)
    lora.copy_adapter(model, "policy", "reference")  # frozen copy
    assert not any(p.requires_grad for p in lora.lora_parameters(model, "reference"))
    with reference(model):
        torch.testing.assert_close(logps(model), start, atol=1e-6, rtol=0)
        assert (logps(model) - base).abs().max() > 1e-2  # NOT the bare base
    sft_steps(model, "policy", sign=1.0)  # move the policy away
    with lora.use_adapter(model, "policy"):
        assert (logps(model) - start).abs().max() > 1e-2
    with reference(model):
        torch.testing.assert_close(logps(model), start, atol=1e-6, rtol=0)  # the reference stayed at the start


@pytest.fixture
def reward_folder(tmp_path):
    """A copy of the embedded reward model (trained on the embedded model) whose head records a float32 base."""
    import json
    import shutil
    from minirlhf.assets import ASSETS_DIR
    folder = tmp_path / "reward_model"
    shutil.copytree(f"{ASSETS_DIR}/reward-model", folder)
    config = json.loads((folder / "head_config.json").read_text())
    assert "base" not in config  # as shipped: no record
    config["base"] = {"quantization": "none", "dtype": "float32"}
    (folder / "head_config.json").write_text(json.dumps(config))
    return str(folder)


def test_reward_model_on_a_base_of_another_precision_says_so_once(reward_folder, capsys):
    """A reward model recorded as trained on a float32 base: on a 4-bit base one warning line on stderr (and it is
    used, not refused); on a float32 base, or for a folder without the record, nothing."""
    from minirlhf.assets import ASSETS_DIR, TINY_LLAMA
    from minirlhf.models import base_precision, load_reward_model
    tok = load_tokenizer(TINY_LLAMA)
    float_base = load_model(TINY_LLAMA, device="cpu", tokenizer=tok)
    assert base_precision(float_base) == {"quantization": "none", "dtype": "float32"}
    capsys.readouterr()
    load_reward_model(float_base, reward_folder)
    assert capsys.readouterr().err == ""
    try:
        kbit_base = load_model(TINY_LLAMA, quantization="4bit", device="cpu", tokenizer=tok)
    except ValueError as e:  # quantization.keep_4bit_layout_on_cpu: this CPU cannot run that model's 4-bit rows
        pytest.skip(str(e))
    assert base_precision(kbit_base) == {"quantization": "4bit", "dtype": "float32"}
    capsys.readouterr()
    adapter, head = load_reward_model(kbit_base, reward_folder)
    err = capsys.readouterr().err
    assert err == (f"warning: --reward-model {reward_folder!r}: reward model trained on a float32 base; this base is "
                   "4-bit NF4 (float32 compute): its scores may shift (retrain it on this base to be exact)\n")
    assert adapter == "reward" and head is not None
    load_reward_model(kbit_base, f"{ASSETS_DIR}/reward-model", adapter="shipped")  # no record: no word
    assert capsys.readouterr().err == ""
