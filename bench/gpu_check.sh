#!/usr/bin/env bash
# The GPU check of issue 6 (PARTS picks some; the default ones take about 14 minutes on an H200):
#   f32       float32 steps against PyTorch (cuDNN benchmark mode), batch 8, 1, 32
#   bf16      bfloat16 steps against PyTorch on cuDNN's heuristic algorithms, batch 8
#   bf16s     bfloat16 steps against PyTorch with cuDNN's search (benchmark mode), batch 8;
#             TORCH_BENCH_LIMIT: algorithms it times per shape, default 3 (PyTorch's own
#             default, 10, did not finish the 7x7x256 bf16 search in over two minutes, three times)
#   pipeline  the real training loop: steps/s and data wait, e2e and the convex stages, with the
#             slices in host memory and with --data_on_device (+data), and with device-cached features
#   b1        float32 steps at batch 1, lwjax only
#   fusion    bfloat16 steps with XLA's convolution fusion back on (--conv_fusion), lwjax only:
#             against bf16's rows, what turning it off (the default) gains on this machine
#   layers    one conv layer at a time (first, hidden, head; fwd and fwd+bwd) against PyTorch,
#             float32 and bfloat16 at batch 8: which layer a step's gap to PyTorch comes from
#   certify   issue 19: the real trainer at paper size on a small synthetic set (CERT_FLAGS): each
#             pfista stage's gap against passes and seconds per pass, and the time to certified
#             stages against e2e's 40 epochs (bench/phase_times.py; $OUT/certify.*)
#   certify_hi  after certify: its first two convex stages again at "highest" matmul precision
#   certify_bf16  after certify: it again with --compute_dtype=bfloat16 for both methods, on
#             certify's data: do pfista's refined steps certify in bfloat16, at its speed?
#   memory    issue 19 point 4 on the GPU: launch/memory.py --measure at paper size (the compiled
#             steps' bytes per example and largest batch, and their measured peaks; $OUT/memory.*)
# Run from the repository root; results land in $OUT (or ./gpu_out). SIZE overrides the
# paper-scale size flags (CPU dry run: SIZE="--image_size=32 --features=8 --kernel_size=3"),
# PIPE_LIMIT, LAYERS_LIMIT, F32_LIMIT, SEARCH_LIMIT, CERT_LIMIT and MEM_LIMIT the parts' seconds
# (default 300, 260, 300, 300, 480, 300), F32_BATCHES the f32 part's batch sizes (default 8,1,32).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PARTS=${PARTS:-"f32 bf16s pipeline"}
SIZE=${SIZE:-"--image_size=320 --features=256 --kernel_size=7"}
STEPS=e2e,layerwise_s4,layerwise_convex_s4,layerwise_cached,eval
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# One persistent cache for the processes below (compiled steps and XLA's autotuning results:
# each new set of 7x7x256 convolutions costs ~30 s of autotuning at compile time).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/lwjax_jax_cache}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

bench() {  # name, timeout, flags...: progress lines (stderr) show where a cut-short run was.
  local name=$1 limit=$2; shift 2
  # shellcheck disable=SC2086
  timeout "$limit" python3 bench/bench_steps.py $SIZE --depth=5 --steps=$STEPS "$@" \
    --json_out="$OUT/$name.json" >"$OUT/$name.log" 2>"$OUT/$name.err"
  echo "$name: exit $?"; grep -v "^[IW][0-9]" "$OUT/$name.log" | tail -n 30
  grep "^  \[" "$OUT/$name.err" | tail -n 3
}
for part in $PARTS; do
  case $part in
    f32) bench bench_f32 "${F32_LIMIT:-300}" --compute_dtype=float32 \
           --batch_sizes="${F32_BATCHES:-8,1,32}" --check=false --time_budget_s=200 ;;
    bf16) bench bench_bf16 170 --compute_dtype=bfloat16 --batch_sizes=8 --check=false \
            --torch_cudnn_benchmark=false --time_budget_s=120 ;;
    bf16s) bench bench_bf16s "${SEARCH_LIMIT:-300}" --compute_dtype=bfloat16 --batch_sizes=8 \
             --check=false --torch_cudnn_benchmark=true \
             --torch_cudnn_benchmark_limit="${TORCH_BENCH_LIMIT:-3}" --time_budget_s=200 ;;
    fusion) bench bench_fusion 150 --compute_dtype=bfloat16 --batch_sizes=8 --check=false \
              --torch=false --conv_fusion=true --time_budget_s=110 ;;
    b1) bench bench_b1 90 --compute_dtype=float32 --batch_sizes=1 --torch=false \
          --steps=e2e,layerwise_convex_s4,layerwise_s4,eval --time_budget_s=60 ;;
    memory)
      # shellcheck disable=SC2086
      timeout "${MEM_LIMIT:-300}" python3 launch/memory.py --flagfile=poisson.flags $SIZE --budget_gb=12 \
        --measure --json_out="$OUT/memory.json" --figure_dir="$OUT" 2>&1 \
        | grep -v "^[IW][0-9]" | tee "$OUT/memory.log" | tail -n 20 ;;
    layers)
      # shellcheck disable=SC2086
      timeout ${LAYERS_LIMIT:-260} python3 bench/bench_layers.py $SIZE --batch_sizes=8 \
        --compute_dtype=bfloat16,float32 --torch_cudnn_benchmark=false \
        --json_out="$OUT/layers.json" 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/layers.log" ;;
    pipeline)
      # shellcheck disable=SC2086
      timeout ${PIPE_LIMIT:-300} python3 bench/bench_pipeline.py $SIZE --depth=3 --batch_size=8 --slices=48 \
        --epochs=3 --runs=${RUNS:-e2e,e2e+data,layerwise_convex:none,layerwise_convex:none+data,layerwise_convex:device+data} \
        --json_out="$OUT/pipeline.json" 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/pipeline.log" ;;
    certify|certify_hi|certify_bf16)
      # certify_hi: the convex stages alone with every matmul and conv at "highest" precision
      # (no TF32), shallower: does TF32 in the solver's step stall the gap?
      # A killed run resumes: rerun the part with the same CERT_WORKDIR to continue it.
      work=${CERT_WORKDIR:-/tmp/lwjax_certify}; limit=${CERT_LIMIT:-480}; flags=${CERT_FLAGS:-"--synth_train_subjects=3 --synth_val_subjects=1 --synth_slices=8 --depth=5 --e2e_depths=5 --batch_size=8 --cache_features=device --data_on_device"}
      if [ "$part" = certify_hi ]; then
        work=$work.hi; limit=${CERT_HI_LIMIT:-120}; flags="$flags --depth=3 --method=layerwise_convex --data_dir=${CERT_WORKDIR:-/tmp/lwjax_certify}/data --convex_precision=highest"
      elif [ "$part" = certify_bf16 ]; then
        work=$work.bf16; flags="$flags --data_dir=${CERT_WORKDIR:-/tmp/lwjax_certify}/data --compute_dtype=bfloat16"
      fi
      # shellcheck disable=SC2086
      timeout "$limit" python3 launch/train.py --flagfile=poisson.flags $SIZE $flags \
        --workdir="$work" >"$OUT/$part.log" 2>&1
      echo "$part: exit $?"; grep -v "steps/s\|checkpoint\|orbax" "$OUT/$part.log" | tail -n 40
      python3 bench/phase_times.py "$work" --log="$OUT/$part.log" --json_out="$OUT/$part.json"
      cp "$work/metrics.jsonl" "$OUT/$part.metrics.jsonl" ;;
    *) echo "unknown part $part" ;;
  esac
done
