"""Mixed precision (minirlhf/precision.py): the dtype rules, fp16 loss scaling, and every script run in bf16 and fp16.

The end-to-end runs use CPU autocast (torch's CPU kernels for bf16 / fp16), a few steps each on the embedded tiny
model: each must finish, move its loss, keep the frozen base bit for bit, and save float32 trainable weights.
"""
import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from minirlhf import precision
from minirlhf.cli import parse_args
from minirlhf.errors import Diverged
from minirlhf.lora import add_lora, lora_parameters
from minirlhf.precision import LossScaler, autocast, compute_dtype, resolve_dtype, set_compute_dtype
from minirlhf.training import make_optimizer, make_trainable, optimizer_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the dtype rules ---------------------------------------------------------------------------------------------

def test_auto_is_fp32_on_the_cpu_and_named_dtypes_are_themselves():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    for name, dtype in precision.DTYPES.items():
        assert resolve_dtype(name, cpu) == dtype


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_on_a_gpu_is_bf16_only_where_it_is_native(monkeypatch, capability, expected):
    """V100 / T4 (7.x) emulate bf16 (torch.cuda.is_bf16_supported() says True there): auto picks fp16 on them."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected


def test_autocast_follows_the_models_compute_dtype():
    model = make_tiny_llama()
    x = torch.randn(3, 32)
    assert compute_dtype(model) == torch.float32
    with autocast(model):
        assert model.model.layers[0].mlp.up_proj(x).dtype == torch.float32  # no autocast at all in fp32
    set_compute_dtype(model, torch.bfloat16)
    with autocast(model):
        assert model.model.layers[0].mlp.up_proj(x).dtype == torch.bfloat16


def test_full_finetuning_trains_fp32_weights_of_a_16bit_base():
    model = make_tiny_llama(dtype=torch.bfloat16)
    set_compute_dtype(model, torch.bfloat16)
    params = make_trainable(model, "sft", full_finetune=True)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert compute_dtype(model) == torch.bfloat16  # it still computes in bf16 (under autocast)


def test_lora_over_a_bf16_base_trains_fp32_and_the_base_stays_bf16():
    model = make_tiny_llama(dtype=torch.bfloat16)
    set_compute_dtype(model, torch.bfloat16)
    params = make_trainable(model, "policy", lora_r=4, lora_alpha=8)
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)


# ---- fp16 loss scaling --------------------------------------------------------------------------------------------

def _layer_and_scaler(dtype):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    set_compute_dtype(model, dtype)
    return model, LossScaler(model)


def test_scaler_is_a_plain_backward_unless_fp16():
    for dtype in (torch.float32, torch.bfloat16):
        model, scaler = _layer_and_scaler(dtype)
        assert not scaler.enabled
        loss = model(torch.ones(2, 4)).sum()
        scaler.backward(loss)
        expected = torch.ones(2, 4).sum(0).expand(4, 4)  # d(sum(W x + b))/dW = sum over rows of x
        assert torch.equal(model[0].weight.grad, expected)


def test_fp16_scaler_scales_the_backward_and_the_step_unscales_it():
    torch.manual_seed(0)
    model, scaler = _layer_and_scaler(torch.float16)
    assert scaler.enabled
    reference = torch.nn.Linear(4, 4)
    reference.load_state_dict(model[0].state_dict())
    x = torch.randn(8, 4)
    scaler.backward(model(x).pow(2).mean())
    S = scaler.scaler.get_scale()
    assert S == precision.INIT_LOSS_SCALE == 2.0 ** 10
    reference(x).pow(2).mean().backward()
    assert torch.allclose(model[0].weight.grad, S * reference.weight.grad, rtol=1e-5)  # scaled by S
    params = list(model.parameters())
    optimizer, ref_opt = make_optimizer(params, 0.1), make_optimizer(list(reference.parameters()), 0.1)
    optimizer_step(optimizer, params, loss=0.0, grad_clip=1e9, step=0, scaler=scaler)
    ref_opt.step()
    assert torch.allclose(model[0].weight, reference.weight, atol=1e-6)  # the same step as unscaled fp32


def test_fp16_overflow_skips_the_step_halves_the_scale_and_a_collapse_is_divergence():
    model, scaler = _layer_and_scaler(torch.float16)
    params = list(model.parameters())
    optimizer = make_optimizer(params, 0.1)
    before = model[0].weight.detach().clone()
    for step in range(40):
        optimizer.zero_grad()
        scaler.backward(model(torch.ones(1, 4)).sum() * float("inf"))  # every gradient overflows
        try:
            optimizer_step(optimizer, params, loss=1.0, grad_clip=1.0, step=step, scaler=scaler)
        except Diverged as e:
            assert "fp16" in str(e) and "--dtype bfloat16" in str(e)
            break
        assert torch.equal(model[0].weight, before)  # skipped: the weights never see the overflow
        assert scaler.scaler.get_scale() == 2.0 ** (9 - step)  # halved at every overflow
    else:
        pytest.fail("an ever-overflowing fp16 run never raised Diverged")
    assert step == 10  # 2^10 halved 11 times falls below MIN_LOSS_SCALE = 1
    assert torch.equal(model[0].weight, before)


def test_a_non_finite_loss_diverges_even_under_fp16():
    model, scaler = _layer_and_scaler(torch.float16)
    params = list(model.parameters())
    scaler.backward(model(torch.ones(1, 4)).sum())
    with pytest.raises(Diverged):
        optimizer_step(make_optimizer(params, 0.1), params, loss=float("nan"), grad_clip=1.0, step=0, scaler=scaler)


def test_fp16_lora_step_on_a_tiny_llama_matches_fp32_direction():
    """One LoRA step of the tiny Llama in fp16 autocast moves the adapter like the fp32 step does (cosine > 0.99):
    the loss scaling loses nothing that matters."""
    grads = {}
    for dtype in (torch.float32, torch.float16):
        model = make_tiny_llama()
        set_compute_dtype(model, dtype)
        add_lora(model, "all-linear", r=4, alpha=8, adapter="p")
        with torch.no_grad():
            for p in lora_parameters(model, "p"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        scaler = LossScaler(model)
        ids = torch.randint(3, 101, (4, 16), generator=torch.Generator().manual_seed(1))
        with autocast(model):
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
        scaler.backward(loss)
        scaler.unscale_(optimizer := make_optimizer(lora_parameters(model, "p"), 0.1))
        grads[dtype] = torch.cat([p.grad.reshape(-1) for p in lora_parameters(model, "p")])
        assert all(p.dtype == torch.float32 for p in lora_parameters(model, "p"))
        del optimizer
    cos = torch.nn.functional.cosine_similarity(grads[torch.float32], grads[torch.float16], dim=0)
    assert cos > 0.99, cos


# ---- every script, in bf16 and fp16 autocast on the CPU ----------------------------------------------------------

RL = ["--iterations", "2", "--rollout-size", "8", "--minibatch-size", "8", "--max-new-tokens", "8",
      "--eval-prompts", "2", "--eval-samples", "1", "--eval-every", "0"]
SCRIPTS = {
    "train_sft.py": (["--max-steps", "3", "--batch-size", "4", "--log-every", "1", "--eval-every", "3"],
                     "train/loss", "adapter"),
    "train_reward.py": (["--max-steps", "3", "--batch-size", "8", "--max-train-pairs", "32", "--max-eval-pairs", "8",
                         "--eval-every", "1"], "train/loss", "reward_model"),
    "train_dpo.py": (["--max-steps", "3", "--batch-size", "8", "--max-train-pairs", "32", "--max-eval-pairs", "8",
                      "--eval-prompts", "2", "--eval-samples", "1", "--log-every", "1"], "train/loss", "policy"),
    "train_ppo.py": (RL + ["--reward", "gold"], "loss/total", "policy"),
    "train_grpo.py": (RL + ["--reward", "gold", "--group-size", "4"], "loss/total", "policy"),
    "train_reinforce.py": (RL, "loss/policy", "policy"),
}


def _load_script(script):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_script_trains_in_16_bit_autocast(script, dtype, tmp_path):
    """In-process (main(parse_args(...))): the python start-up and imports would double this test's time."""
    flags, loss_key, saved = SCRIPTS[script]
    module = _load_script(script)
    summary = module.main(parse_args(module.Args, ["--threads", "1", "--dtype", dtype, *flags, "--out", str(tmp_path)]))
    assert summary == json.load(open(tmp_path / "summary.json"))
    assert summary["params/frozen_unchanged"] is True  # the 16-bit base, bit for bit
    losses = [row[loss_key] for row in map(json.loads, open(tmp_path / "metrics.jsonl")) if loss_key in row]
    assert len(losses) >= 2 and all(map(lambda v: v == v and abs(v) < 1e6, losses)), losses
    assert len(set(losses)) > 1, losses  # the loss moved
    weights = {k: v for f in os.listdir(tmp_path / saved) if f.endswith(".safetensors")
               for k, v in load_file(tmp_path / saved / f).items()}
    assert weights and all(v.dtype == torch.float32 for v in weights.values())  # adapters and heads: fp32
    b = [v for k, v in weights.items() if k.endswith("lora_B.weight")]
    assert b and any(v.abs().sum() > 0 for v in b)  # trained (B starts at 0)
