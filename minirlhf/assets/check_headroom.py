"""How much room the SFT model leaves for alignment, measured with the world's gold reward on held-out prompts.

    python -m minirlhf.assets.check_headroom [MODEL_DIR] [--samples N]

Samples N responses per held-out prompt at temperature 1 and one greedy response with minirlhf.sampling (as DPO
and PPO evaluate), decodes them and prints the mean gold score (and its share of GOLD_MAX), the share of "best"
responses (gold >= 3.5), the share of each content class (gold.py), and the accuracy when the model answers in the
concise style ("The answer is X." / "It is X." / "X."). The target band for the shipped model: sampled mean gold
between 25 % and 65 % of GOLD_MAX (fluent and on-task, with room for DPO/PPO to improve).
"""
import argparse
import re
from collections import Counter

import torch

from minirlhf.assets import TINY_LLAMA
from minirlhf.data import world
from minirlhf.models import load_model, load_tokenizer
from minirlhf.sampling import sample

CONCISE = re.compile(r"^(the answer is |it is )?[a-z0-9]+\.$")


@torch.no_grad()
def generate(model, tokenizer, prompts, temperature, max_new_tokens=40, batch_size=64):
    """Decoded responses (EOS and padding dropped) to the user texts `prompts`, sampled with minirlhf.sampling
    (temperature 0 is greedy)."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts[i:i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        samples = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, temperature=temperature,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
    return out


def report(prompts, responses):
    """Gold statistics of (prompt, response) pairs as a dict."""
    scores = [world.gold_score(p, r) for p, r in zip(prompts, responses)]
    contents = Counter(world.judge(p, r)[0] for p, r in zip(prompts, responses))
    concise = [s for s, r in zip(scores, responses) if CONCISE.match(r.strip().lower())]
    n = len(scores)
    return {"gold_mean": sum(scores) / n, "gold_frac": sum(scores) / n / world.GOLD_MAX,
            "best_frac": sum(s >= 3.5 for s in scores) / n,
            **{f"content/{k}": contents[k] / n for k in ("correct", "wrong", "evasive", "empty")},
            "concise_frac": len(concise) / n,
            "concise_accuracy": sum(s == world.GOLD_MAX for s in concise) / max(1, len(concise))}


def headroom(model_dir=TINY_LLAMA, samples=4, seed=0):
    """{'sampled': report at temperature 1, 'greedy': report of greedy decoding} on world.prompt_rows('test')."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="float32", tokenizer=tokenizer).eval()
    prompts = [row["prompt"][-1]["content"] for row in world.prompt_rows("test")]
    sampled = [p for p in prompts for _ in range(samples)]
    return {"sampled": report(sampled, generate(model, tokenizer, sampled, temperature=1.0)),
            "greedy": report(prompts, generate(model, tokenizer, prompts, temperature=0.0)), "n_prompts": len(prompts)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?", default=TINY_LLAMA)
    parser.add_argument("--samples", type=int, default=4, help="samples per held-out prompt at temperature 1")
    args = parser.parse_args(argv)
    result = headroom(args.model_dir, args.samples)
    print(f"held-out prompts: {result['n_prompts']}, {args.samples} samples each at T=1; GOLD_MAX {world.GOLD_MAX}")
    for mode in ("sampled", "greedy"):
        r = result[mode]
        print(f"{mode:8s} gold {r['gold_mean']:.3f} ({100 * r['gold_frac']:.1f} % of max) | best(>=3.5) "
              f"{100 * r['best_frac']:.1f} % | correct {100 * r['content/correct']:.1f} % wrong "
              f"{100 * r['content/wrong']:.1f} % evasive {100 * r['content/evasive']:.1f} % | concise style "
              f"{100 * r['concise_frac']:.1f} %, accuracy {100 * r['concise_accuracy']:.1f} %")
    return result


if __name__ == "__main__":
    main()
