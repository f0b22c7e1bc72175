"""minirlhf's benchmark suite: one markdown table, every figure next to what it is compared with, as a ratio.

    python dev/run.py                    # full run, 2 threads (all cores), ~12 minutes; writes the table into
                                           # docs/benchmarks.md (between its markers; README.md only links to it)
    python dev/run.py --threads 1        # one thread (when anything else runs on the machine)
    python dev/run.py --quick            # the tiny model only, fewer repeats: a smoke run (~2 minutes)
    python dev/run.py --profile          # also print torch.profiler's top operators of one step of each job

Run it by hand on an OTHERWISE IDLE machine, never in CI: the numbers are wall-clock times. On 2 shared cores, two
OpenMP threads spin-wait on each other and a run can be many times slower; the header records the load average at
the start and the end of the run, and the matmul rate is measured at both ends as a check.

What it measures: on the embedded tiny model and on a SmolLM2-135M-shaped model built locally from its
config (LlamaForCausalLM, hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied
embeddings; random weights, no download):
- training throughput (tokens/s, peak memory) of an SFT, a reward-model and a DPO step at stated batch and lengths,
  and MFU: achieved FLOP/s over this machine's fp32 matmul rate, measured in the same run with the same threads;
- the sampler's tokens/s against transformers' generate on the same model, batch, lengths and settings (ratio);
- one PPO iteration split into generation / scoring / training time, and its peak memory against a PPO that holds
  policy, reference, reward and value as four separate model copies built from the same code (ratio);
- the 4-bit base's resident bytes per parameter.
Targets, reported met or not: sampler >= 2.0x generate on the tiny model, >= 1.0x on the 135M shape;
PPO peak memory <= 0.4x the four-copy layout; training step >= 50 % of the measured matmul rate on the 135M-shaped
model; 4-bit base <= 0.55 bytes/param.

How each figure is made
- Every step runs the library's own code paths, in float32 on the CPU: SFT = train_sft.lm_loss (packed blocks, loss
  on every token); reward = train_reward.pair_scores (heads.sequence_scores) + reward_losses.bradley_terry_loss;
  DPO = train_dpo.sequence_logps (heads.response_logprobs) for the policy and, under `models.reference`, the
  reference, + dpo.dpo_loss; then backward, clip_grad_norm_ and AdamW (training.make_optimizer). LoRA r=16,
  alpha=32 on every linear layer (the scripts' default: training.make_trainable) unless the row says "full".
  A step's time is the median of the timed steps after one warm-up step.
- Model FLOPs of a step (the PaLM appendix-B / nanoGPT convention, counted from the config, not from the profiler):
  per token of a row of length T, with N = weights of the decoder's linear layers (q, k, v, o, gate, up, down) and
  L layers of attention width d (heads x head_dim):
      forward     2N + 4·L·T·d (QKᵀ and AV, no discount for the causal mask) + 2·H·V at each position whose logits
                  are computed (the tied LM head; every position for SFT, response positions for DPO, none for the
                  reward model, which reads one hidden state) + 2·N_lora (the LoRA branches, r·(in+out) each)
      backward    full fine-tuning: 2 x forward (gradients of inputs and of weights);
                  LoRA over a frozen base: the frozen matmuls need input gradients only, 1 x their forward (2N, and
                  2·H·V at the LM-head positions), attention has no weights and costs 2 x its forward, the LoRA
                  branches 2 x theirs. So a LoRA step is ~4N per token instead of full fine-tuning's 6N.
      DPO adds one forward-only reference pass over the same rows.
  MFU = (model FLOPs / step time) / (the fp32 torch.mm rate at 2048 x 2048 x 2048 measured at the start of this
  run; it is measured again at the end, to show whether the machine's speed drifted). Tokens/s counts the tokens the trained model reads (all rows x their length).
- Peak memory: each measurement runs in a fresh subprocess; after its imports it resets the kernel's high-water mark
  (/proc/self/clear_refs) and reports VmHWM minus the RSS at that point: weights + activations + optimizer state +
  allocator overhead. (ru_maxrss is wrong here: Linux carries it over from the parent across fork + exec.)
  transformers memory-maps float32 safetensors weights, so a frozen copy's pages count in RSS once touched, once per
  copy; on a GPU each copy is its own allocation. 4-bit weights are new anonymous memory either way.
- Sampler vs generate: minirlhf.sampling.sample vs model.generate(do_sample=True, temperature=1, top_k=0, top_p=1),
  both forced to the same length (min_new_tokens = max_new_tokens), left-padded prompts of varied lengths, runs
  alternating so they share the machine's state; the median tokens/s of the repeats. sample runs on fast/decode.py's
  forward (its default for Llama models); the comparison column also shows sample(engine="hf"), the same loop on
  transformers' forward.
- PPO: one iteration composed as train_ppo.py does it (sample -> reward model score -> policy log-probs and values,
  reference log-probs -> per-token KL reward, GAE, whitened advantages -> minibatch epochs of clipped policy + value
  loss), in two layouts doing the same work on the same samples:
      shared      one base; policy = LoRA adapter "policy" (r=8, as train_ppo.py), value head on the policy trunk,
                  reward = adapter "reward" + head, reference = the base with adapters disabled;
      four-copy   four models from load_model: policy = base + LoRA; reference = a second copy; reward = a third
                  copy + the same reward adapter and head; value = a fourth copy with its own LoRA adapter and a
                  value head (the separate-models layout of older TRL; LoRA rather than full fine-tuning keeps its
                  optimizer state small, so the comparison only measures the layout).
  The memory comparison is run three times (once with --quick): as is; with glibc's MALLOC_MMAP_THRESHOLD_=131072, so
  that freed activation blocks go back to the OS and the peak follows the live tensors rather than the heap's
  high-water mark; and with gradient checkpointing of the trained trunks (policy; the value copy in the four-copy
  layout), as train_ppo.py --gradient-checkpointing does it.
  Responses are forced to full length (min_new_tokens) so the work is fixed. Times: median over the iterations after
  the first (warm-up); scoring = reward + log-probs + values + advantages. On the 135M model the reward model is a
  random LoRA adapter + head (written once per run); on the tiny model it is the shipped minirlhf/assets/reward-model.
- 4-bit: load_model(..., quantization="4bit") (NF4, double quantization) on the CPU; models.resident_bytes divided
  by the parameter count, for the whole model and for the quantized linear layers alone.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the training scripts' loss code (train_sft.lm_loss, ...) is imported from the repo root; bench/common.py from bench/
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]

from common import OFFLINE, Child, load_average, machine, mib, status_kib, write_doc  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from minirlhf import lora  # noqa: E402
from minirlhf.assets import ASSETS_DIR, TINY_LLAMA  # noqa: E402
from minirlhf.data.tokenize import collate_pairs  # noqa: E402
from minirlhf.dpo import dpo_loss  # noqa: E402
from minirlhf.formats import save_adapter, save_head  # noqa: E402
from minirlhf.gae import gae  # noqa: E402
from minirlhf.heads import (ScalarHead, final_hidden, predicting_states, response_logprobs,  # noqa: E402
                            response_logprobs_and_states, sequence_scores)
from minirlhf.models import (count_parameters, load_model, load_reward_model, reference, resident_bytes,  # noqa: E402
                             dropout_off)
from minirlhf.ppo import policy_loss, value_loss  # noqa: E402
from minirlhf.reward_losses import bradley_terry_loss  # noqa: E402
from minirlhf.rollout import minibatches  # noqa: E402
from minirlhf.sampling import sample  # noqa: E402
from minirlhf.token_rewards import token_rewards, whiten_advantages  # noqa: E402
from minirlhf.training import make_optimizer, make_trainable  # noqa: E402

# The SmolLM2-135M shape (HuggingFaceTB/SmolLM2-135M's config), random weights; pad and EOS are arbitrary distinct ids.
SMOL_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=2)
TINY_REWARD_MODEL = os.path.join(ASSETS_DIR, "reward-model")

# What each model is measured at. sft: (rows, tokens per row); pairs: (pairs, prompt tokens, response tokens), each
# pair being 2 rows of prompt + response; sample: (batch, longest prompt, new tokens); ppo: one iteration's shape.
SETTINGS = {
    "tiny": dict(sft=(16, 128), pairs=(16, 32, 32), sample=(64, 32, 24),
                 ppo=dict(rollout=64, minibatch=32, epochs=2, prompt=32, new_tokens=24, iterations=3),
                 train_steps=4, sample_repeats=5),
    "135m": dict(sft=(4, 256), pairs=(2, 128, 128), sample=(4, 32, 32),
                 ppo=dict(rollout=8, minibatch=4, epochs=1, prompt=48, new_tokens=32, iterations=2),
                 train_steps=3, sample_repeats=3),
}
QUICK = dict(train_steps=2, sample_repeats=3, ppo_iterations=2)  # --quick: fewer repeats (and the tiny model only)
LORA_R, LORA_ALPHA = 16, 32  # SFT / reward / DPO adapters (the scripts' defaults)
PPO_LORA_R, PPO_LORA_ALPHA, KL_COEF, VF_COEF = 8, 16, 0.3, 0.1  # train_ppo.py's defaults
DPO_BETA = 0.5  # train_dpo.py's default
TARGETS = dict(mfu=0.50, sampler={"tiny": 2.0, "135m": 1.0}, ppo_memory=0.4, bytes_per_param=0.55)
MARK_BEGIN, MARK_END = "<!-- dev/run.py: begin (generated) -->", "<!-- dev/run.py: end -->"


# ----------------------------------------------------------------------------------------------------- helpers
def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns the RSS in bytes, the baseline for peak_above()."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("self", "VmRSS") * 1024


def peak_above(baseline):
    """Bytes of RSS high-water mark above `baseline` (since reset_peak)."""
    return status_kib("self", "VmHWM") * 1024 - baseline


def median_time(fn, repeats):
    """Median wall time of `repeats` calls of fn(), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(m, k, n, repeats):
    """fp32 FLOP/s of torch.mm on (m, k) @ (k, n): 2·m·k·n / median time."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / median_time(lambda: torch.mm(a, b), repeats)


def shape_of(config):
    """The numbers the FLOP formula needs: H, L, V, attention width d, N = decoder linear weights."""
    H, L, V, I = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    n_linear = L * (H * q + 2 * H * kv + q * H + 3 * H * I)  # q, k, v, o projections + gate, up, down
    return dict(hidden=H, layers=L, vocab=V, attn=q, n_linear=n_linear)


def pass_flops(shape, rows, seq, lm_positions, backward, n_lora=0):
    """Model FLOPs of one pass over `rows` rows of `seq` tokens (see the module docstring).

    lm_positions: positions where the LM head runs. backward: "none" | "frozen" (LoRA over a frozen base) | "full"."""
    n = rows * seq
    linear = 2 * shape["n_linear"] * n
    attention = 4 * shape["layers"] * seq * shape["attn"] * n  # QKᵀ and AV, 2·T·d each per token and layer
    head = 2 * shape["hidden"] * shape["vocab"] * lm_positions
    adapters = 2 * n_lora * n
    forward = linear + attention + head + adapters
    if backward == "none":
        return forward
    if backward == "full":
        return 3 * forward
    return forward + linear + 2 * attention + head + 2 * adapters


def random_prompts(batch, longest, vocab, pad_id, seed):
    """(B, P) left-padded random prompts of lengths between longest/4 and longest, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, longest // 4), longest + 1, (batch,), generator=g)
    lengths[0] = longest
    ids, mask = torch.full((batch, longest), pad_id), torch.zeros(batch, longest, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, longest - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, longest - n:] = 1
    return ids, mask


def random_pairs(pairs, prompt_len, response_len, vocab, pad_id, seed):
    """A collated batch of random preference pairs (train_*.py's collate_pairs): (2·pairs, prompt + response)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()
    return collate_pairs([{"prompt_ids": ids(prompt_len), "chosen_ids": ids(response_len),
                           "rejected_ids": ids(response_len)} for _ in range(pairs)], pad_id)


def profiled(fn, enabled, title):
    """Run fn() once, under torch.profiler when enabled, printing the top operators by self CPU time."""
    if not enabled:
        return fn()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    print(f"### profile: {title}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return out


# ------------------------------------------------------------------------------ measurements (each in a child)
def child_build_135m(job):
    """Write the 135M-shaped base (random weights) and a random reward adapter + head for it."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOL_135M)).save_pretrained(job["path"])
    model = load_model(job["path"], dtype="float32", device="cpu")
    lora.add_lora(model, "all-linear", r=LORA_R, alpha=LORA_ALPHA, adapter="reward")
    for p in lora.lora_parameters(model, "reward"):
        torch.nn.init.normal_(p, std=0.02)  # B != 0: the reward adapter changes the trunk's states
    save_adapter(model, job["reward_path"], "reward")
    save_head(ScalarHead(model.config.hidden_size), job["reward_path"])
    return {}


def child_train(job):
    """One training step (sft | sft-full | reward | dpo): time, tokens/s, model FLOPs, peak memory."""
    kind, device = job["kind"], "cpu"
    # the scripts' own loss code (imported here: only a training measurement depends on the scripts importing)
    from train_dpo import sequence_logps
    from train_reward import pair_scores
    from train_sft import lm_loss
    baseline = reset_peak()
    torch.manual_seed(0)
    model = load_model(job["path"], dtype="float32", device=device)
    cfg, shape = model.config, shape_of(model.config)
    full = kind == "sft-full"
    params = make_trainable(model, "policy", full_finetune=full, lora_r=LORA_R, lora_alpha=LORA_ALPHA)
    n_lora = 0 if full else sum(p.numel() for p in params)
    head = None
    if kind == "reward":
        head = ScalarHead(cfg.hidden_size)
        params += list(head.parameters())
    optimizer = make_optimizer(params, lr=1e-5)

    if kind in ("sft", "sft-full"):
        rows, seq = job["sft"]
        blocks = torch.randint(3, cfg.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(1))
        model.train()

        def loss_fn():
            return lm_loss(model, blocks)  # packed blocks: every position's logits, loss on every token
        flops = pass_flops(shape, rows, seq, rows * seq, "full" if full else "frozen", n_lora)
        setting = f"{rows} x {seq} tokens, {'full fine-tuning' if full else f'LoRA r={LORA_R} all-linear'}"
    else:
        pairs, prompt_len, response_len = job["pairs"]
        batch = random_pairs(pairs, prompt_len, response_len, cfg.vocab_size, cfg.pad_token_id, seed=1)
        rows, seq = batch["input_ids"].shape  # (2·pairs, prompt + response)
        if kind == "reward":
            model.train()

            def loss_fn():
                chosen, rejected, _, _ = pair_scores(model, head, batch, device)  # (pairs,) each
                return bradley_terry_loss(chosen, rejected).mean()
            flops = pass_flops(shape, rows, seq, 0, "frozen", n_lora)  # no LM head: the head reads one state
        else:
            dropout_off(model)  # as train_dpo.py: no dropout in the log-ratios

            def loss_fn():
                policy = sequence_logps(model, batch, device)  # (2·pairs,) chosen rows first
                with torch.no_grad(), reference(model):
                    ref = sequence_logps(model, batch, device)
                losses, _, _ = dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta=DPO_BETA)
                return losses.mean()
            lm = rows * response_len  # the LM head runs only where a response token is predicted
            flops = (pass_flops(shape, rows, seq, lm, "frozen", n_lora)
                     + pass_flops(shape, rows, seq, lm, "none"))  # + the reference's forward
        setting = (f"{pairs} pairs x ({prompt_len} prompt + {response_len} response) tokens, LoRA r={LORA_R} "
                   "all-linear")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    step()  # warm-up (allocations, first-call overheads)
    times = []
    for i in range(job["steps"]):
        start = time.perf_counter()
        profiled(step, job["profile"] and i == 0, f"{kind} step, {job['model']}")
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return dict(seconds=seconds, tokens=rows * seq, flops=flops, setting=setting, peak=peak_above(baseline),
                params=count_parameters(model)[1])


def child_sample(job):
    """minirlhf.sampling.sample vs model.generate, same batch / prompts / length / distribution."""
    torch.manual_seed(0)
    model = load_model(job["path"], dtype="float32", device="cpu").eval()
    cfg = model.config
    batch, longest, new_tokens = job["sample"]
    ids, mask = random_prompts(batch, longest, cfg.vocab_size, cfg.pad_token_id, seed=2)
    common = dict(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)

    def ours(engine):
        def run():
            out = sample(model, ids, mask, new_tokens, min_new_tokens=new_tokens, temperature=1.0, engine=engine,
                         **common)
            return int(out.response_mask.sum())
        return run

    def theirs():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    runs = {"sample": ours("auto"), "sample (hf)": ours("hf"), "generate": theirs}
    rates = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for i in range(job["repeats"]):
        for name, run in runs.items():  # alternate, so both see the same machine state
            start = time.perf_counter()
            n = profiled(run, job["profile"] and i == 0, f"{name}, {job['model']}")
            rates[name].append(n / (time.perf_counter() - start))
    return dict(ours=statistics.median(rates["sample"]), hf=statistics.median(rates["sample (hf)"]),
                theirs=statistics.median(rates["generate"]),
                setting=f"batch {batch}, prompts {mask.sum(1).min().item()}-{longest} tokens (left-padded), "
                        f"{new_tokens} new tokens, temperature 1, full softmax")


def value_states_from(model):
    """states -> V(s_t) inputs for a separate value model: its own trunk's states, shifted as the policy's are."""
    def states(input_ids, attention_mask, response_mask):
        hidden = final_hidden(model, input_ids, attention_mask)  # (B, T, H)
        return predicting_states(hidden, response_mask)  # (B, T, H): states[:, t] predicts token t
    return states


def child_ppo(job):
    """One PPO iteration on a shared base (adapters) or on four model copies; phase times and peak memory."""
    baseline = reset_peak()
    torch.manual_seed(0)
    s, layout, path = job["ppo"], job["layout"], job["path"]
    trace = []  # (where, RSS above the baseline, peak above the baseline) in MiB: printed with --profile

    def mark(where):
        trace.append((where, round((status_kib("self", "VmRSS") * 1024 - baseline) / 2**20),
                      round(peak_above(baseline) / 2**20)))

    checkpointing = job.get("checkpointing", False)  # recompute the trained trunks' blocks (--gradient-checkpointing)

    def base(trained=False):
        return load_model(path, dtype="float32", device="cpu", gradient_checkpointing=checkpointing and trained)

    policy = base(trained=True)
    params = make_trainable(policy, "policy", lora_r=PPO_LORA_R, lora_alpha=PPO_LORA_ALPHA)
    H = policy.config.hidden_size
    value_head = ScalarHead(H, init_std=0.0)
    if layout == "shared":  # every role on the one base (train_ppo.py)
        reward_model = ref_model = policy
        reward_adapter, reward_head = load_reward_model(policy, job["reward_path"])
        value_states = None  # the value head reads the policy's own states
        models = [policy]
    else:  # four copies from the same code
        ref_model = base()
        reward_model = base()
        reward_adapter, reward_head = load_reward_model(reward_model, job["reward_path"])
        value_model = base(trained=True)
        params += make_trainable(value_model, "value", lora_r=PPO_LORA_R, lora_alpha=PPO_LORA_ALPHA)
        value_states = value_states_from(value_model)
        models = [policy, ref_model, reward_model, value_model]
    reward_head.requires_grad_(False)
    params += list(value_head.parameters())
    for m in models:  # eval, or train mode with dropout off where blocks are checkpointed (transformers needs it)
        dropout_off(m)
    mark("models loaded")
    optimizer = make_optimizer(params, lr=1e-5)
    cfg = policy.config
    prompt_ids, prompt_mask = random_prompts(s["rollout"], s["prompt"], cfg.vocab_size, cfg.pad_token_id, seed=3)
    P, R = prompt_ids.shape[1], s["new_tokens"]

    def iteration(generator):
        times, tick = {}, time.perf_counter()
        # 1. rollout with the policy
        out = sample(policy, prompt_ids, prompt_mask, R, min_new_tokens=R, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id, generator=generator)
        input_ids = torch.cat([prompt_ids, out.response_ids], 1)  # (B, T)
        attention_mask = torch.cat([prompt_mask, out.response_mask], 1)
        response_mask = torch.cat([torch.zeros_like(prompt_mask), out.response_mask], 1)
        mask = out.response_mask.bool()  # (B, R)
        times["generation"], tick = time.perf_counter() - tick, time.perf_counter()
        mark("generation")
        # 2. score, log-probs and values, reference log-probs, advantages
        with torch.no_grad():
            with lora.use_adapter(reward_model, reward_adapter):
                scores = sequence_scores(reward_model, reward_head, input_ids, attention_mask)  # (B,)
            logprobs, _, states = response_logprobs_and_states(policy, input_ids, attention_mask, response_mask)
            if value_states is not None:
                states = value_states(input_ids, attention_mask, response_mask)
            values = value_head(states)[:, P:] * mask  # (B, R)
            with reference(ref_model):
                ref_logprobs = response_logprobs(ref_model, input_ids, attention_mask, response_mask)
        logprobs, ref_logprobs = logprobs[:, P:], ref_logprobs[:, P:]  # (B, T) -> (B, R)
        rewards, _ = token_rewards(scores, logprobs, ref_logprobs, mask, KL_COEF)
        advantages, returns = gae(rewards, values, mask)
        advantages = whiten_advantages(advantages, mask)
        times["scoring"], tick = time.perf_counter() - tick, time.perf_counter()
        mark("scoring")
        # 3. minibatch epochs of clipped policy + value loss
        for _ in range(s["epochs"]):
            for mb in minibatches(len(scores), s["minibatch"], generator):
                newlogprobs, _, mb_states = response_logprobs_and_states(
                    policy, input_ids[mb], attention_mask[mb], response_mask[mb])
                if value_states is not None:
                    mb_states = value_states(input_ids[mb], attention_mask[mb], response_mask[mb])
                vpred = value_head(mb_states)[:, P:]  # (b, R)
                pg_loss, _ = policy_loss(newlogprobs[:, P:], logprobs[mb], advantages[mb], mask[mb])
                v_loss, _ = value_loss(vpred, values[mb], returns[mb], mask[mb])
                optimizer.zero_grad(set_to_none=True)
                (pg_loss + VF_COEF * v_loss).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
        times["training"] = time.perf_counter() - tick
        mark("training")
        return times

    generator = torch.Generator().manual_seed(4)
    runs = [iteration(generator) for _ in range(s["iterations"])]
    timed = runs[1:] or runs  # the first iteration is the warm-up
    times = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    weights = sum(resident_bytes(m) for m in models) + sum(
        resident_bytes(h) for h in (value_head, reward_head))
    if job["profile"]:
        print(f"### memory trace (MiB above the RSS after imports: now, peak), PPO {layout}, {job['model']}")
        print("\n".join(f"  {where:<14} {now:6d} {peak:6d}" for where, now, peak in trace))
    return dict(times=times, peak=peak_above(baseline), weights=weights,
                setting=f"rollout {s['rollout']} x ({P} prompt + {R} response) tokens, minibatch {s['minibatch']}, "
                        f"{s['epochs']} epoch(s), policy LoRA r={PPO_LORA_R}")


def child_4bit(job):
    """Resident bytes per parameter of the 4-bit NF4 base: whole model, quantized linears only, bf16 embeddings."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        q = load_model(job["path"], quantization="4bit", dtype=dtype, device="cpu")
        _, total = count_parameters(q)
        quantized = [p for p in q.parameters() if getattr(p, "quant_state", None) is not None]
        n_quantized = sum(p.quant_state.shape.numel() for p in quantized)
        # the rest (embeddings = tied LM head, norms) as stored, counted once
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in q.parameters()
                if getattr(p, "quant_state", None) is None}
        seen.update({b.data_ptr(): b.numel() * b.element_size() for b in q.buffers()})
        other_bytes = sum(seen.values())
        out[dtype] = dict(total=total, bytes=resident_bytes(q), n_quantized=n_quantized,
                          quantized_bytes=resident_bytes(q) - other_bytes)
        del q
    fp32 = load_model(job["path"], dtype="float32", device="cpu")
    out["float32_bytes"] = resident_bytes(fp32)
    return out


CHILDREN = {"build-135m": child_build_135m, "train": child_train, "sample": child_sample, "ppo": child_ppo,
            "4bit": child_4bit}


# ------------------------------------------------------------------------------------------------ the parent
def run_child(job, threads, echo=False, env=None):
    """Run one measurement in a fresh interpreter (its own peak memory), return its result dict."""
    log = os.path.join(tempfile.gettempdir(), f"minirlhf-bench-{os.getpid()}.log")
    child = Child([os.path.abspath(__file__), "--child", json.dumps(job), "--threads", str(threads)], log, threads,
                  dict(OFFLINE, **(env or {}))).wait()
    if child.returncode != 0:
        sys.stderr.write(child.tail())
        raise SystemExit(f"dev/run.py: error: measurement {job['name']} failed (exit {child.returncode})")
    result = child.result_line()
    if echo:
        print("\n".join(line for line in open(log).read().splitlines() if line != result))
    print(f"  {job['name']:<24} {child.wall_seconds:6.1f}s", file=sys.stderr, flush=True)
    os.remove(log)
    return json.loads(result)


def row(measurement, model, setting, value, comparison="", ratio=None, peak=None, target=None, met=None):
    return dict(measurement=measurement, model=model, setting=setting, value=value, comparison=comparison,
                ratio="" if ratio is None else f"{ratio:.{3 if target else 2}f}",  # 3 digits next to a target
                peak="" if peak is None else mib(peak),
                target=target or "", met="" if met is None else ("yes" if met else "**no**"))


def training_rows(name, label, jobs, threads, rate):
    rows = []
    for kind, title in (("sft", "SFT step"), ("sft-full", "SFT step"), ("reward", "reward-model step (BT)"),
                        ("dpo", "DPO step")):
        r = run_child(dict(jobs, name=f"{kind} {name}", kind=kind), threads, echo=jobs["profile"])
        achieved = r["flops"] / r["seconds"]
        target = TARGETS["mfu"] if name == "135m" else None
        rows.append(row(f"{title}: tokens/s, MFU", label, r["setting"],
                        f"{r['tokens'] / r['seconds']:,.0f} tok/s, {achieved / 1e9:.1f} GFLOP/s "
                        f"({r['seconds']:.2f} s/step)",
                        f"fp32 matmul {rate / 1e9:.1f} GFLOP/s", achieved / rate, r["peak"],
                        f">= {target:.2f}" if target else None, achieved / rate >= target if target else None))
    return rows


def sampler_row(name, label, jobs, threads):
    r = run_child(dict(jobs, name=f"sample {name}"), threads, echo=jobs["profile"])
    ratio, target = r["ours"] / r["theirs"], TARGETS["sampler"][name]
    return [row("sampler vs generate: tokens/s", label, r["setting"], f"sample {r['ours']:,.0f} tok/s",
                f"generate {r['theirs']:,.0f} tok/s (sample on the HF forward {r['hf']:,.0f} tok/s)", ratio,
                target=f">= {target:.1f}", met=ratio >= target)]


def ppo_rows(name, label, jobs, threads, quick):
    shared = run_child(dict(jobs, name=f"ppo shared {name}", layout="shared"), threads, echo=jobs["profile"])
    four = run_child(dict(jobs, name=f"ppo four-copy {name}", layout="four"), threads, echo=jobs["profile"])
    # the same two iterations with glibc malloc handing every block >= 128 KiB back to the OS when it is freed:
    # the peak then follows the live tensors instead of the heap's high-water mark (slower: more page faults)
    live = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    if not quick:
        shared_live = run_child(dict(jobs, name=f"ppo shared {name} (mmap)", layout="shared"), threads, env=live)
        four_live = run_child(dict(jobs, name=f"ppo four-copy {name} (mmap)", layout="four"), threads, env=live)
        # and with the trained trunks' blocks recomputed in the backward pass (train_ppo.py --gradient-checkpointing)
        shared_ckpt = run_child(dict(jobs, name=f"ppo shared {name} (ckpt)", layout="shared", checkpointing=True),
                                threads)
        four_ckpt = run_child(dict(jobs, name=f"ppo four-copy {name} (ckpt)", layout="four", checkpointing=True),
                              threads)

    def split(t):
        return (f"gen {t['generation']:.2f} + score {t['scoring']:.2f} + train {t['training']:.2f} = "
                f"{sum(t.values()):.2f} s")
    ratio = shared["peak"] / four["peak"]
    rows = [
        row("PPO iteration time: shared base", label, shared["setting"], split(shared["times"]),
            "four-copy: " + split(four["times"]), sum(shared["times"].values()) / sum(four["times"].values())),
        row("PPO peak memory: shared / four copies", label, shared["setting"], mib(shared["peak"]),
            f"four-copy {mib(four['peak'])}", ratio, None, f"<= {TARGETS['ppo_memory']}",
            ratio <= TARGETS["ppo_memory"]),
        row("PPO model weights resident", label, "policy + reference + reward + value (+ adapters, heads)",
            mib(shared["weights"]), f"four-copy {mib(four['weights'])}", shared["weights"] / four["weights"]),
    ]
    if not quick:
        rows.insert(2, row("PPO peak memory, malloc returning freed blocks", label,
                           f"same, {next(iter(live))}={live['MALLOC_MMAP_THRESHOLD_']} (glibc)",
                           mib(shared_live["peak"]), f"four-copy {mib(four_live['peak'])}",
                           shared_live["peak"] / four_live["peak"]))
        ratio = shared_ckpt["peak"] / four_ckpt["peak"]
        rows.insert(3, row("PPO peak memory, gradient checkpointing", label,
                           "same, policy (and value copy) blocks recomputed in backward; training "
                           f"{shared_ckpt['times']['training']:.2f} s vs {shared['times']['training']:.2f} s without",
                           mib(shared_ckpt["peak"]), f"four-copy {mib(four_ckpt['peak'])}", ratio, None,
                           f"<= {TARGETS['ppo_memory']}", ratio <= TARGETS["ppo_memory"]))
    return rows


def four_bit_rows(name, label, jobs, threads):
    r = run_child(dict(jobs, name=f"4bit {name}"), threads)
    f32, b16 = r["float32"], r["bfloat16"]
    fp32_bpp = r["float32_bytes"] / f32["total"]
    target = f"<= {TARGETS['bytes_per_param']}"
    linear = f32["quantized_bytes"] / f32["n_quantized"]
    whole, whole16 = f32["bytes"] / f32["total"], b16["bytes"] / b16["total"]
    share = f32["n_quantized"] / f32["total"]
    return [
        row("4-bit NF4 base: bytes/param, quantized linears", label,
            f"{f32['n_quantized'] / 1e6:.1f} M params in 4-bit linears ({share:.0%} of the model)",
            f"{linear:.3f} B/param", f"float32 {fp32_bpp:.2f} B/param", linear / fp32_bpp,
            target=target, met=linear <= TARGETS["bytes_per_param"]),
        row("4-bit NF4 base: bytes/param, whole model", label,
            "tied embedding / LM head and norms in float32 (load_model's CPU default)",
            f"{whole:.3f} B/param ({mib(f32['bytes'])})", f"float32 {fp32_bpp:.2f} B/param", whole / fp32_bpp,
            target=target, met=whole <= TARGETS["bytes_per_param"]),
        row("4-bit NF4 base: bytes/param, whole model", label,
            "dtype=bfloat16: tied embedding in bf16 (norms float32)",
            f"{whole16:.3f} B/param ({mib(b16['bytes'])})", f"float32 {fp32_bpp:.2f} B/param", whole16 / fp32_bpp,
            target=target, met=whole16 <= TARGETS["bytes_per_param"]),
    ]


def table(rows):
    cols = [("measurement", "measurement"), ("model", "model"), ("setting", "setting"), ("value", "value"),
            ("comparison", "comparison"), ("ratio", "ratio"), ("peak", "peak memory"), ("target", "target"),
            ("met", "met?")]
    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[key]) for key, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads, here and in every measurement (default 2 = all cores: needs an idle "
                             "machine; use 1 when the cores are shared)")
    parser.add_argument("--quick", action="store_true", help="the tiny model only, fewer repeats (a smoke run)")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"),
                        help="markdown file to write the table into, between its markers")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators for one step of each training / sampling job")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measurement, print its JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        job = json.loads(args.child)
        result = CHILDREN[job["child"]](job)
        print(json.dumps(result))
        return

    start, load_start = time.time(), load_average()
    command = " ".join(["python", "dev/run.py", *sys.argv[1:]])
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"
    print(f"dev/run.py: {args.threads} thread(s), {'quick' if args.quick else 'full'} run", file=sys.stderr)
    repeats = 3 if args.quick else 5
    rate = matmul_rate(2048, 2048, 2048, repeats)
    with tempfile.TemporaryDirectory(prefix="minirlhf-bench-") as tmp:
        models = [("tiny", "tiny (1.9 M, assets/tiny-llama)", TINY_LLAMA, TINY_REWARD_MODEL)]
        if not args.quick:
            path, reward_path = os.path.join(tmp, "smol-135m"), os.path.join(tmp, "reward-135m")
            run_child(dict(name="build 135m", child="build-135m", path=path, reward_path=reward_path), args.threads)
            models.append(("135m", "SmolLM2-135M shape (134.5 M, random)", path, reward_path))
        # the matmul rate at the shapes the 135M model's MLP and LM head multiply in an SFT step (1024 tokens)
        mlp_rate = matmul_rate(1024, 576, 1536, 10 if args.quick else 20)
        head_rate = matmul_rate(1024, 576, 49152, 2 if args.quick else 3)

        sections = {"train": [], "sample": [], "ppo": [], "4bit": []}
        for name, label, path, reward_path in models:
            s = dict(SETTINGS[name])
            if args.quick:
                s.update(train_steps=QUICK["train_steps"], sample_repeats=QUICK["sample_repeats"],
                         ppo=dict(s["ppo"], iterations=QUICK["ppo_iterations"]))
            base = dict(model=name, path=path, profile=args.profile)
            sections["train"] += training_rows(name, label, dict(base, child="train", steps=s["train_steps"],
                                                                 sft=s["sft"], pairs=s["pairs"]),
                                               args.threads, rate)
            sections["sample"] += sampler_row(name, label, dict(base, child="sample", sample=s["sample"],
                                                                repeats=s["sample_repeats"]), args.threads)
            sections["ppo"] += ppo_rows(name, label, dict(base, child="ppo", reward_path=reward_path, ppo=s["ppo"]),
                                        args.threads, args.quick)
        name, label, path, _ = models[-1]  # the 4-bit base: the largest model measured
        sections["4bit"] += four_bit_rows(name, label, dict(model=name, path=path, child="4bit"), args.threads)
    rate_end = matmul_rate(2048, 2048, 2048, repeats)
    matmul = [
        row("fp32 matmul rate (torch.mm 2048³)", "-", "start of run / end of run", f"{rate / 1e9:.1f} GFLOP/s",
            f"end {rate_end / 1e9:.1f} GFLOP/s", rate / rate_end),
        row("fp32 matmul rate at the 135M model's shapes", "-", "(1024 x 576) @ (576 x 1536): MLP",
            f"{mlp_rate / 1e9:.1f} GFLOP/s", f"2048³ {rate / 1e9:.1f} GFLOP/s", mlp_rate / rate),
        row("fp32 matmul rate at the 135M model's shapes", "-", "(1024 x 576) @ (576 x 49152): LM head",
            f"{head_rate / 1e9:.1f} GFLOP/s", f"2048³ {rate / 1e9:.1f} GFLOP/s", head_rate / rate),
    ]
    cpu, cores = machine()
    # MFU uses the rate measured at the start; the end-of-run rate shows whether the machine's speed drifted
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpu}, {cores} cores; torch {torch.__version__}, "
              f"transformers {transformers.__version__}, Python {platform.python_version()}; "
              f"**{args.threads} thread(s)**; load average {load_start} at the start, {load_average()} at the end; "
              f"wall time {time.time() - start:.0f} s.\n\nCommand: `{command}`\n")
    block = header + "\n" + table(matmul + sections["train"] + sections["sample"] + sections["ppo"]
                                  + sections["4bit"])
    print(block)
    write_doc(args.out, block, MARK_BEGIN, MARK_END, new_file=(
        "# Benchmarks\n\n`python dev/run.py` writes the block below; the analysis after it is written by hand.\n"))
    print(f"wrote {os.path.relpath(args.out, REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
