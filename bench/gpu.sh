#!/usr/bin/env bash
# Rollout engine on one CUDA GPU: Qwen3-0.6B-shaped random-init model, bf16, batch 64, prompt 128, 64 new.
# Prints tok/s of lm.rollout (eager and torch.compile'd decode step with CUDA graphs) next to HF
# model.generate, and the compiled decode step's achieved GB/s against the memory-bandwidth floor
# (bytes of weights + live KV read per step / step time). Not runnable on the CPU dev box.
#
# Run from anywhere:  bash bench/gpu.sh            (about 3-5 minutes on one H100, mostly compilation)
#   PEAK_GBS=4800 bash bench/gpu.sh                (H200; default 3350 = H100 SXM HBM3)
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK_GBS="${PEAK_GBS:-3350}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# Hard cap well under 8 minutes; the JSON line is the last line of the output.
timeout 450 python bench/rollout.py \
    --device cuda --dtype bfloat16 --preset-shape qwen3-0.6b \
    --batch 64 --prompt 128 --new 64 --repeats 5 --compile --peak-gbs "$PEAK_GBS"
