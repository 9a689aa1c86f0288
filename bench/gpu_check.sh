#!/usr/bin/env bash
# The GPU check of issue 6 as one script (one lease, ~9 minutes): the step benchmark against
# PyTorch, then the memory prediction against the measured peak. Run from the repository root;
# results land in $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 330 python3 bench/bench_steps.py --batch_sizes=8,1,32 --compute_dtype=float32,bfloat16 \
  --steps=e2e,layerwise_s1,layerwise_s4,layerwise_cached,layerwise_convex_s4,eval \
  --time_budget_s=200 --json_out="$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
timeout 150 python3 launch/memory.py --flagfile=poisson.flags --budget_gb=12 --measure \
  --json_out="$OUT/memory_gpu.json" 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/memory_gpu.log"
