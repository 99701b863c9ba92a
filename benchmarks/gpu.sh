#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go (CI has no GPU): correctness on the GPU, generation
# speed, the train CLI with bf16 and resume, then training throughput/MFU of the GPT-2-124M shape
# with bf16 autocast + torch.compile, then sliding-window attention (FlexAttention's block masks
# against the blocks path and dense SDPA). One JSON line per case.
#     bash benchmarks/gpu.sh            (PY=python3 by default; text2llm importable from src/)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
$PY benchmarks/gpu_checks.py
$PY benchmarks/train.py --device cuda --steps 100
$PY benchmarks/attention.py --device cuda --cases paths,train   # FlexAttention vs blocks vs dense, bf16 steps
