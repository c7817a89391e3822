#!/usr/bin/env bash
# One CUDA GPU, random-init Qwen3 shapes in bf16, under 8 minutes on one H100:
#  1. rollout engine, Qwen3-0.6B shape, batch 64, prompt 128, 64 new: tok/s of lm.rollout (eager and
#     torch.compile'd decode step with CUDA graphs) next to HF model.generate, and the compiled decode
#     step's achieved GB/s against the memory-bandwidth floor (weights + live KV read per step / step time);
#  2. one OPD step and one GRPO step (bench/train_step.py) on the Qwen3-0.6B and Qwen3-1.7B shapes with
#     gradient checkpointing: rollout tok/s, teacher scoring tok/s, training tok/s, peak memory, MFU.
# Each part prints a JSON line last. Not runnable on the CPU dev box.
#
# Run from anywhere:  bash bench/gpu.sh
#   PEAK_GBS=4800 PEAK_TFLOPS=989 bash bench/gpu.sh   (H200; defaults are H100 SXM: 3350 GB/s, 989 bf16 TFLOP/s)
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK_GBS="${PEAK_GBS:-3350}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# Hard caps that add up to under 8 minutes.
timeout 270 python bench/rollout.py \
    --device cuda --dtype bfloat16 --preset-shape qwen3-0.6b \
    --batch 64 --prompt 128 --new 64 --repeats 5 --compile --peak-gbs "$PEAK_GBS"

for shape in qwen3-0.6b qwen3-1.7b; do
    timeout 90 python bench/train_step.py --shape "$shape" --device cuda --dtype bfloat16 --grad-ckpt \
        --batch 16 --samples 4 --prompt 512 --new 128 --steps 2 --peak-tflops "$PEAK_TFLOPS" || echo "train_step $shape: failed or timed out"
done
