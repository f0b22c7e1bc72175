"""fingerprint.frozen_fingerprint: per-tensor float64 checksums of every frozen value (4-bit quantization state
included), computed in chunks on the tensor's device, so the host holds O(number of tensors), not O(parameters).

Host memory, measured on the SmolLM2-135M-shaped model below (float32, 272 frozen tensors, 1 thread): peak RSS growth
during the call 0.14 MB (3.9 MB on a first call, when the kernels' code is paged in); the implementation this
replaced (each whole tensor copied to float64 with a float64 index vector, then their product) 648 MB, in 1.1 s
against 0.2 s.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from minirlhf import fingerprint
from minirlhf.fingerprint import frozen_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(tensors):
    """[Σ w, Σ i·w] (i = 1..n, row-major) of each tensor, in numpy float64: the definition, written independently."""
    out = []
    for t in tensors:
        w = t.detach().to(torch.float64).numpy().reshape(-1)
        out += [w.sum(), (w * np.arange(1, w.size + 1)).sum()]
    return out


def frozen_model():
    model = make_tiny_llama()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("chunk", [7, 2 ** 16])  # 7: every tensor spans many chunks (and a partial last one)
def test_the_fingerprint_is_the_per_tensor_sums(monkeypatch, chunk):
    monkeypatch.setitem(fingerprint.CHUNK, "cpu", chunk)
    model = frozen_model()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous().t(),
                                              requires_grad=False)  # a strided (transposed) view
    assert not model.lm_head.weight.is_contiguous()
    got = frozen_fingerprint(model)
    want = reference(model.parameters())
    assert len(got) == 2 * len(list(model.parameters())) == 2 * 21  # embeddings, 2 x 9 per layer, norm, LM head
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("where", ["first", "middle", "last", "swap"])
def test_changing_one_value_anywhere_or_swapping_two_changes_it(monkeypatch, where):
    monkeypatch.setitem(fingerprint.CHUNK, "cpu", 100)  # the middle value sits inside a chunk, not on its edge
    model = frozen_model()
    before = frozen_fingerprint(model)
    assert frozen_fingerprint(model) == before  # the same values give the same floats
    w = model.model.layers[1].mlp.down_proj.weight.data.view(-1)  # 2048 values
    i = {"first": 0, "middle": 1234, "last": w.numel() - 1, "swap": 1234}[where]
    if where == "swap":
        w[i], w[i + 501] = w[i + 501].clone(), w[i].clone()  # the sum is unchanged, the weighted sum is not
        assert w[i] != w[i + 501]
    else:
        w[i] = torch.nextafter(w[i], torch.tensor(1.0))  # the smallest possible change
    assert frozen_fingerprint(model) != before


def test_trainable_parameters_are_not_part_of_it():
    model = frozen_model()
    before = frozen_fingerprint(model)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    trainable = frozen_fingerprint(model)
    assert len(trainable) == len(before) - 2  # one tensor fewer
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert frozen_fingerprint(model) == trainable


def test_a_4bit_weight_counts_its_block_scales(tmp_path):
    """A 4-bit weight whose packed codes stay put but whose absmax (or nested absmax, or offset) changes holds other
    values: the fingerprint must see it."""
    pytest.importorskip("bitsandbytes")
    from minirlhf.models import load_model
    make_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)  # rows a multiple of 64
    model = load_model(str(tmp_path), quantization="4bit")
    state = model.model.layers[0].self_attn.q_proj.weight.quant_state
    before = frozen_fingerprint(model)
    for tensor in (state.absmax, state.state2.absmax, state.offset):
        old = tensor.clone()
        tensor.view(-1)[-1] += 1 if not tensor.is_floating_point() else 0.5
        assert frozen_fingerprint(model) != before
        tensor.copy_(old)
    assert frozen_fingerprint(model) == before


CHILD = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from minirlhf.fingerprint import frozen_fingerprint

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

torch.set_num_threads(1)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                     num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                     tie_word_embeddings=True)).requires_grad_(False)
frozen_fingerprint(torch.nn.Linear(1024, 1024).requires_grad_(False))  # pages the kernels' code in
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := the RSS now
base = kib("VmRSS")
values = frozen_fingerprint(model)
print(sum(p.numel() for p in model.parameters()), len(values), (kib("VmHWM") - base) * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_the_fingerprint_of_a_135m_model_needs_under_10_mb_of_host_memory():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, floats, peak = map(int, proc.stdout.split())
    assert params == 134_515_008 and floats == 2 * 272  # the 135M shape: 30 x 9 tensors + embeddings + final norm
    assert peak < 10 * 2 ** 20, f"the fingerprint grew the host's RSS by {peak / 2 ** 20:.1f} MB"


def test_an_8bit_base_is_unchanged_through_its_first_forward_and_a_changed_scale_is_seen():
    """bitsandbytes moves an 8-bit layer's row scales (SCB) from the weight to the layer's state at its first forward:
    the fingerprint must read them where they are, or an untouched 8-bit base looks changed (it did: the StackLLaMA
    recipe's frozen_unchanged was false in dev/real_shapes.py)."""
    import bitsandbytes as bnb

    from minirlhf.assets import TINY_LLAMA
    from minirlhf.models import load_model, load_tokenizer
    from minirlhf.training import make_trainable
    model = load_model(TINY_LLAMA, quantization="8bit", tokenizer=load_tokenizer(TINY_LLAMA))
    make_trainable(model, "p", lora_r=2, lora_alpha=4)
    before = frozen_fingerprint(model)
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    assert layer.weight.SCB is not None
    model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits.sum().backward()
    assert layer.weight.SCB is None and layer.state.SCB is not None  # moved by bitsandbytes
    assert frozen_fingerprint(model) == before
    with torch.no_grad():
        layer.state.SCB[0] += 1
    assert frozen_fingerprint(model) != before
