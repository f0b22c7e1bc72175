"""The roles of an RL run on ONE frozen base (as in the multi-adapter PPO setup: a 4-bit Llama whose adapters serve
every role): the policy is a LoRA adapter "policy" (trainable), the reward model a second adapter "reward" + its head
(frozen), or the built-in world's gold score, and the reference the base with every adapter disabled
(models.reference).

    tokenizer, model, params = load_policy(args)   # the one frozen base and the policy adapter on it (B = 0)
    reward = Reward(model, args)                   # the reward adapter(s) + head(s), or gold; reward(batch): (B,)
    print(roles(model, reward, args, world_size))  # which role is what, and the batch sizes
"""
import torch

from .data import load_preference_dataset, world
from .data.tokenize import pair_batches, require_pad_token, tokenize_preference_dataset
from .errors import InputError
from .heads import RatingHead, in_row_chunks, sequence_scores
from .lora import adapter_names, use_adapter
from .models import load_model, load_reward_model, load_tokenizer, parameter_report
from .reward_ensemble import combine, ensemble_std, normalize_members, reference_statistics
from .reward_losses import expected_rating, rating_entropy
from .sampling import eval_mode
from .token_rewards import missing_eos_penalty
from .training import make_trainable

REFERENCE_PAIRS = 512  # --reward-ensemble-normalize's reference set: the first this many training pairs of the world


def load_policy(args):
    """The tokenizer (with a pad token distinct from EOS), the one frozen base every role shares, and on it the policy:
    a fresh LoRA adapter "policy" (B = 0, so the policy starts AS the base: the reference). Returns (tokenizer,
    model, the policy's trainable parameters)."""
    tokenizer = load_tokenizer(args.model)
    require_pad_token(tokenizer)
    model = load_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                       tokenizer=tokenizer, gradient_checkpointing=args.gradient_checkpointing)
    params = make_trainable(model, "policy", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                            lora_targets=args.lora_targets)
    return tokenizer, model, params


def roles(model, reward, args, world_size):
    """What the run is: the parameter report, which role is what on the one base, and the batch sizes."""
    groups = f" in groups of {args.group_size}" if hasattr(args, "group_size") else ""
    return (f"{parameter_report(model)}\nroles on one base: {', '.join(adapter_names(model))} adapter(s); reward = "
            f"{reward.describe}; reference = the base with adapters disabled\n{args.iterations} iterations of "
            f"{args.rollout_size * world_size} responses ({world_size} process(es) x {args.rollout_size}){groups}, "
            f"minibatches of {args.minibatch_size} per process")


class Reward:
    """The reward of a prompt + response: the reward model of --reward-model (its LoRA adapter "reward" and head on
    the shared base, frozen; read at the last real token; a rating head gives E[rating], optionally minus
    reward_entropy_coef x its entropy) or, with --reward gold, the built-in world's gold score (a verifiable reward).
    Several --reward-model folders are an ensemble on the same base (adapters "reward", "reward1", ...): each member
    scores every response and --reward-ensemble combines the scores (reward_ensemble.combine); one folder is its own
    score, exactly. With --reward-ensemble-normalize each member's scores are first standardised by its mean and std
    over a fixed reference set (reference_statistics; needs the tokenizer) and put on the members' average offset and
    scale (reward_ensemble.normalize_members)."""

    def __init__(self, model, args, tokenizer=None):
        self.model, self.gold_only = model, args.reward == "gold"
        self.transform, self.entropy_coef = args.reward_transform, args.reward_entropy_coef
        self.ensemble, self.ensemble_lambda = args.reward_ensemble, args.reward_ensemble_lambda
        self.forward_batch_size = args.forward_batch_size  # rows per reward-model pass
        self.missing_eos_penalty = getattr(args, "missing_eos_penalty", None)
        self.gold = world.gold_score if args.dataset == "builtin" else None
        self.members = []  # (adapter name, head): the first is "reward", as with one reward model
        if not self.gold_only:
            for i, path in enumerate(args.reward_model):  # "policy" stays the active adapter
                adapter, head = load_reward_model(model, path, adapter="reward" if i == 0 else f"reward{i}")
                self.members.append((adapter, head.requires_grad_(False)))
        self.heads = [head for _, head in self.members]  # frozen: checked unchanged at the end of the run
        self.std = None  # the last rollout's mean ensemble std (metrics(); an ensemble only)
        self.reference = None  # --reward-ensemble-normalize: each member's (mean (M,), std (M,)) over the reference
        if getattr(args, "reward_ensemble_normalize", False) and not self.gold_only:
            self.reference = self.reference_statistics(tokenizer, args)
        if self.gold_only:
            self.describe = "gold reward"
        else:
            self.describe = f"{type(self.heads[0]).__name__} from {', '.join(args.reward_model)}"
            if len(self.members) > 1:
                self.describe = f"{self.ensemble} of {len(self.members)}: {self.describe}"
            if self.reference is not None:
                self.describe += "; normalised (reference mean, std: " + ", ".join(
                    f"{m:+.3f}, {s:.3f}" for m, s in zip(*self.reference)) + ")"

    def __call__(self, batch):
        """(B,) rewards of a sample_rollout batch: the score, minus --missing-eos-penalty for a response cut off
        before its EOS (TRL's missing_eos_penalty). Notes the members' disagreement for metrics()."""
        members = self.member_scores(batch)  # (M, B)
        if len(members) > 1:
            self.std = ensemble_std(members).mean().item()
        scores = combine(members, self.ensemble, self.ensemble_lambda)  # (B,); one member: its scores
        if self.missing_eos_penalty is not None:
            scores = missing_eos_penalty(scores, batch["ended"], self.missing_eos_penalty)
        return scores

    def metrics(self):
        """What an iteration logs about the reward: objective/ensemble_std, the members' population std averaged
        over the last rollout (their disagreement: it grows as the policy finds what only some members like);
        nothing for one reward model or gold."""
        return {} if self.std is None else {"objective/ensemble_std": self.std}

    def score(self, batch):
        """(B,) scores of a sample_rollout / evaluation.generate batch: the members' scores combined."""
        return combine(self.member_scores(batch), self.ensemble, self.ensemble_lambda)

    @torch.no_grad()
    def member_scores(self, batch):
        """(M, B) scores of a batch by each of the M reward models (--forward-batch-size rows per pass); (1, B) gold
        scores with --reward gold. With --reward-ensemble-normalize each member's row is standardised
        and put on the members' average offset and scale (reward_ensemble.normalize_members)."""
        if self.gold_only:
            return torch.tensor([[self.gold(p, t) for p, t in zip(batch["prompts"], batch["texts"])]],
                                device=batch["input_ids"].device)
        scores = torch.stack([self.member_score(adapter, head, batch) for adapter, head in self.members])  # (M, B)
        return scores if self.reference is None else normalize_members(scores, *self.reference)

    @torch.no_grad()
    def reference_statistics(self, tokenizer, args):
        """Each member's mean and population std (float64, (M,) each) over the FIXED reference set: the chosen and
        the rejected responses of the first REFERENCE_PAIRS preference pairs of the built-in world's training split
        (what the members were trained on; over these 1024 responses the three frontier members' means and stds
        came within 0.06 of those over all 6000, which take ~15 s per member to score on one CPU thread, these ~2 s),
        formatted as the run formats its prompts (--template, --system-prompt), scored --forward-batch-size pairs at
        a time. The same set for every member and every run: the statistics are a property of the reward model, not
        of the policy."""
        rows = load_preference_dataset("builtin", split="train")
        rows = rows.select(range(min(REFERENCE_PAIRS, len(rows))))
        pairs = tokenize_preference_dataset(rows, tokenizer, template=args.template, system_prompt=args.system_prompt,
                                            name="the reference set (--dataset builtin [train])")
        pairs = pairs.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        pad_id, device, scores = require_pad_token(tokenizer), next(self.model.parameters()).device, []
        with eval_mode(self.model):
            for batch in pair_batches(pairs, pad_id, self.forward_batch_size):  # (2b, T): b chosen rows, b rejected
                batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
                scores.append(torch.stack([self.member_score(adapter, head, batch) for adapter, head in self.members]))
        mean, std = reference_statistics(torch.cat(scores, dim=1))  # (M, 2N) -> (M,), (M,)
        flat = [path for path, s in zip(args.reward_model, std.tolist()) if not s > 0]  # constant (or NaN) scores
        if flat:
            raise InputError(f"--reward-ensemble-normalize: {flat[0]!r} gives every response of the reference set "
                             "the same score (std 0): it cannot be standardised")
        return mean, std

    def member_score(self, adapter, head, batch):
        """(B,) one reward model's scores: its head at the last real token; E[rating] for a rating head."""
        ids, attention = batch["input_ids"], batch["attention_mask"]  # (B, T)
        with use_adapter(self.model, adapter):
            out = in_row_chunks(lambda rows: sequence_scores(self.model, head, ids[rows], attention[rows]),
                                len(ids), self.forward_batch_size)  # (B,) / (B, K)
        if not isinstance(head, RatingHead):
            return out
        rating = expected_rating(out)  # (B, K) -> (B,)
        if self.transform == "expected-minus-entropy":  # an unsure reward model's score counts less
            rating = rating - self.entropy_coef * rating_entropy(out)
        return rating
