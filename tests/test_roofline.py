"""dev/roofline.py's counting functions against a count by hand on the embedded tiny model's shape (hidden 192, 4
layers, 6 heads of 32, 6 key/value heads, intermediate 512, vocab 512), and against dev/run.py's pass_flops."""
import importlib.util
import os

import pytest

from minirlhf.assets import TINY_LLAMA
from minirlhf.models import load_model
from minirlhf.training import make_trainable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def roofline():
    spec = importlib.util.spec_from_file_location("dev_roofline", os.path.join(REPO, "dev", "roofline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY_LLAMA, dtype="float32", device="cpu")


# by hand: one layer's q, k, v, o (192 x 192 each) + gate, up, down (192 x 512 each)
LAYER = 4 * 192 * 192 + 3 * 192 * 512  # 442,368
N = 4 * LAYER  # 1,769,472 decoder linear weights
HEAD = 192 * 512  # the tied LM head


def test_shape(roofline, tiny):
    shape = roofline.model_shape(tiny.config)
    assert shape == dict(hidden=192, layers=4, vocab=512, attn=192, n_linear=N, kv=192)


def test_lora_params(roofline, tiny):
    assert roofline.lora_params(tiny) == 0  # no adapter
    make_trainable(tiny, "policy", lora_r=8, lora_alpha=16, lora_targets=["all-linear"])
    # r·(in + out): q, k, v, o 8·(192 + 192); gate, up 8·(192 + 512); down 8·(512 + 192); 4 layers; no LM head
    assert roofline.lora_params(tiny) == 4 * (4 * 8 * 384 + 3 * 8 * 704) == 116_736


def test_pass_flops_by_hand(roofline, tiny):
    shape = roofline.model_shape(tiny.config)
    # 10 tokens in rows of 8, LM head at 3 positions, 100 LoRA weights
    per_token = 2 * N + 4 * 4 * 8 * 192 + 2 * 100  # linears, attention (4·L·T·d), LoRA
    forward = 10 * per_token + 2 * HEAD * 3
    assert roofline.forward_flops(shape, 10, 8, 3, 100) == forward == 36_227_024
    # backward over a frozen base: input gradients of the linears and the head (1x), attention 2x, LoRA 2x
    backward = 10 * (2 * N + 8 * 4 * 8 * 192 + 4 * 100) + 2 * HEAD * 3
    assert roofline.backward_flops(shape, 10, 8, 3, 100) == backward == 36_474_784


def test_pass_flops_agree_with_dev_run(roofline, tiny):
    """tokens = rows x width: the same numbers as dev/run.py's pass_flops, forward and LoRA forward + backward."""
    shape = roofline.model_shape(tiny.config)
    run = roofline.dev_run
    assert roofline.forward_flops(shape, 2 * 8, 8, 5, 100) == run.pass_flops(shape, 2, 8, 5, "none", 100)
    both = roofline.forward_flops(shape, 16, 8, 5, 100) + roofline.backward_flops(shape, 16, 8, 5, 100)
    assert both == run.pass_flops(shape, 2, 8, 5, "frozen", 100)


def test_prefill_flops_by_hand(roofline, tiny):
    shape = roofline.model_shape(tiny.config)
    # 2 distinct prompts, 10 real tokens, width 8: layers 1-3 at every token; the last layer's k, v at every token,
    # its q, o, MLP and attention at the 2 last tokens; the LM head at those 2
    first_three = 3 * 10 * (2 * LAYER + 4 * 8 * 192)
    last = 10 * 2 * (2 * 192 * 192) + 2 * (2 * (LAYER - 2 * 192 * 192) + 4 * 8 * 192)
    assert roofline.prefill_flops(shape, 10, 2, 8) == first_three + last + 2 * HEAD * 2 == 30_081_024


def test_decode_step_bytes_by_hand(roofline, tiny):
    shape = roofline.model_shape(tiny.config)
    weights = (N + HEAD) * 4  # every linear weight and the LM head, float32
    cache = 2 * 4 * 4 * 20 * 192 * 4  # keys and values, 4 layers, 4 rows, 20 columns, 6 heads x 32, float32
    assert roofline.decode_step_bytes(shape, 4, 20) == weights + cache == 7_962_624
    assert roofline.decode_step_bytes(shape, 4, 20, n_lora=1000) == weights + cache + 4000  # A, B not merged


def test_rows_verdict(roofline):
    # the same weight bytes each way: a step bound by memory keeps its time as the rows grow, one bound by arithmetic
    # slows in proportion (SmolLM2's sweep on the 2-core Xeon: 13.2, 8.5, 4.5 GB/s at 4, 16, 64 rows)
    memory = [(4, 20e9, 40e9), (16, 19e9, 152e9), (64, 16e9, 512e9)]  # time grows 1.25x
    arithmetic = [(4, 13.2e9, 26e9), (16, 8.5e9, 68e9), (64, 4.5e9, 144e9)]  # 2.9x
    assert roofline.rows_verdict(memory) == "from 4 to 64 rows its time grows 1.2x: bound by memory"
    assert roofline.rows_verdict(arithmetic) == ("from 4 to 64 rows its time grows 2.9x: bound by its arithmetic "
                                                 "rate at these rows, not memory")
