#!/usr/bin/env bash
# CPU benchmark of every stage (the numbers in docs/speed.md and docs/scaling.md). Small models, a few minutes
# on 2 cores. Usage: benchmarks/run_cpu.sh [OUT_DIR]   (default results/bench/cpu)
set -euo pipefail
# One thread per process: on a shared host, oversubscribed OpenMP threads spin against other jobs and make
# timings meaningless (measured: 2 threads under load ran up to 5x slower than 1, erratically).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="${1:-results/bench/cpu}"
mkdir -p "$out"

# UNet speed options on the small preset: bf16 autocast, channels_last, the einsum attention reference;
# a batch sweep of distinct conditionings; full training steps.
# Round-robin rounds: on a shared host, load drift then hits every variant alike.
rcdm bench --flags small --benchmarks sample,train --samplers ddim:2 --batch-sizes 1,4 \
  --train-batch-size 4 --dtype fp32 bf16 --channels-last --attention-einsum --repeats 1 --warmup 1 --rounds 5 \
  --out "$out" --name unet_small

# torch.compile on its own (compilation takes minutes on CPU; measured after the warm-up call)
rcdm bench --flags small --benchmarks sample --samplers ddim:2 --batch-size 4 --compile --repeats 2 --rounds 2 \
  --warmup 2 --out "$out" --name compile_small

# Optimizer / EMA updates, HDF5 reading with prefetching workers, extraction, evaluation (ResNet-50 encoder
# with random weights: the published encoders' cost; a random FID Inception when its weights are absent).
rcdm bench --flags small --benchmarks update,data,extract,evaluate --batch-size 16 --train-batch-size 32 \
  --workers 2 --encoder resnet50 --inception-random --extract-images 32 --native-size 256 \
  --eval-images 32 --repeats 1 --warmup 1 --rounds 2 --out "$out" --name stages

# The published 128 px UNet: seconds per evaluation per image (dpm-solver++ with 1 step = one UNet evaluation).
rcdm bench --flags 128 --benchmarks sample --samplers dpm-solver++:1 --batch-sizes 1 --repeats 1 --warmup 1 --rounds 3 \
  --out "$out" --name unet_128
