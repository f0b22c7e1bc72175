#!/usr/bin/env bash
# The SmolLM2 + HelpSteer2 setup, part 2: REINFORCE with a running-mean baseline (train_reinforce.py) from
# HuggingFaceTB/SmolLM2-135M-Instruct on HelpSteer2 prompts, against a distributional (10-class) reward model.
#
# Two deliberate differences from the original setup, both forced by minirlhf's one-base design (every RL role is an
# adapter on ONE frozen base, minirlhf/rollout.py):
# - The policy is a LoRA adapter: train_reinforce.py has no --full-finetune. The original trained every weight at
#   lr 1e-5; a LoRA adapter needs a larger step for the same progress, about 10x the full fine-tuning rate ("LoRA
#   Without Regret", Schulman et al., Thinking Machines 2025), hence --lr 1e-4.
# - The reward model is a LoRA adapter + rating head on the same base, trained first below (same data and loss as
#   the distributional model of smollm2_helpsteer2_reward.sh; lr 5e-4, 10x its 5e-5 by the same rule). A fully
#   fine-tuned reward model is a second set of weights: the RL scripts refuse it unless the policy starts from it.
#
# GPU memory: one 135 M base in bf16 (~0.3 GB) serves policy, reference and reward; the rest is the rollout's
# activations and KV cache (32 prompts of up to 768 tokens + 512 new tokens; --forward-batch-size bounds the
# scoring passes).
# Needs a CUDA GPU and the Hugging Face Hub. Run: bash examples/smollm2_helpsteer2_reinforce.sh   (OUT=dir)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
OUT=${OUT:-runs/smollm2_helpsteer2}

# 1. the distributional reward model, as a LoRA adapter on the base the policy will share
python train_reward.py --model "$MODEL" --dataset juyoungml/HelpSteer2-binarized \
    --loss distributional --alpha 0.2 --lr 5e-4 --batch-size 8 --epochs 1 --max-length 1024 --max-prompt-length 768 \
    --dtype auto --forward-batch-size 16 --eval-every 200 --out "$OUT/reward_distributional_lora"

# 2. REINFORCE against it: one response per prompt, score = E[rating] of the reward model, minus beta x KL
python train_reinforce.py --model "$MODEL" --dataset juyoungml/HelpSteer2-binarized \
    --reward-model "$OUT/reward_distributional_lora/reward_model" --reward-transform expected \
    --lr 1e-4 --iterations 200 --rollout-size 32 --minibatch-size 8 --kl-coef 0.05 \
    --max-prompt-length 768 --max-new-tokens 512 --dtype auto --forward-batch-size 16 \
    --eval-every 20 --report-to tensorboard --out "$OUT/reinforce"
