"""TRL's side of dev/vs_trl.py: one job per run of this file, in its own process, timed whole by the parent.

    python dev/trl_jobs.py '{"job": "dpo", "threads": 1, "steps": 10, "out": "/tmp/x", ...}'

The job's settings come from dev/vs_trl.py as JSON (the same numbers it gives minirlhf's script); each function
below writes every TRL setting that matters out in full, with a comment where TRL's default differs from minirlhf's.
Prints one JSON line at the end: what the parent reports next to the wall time (tokens per row, train_runtime, ...).
TRL is imported here only, never by minirlhf/, the train_*.py scripts or the tests (pip install -e ".[bench]").
"""
import json
import os
import sys
import time

STARTED = time.time()
if len(sys.argv) != 2:
    raise SystemExit("usage: python dev/trl_jobs.py JOB_JSON (dev/vs_trl.py runs it; see its docstring)")
JOB = json.loads(sys.argv[1])

import torch  # noqa: E402

torch.set_num_threads(JOB["threads"])  # the same thread count as minirlhf's --threads (OMP_NUM_THREADS is set too)

import datasets  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from minirlhf.data import load_preference_dataset, load_prompt_dataset, world  # noqa: E402  the same data
from minirlhf.padding import ensure_pad_token, resize_for_tokenizer  # noqa: E402  the same vocabulary


def common(job):
    """The Trainer settings every job shares: fp32 on the CPU, no evaluation, no checkpoints, no logging service."""
    return dict(
        output_dir=job["out"],
        use_cpu=True,
        bf16=False,  # TRL's default is bf16=True (mixed precision); minirlhf trains in fp32 on the CPU
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is True; minirlhf's scripts default to off
        optim="adamw_torch",  # torch.optim.AdamW, as minirlhf's training.make_optimizer (transformers may pick fused)
        weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,  # torch's AdamW defaults, as minirlhf
        max_grad_norm=job["grad_clip"],
        lr_scheduler_type="cosine_with_min_lr",  # minirlhf: linear warmup, cosine decay to 0.1 x lr (training.lr_at)
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        gradient_accumulation_steps=1,
        eval_strategy="no",
        save_strategy="no",  # nothing written during training (minirlhf: --save-every 0)
        report_to="none",
        logging_steps=10,  # TRL's default; minirlhf logs every 10 steps too (DPO's --log-every)
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=job["seed"],
    )


def lora(job, task_type):
    """The same adapter as minirlhf's make_trainable: rank r, alpha, no dropout, every linear but the LM head."""
    return LoraConfig(r=job["lora_r"], lora_alpha=job["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type=task_type)


def rendered_pairs(tokenizer):
    """The built-in preference pairs with each prompt rendered by the chat template (add_generation_prompt), as
    minirlhf's templates.format_prompt does; plain text, so TRL appends the EOS text to each response itself
    (non-conversational data: the tokens then equal minirlhf's, which the parent checks)."""
    rows = load_preference_dataset("builtin", split="train")
    prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows["prompt"]]
    return Dataset.from_dict({"prompt": prompts, "chosen": rows["chosen"], "rejected": rows["rejected"]})


def model_and_tokenizer(job):
    """The tokenizer of job["model"] and the model to hand TRL: the folder itself when the tokenizer already has a pad
    token distinct from EOS (the tiny model; TRL loads it, as model_init_kwargs say), else the model loaded as TRL
    loads a path (trl's create_model_from_path, fp32) after minirlhf's two steps of models.load_tokenizer /
    load_model: padding.ensure_pad_token (SmolLM2 pads with its EOS: "<|pad|>" is added, id 49152) and
    padding.resize_for_tokenizer (the embeddings grow to 49216 rows, the new ones the mean row). Without them TRL
    would pad with EOS and sample from 49152 rows, minirlhf from 49216."""
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    if ensure_pad_token(tokenizer) == "kept":
        return job["model"], tokenizer
    from trl.trainer.utils import create_model_from_path
    model = create_model_from_path(job["model"], dtype=torch.float32)
    resize_for_tokenizer(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def dpo(job, tokenizer, model):
    """DPOTrainer on LoRA: the reference is the base with the adapter disabled, computed every step (as
    train_dpo.py), or once before training with precompute_ref (train_dpo.py --precompute-ref)."""
    config = DPOConfig(
        **common(job),
        model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=job["batch_size"],
        max_steps=job["steps"],
        learning_rate=job["lr"],  # TRL's default 1e-6; minirlhf's 1e-3
        warmup_steps=job["warmup_steps"],
        beta=job["beta"],  # TRL's default 0.1; minirlhf's 0.5
        loss_type=["sigmoid"],
        max_length=job["max_length"],  # no prompt is cut: the longest pair is 55 tokens (parent's token check)
        precompute_ref_log_probs=job["precompute_ref"],
        precompute_ref_batch_size=job["forward_batch_size"],  # minirlhf's --forward-batch-size
        disable_dropout=True,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=rendered_pairs(tokenizer),
                         processing_class=tokenizer, peft_config=lora(job, "CAUSAL_LM"))
    data = trainer.train_dataset
    tokens = {k: list(data[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    return trainer, tokens


def reward(job, tokenizer, model):
    """RewardTrainer: AutoModelForSequenceClassification (num_labels 1: a bias-free linear head on the last real
    token's state, as minirlhf's ScalarHead) + LoRA, the head trained in full (PEFT's modules_to_save), BT loss."""
    config = RewardConfig(
        **common(job),
        model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=job["batch_size"],
        max_steps=job["steps"],
        learning_rate=job["lr"],  # TRL's default 1e-4; minirlhf's 2e-3
        warmup_steps=job["warmup_steps"],
        max_length=job["max_length"],  # a filter, not a cut: no pair is longer (the parent checks the tokens)
        center_rewards_coefficient=None,  # plain Bradley-Terry (train_reward.py --loss bt)
        disable_dropout=True,
    )
    # no "margin" column: with one, RewardTrainer would train the margin loss (train_reward.py --loss margin)
    trainer = RewardTrainer(model=model, args=config, train_dataset=rendered_pairs(tokenizer),
                            processing_class=tokenizer, peft_config=lora(job, "SEQ_CLS"))
    data = trainer.train_dataset
    return trainer, {k: list(data[k]) for k in ("chosen_ids", "rejected_ids")}


def gold_reward(prompts, completions, **kwargs):
    """The built-in world's gold score of each (prompt messages, completion text), as minirlhf's roles.Reward
    calls it; TRL decodes completions with skip_special_tokens=True, as minirlhf's evaluation.generate does."""
    return [world.gold_score(p, c[0]["content"]) for p, c in zip(prompts, completions)]


# minirlhf's --loss-aggregation -> TRL's loss_type. "token" (sum over the minibatch's tokens / its token count) is
# TRL's "bnpo" with one micro-batch per step; TRL's default "dapo" divides by the whole generation batch's token count
# / steps_per_generation instead (the mean over the minibatches, not this minibatch's own count).
LOSS_TYPE = {"token": "bnpo", "sequence": "grpo", "constant": "dr_grpo"}


def grpo(job, tokenizer, model):
    """GRPOTrainer doing train_grpo.py's work: every iteration samples rollout_size completions (rollout_size / G
    prompts x G), then ppo_epochs passes over them in minibatches of minibatch_size, one optimizer step each."""
    if job["min_new_tokens"] or job["missing_eos_penalty"] is not None:
        raise SystemExit("trl_jobs.py: error: --min-new-tokens / --missing-eos-penalty have no TRL mapping here")
    per_iteration = job["ppo_epochs"] * (job["rollout_size"] // job["minibatch_size"])  # optimizer steps
    config = GRPOConfig(
        **{**common(job), "logging_steps": per_iteration},  # one log row per iteration, as train_grpo.py
        model_init_kwargs={"dtype": torch.float32} if isinstance(model, str) else None,  # (a model: loaded in fp32)
        num_generations=job["group_size"],
        generation_batch_size=job["rollout_size"],  # -> steps_per_generation = rollout_size / minibatch_size
        per_device_train_batch_size=job["minibatch_size"],
        num_iterations=job["ppo_epochs"],  # TRL's default 1; the same rollout is used ppo_epochs times
        max_steps=job["iterations"] * per_iteration,
        learning_rate=job["lr"],  # TRL's default 1e-6; minirlhf's 2e-3
        # minirlhf warms up over 2 ITERATIONS and sets the lr once per iteration; TRL's schedule is per optimizer
        # step: 2 iterations = 2 x per_iteration steps (and TRL's first step has lr 0, minirlhf's lr / warmup)
        warmup_steps=job["warmup_iterations"] * per_iteration,
        max_completion_length=job["max_new_tokens"],  # TRL's default 512
        # (TRL 1.16's GRPO cuts no prompts: the built-in prompts are <= 24 tokens, under minirlhf's
        # --max-prompt-length 32, so neither side cuts; the parent compares the prompt tokens)
        temperature=job["temperature"], top_k=job["top_k"], top_p=job["top_p"], min_p=None,
        repetition_penalty=1.0,
        beta=job["beta"],  # TRL's default 0.0 (no KL term, no reference pass); minirlhf's 0.04
        # k3 KL as DeepSeekMath (minirlhf's grpo.py); TRL's default multiplies it by the ratio (DeepSeek-V3.2)
        use_bias_correction_kl=False,
        epsilon=job["clip_eps"],
        epsilon_high=job["clip_high"] if job["clip_high"] is not None else job["clip_eps"],
        loss_type=LOSS_TYPE[job["loss_aggregation"]],
        # (r - group mean) / (group std + 1e-4), unbiased std: minirlhf's group_advantages ("batch", "none" alike)
        scale_rewards=job["advantage_std"],
        importance_sampling_level="token",
        mask_truncated_completions=False,
        disable_dropout=True,  # TRL's default False (the tiny model has no dropout either way)
        shuffle_dataset=True,
        log_completions=False,
    )
    prompts = list(load_prompt_dataset("builtin", split="train")["prompt"])  # message lists: conversational
    trainer = GRPOTrainer(model=model, reward_funcs=gold_reward, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                          peft_config=lora(job, "CAUSAL_LM"))
    # the prompt ids TRL samples from (GRPOTrainer._tokenize_prompts: the chat template, add_generation_prompt)
    ids = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    return trainer, {"prompt_ids": [list(x) for x in ids]}


JOBS = {"dpo": dpo, "reward": reward, "grpo": grpo}


def main():
    job = JOB
    datasets.disable_progress_bars()  # as minirlhf's scripts
    model, tokenizer = model_and_tokenizer(job)
    trainer, tokens = JOBS[job["job"]](job, tokenizer, model)
    setup = time.time() - STARTED
    result = trainer.train()
    out = {"setup_seconds": setup, "train_runtime": result.metrics["train_runtime"],
           "global_step": trainer.state.global_step}
    if job["job"] == "grpo":  # the adapter (PEFT format), for minirlhf's evaluator outside this process
        # the LoRA weights only: PEFT's default ("auto") would add the embeddings and LM head to the file when the
        # vocabulary was grown (SmolLM2); they are frozen, the base's, which the evaluator grows the same way
        trainer.model.save_pretrained(os.path.join(job["out"], "policy"), save_embedding_layers=False)
        lengths = [row["completions/mean_length"] for row in trainer.state.log_history
                   if "completions/mean_length" in row]
        out["completion_length"] = sum(lengths) / max(1, len(lengths))
        out["vocabulary"] = dict(pad_token=tokenizer.pad_token, pad_token_id=tokenizer.pad_token_id,
                                 embedding_rows=trainer.model.get_input_embeddings().weight.shape[0])
    with open(os.path.join(job["out"], "tokens.json"), "w") as f:
        json.dump(tokens, f)
    out["process_seconds"] = time.time() - STARTED
    print(json.dumps(out))


if __name__ == "__main__":
    main()
