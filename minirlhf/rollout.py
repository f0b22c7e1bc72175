"""The algorithm-free steps of an RL iteration, shared by train_ppo.py, train_grpo.py, train_reinforce.py,
train_online_dpo.py and train_distill.py: the prompts, the loop's start (start_rl_run), the rollout (sampling), the
log-prob passes over it and the minibatches of the update. (The roles on the one base, policy / reward / reference, are roles.py; the
evaluation, logging and the end of a run, report.py.)

Legend: B responses, P prompt columns (left-padded), R response columns (right-padded), T = P + R, H hidden size.

    sampling = SamplingSettings.from_args(args, tokenizer.eos_token_id)   # --temperature, --top-k, --top-p, ...
    generator, before = start_rl_run(run, args, model, reward, train_prompts, held_out, optimizer, scaler)  # resume
    batch = sample_rollout(model, tokenizer, train_prompts.take(k), args, generator)   # prompts -> responses
    old_logprobs, values = rollout_logprobs(model, batch, sampling, args.forward_batch_size, value_head)
    old_logprobs, tis, update_mask, mismatch = old_logprobs_and_corrections(model, batch, sampling, args, old_logprobs)
    ref_logprobs = reference_logprobs(model, batch, args.temperature, args.forward_batch_size)   # (B, R) each
    for mb in minibatches(B, args.minibatch_size):     # the update: one optimizer step per minibatch, computed in
        for mu in mb.split(micro_batch_rows(args)):    # micro-batches of rows, with a backward each
            logprobs, entropy, values = policy_logprobs(model, batch, sampling, mu, value_head)  # (b, R)
        stats.append(add_up(micro_batch_stats))        # the minibatch's statistics: sums over its micro-batches
Every pass over a rollout runs on at most --forward-batch-size rows (sampling, scoring, log-probs; the update's
micro-batches: --micro-batch-size, by default the same): its memory is bounded by the flag, not by --rollout-size.
The policy's log-probs (old and new) are those of the distribution the rollout was sampled from (`sampling`: the
temperature and the top-k / top-p / min-new-tokens filter, heads.py); the reference's are its unfiltered softmax at
the same temperature: KL(π_sampled ‖ π_ref) is what the penalty means (docs/negative_kl.md).
The per-token reward bookkeeping (KL penalty, score on the last token, whitening) is math: token_rewards.py.
"""
import functools
import operator

import torch
import torch.nn.functional as F

from .data import describe_source, load_prompt_dataset
from .data.tokenize import tokenize_prompt_dataset
from .errors import InputError
from .evaluation import before_training, generate
from .heads import in_row_chunks, response_logprobs, response_logprobs_and_states
from .mismatch import rollout_correction
from .models import reference
from .sampling import as_settings
from .training import EpochOrder
from .validation import warn


class TrainPrompts:
    """The training prompts of --split and this process's position in them (training.EpochOrder: sharded over
    processes, reshuffled every epoch; state_dict() for checkpoints). take(k, repeat) -> (messages, token ids) of
    the next k prompts, each `repeat` times in a row (GRPO's groups). Fewer prompts than a rollout takes: the rollout
    cycles through them (every prompt once before any twice), with one warning line; a rollout is always whole, so
    the samples counted in summary.json are the samples drawn. Fewer prompts than processes is one InputError line."""

    def __init__(self, args, tokenizer, dist):
        self.source = describe_source(args.dataset, args.split, args.data_files)
        data = tokenize_prompt_dataset(load_prompt_dataset(args.dataset, split=args.split, data_files=args.data_files),
                                       tokenizer, args.max_prompt_length, args.template,
                                       system_prompt=args.system_prompt, name=f"{args.dataset} [{args.split}]")
        self.messages, self.ids = data["prompt"], data["prompt_ids"]
        if len(self.ids) < dist.world_size:
            raise InputError(f"{self.source}: {len(self.ids)} prompt(s) for {dist.world_size} processes, which shard "
                             "the prompts: each needs at least one; give more prompts or run fewer processes")
        self.order = EpochOrder(len(self.ids), args.seed, dist.rank, dist.world_size)
        per_rollout = args.rollout_size // (getattr(args, "group_size", None) or getattr(args, "samples_per_prompt", 1))
        if per_rollout > self.order.epoch_length():
            warn(f"{self.source}: {len(self.ids)} prompt(s), fewer than the {per_rollout} a rollout takes"
                 + (" per process" if dist.world_size > 1 else "")
                 + ": every rollout cycles through them (each prompt once before any twice)")

    def take(self, k, repeat=1):
        idx = [i for i in self.order.take(k) for _ in range(repeat)]
        return [self.messages[i] for i in idx], [self.ids[i] for i in idx]

    def state_dict(self):
        return self.order.state_dict()

    def load_state_dict(self, state):
        self.order.load_state_dict(state)


def start_rl_run(run, args, model, reward, prompts, held_out, optimizer, scaler, heads=None, **state):
    """The RL scripts' start, once their prompts, held-out evaluation, optimizer and loss scaler exist: the rollout
    sampler's generator (seeded seed·1000 + rank: every process draws its own samples), run.start with all a resume
    restores (the policy, the trained `heads`, the reward's frozen heads, the optimizer, the prompts' order, the
    generator, the scaler, and each of `state` that is not None: a KL controller, a baseline), then the evaluation
    before training (a resumed run reads it back). Returns (generator, (metrics, samples) of that evaluation)."""
    generator = torch.Generator(device=run.device).manual_seed(args.seed * 1000 + run.dist.rank)
    run.start(args.iterations, model=model, heads=heads, frozen=reward.heads, optimizer=optimizer,
              samples_per_step=args.rollout_size * run.dist.world_size,
              state={"prompts": prompts, "generator": generator, "scaler": scaler,
                     **{name: v for name, v in state.items() if v is not None}})
    return generator, run.once("before", lambda: before_training(held_out), default=({}, []))


def sample_rollout(model, tokenizer, prompts, args, generator):
    """One response per prompt from the active adapter (the policy), at --temperature with --top-k, --top-p,
    --min-new-tokens and --stop-strings; prompts = (messages, token ids). The evaluation.generate dict, on the
    generator's device, plus "prompts" (the messages), "P" (prompt columns) and "mask" (B, R): True on response
    tokens.
    Sampled --forward-batch-size prompts at a time (merge_generated joins the chunks). The chunks draw from the
    generator one after the other, so a chunked rollout samples other (equally likely) responses than one pass over
    all prompts would: the samples depend on the flag, their distribution does not."""
    (messages, prompt_ids), device = prompts, generator.device
    size = args.forward_batch_size
    batch = merge_generated([generate(model, tokenizer, prompt_ids[i:i + size], max_new_tokens=args.max_new_tokens,
                                      **sampler_kwargs(args), generator=generator, device=device)
                             for i in range(0, len(prompt_ids), size)], tokenizer.pad_token_id)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    P = batch["input_ids"].shape[1] - batch["response_ids"].shape[1]  # prompt columns (left-padded)
    return {**batch, "prompts": messages, "P": P, "mask": batch["response_mask"][:, P:].bool()}  # mask: (B, R)


def sampler_kwargs(args):
    """generate()'s sampling keywords from a script's Args: the rollouts and the held-out evaluation sample alike."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "min_new_tokens": args.min_new_tokens, "stop_strings": tuple(args.stop_strings or ())}


def merge_generated(parts, pad_token_id):
    """One evaluation.generate batch from chunks of rows sampled separately, in their order. Each chunk has its own
    prompt width P_c and response width R_c; its rows are padded on the left to the widest prompt and on the right to
    the longest response: the layout of one generate call (prompts left-padded, responses right-padded), padding
    being pad_token_id in the token ids and 0 in the masks and log-probs."""
    if len(parts) == 1:
        return parts[0]
    R = max(part["response_ids"].shape[1] for part in parts)
    P = max(part["input_ids"].shape[1] - part["response_ids"].shape[1] for part in parts)

    def widen(part, key, value):  # (b, P_c + R_c) -> (b, P + R): pad the prompt's left and the response's right
        R_c = part["response_ids"].shape[1]
        return F.pad(part[key], (P - (part[key].shape[1] - R_c), R - R_c), value=value)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "response_mask": 0, "logprobs": 0.0}  # (B, T) each
    return {**{key: torch.cat([widen(part, key, value) for part in parts]) for key, value in pads.items()},
            "response_ids": torch.cat([F.pad(part["response_ids"], (0, R - part["response_ids"].shape[1]),
                                             value=pad_token_id) for part in parts]),  # (B, R)
            "ended": torch.cat([part["ended"] for part in parts]),  # (B,)
            "texts": [text for part in parts for text in part["texts"]]}


def rollout_rows(batch, rows):
    """The rows `rows` (a 1-D index tensor) of a sample_rollout batch, as a sample_rollout batch of its own; its
    columns are kept as they are (a column may then be padding in every row)."""
    picked = {k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return {**batch, **picked, **{k: [batch[k][i] for i in rows.tolist()] for k in ("texts", "prompts")}}


def join_rollouts(parts, pad_token_id):
    """One sample_rollout batch from several, their rows in order, re-padded to the widest prompt and the longest
    response (merge_generated); "P" and "mask" recomputed for the joined columns."""
    batch = merge_generated([{k: part[k] for k in GENERATED} for part in parts], pad_token_id)
    P = batch["input_ids"].shape[1] - batch["response_ids"].shape[1]
    return {**batch, "prompts": [m for part in parts for m in part["prompts"]], "P": P,
            "mask": batch["response_mask"][:, P:].bool()}


GENERATED = ("input_ids", "attention_mask", "response_mask", "logprobs", "response_ids", "ended", "texts")  # generate's


def policy_logprobs(model, batch, sampling, rows=slice(None), value_head=None):
    """The policy's log-probs of the sampled tokens and their entropies, (b, R) each, for the rows `rows` of a
    rollout (all by default), and with a value head the values V(s_t) of the states that predict them, (b, R) (None
    without one). With grad when called with grad (the update's micro-batches); rollout_logprobs is the pass without
    grad. sampling: the sampling.SamplingSettings the rollout was drawn with (or a plain temperature): the log-probs
    are under that filtered distribution, recomputed from this policy's logits (where it gives a sampled token
    probability 0, the rule of heads._chunk_logprobs)."""
    logprobs, entropy, states = response_logprobs_and_states(
        model, batch["input_ids"][rows], batch["attention_mask"][rows], batch["response_mask"][rows], sampling)
    P = batch["P"]
    values = value_head(states)[:, P:] if value_head is not None else None  # (b, T, H) -> (b, R)
    return logprobs[:, P:], entropy[:, P:], values  # (b, T) -> (b, R)


@torch.no_grad()
def rollout_logprobs(model, batch, sampling, forward_batch_size, value_head=None):
    """The log-probs of the sampled tokens under the policy that sampled them (the update's old log-probs), (B, R),
    and with a value head its values, (B, R) (else None): policy_logprobs without grad, forward_batch_size rows at a
    time (only the values are kept of the (b, T, H) states a value head reads). Under `sampling`'s filter they are
    the sampler's own log-probs, recomputed (tests/test_sampling_flags.py: equal to 1e-5)."""
    logprobs, _, values = in_row_chunks(
        lambda rows: policy_logprobs(model, batch, sampling, rows, value_head), len(batch["input_ids"]),
        forward_batch_size)
    return logprobs, values


def old_logprobs_and_corrections(model, batch, sampling, args, trainer_logprobs=None):
    """The update's old log-probs and what corrects the sampler / trainer mismatch (mismatch.py, docs/kl.md "The
    sampler is not the trainer"): (old log-probs (B, R), TIS weights (B, R) or None, the update's mask (B, R),
    mismatch metrics or None). batch["logprobs"] holds the sampler's log-probs; trainer_logprobs the trainer's
    (rollout_logprobs) when the script computes them anyway (PPO: they are its old log-probs).
    Without them (GRPO, REINFORCE) and with neither --tis-cap nor --mismatch-mask-threshold, the old log-probs are the
    sampler's, with no second pass, the weights None, the mask batch["mask"], and the metrics None: the script then
    measures the mismatch on its update's first minibatch, whose log-probs are the trainer's before any step. With
    either flag the trainer's are computed here (one pass without grad), and they are the old log-probs, also in the
    KL to the reference (computed by the trainer: against the sampler's log-probs, the mismatch would read as KL)."""
    sampler_logprobs, mask = batch["logprobs"][:, batch["P"]:], batch["mask"]  # (B, T) -> (B, R)
    correcting = args.tis_cap is not None or args.mismatch_mask_threshold is not None
    if trainer_logprobs is None:
        if not correcting:
            return sampler_logprobs, None, mask, None
        trainer_logprobs, _ = rollout_logprobs(model, batch, sampling, args.forward_batch_size)
    weights, loss_mask, metrics = rollout_correction(sampler_logprobs, trainer_logprobs, mask, args.tis_cap,
                                                     args.mismatch_mask_threshold)
    return trainer_logprobs, weights, loss_mask, metrics


@torch.no_grad()
def reference_logprobs(model, batch, temperature, forward_batch_size):
    """(B, R) log-probs of the sampled tokens under the reference: the base with every adapter disabled;
    forward_batch_size rows at a time. Its UNFILTERED softmax at the sampling temperature (given a SamplingSettings,
    only its temperature is used): the KL penalty compares the distribution the policy samples from with the
    reference itself, not with a filtered reference."""
    temperature = as_settings(temperature).temperature
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]  # (B, T)
    with reference(model):
        logprobs = in_row_chunks(lambda rows: response_logprobs(model, ids[rows], attention[rows], mask[rows],
                                                                temperature=temperature),
                                 len(ids), forward_batch_size)  # (B, T)
    return logprobs[:, batch["P"]:]


def add_up(parts):
    """{name: the sum over parts} of a list of dicts of scalar tensors: the statistics of a minibatch from those of
    its micro-batches (each a sum over its rows / the minibatch's count, so the sums are the minibatch's means)."""
    return {k: functools.reduce(operator.add, [part[k] for part in parts]) for k in parts[0]}


def micro_batch_rows(args):
    """Rows per forward + backward of the update: --micro-batch-size, or --forward-batch-size when it is not given."""
    return args.micro_batch_size or args.forward_batch_size


def minibatches(batch_size, minibatch_size, generator=None, group_size=1):
    """Shuffled index tensors covering range(batch_size) once, each of minibatch_size (the last may be smaller).

    group_size > 1 (--group-minibatches): the rollout is groups of group_size consecutive rows (one prompt each, as
    sample_rollout lays out a prompt sampled G times) and the GROUPS are shuffled, not the rows: a minibatch holds
    whole groups, in order, so its rows share few prompts, and the packed forward (fast/unpad.py) computes each of
    them once instead of once per row. Every row is still in exactly one minibatch per epoch."""
    if not 1 <= minibatch_size <= batch_size:
        raise ValueError(f"minibatch size must lie in [1, {batch_size}], got {minibatch_size}")
    if group_size == 1:
        order = torch.randperm(batch_size, generator=generator)
    else:
        if batch_size % group_size:
            raise ValueError(f"a rollout of {batch_size} rows is not made of groups of {group_size}")
        groups = torch.randperm(batch_size // group_size, generator=generator)  # (B / G,)
        order = (groups[:, None] * group_size + torch.arange(group_size)).flatten()  # (B,) each group's rows together
    return list(order.split(minibatch_size))


