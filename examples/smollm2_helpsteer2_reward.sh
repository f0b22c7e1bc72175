#!/usr/bin/env bash
# The SmolLM2 + HelpSteer2 setup, part 1: three reward models on HuggingFaceTB/SmolLM2-135M-Instruct, trained on
# juyoungml/HelpSteer2-binarized by full fine-tuning (batch 8 pairs, lr 5e-5, one epoch, 1024 tokens):
#   Bradley-Terry (--loss bt), Bradley-Terry with the score difference as margin (--loss margin), and the
#   distributional 10-class rating loss (--loss distributional --alpha 0.2).
# Compare them afterwards on the held-out split: python train_reward.py --eval-only --reward-model DIR/reward_model
# (a fully fine-tuned reward model is its own --model: pass --model DIR/reward_model too).
#
# GPU memory: full fine-tuning keeps float32 weights, gradients and AdamW's two moments, 16 bytes per parameter:
# about 2.2 GB for 135 M parameters; activations come on top (8 pairs = 16 rows of up to 1024 tokens per step;
# add --gradient-checkpointing or lower --batch-size with --grad-accum if they do not fit). dev/gpu_check.py
# measures a 135M-shaped reward step.
# Needs a CUDA GPU and the Hugging Face Hub (model and data are downloaded on first use).
# Run from anywhere: bash examples/smollm2_helpsteer2_reward.sh   (OUT=dir to choose where the runs go)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
OUT=${OUT:-runs/smollm2_helpsteer2}

python train_reward.py --model "$MODEL" --dataset juyoungml/HelpSteer2-binarized \
    --full-finetune --lr 5e-5 --batch-size 8 --epochs 1 --max-length 1024 --max-prompt-length 768 \
    --dtype auto --forward-batch-size 16 --eval-every 200 --loss bt --out "$OUT/reward_bt"

python train_reward.py --model "$MODEL" --dataset juyoungml/HelpSteer2-binarized \
    --full-finetune --lr 5e-5 --batch-size 8 --epochs 1 --max-length 1024 --max-prompt-length 768 \
    --dtype auto --forward-batch-size 16 --eval-every 200 --loss margin --out "$OUT/reward_margin"

python train_reward.py --model "$MODEL" --dataset juyoungml/HelpSteer2-binarized \
    --full-finetune --lr 5e-5 --batch-size 8 --epochs 1 --max-length 1024 --max-prompt-length 768 \
    --dtype auto --forward-batch-size 16 --eval-every 200 --loss distributional --alpha 0.2 \
    --out "$OUT/reward_distributional"
