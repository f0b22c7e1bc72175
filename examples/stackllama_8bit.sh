#!/usr/bin/env bash
# The StackLLaMA setup on lvwerra/stack-exchange-paired ("Question: ...\n\nAnswer: " prompts, --template qa):
#   1. SFT of a LoRA adapter on the preferred answers, packed into 1024-token blocks, merged into the base;
#   2. a reward model: an 8-bit base (LLM.int8) + LoRA, Bradley-Terry on the answer pairs;
#   3. PPO from the merged SFT model on the same 8-bit base + LoRA: policy, value head, reward adapter and
#      reference all on one base; adaptive KL (start 0.2, target 6 nats).
# Base: meta-llama/Llama-3.2-1B (a Llama base model without a chat template, as StackLLaMA's LLaMA-7B; gated on the
# Hub: accept its licence first), or MODEL=HuggingFaceTB/SmolLM2-135M to keep it small.
# PPO's lr 1.4e-5, 4 PPO epochs and 128 new tokens are the StackLLaMA RL run's; the other numbers are our choices.
#
# Why SFT is not 8-bit: --merge folds the adapter into float weights, and the later stages must start from the SFT
# model (StackLLaMA merged its adapter into the 16-bit base too). A 1B base fits in bf16 (~2.5 GB).
# Data: the data/reward split is several GB; to train on a slice, download some of its parquet files and pass them
# with --data-files (they hold the Hub's raw schema). StackLLaMA's SFT used data/finetune; minirlhf reads
# data/reward (train) and data/evaluation (test).
# GPU memory (1B): weights ~2.5 GB in bf16 (SFT), ~1.5 GB 8-bit (int8 linears + bf16 embeddings); activations on top.
# Needs a CUDA GPU (bitsandbytes) and the Hugging Face Hub. Run: bash examples/stackllama_8bit.sh   (OUT=dir)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Llama-3.2-1B}
OUT=${OUT:-runs/stackllama}

# 1. supervised fine-tuning (packing: loss on every token of 1024-token blocks), adapter merged into the base
python train_sft.py --model "$MODEL" --dataset lvwerra/stack-exchange-paired --template qa \
    --packing --block-size 1024 --batch-size 4 --lr 1e-4 --warmup-steps 100 --max-steps 2000 \
    --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --dtype auto --merge --out "$OUT/sft"

# 2. the reward model on the 8-bit SFT model
python train_reward.py --model "$OUT/sft/model" --dataset lvwerra/stack-exchange-paired --template qa \
    --quantization 8bit --dtype auto --lora-r 8 --lora-alpha 32 --lora-dropout 0.1 \
    --lr 2e-5 --batch-size 4 --max-train-pairs 100000 --epochs 1 --max-length 512 --max-prompt-length 384 \
    --forward-batch-size 16 --eval-every 500 --out "$OUT/reward"

# 3. PPO on the same 8-bit SFT model, rewarded by that reward adapter
python train_ppo.py --model "$OUT/sft/model" --dataset lvwerra/stack-exchange-paired --template qa \
    --reward-model "$OUT/reward/reward_model" --quantization 8bit --dtype auto \
    --lr 1.4e-5 --iterations 200 --rollout-size 64 --minibatch-size 8 --ppo-epochs 4 \
    --kl-coef 0.2 --target-kl 6 --max-prompt-length 384 --max-new-tokens 128 \
    --forward-batch-size 16 --report-to tensorboard --out "$OUT/ppo"
