"""Measure: (1) tokens/s of minirlhf.sampling.sample vs transformers' model.generate on the same tiny model and batch;
(2) resident bytes per parameter of a 4-bit NF4 model on the CPU.

    python bench/sampler_vs_generate.py

Both samplers draw from the full softmax (temperature 1, no top-k / top-p) and are forced to the same length
(min_new_tokens = max_new_tokens), so they do the same work. Not a test: numbers depend on the machine and its load.
"""
import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minirlhf.models import count_parameters, load_model, resident_bytes
from minirlhf.sampling import sample

BATCH = 8             # prompts per batch
PROMPT_LENGTHS = (12, 20, 31, 8, 25, 16, 30, 5)  # left-padded to the longest
MAX_NEW_TOKENS = 64   # generated per prompt (forced: min_new_tokens = max_new_tokens)
REPEATS = 5           # timed runs of each sampler (alternating); the median is reported
THREADS = 1           # torch threads: on 2 shared cores, 2 OpenMP threads spin-wait and run ~50x slower
PAD, EOS = 0, 2
CONFIG = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)


def prompts():
    g = torch.Generator().manual_seed(0)
    P = max(PROMPT_LENGTHS)
    ids, mask = torch.full((BATCH, P), PAD), torch.zeros(BATCH, P, dtype=torch.long)
    for i, n in enumerate(PROMPT_LENGTHS[:BATCH]):
        ids[i, P - n:] = torch.randint(3, CONFIG["vocab_size"], (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def tokens_per_second(runs):
    """{name: run() -> tokens} -> {name: median tokens/s}; the runs alternate so they share the machine's load."""
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()  # warm-up
    for _ in range(REPEATS):
        for name, run in runs.items():
            start = time.perf_counter()
            n_tokens = run()
            times[name].append(n_tokens / (time.perf_counter() - start))
    return {name: statistics.median(tps) for name, tps in times.items()}


def main():
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    ids, mask = prompts()
    common = dict(eos_token_id=EOS, pad_token_id=PAD)

    def ours():
        out = sample(model, ids, mask, MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, temperature=1.0, **common)
        return int(out.response_mask.sum())

    def theirs():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, **common)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Llama hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, vocab "
          f"{CONFIG['vocab_size']}, {n_params / 1e6:.2f} M params; batch {BATCH}, {MAX_NEW_TOKENS} new tokens each; "
          f"{torch.get_num_threads()} threads")
    tps = tokens_per_second({"sample": ours, "generate": theirs})
    ours_tps, theirs_tps = tps["sample"], tps["generate"]
    print(f"sample():         {ours_tps:8.0f} tokens/s")
    print(f"model.generate(): {theirs_tps:8.0f} tokens/s")
    print(f"ratio sample/generate: {ours_tps / theirs_tps:.2f}")

    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        q = load_model(path, quantization="4bit")
    _, total = count_parameters(q)
    linear = [p for p in q.parameters() if getattr(p, "quant_state", None) is not None]
    n_quant = sum(p.quant_state.shape.numel() for p in linear)
    float_bytes = sum(p.numel() * p.element_size() for p in q.parameters() if p.is_floating_point())
    float_bytes += sum(b.numel() * b.element_size() for b in q.buffers())
    print(f"4-bit NF4 (double quant) on {next(q.parameters()).device}: {resident_bytes(q):,d} resident bytes for "
          f"{total:,d} params = {resident_bytes(q) / total:.3f} bytes/param (float32: {resident_bytes(model) / total:.3f})")
    print(f"  the {n_quant:,d} quantized linear weights alone: {(resident_bytes(q) - float_bytes) / n_quant:.3f} "
          f"bytes/param; the other {total - n_quant:,d} (embeddings, LM head, norms) stay float32")


if __name__ == "__main__":
    main()
