"""Every numeric setting has a stated range, checked before anything is loaded, with one line naming the flag.

Each settings group declares its fields' ranges beside them (settings.py's RANGES), and a script its own in a small
table, read like the math:

    RANGES = {"lr": "> 0", "lora_dropout": "[0, 1)", "max_steps": "-1 or >= 1", "target_kl": "none or > 0"}
    check_ranges(args, RANGES)   # InputError: "--lora-dropout must lie in [0, 1), got -1.0"

A spec is one of  "> a", ">= a", "< b", "<= b", "[a, b]", "[a, b)", "(a, b]", "(a, b)", optionally preceded by
"V or " for values allowed besides the range ("-1 or >= 1": -1 is a sentinel; "none or > 0": the flag may be none).
Every float must also be finite: NaN and inf are refused whatever the range (NaN compares False with everything, so
a check written `if args.grad_clip <= 0: error` lets `--grad-clip nan` through, and inf passes every lower bound).
COMMON_RANGES holds the few that no settings group declares.
"""
import math
import os
import re
import sys

from .errors import InputError

COMMON_RANGES = {"weight_decay": ">= 0", "warmup_steps": ">= 0", "log_every": ">= 1"}  # the rest is declared with its flag (settings.py's RANGES)

_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")
_BOUND = re.compile(r"^(>=|<=|>|<)\s*(\S+)$")


def _in_range(value, spec):
    """True if value satisfies the range part of a spec (no "or")."""
    if m := _INTERVAL.match(spec):
        lo, hi = float(m[2]), float(m[3])
        return (lo <= value if m[1] == "[" else lo < value) and (value <= hi if m[4] == "]" else value < hi)
    if m := _BOUND.match(spec):
        bound = float(m[2])
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[m[1]]
    raise ValueError(f"bad range spec {spec!r}")  # a bug in a script's table, not user input


def check_value(flag, value, spec):
    """Raise InputError unless `value` (of flag `flag`, e.g. "--lr") satisfies `spec`."""
    *extras, interval = [s.strip() for s in spec.split(" or ")]
    if any((value is None) if e == "none" else (value is not None and value == float(e)) for e in extras):
        return
    if value is None:
        raise InputError(f"{flag} must be {spec.replace('none or ', '')}, got none")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number ({spec}), got {value}")
    if not _in_range(value, interval):
        words = f"lie in {interval}" if interval[0] in "[(" else f"be {interval}"
        raise InputError(f"{flag} must {words}" + (f" (or {', '.join(extras)})" if extras else "") + f", got {value}")


def check_ranges(args, ranges):
    """Check every field of `args` named in a range table: COMMON_RANGES, then the RANGES of each settings class
    `args` is made of (settings.py), then the script's own `ranges`; a later table wins."""
    table = dict(COMMON_RANGES)
    for klass in reversed(type(args).__mro__):
        table.update(klass.__dict__.get("RANGES", {}))
    table.update(ranges)
    for name, spec in table.items():
        if hasattr(args, name):
            check_value("--" + name.replace("_", "-"), getattr(args, name), spec)


def check_choice(flag, value, allowed):
    """Raise InputError unless value is one of `allowed`."""
    if value not in allowed:
        raise InputError(f"{flag} must be one of {tuple(allowed)}, got {value!r}")


def check_common(args, ranges, datasets="preference"):
    """The checks every script shares, on whichever of these fields `args` has: the numeric ranges (COMMON_RANGES +
    the script's `ranges`), the choices (quantization, dtype, template, dataset, splits), --pass-k and the device.
    Cheap: runs before any model or data is loaded. `datasets`: "preference" or "prompt", the kind of --dataset the
    script reads."""
    from .data.loading import KNOWN_PREFERENCE_DATASETS, KNOWN_PROMPT_DATASETS, SPLITS
    from .data.templates import TEMPLATES
    from .devices import get_device
    from .hub import check_model_source
    from .precision import DTYPES
    from .quantization import QUANTIZATIONS
    check_ranges(args, ranges)
    known = KNOWN_PREFERENCE_DATASETS if datasets == "preference" else KNOWN_PROMPT_DATASETS
    if hasattr(args, "dataset") and args.dataset not in known:
        raise InputError(f"--dataset {args.dataset!r} is unknown; known: {', '.join(known)}")
    for name, allowed in (("quantization", QUANTIZATIONS), ("dtype", ("auto", *DTYPES)),
                          ("split", tuple(SPLITS)), ("eval_split", tuple(SPLITS))):
        if hasattr(args, name):
            check_choice("--" + name.replace("_", "-"), getattr(args, name), allowed)
    if getattr(args, "system_prompt", None) is not None and not args.system_prompt.strip():
        raise InputError("--system-prompt is empty: give the text of the system message, or leave the flag out")
    if getattr(args, "template", None) is not None:
        check_choice("--template", args.template, tuple(TEMPLATES))
    if getattr(args, "dataset", None) == "builtin" and getattr(args, "data_files", None):
        raise InputError("--data-files: the builtin data set is generated in code and reads no files")
    if getattr(args, "full_finetune", False) and getattr(args, "quantization", "none") != "none":
        raise InputError(f"--full-finetune trains every weight in float32, which a --quantization {args.quantization} "
                         "base cannot: pass --quantization none, or leave --full-finetune out to train a LoRA adapter")
    if hasattr(args, "pass_k"):
        check_pass_k(args)
    if hasattr(args, "device"):
        get_device(args.device)  # InputError for an unknown device or CUDA asked for where there is none
    if getattr(args, "model", None) and not getattr(args, "init_config", None):
        check_model_source(args.model)  # a local folder with config.json + weights, or a Hub id (no network here)
        check_lora_targets(args)


def check_pass_k(args):
    """--pass-k: every k >= 1, and only on the built-in world (correctness is its gold judge's: world.is_correct)."""
    if not args.pass_k:
        return
    if any(k < 1 for k in args.pass_k):
        raise InputError(f"--pass-k must be integers >= 1, got {' '.join(map(str, args.pass_k))}")
    if args.dataset != "builtin":
        raise InputError(f"--pass-k counts correct answers, which only the built-in world can judge: it needs "
                         f"--dataset builtin, got {args.dataset}")


def check_lora_targets(args):
    """--lora-targets against the module names of --model's meta-device skeleton (hub.model_skeleton: built from
    its config.json, nothing loaded): every target must match a linear module. Skipped where nothing trains a fresh
    adapter (--full-finetune, DPO's --sft-adapter, --eval-only) or the config is not on this machine yet (training.make_trainable
    checks the real model then)."""
    from .lora import targets_problem
    from .hub import model_skeleton
    targets = list(getattr(args, "lora_targets", None) or [])
    if not targets or any(getattr(args, name, None) for name in ("full_finetune", "sft_adapter", "eval_only")):
        return
    skeleton = model_skeleton(args.model)
    problem = skeleton is not None and targets_problem(
        skeleton, "all-linear" if targets == ["all-linear"] else targets, f"--model {args.model}")
    if problem:
        raise InputError(f"--lora-targets {problem}")


SAMPLING_RANGES = {"top_k": ">= 0", "top_p": "(0, 1]", "min_new_tokens": ">= 0"}
# the sampler / trainer mismatch's corrections (mismatch.py): a cap below 1 would shrink every token's weight
MISMATCH_RANGES = {"tis_cap": "none or >= 1", "mismatch_mask_threshold": "none or > 0"}


def check_sampling(args):
    """The sampling flags (train_ppo.py, train_grpo.py, train_reinforce.py, and train_dpo.py's evaluation): --top-k,
    --top-p, --min-new-tokens in [0, --max-new-tokens], --stop-strings non-empty texts."""
    for name, spec in SAMPLING_RANGES.items():
        check_value("--" + name.replace("_", "-"), getattr(args, name), spec)
    if args.min_new_tokens > args.max_new_tokens:
        raise InputError(f"--min-new-tokens must lie in [0, --max-new-tokens {args.max_new_tokens}], got "
                         f"{args.min_new_tokens}")
    if any(not text for text in args.stop_strings or ()):
        raise InputError(f"--stop-strings must be non-empty texts, got {list(args.stop_strings)!r}")


# What --kl-estimator's gradient is in the reward (docs/kl.md, "Where the estimate goes decides its gradient";
# tests/test_kl_gradients.py): k1's is grad KL(pi || pi_ref), the others' are not.
REWARD_KL_GRADIENTS = {
    "k2": "∇E_π[k2] − ∇KL(π‖π_ref), biased and vanishing to first order near π_ref",
    "k3": "∇KL(π‖π_ref) − ∇KL(π_ref‖π), vanishing to first order near π_ref and partly of the wrong sign",
}


def kl_estimator_warning(estimator):
    """The one warning line for a --kl-estimator put in the reward whose gradient is not the KL's, or None (k1)."""
    if estimator not in REWARD_KL_GRADIENTS:
        return None
    return (f"--kl-estimator {estimator} in the reward: its gradient is {REWARD_KL_GRADIENTS[estimator]}, not the "
            f"KL's (docs/kl.md); k1 is the correct choice")


def warn(line):
    """One line `script.py: warning: ...` on stderr, from the first process only (torchrun's RANK 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{os.path.basename(sys.argv[0])}: warning: {line}", file=sys.stderr)


def filter_flags(args):
    """The sampling flags that make the sampled distribution differ from π, as typed: "--top-k 5 --min-new-tokens 8";
    "" when none is set (--temperature is no such flag: the reference's log-probs are taken at it too)."""
    flags = [(args.top_k, args.top_k > 0, "--top-k"), (args.top_p, args.top_p < 1, "--top-p"),
             (args.min_new_tokens, args.min_new_tokens > 0, "--min-new-tokens")]
    return " ".join(f"{flag} {value}" for value, on, flag in flags if on)


def check_kl_floor(args, measured_kl):
    """--target-kl against the floor the sampling filters put under the KL. With --top-k / --top-p /
    --min-new-tokens the rollout is drawn from the filtered q, not π, and the KL the adaptive controller steers
    (objective/kl, an estimate of KL(q‖π_ref)) is above 0 even for the fresh policy π = π_ref (docs/negative_kl.md):
    -log π_ref(kept set) per token. Call it with the first rollout's objective/kl, which is that floor: a --target-kl
    below it cannot be reached, so the run stops with one line naming the floor and the flags."""
    flags = filter_flags(args)
    if args.target_kl is not None and flags and measured_kl > args.target_kl:
        raise InputError(f"--target-kl {args.target_kl} is below the KL floor of the sampling filters ({flags}): the "
                         f"fresh policy, equal to the reference, already measures objective/kl {measured_kl:.3f} "
                         f"nats per sequence, since it samples from the filtered distribution, not from π; raise "
                         f"--target-kl above it or drop the filters")


def check_reward_models(folders, flag="--reward-model"):
    """The folders of --reward-model (one, or an ensemble's members), each checked file by file before anything is
    loaded: LoRA reward models of train_reward.py (a fully fine-tuned one is its own base: it cannot share the
    policy's), no folder twice, and one kind of head for all (a Bradley-Terry score and an expected rating are on
    different scales: their mean, min or spread would mean nothing). Returns that kind: scalar | rating."""
    from .folders import check_reward_model_dir, read_head_config
    kinds = {}
    for folder in folders:
        if check_reward_model_dir(folder, flag) == "full":  # one line naming the missing file
            raise InputError(f"{flag} {folder!r} is a fully fine-tuned model, not an adapter on the shared base; "
                             "train it with LoRA (train_reward.py without --full-finetune)")
        kinds[folder] = read_head_config(folder, flag)["kind"]  # checked above: scalar | rating
    twice = next((f for i, f in enumerate(folders) if any(os.path.samefile(f, g) for g in folders[:i])), None)
    if twice is not None:
        raise InputError(f"{flag} names {twice!r} twice: an ensemble's members must be different reward models")
    if len(set(kinds.values())) > 1:
        raise InputError(f"{flag}: an ensemble's members must have one kind of head, got "
                         + ", ".join(f"{kind} in {folder!r}" for folder, kind in kinds.items())
                         + " (their scores are on different scales)")
    return kinds[folders[0]]


def check_group_minibatches(args, group_size, flag):
    """--group-minibatches puts whole groups of `group_size` responses (flag: the script's name for it) into each
    minibatch: the minibatch size must then be a multiple of it."""
    if args.group_minibatches and args.minibatch_size % group_size:
        raise InputError(f"--group-minibatches needs --minibatch-size {args.minibatch_size} to be a multiple of "
                         f"{flag} {group_size} (a minibatch holds whole groups)")


def check_ensemble_normalize(reward, dataset):
    """--reward-ensemble-normalize standardises reward models over the built-in world's training pairs: it needs
    --reward model and --dataset builtin (their prompts are the reference set's)."""
    if reward != "model":
        raise InputError("--reward-ensemble-normalize standardises reward models' scores: it needs --reward model, "
                         f"got --reward {reward}")
    if dataset != "builtin":
        raise InputError("--reward-ensemble-normalize: its reference set is the built-in world's training pairs; it "
                         f"needs --dataset builtin, got {dataset!r}")


def check_rl_args(args, ranges, kl_estimators=None):
    """What train_ppo.py, train_grpo.py, train_reinforce.py, train_online_dpo.py and train_distill.py check alike:
    check_common, the reward source (the reward-model folder(s), file by file, whose head fits --reward-transform,
    and --reward-ensemble; or the gold score of the built-in world), the KL estimator (k2 or k3 in the reward: one
    warning line, kl_estimator_warning), minibatch <= rollout, a --target-kl with a starting --kl-coef, the sampling
    flags, --tis-cap and --mismatch-mask-threshold."""
    from .reward_ensemble import ENSEMBLES
    check_common(args, {**MISMATCH_RANGES, **ranges}, datasets="prompt")
    check_sampling(args)
    check_choice("--reward", args.reward, ("model", "gold"))
    check_choice("--reward-transform", args.reward_transform, ("expected", "expected-minus-entropy"))
    check_choice("--reward-ensemble", args.reward_ensemble, ENSEMBLES)
    if kl_estimators:
        check_choice("--kl-estimator", args.kl_estimator, kl_estimators)
    if args.minibatch_size > args.rollout_size:
        raise InputError(f"--minibatch-size {args.minibatch_size} is larger than --rollout-size {args.rollout_size}")
    if getattr(args, "target_kl", None) is not None and args.kl_coef <= 0:
        raise InputError("--target-kl needs --kl-coef > 0 (its starting value)")
    if args.reward == "gold" and args.dataset != "builtin":
        raise InputError("--reward gold is the built-in world's gold score: it needs --dataset builtin")
    if args.reward_ensemble_normalize:
        check_ensemble_normalize(args.reward, args.dataset)
    if args.reward == "model":
        kind = check_reward_models(args.reward_model)
        if kind != "rating" and args.reward_transform != "expected":
            raise InputError(f"--reward-transform {args.reward_transform} needs a rating (distributional) reward "
                             f"head; {args.reward_model[0]!r} holds a {kind} head")
    if kl_estimators and (line := kl_estimator_warning(args.kl_estimator)):
        warn(line)  # once the shared checks have passed: a command they refuse prints its error alone
