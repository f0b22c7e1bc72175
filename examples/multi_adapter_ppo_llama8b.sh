#!/usr/bin/env bash
# The multi-adapter PPO setup: ONE 4-bit NF4 Llama base in memory serves the policy (LoRA adapter + value head), the
# reward model (a second LoRA adapter + head, trained first, on Anthropic/hh-rlhf helpful-base) and the reference
# (the base with adapters off). Llama-3 prompt format (--template llama3) under a system prompt; PPO prompts are
# rajpurkar/squad questions. summary.json reports the cost per training sample from --cost-per-hour.
# Base: meta-llama/Llama-3.1-8B-Instruct (gated on the Hub: accept its licence first); MODEL=meta-llama/Llama-3.1-8B
# for the base model. --cost-per-hour 3.00 is an EXAMPLE price for one H100 hour; put your own.
#
# GPU memory (8B): the 4-bit base is ~5.5 GB (7 B quantized weights at ~0.52 bytes, embeddings and LM head in bf16,
# 2 x 0.5 B parameters); adapters ~0.1 GB with their AdamW state. Activations come on top: gradient checkpointing and
# --forward-batch-size 4 keep them small; a 24 GB GPU should suffice, a 40-80 GB one is comfortable.
# Needs a CUDA GPU (bitsandbytes) and the Hugging Face Hub. Run: bash examples/multi_adapter_ppo_llama8b.sh   (OUT=dir)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}
OUT=${OUT:-runs/multi_adapter_ppo}
SYSTEM="You are a helpful, honest assistant. Answer briefly."

# 1. the reward adapter on the 4-bit base (Bradley-Terry on hh-rlhf helpful-base)
python train_reward.py --model "$MODEL" --dataset Anthropic/hh-rlhf --template llama3 --system-prompt "$SYSTEM" \
    --quantization 4bit --dtype auto --lora-r 16 --lora-alpha 32 --lora-targets all-linear \
    --lr 1e-4 --batch-size 4 --grad-accum 4 --epochs 1 --max-length 512 --max-prompt-length 384 \
    --gradient-checkpointing --forward-batch-size 8 --eval-every 500 --out "$OUT/reward"

# 2. PPO: policy adapter + value head, that reward adapter and the reference, all on the one 4-bit base
python train_ppo.py --model "$MODEL" --dataset rajpurkar/squad --template llama3 --system-prompt "$SYSTEM" \
    --reward-model "$OUT/reward/reward_model" --quantization 4bit --dtype auto \
    --lr 1.41e-5 --iterations 100 --rollout-size 16 --minibatch-size 4 --ppo-epochs 4 \
    --max-prompt-length 384 --max-new-tokens 128 --forward-batch-size 4 --gradient-checkpointing \
    --cost-per-hour 3.00 --report-to tensorboard --out "$OUT/ppo"
