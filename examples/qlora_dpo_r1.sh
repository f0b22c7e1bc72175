#!/usr/bin/env bash
# The QLoRA DPO workshop: DPO on juyoungml/HelpSteer2-binarized from HuggingFaceTB/SmolLM2-135M-Instruct on a 4-bit
# NF4 base (double quantization), LoRA rank 1 on q_proj and v_proj only, float16 compute (with loss scaling), lr 5e-4,
# 8 pairs per step for 8 steps (64 pairs), beta 0.1, 1024 tokens. The reference is the same 4-bit base with the
# adapter switched off.
#
# GPU memory: the 4-bit base is ~0.1 GB (0.52 bytes per quantized weight; dev/run.py measures it); rank-1 adapters
# are ~0.1 M parameters. The rest is activations: 16 rows of up to 1024 tokens, policy and reference passes.
# Needs a CUDA GPU (bitsandbytes) and the Hugging Face Hub. Run: bash examples/qlora_dpo_r1.sh   (OUT=dir)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
OUT=${OUT:-runs/qlora_dpo_r1}

python train_dpo.py --model "$MODEL" --dataset juyoungml/HelpSteer2-binarized \
    --quantization 4bit --dtype float16 --lora-r 1 --lora-targets q_proj v_proj \
    --lr 5e-4 --batch-size 8 --max-steps 8 --beta 0.1 --max-length 1024 --max-prompt-length 768 \
    --forward-batch-size 16 --log-every 1 --out "$OUT"
