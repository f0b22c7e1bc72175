"""A roofline for every phase of a GRPO run: how far each one is from this machine's limit.

    python dev/roofline.py                  # tiny model + SmolLM2-135M-Instruct, 2 threads, ~5 minutes; writes its
                                              # block into docs/benchmarks.md (between its markers)
    python dev/roofline.py --threads 1      # one thread (when anything else runs on the machine)
    python dev/roofline.py --quick          # fewer iterations, no profile: a smoke run (~1-2 minutes)
    python dev/roofline.py --no-write       # print the block only
    python dev/roofline.py --model tiny     # one model only (tiny | smollm2 | both, the default)

Run it by hand on an otherwise idle machine: the numbers are wall-clock times (see dev/run.py's docstring).

1. The machine's limits, measured once at the start of the run with the run's threads and stated in the header:
   - the fp32 matmul rate: torch.mm at 2048 x 2048 x 2048 (dev/run.py's matmul_rate: 2·m·k·n / median time), and at
     the shapes SmolLM2's passes multiply ((1024 x 576) @ (576 x 1536): the MLP; (1024 x 576) @ (576 x 49152): the
     LM head). Compute-bound phases are compared with the 2048³ rate;
   - the memory read bandwidth: `x.sum()` over a float32 tensor of MEMORY_BYTES (1 GiB: larger than the last-level
     cache, whose size the header states), bytes read / the best time of a few repeats; and, for reference,
     `y.copy_(x)`: (bytes read + bytes written) / best time. Decode steps are compared with the read bandwidth.
2. The run: train_grpo.py itself, in a child process per model (its own peak memory), with timing wrappers put
   around minirlhf's functions (nothing in minirlhf/ or train_grpo.py is changed):
       fast.decode.Decoder.prefill / .step     the sampler's prefill and each decode step (the forward only; the
                                               sampling on the logits, softmax and multinomial over the vocabulary,
                                               runs between steps, in sampling._sample: it is in the row "the
                                               rest", the generation phase less prefill and steps)
       train_grpo.reference_logprobs           the reference's log-prob pass (GRPO's old log-probs are the sampler's
                                               own: no second pass, unless --tis-cap / --mismatch-mask-threshold)
       train_grpo.minibatch_gradient           the update's forward + backward of one minibatch
       fast.unpad.packing_for, heads.lm_logits what each trunk pass computes (packed rows or the padded grid) and at
                                               how many positions the LM head runs
       phases.PhaseClock.start / .take         the run's phase clock (time/generation, time/logprobs, ...): which
                                               phase a call belongs to, and the iteration's seconds per phase
   The first iteration is a warm-up and left out; every figure is a mean over the iterations after it. Evaluations
   (before and after training) are left out.
   Workloads. tiny: train_grpo.py's defaults with --reward gold (rollout 64 = 8 prompts x 8, 24 new tokens,
   minibatch 32, 2 epochs, LoRA r 8 all-linear). smollm2: --model smollm2 (SmolLM2-135M-Instruct, fp32) --reward
   gold, rollout 16 = 4 prompts x 4, 16 new tokens, minibatch 8, 2 epochs, LoRA r 8 all-linear, temperature 0.7 and
   lr 2e-4 and the update in minibatches of whole groups, micro-batches of one group (examples/smollm2_cpu.sh's),
   one held-out prompt per evaluation.
3. What each phase is compared with (the counting functions below; tests/test_roofline.py checks them by hand):
   - decode step: bytes it must read / step time vs the read bandwidth. Bytes = every weight its matmuls read (all
     decoder linear layers and the LM head, 4 bytes each in fp32; the merged W + BA copies when the sampler merged the
     LoRA adapter, else also the adapter's A and B: fast/decode.py merged_lora_weights, MERGE_LIMIT_BYTES) + the KV
     cache the attention reads (every layer's keys and values over all L cache columns, for the rows still computed).
     Not counted: norms, the embedding rows, the logits written (< 1 % on SmolLM2);
   - prefill, reference log-probs, update: FLOPs the pass needs / time vs the 2048³ matmul rate. Per token really
     computed (the real tokens; with fast/unpad.py's packing, each shared prompt slot once): 2·N (N = the decoder's
     linear weights) + 4·L_layers·T·d (attention's QKᵀ and AV over the pass's row width T, no causal discount, as
     dev/run.py) + 2·n_lora (the active adapter's A and B, when it is not merged); + 2·H·V at each position where the
     LM head runs (response positions; the prefill: each distinct prompt's last token). Padding and packing filler
     are not counted: they are work the pass does but does not need, so they lower the achieved rate.
     Backward of a LoRA model over a frozen base: the frozen matmuls need input gradients only (1x their forward: no
     weight gradients), attention 2x, the LoRA branches 2x (input and weight gradients); so forward + backward is
     ~2x the forward (full fine-tuning: 3x).
Targets (the project's plan, SmolLM2): decode steps >= 0.6 of the read bandwidth, update >= 0.6 of the matmul rate.
4. Why (a full run, not --quick; after the SmolLM2 run, on its trained policy, each in the notes under the table):
   - one rollout (4 training prompts x 4, every row forced to full length: min_new_tokens = max_new_tokens, which
     adds an EOS mask to each step's sampling) under torch.profiler from its first decode
     step on: a step's time split into matmuls (LoRA's rank-r ones apart), attention, other operators inside
     Decoder.step, the sampling loop's operators between steps, and what no operator's self time accounts for
     (Python, the profiler's own overhead), with the top operators of each;
   - the run's last update minibatch (forward + backward) again under torch.profiler, split the same way;
   - a decode step's matmuls alone: one sweep of F.linear over every weight a step multiplies, at the step's rows,
     against reading the same weights, the LoRA layers as called, and bfloat16 copies; and F.linear at a quarter of
     the rows and at 4x the rows: a matmul bound by memory would keep its time as the rows grow.
"""
import argparse
import importlib.util
import json
import os
import platform
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

from common import OFFLINE, Child, load_average, machine, mib, status_kib, write_doc  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

# dev/run.py's matmul_rate and shape_of (loaded by path: "run" is too common a module name to put on sys.path)
_spec = importlib.util.spec_from_file_location("dev_run", os.path.join(REPO, "dev", "run.py"))
dev_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dev_run)
matmul_rate, shape_of = dev_run.matmul_rate, dev_run.shape_of

MARK_BEGIN, MARK_END = "<!-- dev/roofline.py: begin (generated) -->", "<!-- dev/roofline.py: end -->"
SECTION = "## A roofline for every phase of a GRPO run (dev/roofline.py)"
MEMORY_BYTES = 2**30  # the bandwidth probe's tensor (--quick: a quarter)
TARGETS = {"decode": 0.6, "update": 0.6}  # fractions of the limit, on SmolLM2
FP32 = 4  # bytes per value
WORKLOADS = {
    "tiny": dict(label="tiny (assets/tiny-llama)", argv=["--reward", "gold"], iterations=6, quick_iterations=2),
    "smollm2": dict(label="SmolLM2-135M-Instruct", iterations=4, quick_iterations=2, argv=[
        "--model", "smollm2", "--reward", "gold", "--dtype", "float32", "--rollout-size", "16", "--group-size", "4",
        "--max-new-tokens", "16", "--minibatch-size", "8", "--ppo-epochs", "2", "--lora-r", "8", "--lora-alpha", "16",
        "--lora-targets", "all-linear", "--temperature", "0.7", "--lr", "2e-4", "--group-minibatches",
        "--micro-batch-size", "4", "--eval-prompts", "1", "--eval-samples", "1"]),
}


# --------------------------------------------------------------------------------------------- the counting
def lora_params(model):
    """Weights of the ACTIVE LoRA adapter's A and B over the whole model (r·(in + out) per adapted layer): the extra
    matmul weights a forward reads and multiplies when the adapter is not merged; 0 with no adapter active."""
    from minirlhf.lora import LoRALinear
    return sum(m.lora_A[m.active].weight.numel() + m.lora_B[m.active].weight.numel()
               for m in model.modules() if isinstance(m, LoRALinear) and m.active in m.lora_A)


def forward_flops(shape, tokens, width, lm_positions, n_lora=0):
    """FLOPs of a trunk forward over `tokens` tokens in rows of `width` positions, with the LM head at
    `lm_positions` positions: 2·N + 4·L·width·d + 2·n_lora per token, 2·H·V per LM-head position.
    shape: dev/run.py's shape_of(config) (n_linear N, layers L, attn d, hidden H, vocab V)."""
    per_token = 2 * shape["n_linear"] + 4 * shape["layers"] * width * shape["attn"] + 2 * n_lora
    return tokens * per_token + 2 * shape["hidden"] * shape["vocab"] * lm_positions


def backward_flops(shape, tokens, width, lm_positions, n_lora=0):
    """FLOPs of the backward of that forward when the base is frozen and only the LoRA adapter trains: input
    gradients of the frozen matmuls (1x their forward: 2·N per token, 2·H·V per LM-head position), attention (no
    weights; gradients of Q, K and V: 2x its forward), the LoRA branches (input and weight gradients: 2x theirs)."""
    per_token = 2 * shape["n_linear"] + 8 * shape["layers"] * width * shape["attn"] + 4 * n_lora
    return tokens * per_token + 2 * shape["hidden"] * shape["vocab"] * lm_positions


def prefill_flops(shape, tokens, rows, width, n_lora=0):
    """FLOPs of fast/decode.py's prefill over `rows` distinct prompts holding `tokens` real tokens, padded to
    `width`: every layer but the last at every token; the last layer's keys and values at every token (the decode
    steps need them) but its queries, output projection, MLP and attention only at each row's last token; the LM
    head at those `rows` tokens. n_lora: the adapter's weights when it is not merged (else 0)."""
    layers, lora_per_layer = shape["layers"], n_lora / shape["layers"]
    per_layer_linear = shape["n_linear"] // layers
    kv = 2 * shape["hidden"] * shape["kv"]  # the k and v projections' weights of one layer
    one_layer = 2 * per_layer_linear + 4 * width * shape["attn"] + 2 * lora_per_layer  # per token
    last_layer = tokens * 2 * kv + rows * (2 * (per_layer_linear - kv) + 4 * width * shape["attn"])
    return ((layers - 1) * tokens * one_layer + last_layer + 2 * lora_per_layer * tokens  # last layer LoRA: all tokens
            + 2 * shape["hidden"] * shape["vocab"] * rows)


def decode_step_bytes(shape, rows, cache_length, n_lora=0, weight_bytes=FP32):
    """Bytes one decode step must read: every decoder linear weight and the LM head (H·V), the LoRA A and B when
    not merged (n_lora weights), and the KV cache: keys and values of every layer for `rows` rows over
    `cache_length` columns (K·D values each per layer and column)."""
    weights = (shape["n_linear"] + shape["hidden"] * shape["vocab"] + n_lora) * weight_bytes
    cache = 2 * shape["layers"] * rows * cache_length * shape["kv"] * FP32
    return weights + cache


def model_shape(config):
    """dev/run.py's shape_of plus the key/value width K·D (the KV cache and the k, v projections)."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return dict(shape_of(config), kv=config.num_key_value_heads * hd)


# ------------------------------------------------------------------------------------------ the machine
def last_level_cache():
    """The last-level cache's size (sysfs, cpu0's highest cache index), e.g. "480 MiB"; "?" when not found."""
    caches = "/sys/devices/system/cpu/cpu0/cache"
    try:
        last = sorted(x for x in os.listdir(caches) if x.startswith("index"))[-1]
        size = open(os.path.join(caches, last, "size")).read().strip()
    except (OSError, IndexError):
        return "?"
    return f"{int(size[:-1]) / 1024:g} MiB" if size.endswith("K") else size


def read_bandwidth(nbytes, repeats):
    """Bytes read per second by x.sum() over a float32 tensor of nbytes: the best of `repeats` calls."""
    x = torch.ones(nbytes // FP32)
    x.sum()
    best = min(_seconds(lambda: x.sum()) for _ in range(repeats))
    return nbytes / best


def copy_bandwidth(nbytes, repeats):
    """(Bytes read + bytes written) per second by y.copy_(x), float32 tensors of nbytes each: best of `repeats`."""
    x, y = torch.ones(nbytes // FP32), torch.zeros(nbytes // FP32)
    y.copy_(x)
    best = min(_seconds(lambda: y.copy_(x)) for _ in range(repeats))
    return 2 * nbytes / best


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------- the instrumented run
class Recorder:
    """What the wrappers saw: the phase and iteration now, and a list of records (dicts) of timed calls."""

    def __init__(self):
        self.phase, self.iteration, self.records, self.iterations = None, 1, [], []
        self.span = None  # the record of the outermost timed call running now: trunk passes are added to it
        self.profiler = None  # profile_decode's: started after a prefill, by the prefill wrapper

    def counting(self):
        return self.phase in ("generation", "scoring", "logprobs", "update")

    def timed(self, kind, fn, *args, **kwargs):
        """fn(*args, **kwargs), timed; its record (with the trunk passes it ran) appended when in a counted phase."""
        if not self.counting() or self.span is not None:
            return fn(*args, **kwargs)
        self.span = record = dict(kind=kind, iteration=self.iteration, passes=[], lm_positions=0)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record["seconds"] = time.perf_counter() - start
            self.span = None
            self.records.append(record)


def install(rec):
    """Put the timing wrappers around minirlhf's functions (module docstring, item 2)."""
    import train_grpo
    from minirlhf import heads, phases
    from minirlhf.fast import decode, unpad

    clock_start, clock_take = phases.PhaseClock.start, phases.PhaseClock.take

    def start(self, name):
        clock_start(self, name)
        rec.phase = name

    def take(self):
        out = clock_take(self)
        rec.iterations.append(dict(out, iteration=rec.iteration))
        rec.iteration += 1
        return out
    phases.PhaseClock.start, phases.PhaseClock.take = start, take

    prefill, _prefill, step = decode.Decoder.prefill, decode.Decoder._prefill, decode.Decoder.step

    def prefill_timed(self, input_ids):
        out = rec.timed("prefill", prefill, self, input_ids)
        if rec.profiler is not None:
            rec.profiler.start()  # profile from the first decode step on
        return out

    def prefill_work(self, input_ids):  # the distinct prompts' prefill (called once by prefill)
        if rec.span is not None:
            rec.span.update(tokens=len(self.rows), rows=len(self.last), width=input_ids.shape[1],
                            n_lora=0 if self.merged else lora_params(self.model))
        return _prefill(self, input_ids)

    def step_timed(self, tokens, running=None):
        if rec.profiler is not None:
            with torch.profiler.record_function("roofline: Decoder.step"):
                return step(self, tokens, running)
        if not rec.counting():
            return step(self, tokens, running)
        start = time.perf_counter()
        out = step(self, tokens, running)
        seconds = time.perf_counter() - start
        if not hasattr(self, "roofline_n_lora"):  # once per rollout (the adapter does not change during one)
            self.roofline_n_lora = 0 if self.merged else lora_params(self.model)
        rec.records.append(dict(kind="step", iteration=rec.iteration, seconds=seconds, rows=len(self.rows_kept),
                                cache=self.length, merged=bool(self.merged), n_lora=self.roofline_n_lora))
        return out
    decode.Decoder.prefill, decode.Decoder._prefill, decode.Decoder.step = prefill_timed, prefill_work, step_timed

    packing_for, lm_logits = unpad.packing_for, heads.lm_logits

    def packing_seen(model, input_ids, attention_mask):
        packing = packing_for(model, input_ids, attention_mask)
        if rec.span is not None:
            if packing is None:
                tokens, width, grid = int(attention_mask.sum()), input_ids.shape[1], input_ids.numel()
            else:
                tokens, width = len(packing.dst.unique()), packing.position_ids.shape[1]
                grid = packing.position_ids.numel()
            rec.span["passes"].append(dict(tokens=tokens, width=width, grid=grid, padded=input_ids.numel(),
                                           packed=packing is not None, n_lora=lora_params(model),
                                           grad=torch.is_grad_enabled()))
        return packing

    def lm_logits_seen(model, states):
        if rec.span is not None:
            rec.span["lm_positions"] += states.shape[:-1].numel()
        return lm_logits(model, states)
    unpad.packing_for, heads.lm_logits = packing_seen, lm_logits_seen

    reference_logprobs, minibatch_gradient = train_grpo.reference_logprobs, train_grpo.minibatch_gradient
    loaded = {"minibatch_gradient": minibatch_gradient}

    def update_timed(*a, **k):
        loaded["update_call"] = (a, k)  # the last one's arguments: profile_update calls it again
        return rec.timed("update", minibatch_gradient, *a, **k)
    train_grpo.reference_logprobs = lambda *a, **k: rec.timed("reference", reference_logprobs, *a, **k)
    train_grpo.minibatch_gradient = update_timed
    load_policy = train_grpo.load_policy

    def load_policy_kept(args):
        loaded["tokenizer"], loaded["model"], params = load_policy(args)
        return loaded["tokenizer"], loaded["model"], params
    train_grpo.load_policy = load_policy_kept
    return loaded


def profile_decode(rec, model, tokenizer, args):
    """One rollout of 4 training prompts x 4 (the run's sampling settings, the trained policy) under torch.profiler
    from its first decode step on; {part: seconds per step} and the steps profiled."""
    from torch.profiler import ProfilerActivity, profile
    from minirlhf.data import load_prompt_dataset
    from minirlhf.data.tokenize import collate_prompts, tokenize_prompt_dataset
    from minirlhf.lora import use_adapter
    from minirlhf.sampling import sample
    r = args.lora_r
    data = tokenize_prompt_dataset(load_prompt_dataset("builtin", split="train"), tokenizer, 64)
    batch = collate_prompts([{"prompt_ids": data[i]["prompt_ids"]} for i in range(4) for _ in range(4)],
                            tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(0)
    common = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  temperature=args.temperature, min_new_tokens=args.max_new_tokens, generator=generator)
    with use_adapter(model, "policy"):
        sample(model, batch["input_ids"], batch["attention_mask"], args.max_new_tokens, **common)  # warm-up
        rec.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        sample(model, batch["input_ids"], batch["attention_mask"], args.max_new_tokens, **common)
        rec.profiler.stop()
    events = list(rec.profiler.events())
    rec.profiler = None
    steps = [e for e in events if e.name == "roofline: Decoder.step"]
    inside = [(e.time_range.start, e.time_range.end) for e in steps]
    start = min(e.time_range.start for e in events)
    end = max(e.time_range.end for e in events)
    parts = dict(matmul=0.0, lora_matmul=0.0, attention=0.0, step_other_ops=0.0, loop_ops=0.0)
    ops = {"step": {}, "loop": {}}  # self CPU microseconds per operator name, inside / outside Decoder.step
    for e in events:
        if e.name.startswith("roofline:") or e.name.startswith("ProfilerStep"):
            continue
        in_step = any(a <= e.time_range.start < b for a, b in inside)
        name, us = e.name, e.self_cpu_time_total
        where = ops["step" if in_step else "loop"]
        where[name] = where.get(name, 0.0) + us
        if not in_step:
            parts["loop_ops"] += us
        else:
            kind = category(e, r)
            parts["step_other_ops" if kind == "other" else kind] += us
    step_us = sum(b - a for a, b in inside)
    parts["step_python"] = step_us - sum(parts[k] for k in ("matmul", "lora_matmul", "attention", "step_other_ops"))
    parts["loop_python"] = (end - start) - step_us - parts["loop_ops"]
    n = max(len(steps), 1)
    tops = {k: [(name, us / n / 1e6) for name, us in sorted(v.items(), key=lambda t: -t[1])[:5]]
           for k, v in ops.items()}
    return dict(steps=len(steps), per_step={k: v / n / 1e6 for k, v in parts.items()}, top=tops,
                rows=len(batch["input_ids"]), sweep=matmul_sweep(model, len(batch["input_ids"])))


def category(event, r):
    """A profiler event's kind: matmul, lora_matmul (a matmul with an operand of LoRA rank r: an adapter's A or B,
    forward or backward; needs record_shapes), attention (scaled_dot_product_attention, forward or backward), other."""
    name = event.name
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear") or "gemm" in name:
        return "lora_matmul" if any(r in shape for shape in event.input_shapes or ()) else "matmul"
    return "attention" if "scaled_dot_product" in name or "attention" in name else "other"


def profile_update(loaded, r):
    """The run's last minibatch_gradient call (forward + backward of one minibatch), again, under torch.profiler:
    its wall seconds split into matmuls, attention, other operators (self CPU time) and the rest (Python, autograd's
    engine), and the top operators."""
    from torch.profiler import ProfilerActivity, profile
    a, k = loaded["update_call"]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        start = time.perf_counter()
        loaded["minibatch_gradient"](*a, **k)
        wall = time.perf_counter() - start
    parts, ops, matmul_flops = dict(matmul=0.0, lora_matmul=0.0, attention=0.0, other=0.0), {}, 0
    for e in prof.events():
        kind = category(e, r)
        parts[kind] += e.self_cpu_time_total / 1e6
        ops[e.name] = ops.get(e.name, 0.0) + e.self_cpu_time_total / 1e6
        if e.name in ("aten::mm", "aten::addmm", "aten::bmm"):  # the products themselves (not aten::linear)
            matmul_flops += e.flops or 0
    parts["rest"] = wall - sum(parts.values())
    return dict(wall=wall, parts=parts, top=sorted(ops.items(), key=lambda t: -t[1])[:8], matmul_flops=matmul_flops)


def rows_verdict(sweep):
    """What F.linear's rows sweep [(rows, bytes/s, FLOP/s), ...] (fewest rows first) says of a decode step's matmuls. A
    product bound by memory reads the same weights at any small number of rows, so its time stays; one bound by its
    arithmetic takes longer as the rows grow. Bound by memory when the time grows less than 1.5x over the sweep."""
    (m0, rate0, _), (m1, rate1, _) = sweep[0], sweep[-1]
    growth = rate0 / rate1  # time at m1 rows / time at m0 rows: the same bytes either way
    if growth < 1.5:
        return f"from {m0} to {m1} rows its time grows {growth:.1f}x: bound by memory"
    return (f"from {m0} to {m1} rows its time grows {growth:.1f}x: bound by its arithmetic rate at these rows, "
            "not memory")


def matmul_sweep(model, rows, repeats=3):
    """What a decode step's matmuls alone reach: one sweep over every weight a step multiplies (each LoRA layer's base
    weight, then the LM head), x of `rows` rows, best of `repeats` sweeps; bytes of those weights / seconds (GB/s),
    for: w.sum() (reading them, no matmul), F.linear(x, w), the LoRA layers as called (policy adapter active: W x +
    B A x, as the sampler runs them when it does not merge), and F.linear in bfloat16 (copies of the weights)."""
    import torch.nn.functional as F
    from minirlhf.lora import LoRALinear, use_adapter
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    head = model.get_output_embeddings().weight
    weights = [m.base_layer.weight for m in layers] + [head]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    x = {n: torch.randn(rows, n) for n in {w.shape[1] for w in weights}}
    half = [w.to(torch.bfloat16) for w in weights]
    x16 = {n: v.to(torch.bfloat16) for n, v in x.items()}

    def best(fn):
        fn()
        return nbytes / min(_seconds(fn) for _ in range(repeats))

    def linear_at(m):  # F.linear with m rows: (GB/s of weights, GFLOP/s); a kernel waiting on memory keeps its time
        xm = {n: torch.randn(m, n) for n in x}  # as the rows grow, one bound by arithmetic slows in proportion
        rate = best(lambda: [F.linear(xm[w.shape[1]], w) for w in weights])
        return m, rate, rate / FP32 * 2 * m  # bytes/s -> weights/s -> 2·m FLOPs per weight

    with torch.no_grad(), use_adapter(model, "policy"):
        out = dict(read=best(lambda: [w.sum() for w in weights]),
                   linear=best(lambda: [F.linear(x[w.shape[1]], w) for w in weights]),
                   lora=best(lambda: [m(x[m.in_features]) for m in layers] + [F.linear(x[head.shape[1]], head)]),
                   bf16=best(lambda: [F.linear(x16[w.shape[1]], w) for w in half]),
                   rows_sweep=[linear_at(m) for m in sorted({max(1, rows // 4), rows, 4 * rows})])
    return dict(out, bytes=nbytes)


def child(job):
    """Run train_grpo.py on one workload with the wrappers installed; print the records as JSON."""
    os.chdir(REPO)
    sys.path.insert(0, REPO)
    import train_grpo
    from minirlhf.cli import parse_args
    rec = Recorder()
    loaded = install(rec)
    w = WORKLOADS[job["model"]]
    iterations = w["quick_iterations"] if job["quick"] else w["iterations"]
    with tempfile.TemporaryDirectory(prefix="minirlhf-roofline-") as out:
        argv = w["argv"] + ["--iterations", str(iterations), "--threads", str(job["threads"]), "--out", out,
                            "--overwrite", "--save-every", "0"]
        args = parse_args(train_grpo.Args, argv)
        started = time.time()
        train_grpo.main(args)
        wall = time.time() - started
    model, tokenizer = loaded["model"], loaded["tokenizer"]
    shape = model_shape(model.config)
    result = dict(records=rec.records, iterations=rec.iterations, shape=shape, argv=argv, wall=wall,
                  parameters=sum(p.numel() for p in model.parameters()),
                  peak_rss=status_kib("self", "VmHWM") * 1024,
                  ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if job["profile"]:
        result["profile"] = profile_decode(rec, model, tokenizer, args)
        result["profile_update"] = profile_update(loaded, args.lora_r)
    return result


# --------------------------------------------------------------------------------------------- the table
def summarise(r, limits):
    """The child's records -> rows of the table (dicts) for one model."""
    shape, timed = r["shape"], [x for x in r["records"] if x["iteration"] > 1]
    its = [x for x in r["iterations"] if x["iteration"] > 1]
    n_it = max(len(its), 1)
    phase_s = {k[len("time/"):]: sum(x.get(k, 0.0) for x in its) / n_it
               for k in ("time/generation", "time/scoring", "time/logprobs", "time/update")}
    iteration_s = sum(phase_s.values())
    rows = []

    def of(kind):
        return [x for x in timed if x["kind"] == kind]

    def row(phase, work, seconds_per, calls, achieved, limit, unit, target=None):
        frac = achieved / limit if achieved is not None and limit else None
        return dict(phase=phase, work=work, time=f"{seconds_per * 1000:,.1f} ms x {calls:g}",
                    achieved="" if achieved is None else f"{achieved / 1e9:,.1f} {unit}",
                    limit="" if limit is None else f"{limit / 1e9:,.1f} {unit}",
                    fraction="" if frac is None else f"{frac:.3f}",
                    share=f"{seconds_per * calls / iteration_s:.0%}",
                    target="" if target is None else f">= {target}",
                    met="" if target is None else ("yes" if frac >= target else "**no**"), frac=frac)

    prefills = of("prefill")
    if prefills:
        flops = sum(prefill_flops(shape, p["tokens"], p["rows"], p["width"], p["n_lora"]) for p in prefills)
        secs = sum(p["seconds"] for p in prefills)
        p0 = prefills[-1]
        rows.append(row("generation: prefill", f"{p0['rows']} distinct prompts, {p0['tokens']} tokens (width "
                        f"{p0['width']}); {flops / len(prefills) / 1e9:.2f} GFLOP", secs / len(prefills),
                        len(prefills) / n_it, flops / secs, limits["matmul"], "GFLOP/s"))
    steps = of("step")
    if steps:
        nbytes = sum(decode_step_bytes(shape, s["rows"], s["cache"], s["n_lora"]) for s in steps)
        secs = sum(s["seconds"] for s in steps)
        mean_rows = sum(s["rows"] for s in steps) / len(steps)
        merged = "LoRA merged" if steps[0]["merged"] else f"LoRA A, B read ({steps[0]['n_lora'] / 1e6:.2f} M)"
        weights = (shape["n_linear"] + shape["hidden"] * shape["vocab"]) * FP32
        target = TARGETS["decode"] if r["model"] == "smollm2" else None
        rows.append(row("generation: decode steps (forward)",
                        f"{mean_rows:.1f} rows, {nbytes / len(steps) / 2**20:.1f} MiB a step (weights "
                        f"{weights / 2**20:.1f} MiB, {merged}, + KV cache L={steps[0]['cache']})",
                        secs / len(steps), len(steps) / n_it, nbytes / secs, limits["read"], "GB/s", target))
        rest = phase_s["generation"] - (secs + sum(p["seconds"] for p in prefills)) / n_it
        rows.append(row("generation: the rest, per step (sampling on the logits: softmax, multinomial over V; "
                        "the Decoder's setup and LoRA merge; detokenizing)", f"vocab {shape['vocab']:,}",
                        rest / max(len(steps) / n_it, 1),
                        len(steps) / n_it, None, None, ""))
    rows.append(row("scoring (gold reward)", "", phase_s["scoring"], 1, None, None, ""))
    for kind, phase, target in (("reference", "log-probs: reference pass (no grad)", None),
                                ("update", "update: forward + backward (minibatch_gradient)", TARGETS["update"])):
        calls = of(kind)
        if not calls:
            continue
        flops = tokens = grid = padded = lm = 0
        for c in calls:
            for p in c["passes"]:  # (one pass per call here; the LM-head positions shared out if there were more)
                flops += pass_flops(shape, p, c["lm_positions"] / len(c["passes"]))
                tokens, grid, padded = tokens + p["tokens"], grid + p["grid"], padded + p["padded"]
            lm += c["lm_positions"]
        secs = sum(c["seconds"] for c in calls)
        k = len(calls)
        packed = "packed" if all(p["packed"] for c in calls for p in c["passes"]) else "padded/packed"
        rows.append(row(phase, f"{tokens / k:,.0f} tokens ({packed}: grid {grid / k:,.0f} of {padded / k:,.0f} "
                               f"padded), LM head at {lm / k:,.0f}; {flops / k / 1e9:.2f} GFLOP",
                        secs / k, k / n_it, flops / secs, limits["matmul"], "GFLOP/s",
                        target if r["model"] == "smollm2" else None))
    upd = sum(c["seconds"] for c in of("update")) / n_it
    rows.append(row("update: optimizer steps, loss bookkeeping", "", phase_s["update"] - upd, 1, None, None, ""))
    ref = sum(c["seconds"] for c in of("reference")) / n_it
    if phase_s["logprobs"] - ref > 0.0005:
        rows.append(row("log-probs: rest", "", phase_s["logprobs"] - ref, 1, None, None, ""))
    return rows, iteration_s, n_it


def top(pairs):
    """'aten::mm 12.3 ms, ...' from (name, seconds) pairs."""
    return ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in pairs)


def shown(argv):
    """argv without --out DIR (a temporary folder)."""
    i = argv.index("--out")
    return argv[:i] + argv[i + 2:]


def pass_flops(shape, p, lm_positions, attention=True):
    """Forward (+ backward, for a pass with gradient) FLOPs of one recorded trunk pass `p`; attention=False: the
    matmuls with weights only (what the profiler's aten::mm FLOPs cover)."""
    width = p["width"] if attention else 0
    flops = forward_flops(shape, p["tokens"], width, lm_positions, p["n_lora"])
    return flops + (backward_flops(shape, p["tokens"], width, lm_positions, p["n_lora"]) if p["grad"] else 0)


def block_for(results, limits, header):
    cols = ["phase", "work per call", "time per call x calls per iteration", "achieved", "limit", "fraction",
            "share of the iteration", "target", "met?"]
    lines = [header, "", "| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    notes = []
    for name, r in results.items():
        rows, iteration_s, n_it = summarise(r, limits)
        label = WORKLOADS[name]["label"]
        for x in rows:
            lines.append(f"| {label} | " + " | ".join(x[k] for k in ("phase", "work", "time", "achieved", "limit",
                                                                       "fraction", "share", "target", "met"))
                         + " |")
        notes.append(f"- {label} ({r['parameters'] / 1e6:.1f} M parameters): iteration {iteration_s:.2f} s (mean of "
                     f"{n_it} after a warm-up; phases of the run's clock), peak RSS {mib(r['peak_rss'])} "
                     f"(VmHWM; ru_maxrss {mib(r['ru_maxrss'])}); its process used {r['cpu_seconds']:.0f} CPU "
                     f"seconds in {r['wall_seconds']:.0f} s (fewer than threads x wall: it waited for a core); "
                     f"the run: `train_grpo.py "
                     f"{' '.join(shown(r['argv']))}`.")
        if "profile" in r:
            p = r["profile"]["per_step"]
            total = sum(p.values())
            parts = ", ".join(f"{k.replace('_', ' ')} {v * 1000:.1f} ms ({v / total:.0%})" for k, v in p.items())
            notes.append(f"- {label}, one decode step under torch.profiler ({r['profile']['rows']} rows, "
                         f"{r['profile']['steps']} steps, min_new_tokens = max_new_tokens): {total * 1000:.1f} ms = "
                         f"{parts}. (The profiler's own overhead lands in the ops and the Python share.) Top "
                         "operators by self time per step, inside Decoder.step: " + top(r["profile"]["top"]["step"])
                         + "; in the sampling loop between steps: " + top(r["profile"]["top"]["loop"]) + ".")
            u = r["profile_update"]
            last = [x for x in r["records"] if x["kind"] == "update"][-1]  # the call profile_update repeated
            real = sum(pass_flops(r["shape"], p, last["lm_positions"] / len(last["passes"]), attention=False)
                       for p in last["passes"])
            grid = sum(pass_flops(r["shape"], dict(p, tokens=p["grid"]), last["lm_positions"] / len(last["passes"]),
                                  attention=False) for p in last["passes"])
            notes.append(f"- {label}, the update's last minibatch (forward + backward) again under torch.profiler: "
                         f"{u['wall']:.2f} s = "
                         + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s ({v / u['wall']:.0%})"
                                     for k, v in u["parts"].items())
                         + " (rest: what no operator's self time accounts for: Python, autograd's engine). Top "
                         "operators: " + top(u["top"]) + f". A check of the counting: the profiler's FLOPs of its "
                         f"aten::mm / addmm / bmm, {u['matmul_flops'] / 1e9:.1f} GFLOP, against this file's count "
                         f"of the same call's matmuls (forward + backward, attention left out) {real / 1e9:.1f} GFLOP "
                         f"over the real tokens, {grid / 1e9:.1f} GFLOP over the packed grid (filler included).")
            sw = r["profile"]["sweep"]
            notes.append(f"- {label}, a decode step's matmuls alone ({r['profile']['rows']} rows, every LoRA layer's "
                         f"base weight and the LM head, {mib(sw['bytes'])} of float32): reading the weights (w.sum()) "
                         f"{sw['read'] / 1e9:.1f} GB/s; F.linear {sw['linear'] / 1e9:.1f} GB/s; the LoRA layers as "
                         f"called (unmerged adapter) {sw['lora'] / 1e9:.1f} GB/s; F.linear on bfloat16 copies "
                         f"{sw['bf16'] / 1e9:.1f} GB/s of float32-equivalent bytes (the bytes a float32 step "
                         f"reads / time). Each vs the read bandwidth {limits['read'] / 1e9:.1f} GB/s. F.linear at "
                         + ", ".join(f"{m} rows {gbs / 1e9:.1f} GB/s ({flops / 1e9:.0f} GFLOP/s)"
                                     for m, gbs, flops in sw["rows_sweep"])
                         + f": {rows_verdict(sw['rows_sweep'])}.")
    return "\n".join(lines + [""] + notes)


def run_child(job, name, threads):
    """This file's --child JOB in a fresh interpreter with `threads` threads: its JSON result."""
    log = os.path.join(tempfile.gettempdir(), f"minirlhf-roofline-{os.getpid()}.log")
    c = Child([os.path.abspath(__file__), "--child", json.dumps(job), "--threads", str(threads)], log, threads,
              OFFLINE).wait()
    if c.returncode != 0:
        sys.stderr.write(c.tail())
        raise SystemExit(f"dev/roofline.py: error: the {name} measurement failed (exit {c.returncode})")
    result = dict(json.loads(c.result_line()), cpu_seconds=c.cpu_seconds, wall_seconds=c.wall_seconds)
    os.remove(log)
    print(f"  {name:<8} {c.wall_seconds:6.1f}s", file=sys.stderr, flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads here and in each run (default 2)")
    parser.add_argument("--quick", action="store_true", help="fewer iterations, a smaller bandwidth probe, no profile")
    parser.add_argument("--model", default="both", help="tiny | smollm2 | both")
    parser.add_argument("--no-write", action="store_true", help="print the block; do not write docs/benchmarks.md")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads < 1:
        raise SystemExit(f"dev/roofline.py: error: --threads must be >= 1, got {args.threads}")
    if args.model not in ("tiny", "smollm2", "both"):
        raise SystemExit(f"dev/roofline.py: error: --model must be tiny, smollm2 or both, got {args.model!r}")
    torch.set_num_threads(args.threads)
    if args.child:
        job = json.loads(args.child)
        if job["kind"] == "run":
            result = dict(child(job), model=job["model"])
        else:  # the machine's limits
            result = dict(matmul=matmul_rate(2048, 2048, 2048, job["repeats"]))
            if job["kind"] == "limits":
                result.update(read=read_bandwidth(job["nbytes"], job["repeats"]),
                              copy=copy_bandwidth(job["nbytes"], job["repeats"]),
                              mlp=matmul_rate(1024, 576, 1536, 10),
                              head=matmul_rate(1024, 576, 49152, 2 if job["quick"] else 3))
        print(json.dumps(result))
        return

    started, load_start = time.time(), load_average()
    command = " ".join(["python", "dev/roofline.py", *sys.argv[1:]])
    repeats = 3 if args.quick else 5
    nbytes = MEMORY_BYTES // 4 if args.quick else MEMORY_BYTES
    # every measurement in a child process: this one stays small, so no child's peak RSS starts from its size
    limits = run_child(dict(kind="limits", quick=args.quick, repeats=repeats, nbytes=nbytes), "limits", args.threads)
    print(f"limits: matmul {limits['matmul'] / 1e9:.1f} GFLOP/s, read {limits['read'] / 1e9:.1f} GB/s",
          file=sys.stderr)
    names = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    results = {name: run_child(dict(kind="run", model=name, quick=args.quick, threads=args.threads,
                                    profile=name == "smollm2" and not args.quick), name, args.threads)
               for name in names}
    matmul_end = run_child(dict(kind="matmul", repeats=repeats), "matmul", args.threads)["matmul"]
    cpu, cores = machine()
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu}, {cores} cores; torch {torch.__version__}, "
              f"transformers {transformers.__version__}, Python {platform.python_version()}; "
              f"**{args.threads} thread(s)**; load average {load_start} at the start, {load_average()} at the end; "
              f"wall time {time.time() - started:.0f} s.\n\nCommand: `{command}`\n\n"
              f"Limits, measured at the start with {args.threads} thread(s): fp32 matmul (torch.mm 2048³) "
              f"**{limits['matmul'] / 1e9:.1f} GFLOP/s** ({matmul_end / 1e9:.1f} at the end); at SmolLM2's shapes "
              f"(1024 x 576) @ (576 x 1536) {limits['mlp'] / 1e9:.1f}, (1024 x 576) @ (576 x 49152) "
              f"{limits['head'] / 1e9:.1f} GFLOP/s. Memory: **{limits['read'] / 1e9:.1f} GB/s read** (x.sum() over "
              f"{nbytes / 2**30:.2g} GiB of float32, bytes read / best of {repeats}; last-level cache "
              f"{last_level_cache()}); copy {limits['copy'] / 1e9:.1f} "
              f"GB/s (y.copy_(x), bytes read + written).")
    block = block_for(results, limits, header)
    print(block)
    if not args.no_write:
        write_doc(args.out, block, MARK_BEGIN, MARK_END, new_section=SECTION)
        print(f"wrote {os.path.relpath(args.out, REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
