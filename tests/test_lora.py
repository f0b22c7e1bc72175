"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) by hand, checked against the closed form in float64 and
against the base model bit for bit. Against PEFT (the independent reference implementation), through its on-disk
format: tests/test_formats.py."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from minirlhf import lora
from minirlhf.lora import LoRALinear

ALL_LINEAR = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Matrices this small run ~10x faster on one thread than on two busy cores (OpenMP waits); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def ids(seed=1, shape=(3, 11)):
    return torch.randint(0, 101, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def randomize_B(model, adapter, seed=0, std=0.1):
    """Fresh adapters have B = 0; give them a nonzero B so that they change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model, adapter):
            B = m.lora_B[adapter].weight
            B.copy_(torch.randn(B.shape, generator=g, dtype=torch.float64) * std)


def lora_names(model, adapter):
    return {n for n, _ in lora.lora_layers(model, adapter)}


# ---- one layer against the closed form -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lora_linear_matches_formula_float64(seed):
    """y = x W^T + b + (alpha/r) x A^T B^T, forward and gradients, float64, tolerance 1e-12."""
    torch.manual_seed(seed)
    n_in, n_out, r, alpha = 23, 17, 5, 7.0
    layer = LoRALinear(nn.Linear(n_in, n_out, dtype=torch.float64))
    layer.add_adapter("a", r, alpha)
    layer.active = "a"
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    x = torch.randn(3, 7, n_in, dtype=torch.float64)
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A = layer.lora_A["a"].weight.detach().clone().requires_grad_(True)  # independent leaves for the reference
    B = layer.lora_B["a"].weight.detach().clone().requires_grad_(True)
    ref = x @ W.T + b + (alpha / r) * (x @ A.T @ B.T)  # (3, 7, n_out)
    y = layer(x)
    assert y.dtype == torch.float64 and y.shape == (3, 7, n_out)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(ref)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(layer.lora_A["a"].weight.grad, A.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.lora_B["a"].weight.grad, B.grad, atol=1e-12, rtol=0)


def test_init_is_kaiming_uniform_A_and_zero_B():
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with a=sqrt(5), as PEFT) and B = 0."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 30))
    layer.add_adapter("a", 16, 32)
    A, bound = layer.lora_A["a"].weight, 1 / math.sqrt(400)
    assert A.shape == (16, 400) and layer.lora_B["a"].weight.shape == (30, 16)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(-c, c) is c/sqrt(3)
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0


@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float32), (torch.float64, torch.float64)])
def test_adapters_are_at_least_float32_and_output_keeps_the_base_dtype(dtype, adapter_dtype):
    """What AdamW updates is never 16-bit (precision.py); the layer's output keeps the base's dtype."""
    layer = LoRALinear(nn.Linear(8, 4, dtype=dtype))
    layer.add_adapter("a", 2, 4)
    A = layer.lora_A["a"].weight
    assert A.dtype == adapter_dtype and layer.lora_B["a"].weight.dtype == adapter_dtype
    assert A.device == layer.base_layer.weight.device
    layer.active = "a"
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    x = torch.randn(2, 8, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = layer.base_layer(x).double() + 2.0 * (x.double() @ A.double().T @ layer.lora_B["a"].weight.double().T)
    assert torch.allclose(y.double(), ref, rtol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5,
                          atol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6)


# ---- the model-level rules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fresh_adapter_reproduces_base_bit_for_bit(dtype):
    model, x = tiny_llama(dtype), ids()
    before = logits(model, x)
    lora.add_lora(model, "all-linear", r=4, alpha=8)
    assert lora.active_adapter(model) == "default"
    assert torch.equal(logits(model, x), before)


def test_all_linear_finds_every_projection_but_not_the_head():
    model = tiny_llama()
    lora.add_lora(model, "all-linear", r=2, alpha=2)
    want = {f"model.layers.{i}.{t}" for i in range(2) for t in ALL_LINEAR}
    assert lora_names(model, "default") == want
    assert type(model.lm_head) is nn.Linear and model.get_output_embeddings() is model.lm_head


def test_suffix_targeting():
    model = tiny_llama()
    lora.add_lora(model, ["q_proj", "v_proj"], r=2, alpha=2)
    want = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ["q_proj", "v_proj"]}
    assert lora_names(model, "default") == want
    lora.add_lora(model, "model.layers.1.mlp.down_proj", r=2, alpha=2, adapter="one")  # a full path is a suffix too
    assert lora_names(model, "one") == {"model.layers.1.mlp.down_proj"}
    lora.add_lora(model, ["q_proj"], r=3, alpha=2, adapter="second")  # same layers: a second entry, not a new wrap
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.base_layer, nn.Linear) and set(q.lora_A) == {"default", "second"}
    assert lora.adapter_names(model) == ["default", "one", "second"]  # sorted
    assert lora.active_adapter(model) == "default"  # adding adapters does not switch the active one


def test_only_the_active_adapter_gets_gradients():
    model, x = tiny_llama(), ids()
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter="policy")
    lora.copy_adapter(model, "policy", "frozen")
    randomize_B(model, "policy")  # with B = 0, A's gradient would be exactly zero
    model(input_ids=x).logits.square().mean().backward()
    trainable = {id(p) for p in lora.lora_parameters(model, "policy")}
    assert len(trainable) == 2 * 14
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_disabled_switching_nesting_and_no_leak():
    model, x = tiny_llama(), ids()
    base = logits(model, x)
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter="a")
    lora.add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, adapter="b")
    randomize_B(model, "a", seed=1)
    randomize_B(model, "b", seed=2)
    out_a = logits(model, x)
    with lora.use_adapter(model, "b"):
        out_b = logits(model, x)
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model, x), base)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    # nesting restores the previous choice, also on an exception
    with lora.use_adapter(model, "b"):
        with lora.adapters_disabled(model):
            assert lora.active_adapter(model) is None
        assert lora.active_adapter(model) == "b"
        with pytest.raises(KeyError), lora.use_adapter(model, "a"):
            raise KeyError
        assert lora.active_adapter(model) == "b"
    assert lora.active_adapter(model) == "a" and torch.equal(logits(model, x), out_a)
    lora.set_active_adapter(model, None)
    assert torch.equal(logits(model, x), base)
    lora.set_active_adapter(model, "a")
    # train b: a does not move at all, and the output under a is bit-identical
    a_before = [p.detach().clone() for p in lora.lora_parameters(model, "a")]
    opt = torch.optim.SGD(lora.lora_parameters(model, "b"), lr=0.1)
    with lora.use_adapter(model, "b"):
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=x).logits.square().mean().backward()
            opt.step()
        assert not torch.equal(logits(model, x), out_b)
    assert all(torch.equal(p, q) for p, q in zip(lora.lora_parameters(model, "a"), a_before))
    assert torch.equal(logits(model, x), out_a)


def test_merge_equals_unmerged_float64():
    model, x = tiny_llama(), ids()
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter="a")
    lora.add_lora(model, ["q_proj"], r=2, alpha=2, adapter="b")
    randomize_B(model, "a")
    unmerged = logits(model, x)
    lora.merge_lora(model, "a")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # other adapters on merged layers are dropped
    assert lora.adapter_names(model) == [] and type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-6, rtol=0)  # RMSNorm rounds through float32


def test_copy_adapter_is_identical_and_frozen():
    model, x = tiny_llama(), ids()
    lora.add_lora(model, "all-linear", r=4, alpha=8, adapter="policy")
    randomize_B(model, "policy")
    lora.copy_adapter(model, "policy", "reference")
    policy = logits(model, x)
    with lora.use_adapter(model, "reference"):
        assert torch.equal(logits(model, x), policy)
    assert all(not p.requires_grad for p in lora.lora_parameters(model, "reference"))
    assert all(p.requires_grad for p in lora.lora_parameters(model, "policy"))
    with torch.no_grad():  # a copy, not an alias
        lora.lora_parameters(model, "policy")[1].add_(1.0)
    with lora.use_adapter(model, "reference"):
        assert torch.equal(logits(model, x), policy)


# ---- QLoRA: bitsandbytes k-bit bases on the CPU -------------------------------------------------------------------

def kbit_layer(bits, n_in=64, n_out=48):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out)
    if bits == 4:  # NF4 with double quantization (QLoRA's recipe), float32 compute
        q = bnb.nn.Linear4bit(n_in, n_out, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    else:  # LLM.int8() weights, no outlier threshold
        q = bnb.nn.Linear8bitLt(n_in, n_out, has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")  # .to(device) is where bitsandbytes quantizes
    try:  # the bare k-bit layer, before any LoRA code is involved
        q(torch.randn(2, n_in, requires_grad=True))
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run a {bits}-bit layer on this CPU: {e}")
    return q, dense


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_over_a_kbit_base(bits):
    q, dense = kbit_layer(bits)
    assert q.weight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert bits == 8 or (q.weight.quant_state.nested and q.weight.quant_type == "nf4")  # double quantization
    model = nn.Sequential(OrderedDict(proj=q))
    lora.add_lora(model, ["proj"], r=4, alpha=8)
    layer = model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.float32  # LoRA weights stay float32 over a quantized base
    with torch.no_grad():
        B.normal_(0, 0.1)
    x = torch.randn(3, 5, 64, requires_grad=True)  # requires_grad keeps bnb's CPU path in training form
    y = model(x)
    with torch.no_grad():
        base_y = q(x)
        delta = 2.0 * (x.double() @ A.double().T @ B.double().T)  # (alpha/r) x A^T B^T in float64
        assert 0 < (base_y - dense(x)).abs().max() < 0.3  # a lossy quantized copy of the dense layer
    torch.testing.assert_close(y.double(), base_y.double() + delta, atol=1e-5, rtol=0)
    weight_before = q.weight.data.clone()
    y.square().mean().backward()
    assert A.grad is not None and B.grad is not None and A.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in q.parameters())
    torch.optim.SGD(lora.lora_parameters(model, "default"), lr=0.1).step()
    assert torch.equal(q.weight.data, weight_before)  # the k-bit base never moves
    with torch.no_grad():
        assert not torch.allclose(model(x), y)
    with pytest.raises(ValueError, match=f"cannot merge into a {bits}-bit base"):
        lora.merge_lora(model, "default")
    assert isinstance(model.proj, LoRALinear)


# ---- bad input --------------------------------------------------------------------------------------------------

def test_clear_errors():
    model = tiny_llama()
    for r in [0, -2, 2.5]:
        with pytest.raises(ValueError, match="rank r must be a positive integer"):
            lora.add_lora(model, "all-linear", r=r, alpha=8)
    with pytest.raises(ValueError, match="target_modules qproj matches no linear module of the model: its linear "
                                         "modules end in q_proj, k_proj, v_proj, o_proj"):
        lora.add_lora(model, ["qproj"], r=2, alpha=2)
    assert lora.adapter_names(model) == []
    lora.add_lora(model, ["q_proj"], r=2, alpha=2, adapter="a")
    with pytest.raises(ValueError, match="adapter 'a' already exists"):
        lora.add_lora(model, ["v_proj"], r=2, alpha=2, adapter="a")
    with pytest.raises(ValueError, match="adapter 'a' already exists"):
        lora.copy_adapter(model, "a", "a")
    for call in [lambda: lora.use_adapter(model, "nope").__enter__(), lambda: lora.set_active_adapter(model, "nope"),
                 lambda: lora.merge_lora(model, "nope"), lambda: lora.lora_parameters(model, "nope"),
                 lambda: lora.copy_adapter(model, "nope", "x")]:
        with pytest.raises(ValueError, match=r"unknown adapter 'nope'; the model has \['a'\]"):
            call()
    assert lora.active_adapter(model) == "a"
