"""The roles of an RL run on ONE frozen base (as in the multi-adapter PPO setup: a 4-bit Llama whose adapters serve
every role): the policy is a LoRA adapter "policy" (trainable), the reward model a second adapter "reward" + its head
(frozen), or the built-in world's gold score, and the reference the base with every adapter disabled
(models.reference).

    tokenizer, model, params = load_policy(args)   # the one frozen base and the policy adapter on it (B = 0)
    reward = Reward(model, args)                   # the reward adapter + head, or the gold score; reward(batch): (B,)
    print(roles(model, reward, args, world_size))  # which role is what, and the batch sizes
"""
import torch

from .data import world
from .data.tokenize import require_pad_token
from .heads import RatingHead, in_row_chunks, sequence_scores
from .lora import adapter_names, use_adapter
from .models import load_model, load_reward_model, load_tokenizer, parameter_report
from .reward_losses import expected_rating, rating_entropy
from .token_rewards import missing_eos_penalty
from .training import make_trainable


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
    reward_entropy_coef x its entropy) or, with --reward gold, the built-in world's gold score (a verifiable reward)."""

    def __init__(self, model, args):
        self.model, self.gold_only = model, args.reward == "gold"
        self.transform, self.entropy_coef = args.reward_transform, args.reward_entropy_coef
        self.forward_batch_size = args.forward_batch_size  # rows per reward-model pass
        self.missing_eos_penalty = getattr(args, "missing_eos_penalty", None)
        self.gold = world.gold_score if args.dataset == "builtin" else None
        self.head = None
        if not self.gold_only:
            _, self.head = load_reward_model(model, args.reward_model)  # adapter "reward"; "policy" stays active
            self.head.requires_grad_(False)
        self.describe = (f"{type(self.head).__name__} from {args.reward_model}" if self.head is not None
                         else "gold reward")

    def __call__(self, batch):
        """(B,) rewards of a sample_rollout batch: the score, minus --missing-eos-penalty for a response cut off
        before its EOS (TRL's missing_eos_penalty)."""
        scores = self.score(batch)
        if self.missing_eos_penalty is not None:
            scores = missing_eos_penalty(scores, batch["ended"], self.missing_eos_penalty)
        return scores

    @torch.no_grad()
    def score(self, batch):
        """(B,) scores of a sample_rollout / evaluation.generate batch (--forward-batch-size rows per pass)."""
        if self.gold_only:
            return torch.tensor([self.gold(p, t) for p, t in zip(batch["prompts"], batch["texts"])],
                                device=batch["input_ids"].device)
        ids, attention = batch["input_ids"], batch["attention_mask"]  # (B, T)
        with use_adapter(self.model, "reward"):
            out = in_row_chunks(lambda rows: sequence_scores(self.model, self.head, ids[rows], attention[rows]),
                                len(ids), self.forward_batch_size)  # (B,) / (B, K)
        if not isinstance(self.head, RatingHead):
            return out
        rating = expected_rating(out)  # (B, K) -> (B,)
        if self.transform == "expected-minus-entropy":  # an unsure reward model's score counts less
            rating = rating - self.entropy_coef * rating_entropy(out)
        return rating
