"""Sample a policy on prompts and measure it: gold score (built-in world), reward-model score, KL(π‖π_ref), length.

Legend: B prompts, P prompt length (left-padded), R response length, T = P + R, V vocab, N response tokens.
Shared by train_dpo.py, train_ppo.py and `python -m minirlhf.compare`, so that every number called `eval/gold` or
`eval/kl` anywhere in minirlhf is computed by the same code:
  eval/gold     mean gold score of sampled responses (world.gold_score, 0..GOLD_MAX)
  eval/reward   mean score of a reward model on the same samples
  eval/kl       mean over prompts of Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)), summed over the response tokens: the
                exact KL of the per-token distributions, in nats per sequence (not a sampled estimate); of π itself,
                unfiltered at temperature 1, whatever --temperature / --top-k / --top-p / --min-new-tokens sample
  eval/length   mean response length in tokens; eval/eos_fraction: share of responses that ended with EOS
                (or a stop string: generate's `ended`)
  eval/pass@k   (--pass-k, built-in world) mean over prompts of the unbiased pass@k from max(k) more samples per
                prompt, drawn by pass_at_k_evaluation with a generator of its own (pass_at_k.py)
"""
import os

import torch

from . import heads
from .atomic import atomic_write_json
from .data.tokenize import collate_prompts
from .heads import final_hidden, lm_logits, predicting_states, to_token_grid
from .kl import exact_kl
from .models import reference
from .pass_at_k import pass_at_k
from .sampling import StopStrings, eval_mode, sample


def generate(model, tokenizer, prompt_ids, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=0,
             stop_strings=(), generator=None, device="cpu"):
    """Sample one response per prompt (prompt_ids: list of B id lists) with the model's active adapter.

    Returns a dict of (B, T) tensors input_ids / attention_mask / response_mask for prompt + response (prompt left-
    padded, response right-padded: the layout every later forward pass uses), the sampler's (B, T) logprobs
    (0 off the response), the (B, R) response_ids, the decoded response texts and the (B,) bool `ended`: the
    response stopped by itself, at EOS or at one of stop_strings (sampling.StopStrings: its text then contains the
    string, the tokens up to the one that completed it are kept), rather than being cut off at max_new_tokens."""
    batch = collate_prompts([{"prompt_ids": p} for p in prompt_ids], tokenizer.pad_token_id)
    prompt, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, P)
    out = sample(model, prompt, prompt_mask, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
                 min_new_tokens=min_new_tokens, stop_strings=StopStrings(tokenizer, stop_strings) if stop_strings
                 else None, generator=generator)
    response_mask = out.response_mask.to(prompt_mask.dtype)  # (B, R)
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
             for ids, m in zip(out.response_ids, response_mask)]
    return {
        "input_ids": torch.cat([prompt, out.response_ids], 1),  # (B, T)
        "attention_mask": torch.cat([prompt_mask, response_mask], 1),  # (B, T)
        "response_mask": torch.cat([torch.zeros_like(prompt_mask), response_mask], 1),  # (B, T)
        "logprobs": torch.cat([torch.zeros_like(prompt, dtype=out.logprobs.dtype), out.logprobs], 1),  # (B, T)
        "response_ids": out.response_ids, "ended": out.ended,  # (B,): EOS or a stop string
        "texts": texts,
    }


def _response_states(model, input_ids, attention_mask, response_mask):
    """(N, H): the states that predict the N response tokens (heads.predicting_states does the shift)."""
    states = predicting_states(final_hidden(model, input_ids, attention_mask), response_mask)  # (B, T, H)
    return states[response_mask.bool()]  # (N, H)


@torch.no_grad()
def sequence_kl(model, input_ids, attention_mask, response_mask):
    """(B,) exact KL(π‖π_ref) summed over each sequence's response tokens; π = the active adapter, π_ref =
    models.reference(model), both their unfiltered softmax at temperature 1 (not the sampling distribution). Both
    trunks' states first, then the logits of heads.LOGITS_CHUNK positions at a time: never two whole (N, V) tensors."""
    states = _response_states(model, input_ids, attention_mask, response_mask)  # (N, H)
    with reference(model):
        ref_states = _response_states(model, input_ids, attention_mask, response_mask)  # (N, H)
    per_token = []
    for s, ref_s in zip(states.split(heads.LOGITS_CHUNK), ref_states.split(heads.LOGITS_CHUNK)):
        logits = lm_logits(model, s).float()  # (n, H) -> (n, V)
        with reference(model):  # the reference's LM head (an adapter may target it)
            ref_logits = lm_logits(model, ref_s).float()  # (n, V)
        per_token.append(exact_kl(logits, ref_logits))  # (n,)
    grid = to_token_grid(torch.cat(per_token), response_mask)  # (N,) -> (B, T)
    return grid[:, 1:].sum(-1)  # (B,): token 0 is never a response token (nothing predicts it), so sum tokens 1..T-1


@torch.no_grad()
def evaluate_policy(model, tokenizer, prompts, prompt_ids, *, gold_fn=None, reward_fn=None, max_new_tokens=24,
                    temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=0, stop_strings=(), batch_size=64, seed=0,
                    device="cpu"):
    """Sample one response per prompt and measure it (metrics in the module docstring).

    prompts: B message lists (for the gold score), prompt_ids: their B token-id lists. gold_fn(messages, text) ->
    float; reward_fn(batch) -> (B,) scores of a generate() batch. The sampler is seeded, so the same model gives the
    same samples (for the same batch_size: the prompts are sampled, scored and measured batch_size at a time, the
    scripts' --forward-batch-size, one batch after the other from one generator). Returns (metrics, samples) with
    samples a list of {"prompt", "response", "gold", "reward"}. temperature, top_k, top_p, min_new_tokens and
    stop_strings are generate()'s: the samples are drawn as the RL rollouts are; eval/kl stays the exact KL of the
    unfiltered distributions at temperature 1, whatever the sampler does."""
    sampler = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_new_tokens": min_new_tokens,
               "stop_strings": stop_strings}
    with eval_mode(model):
        return _evaluate(model, tokenizer, prompts, prompt_ids, gold_fn, reward_fn, max_new_tokens, sampler,
                         batch_size, seed, device)


def _evaluate(model, tokenizer, prompts, prompt_ids, gold_fn, reward_fn, max_new_tokens, sampler, batch_size, seed,
              device):
    g = torch.Generator(device=device).manual_seed(seed)
    golds, rewards, kls, lengths, ended, samples = [], [], [], [], [], []
    for i in range(0, len(prompt_ids), batch_size):
        batch = generate(model, tokenizer, prompt_ids[i:i + batch_size], max_new_tokens=max_new_tokens, **sampler,
                         generator=g, device=device)
        kls.append(sequence_kl(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]))
        lengths.append(batch["response_mask"].sum(1).float())
        ended.append(batch["ended"].float())
        gold = [gold_fn(p, t) for p, t in zip(prompts[i:i + batch_size], batch["texts"])] if gold_fn else None
        reward = reward_fn(batch).float().cpu() if reward_fn else None
        golds += gold or []
        rewards += reward.tolist() if reward is not None else []
        for j, text in enumerate(batch["texts"]):
            samples.append({"prompt": prompts[i + j][-1]["content"], "response": text,
                            "gold": gold[j] if gold else None, "reward": reward[j].item() if reward_fn else None})
    metrics = {"eval/kl": torch.cat(kls).mean().item(), "eval/length": torch.cat(lengths).mean().item(),
               "eval/eos_fraction": torch.cat(ended).mean().item()}
    if golds:
        metrics["eval/gold"] = sum(golds) / len(golds)
    if rewards:
        metrics["eval/reward"] = sum(rewards) / len(rewards)
    return metrics, samples


PASS_AT_K_SEED_OFFSET = 1  # pass@k's generator is seeded with seed + 1: its draws are not a copy of evaluate_policy's


@torch.no_grad()
def pass_at_k_evaluation(model, tokenizer, prompts, prompt_ids, *, ks, correct_fn, max_new_tokens=24,
                         temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=0, stop_strings=(), batch_size=64, seed=0,
                         device="cpu"):
    """{"eval/pass@k": mean over the B prompts of pass_at_k(n, c, k)} for every k in ks, n = max(ks).

    prompts: B distinct message lists, prompt_ids: their token ids. Each prompt is sampled n times (generate(), the
    same sampler settings as evaluate_policy, batch_size rows at a time, from one generator seeded with seed +
    PASS_AT_K_SEED_OFFSET); correct_fn(messages, text) -> bool counts its c correct responses (world.is_correct)."""
    n = max(ks)
    sampler = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_new_tokens": min_new_tokens,
               "stop_strings": stop_strings}
    g = torch.Generator(device=device).manual_seed(seed + PASS_AT_K_SEED_OFFSET)
    ids = [p for p in prompt_ids for _ in range(n)]  # B·n rows, each prompt's n contiguous
    correct = []
    with eval_mode(model):
        for i in range(0, len(ids), batch_size):
            texts = generate(model, tokenizer, ids[i:i + batch_size], max_new_tokens=max_new_tokens, **sampler,
                             generator=g, device=device)["texts"]
            correct += [bool(correct_fn(prompts[(i + j) // n], t)) for j, t in enumerate(texts)]
    c = torch.tensor(correct).view(len(prompt_ids), n).sum(1)  # (B,): correct responses per prompt
    return {f"eval/pass@{k}": pass_at_k(n, c, k).mean().item() for k in sorted(set(ks))}


def held_out_prompts(dataset, split, data_files, tokenizer, n_prompts, samples, max_prompt_length, template=None,
                     system_prompt=None):
    """(prompts, prompt_ids) for evaluate_policy: the first n_prompts prompts of `split`, each repeated `samples`
    times (more samples per prompt: less noisy gold / reward numbers). max_prompt_length None: derived from these
    prompts (tokenize.resolve_lengths); a cut is reported (tokenize.report_cuts)."""
    from .data import load_prompt_dataset
    from .data.tokenize import tokenize_prompt_dataset
    data = load_prompt_dataset(dataset, split=split, data_files=data_files)
    data = tokenize_prompt_dataset(data.select(range(min(n_prompts, len(data)))), tokenizer, max_prompt_length,
                                   template, system_prompt=system_prompt, name=f"{dataset} [{split}]")
    return ([p for p in data["prompt"] for _ in range(samples)],
            [ids for ids in data["prompt_ids"] for _ in range(samples)])


def gold_summary(before, after, before_samples, after_samples, gold_max):
    """The built-in world's verdict on a run: mean gold before / after training, the share of the headroom closed,
    (after - before) / (max - before), and the win rate: how often the response after training scores higher than
    the one before on the same prompt and sample (ties count half)."""
    g0, g1 = before["eval/gold"], after["eval/gold"]
    wins = [(a["gold"] > b["gold"]) + 0.5 * (a["gold"] == b["gold"]) for a, b in zip(after_samples, before_samples)]
    return {"eval/gold_before": g0, "eval/gold_after": g1, "eval/gold_max": gold_max,
            "eval/headroom_closed": (g1 - g0) / (gold_max - g0) if g0 < gold_max else float("nan"),
            "eval/win_rate": sum(wins) / len(wins)}


def show_samples(samples, title, n=6, every=1):
    """Print n samples (every `every`-th: one per prompt when each prompt was sampled `every` times)."""
    print(title)
    for s in samples[:n * every:every]:
        scores = [f"reward {s['reward']:+.2f}"] if s["reward"] is not None else []
        scores += [f"gold {s['gold']:.1f}"] if s["gold"] is not None else []
        print(f"  {s['prompt']!r:45} -> {s['response']!r}" + (f"  ({', '.join(scores)})" if scores else ""))


def save_samples(out, before_samples, after_samples):
    """DIR/samples.json: every held-out sample of the evaluations before and after training (prompt, response, gold,
    reward), in the same order, to read side by side."""
    atomic_write_json(os.path.join(out, "samples.json"), {"before": before_samples, "after": after_samples})


def before_training(evaluate):
    """evaluate() -> (metrics, samples), with the metrics printed as the evaluation before training (scripts call it
    through run.once, so a resumed run reads it back instead)."""
    metrics, samples = evaluate()
    print(" | ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + "   (before training)")
    return metrics, samples
