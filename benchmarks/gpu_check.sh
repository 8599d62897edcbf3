#!/usr/bin/env bash
# One short check of the GPU paths, for a session that is lent a GPU (device tool): bf16 + SDPA + channels_last
# + CUDA graphs on the published 128px UNet (throughput, as ratios vs fp32 eager), the CUDA-only tests, and a DDP
# training run over NCCL (torchrun, every local GPU) that must end with a finite loss and its exports.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (about 5 minutes on one H100; never part of CI)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-results/gpu_check}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

echo "== CUDA-only tests (CUDA graphs equal eager sampling)"
python3 -m pytest -q -rs tests/test_bench.py -k cuda_graph 2>&1 | tee "$OUT/pytest_cuda.log"

echo "== published 128px UNet: sampling and training throughput, fp32 vs bf16 / channels_last / CUDA graphs"
rcdm bench --flags 128 --benchmarks sample,train --samplers ddim:25,dpm-solver++:20 --batch-size 32 \
  --train-batch-size 8 --dtype fp32 bf16 --channels-last --cuda-graph --attention-einsum --repeats 3 \
  --warmup 1 --device cuda --out "$OUT" --name bench_128 2>&1 | tee "$OUT/bench_128.log"

echo "== DDP over NCCL: torchrun, a few training steps of a small model on synthetic HDF5 files"
python3 - "$OUT" <<'PY'
import sys
import numpy as np
from rcdm.formats import hdf5
out = sys.argv[1]
rng = np.random.default_rng(0)
hdf5.write_images_file(f"{out}/images.h5", rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8))
hdf5.write_features_file(f"{out}/features.h5", rng.normal(size=(256, 2, 64)).astype(np.float32))
PY
FLAGS='{"image_size": 32, "num_channels": 64, "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "16", "learn_sigma": true}'
torchrun --standalone --nproc-per-node="$(python3 -c 'import torch; print(torch.cuda.device_count())')" \
  -m rcdm train --images "$OUT/images.h5" --features "$OUT/features.h5" --out "$OUT/ddp" \
  --model-flags "$FLAGS" --steps 20 --batch-size 32 --precision bf16 --log-interval 5 --workers 2 \
  --resume none --no-progress 2>&1 | tee "$OUT/ddp.log"
test -s "$OUT/ddp/train_summary.json" && tail -n 2 "$OUT/ddp/progress.csv"
echo "gpu_check: done, results in $OUT"
