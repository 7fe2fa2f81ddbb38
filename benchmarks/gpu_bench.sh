#!/usr/bin/env bash
# rosa bench on one CUDA GPU: bf16 base weights, fp32 ROSA factors (PEFT keeps LoRA's in fp32 too),
# random-weight models with the shapes of roberta-base and gpt2 (the paper's) and Llama-3.2-1B, AdamW
# (weights do not change speed or memory; the pretrained aliases need packages a GPU box may lack).
# Writes benchmarks/results/perf_gpu.{json,md}. Takes a few minutes on an H100/H200-class GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
export HF_HUB_OFFLINE=1 ROSA_NO_PROGRESS=1
python benchmarks/perf.py --device cuda --dtype bfloat16 --factor-dtype float32 \
    --models roberta-125m gpt2-124m llama-1b --batch-size 8 --seq-len 512 --steps 20 --warmup 3 --latency-reps 20 \
    --threads 4 --name perf_gpu --note "One NVIDIA GPU, not shared; bf16 base weights, fp32 factors." "$@"
