#!/usr/bin/env bash
# CPU benchmark of every stage (the numbers in docs/speed.md and docs/scaling.md). Small models, a few minutes
# on 2 cores. Usage: benchmarks/run_cpu.sh [OUT_DIR]   (default results/bench/cpu)
set -euo pipefail
out="${1:-results/bench/cpu}"
mkdir -p "$out"

# UNet speed options on the small preset: bf16 autocast, channels_last, the einsum attention reference;
# a batch sweep of distinct conditionings; full training steps.
rcdm bench --flags small --benchmarks sample,train --samplers ddim:4 --batch-sizes 1,8 \
  --train-batch-size 8 --dtype fp32 bf16 --channels-last --attention-einsum --repeats 3 --warmup 1 \
  --out "$out" --name unet_small

# torch.compile on its own (compilation takes minutes on CPU; measured after the warm-up call)
rcdm bench --flags small --benchmarks sample --samplers ddim:4 --batch-size 8 --compile --repeats 3 \
  --warmup 2 --out "$out" --name compile_small

# Optimizer / EMA updates, HDF5 reading with prefetching workers, extraction, evaluation (ResNet-50 encoder
# with random weights: the published encoders' cost; a random FID Inception when its weights are absent).
rcdm bench --flags small --benchmarks update,data,extract,evaluate --batch-size 16 --train-batch-size 32 \
  --workers 2 --encoder resnet50 --inception-random --extract-images 64 --native-size 256 \
  --eval-images 64 --repeats 3 --warmup 1 --out "$out" --name stages

# The published 128 px UNet: seconds per evaluation per image (one DDIM step = one UNet evaluation).
rcdm bench --flags 128 --benchmarks sample --samplers ddim:1 --batch-sizes 1,4 --repeats 2 --warmup 1 \
  --out "$out" --name unet_128
