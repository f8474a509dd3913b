#!/usr/bin/env bash
# The accelerator run of BENCHMARKS.md: one GPU (or TPU) machine, one call, about 12 minutes.
#
#   OUT=results/accelerator bash experiments/accelerator.sh          # on the accelerator
#   OUT=/tmp/acc bash experiments/accelerator.sh --smoke              # tiny sizes, any machine
#
# Runs from the repository root with the machine's own jax / flax / optax (PYTHONPATH, no
# install: such machines often have no package index). Each step has its own time limit,
# so a step that fails or runs long costs only itself. What it leaves in $OUT:
#   log.txt         everything printed
#   device.txt      the device and the test subset run on it
#   bench.md        the benchmark tables (every step's, concatenated)
#   bench_json.tgz  the benchmark JSON files
set -u
OUT=${OUT:-results/accelerator}
SMOKE=${1:-}
mkdir -p "$OUT/json"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SPADE_JAX_OFFLINE=1
export SPADE_JAX_CACHE=${SPADE_JAX_CACHE:-/tmp/spade_jax_accelerator_cache}
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/log.txt") 2>&1

step() {  # step NAME SECONDS ARGS...: one benchmark.py call, its tables appended to bench.md
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s) $(date -u +%T)"
  timeout "$limit" "$PY" experiments/benchmark.py --output_json="$OUT/json/$name.json" \
    --output_md="$OUT/json/$name.md" --compilation_cache_dir=none "$@" >/dev/null
  echo "=== $name: exit $? $(date -u +%T)"
  [ -f "$OUT/json/$name.md" ] && cat "$OUT/json/$name.md" >>"$OUT/bench.md"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if [ "$SMOKE" = "--smoke" ]; then
  T="--sections=knn,pixel,kernels,precision,memory,pipeline,coreset --repeats=1 --knn_repeats=1
     --knn_queries=64 --knn_gallery=2048 --knn_dim=16 --knn_kernel_blocks=
     --pixel_grid=8 --pixel_channels=4,8,16 --pixel_k_images=2 --pixel_repeats=1
     --kernels_k_images=2 --kernels_channels=4,8,16 --image_size=32
     --precision_gallery=2048 --memory_kinds=knn --memory_scales=1,2 --memory_knn_rows=512
     --pipeline_backbone=efficientnet_lite0 --pipeline_train=2 --pipeline_test=2
     --pipeline_k_images=2 --backbone_batch=2 --pipeline_cache_images=0
     --coreset_parts=precision --coreset_precision_ns=4096 --coreset_size=20"
  # shellcheck disable=SC2086
  step smoke 600 $T
else
  # Correctness on the device first: search, scoring, maps and kernels against their
  # references (tests written for CPU; those needing 8 fake CPU devices or the CPU kernel
  # skip or fail for that reason alone, which the log shows).
  echo "=== tests on the device $(date -u +%T)"
  JAX_PLATFORMS= XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 "$PY" -m pytest -q -p no:cacheprovider --tb=line -n 4 -k "not sharded" \
    tests/test_neighbors.py tests/test_scoring.py tests/test_anomaly_map.py \
    tests/test_distances.py tests/test_kernels.py tests/test_coreset.py tests/test_memory_bank.py 2>&1 |
    tail -40 | tee -a "$OUT/device.txt"
  # The figures: knn against the device's own matmul, pixel scoring per test image
  # (wide_resnet50_2 shapes, K = 50), peak device memory, end to end per method. knn runs
  # with the platform's blocking (neighbors.BLOCKINGS["gpu"] on a GPU); the precision
  # section times it against blocking="cpu" (the blocking before) and precision="bf16"
  # (recall beside it, also on structured features), taking turns.
  step knn_pixel 90 --sections=knn,pixel,precision --knn_kernel_blocks=
  step pipeline 80 --sections=pipeline --pipeline_test=32 --backbone_batch=16 \
    --pipeline_cache_images=0
  step memory 70 --sections=memory --memory_kinds=knn,pixel_k --memory_scales=1,8
  step kernels 120 --sections=kernels --repeats=2 --kernels_names=l2,mahalanobis,rbf,polynomial,rff
  step backbone 60 --sections=backbone --backbones=wide_resnet50_2 --backbone_batch=32
  # The coreset: float32 vs precision="bf16" ms per step at 200k and 1M x 128 (2000 steps),
  # then a whole 10% coreset of 1M x 128 (100k steps) in seconds, each precision compiled
  # ahead of time and run once; same selection checked, peak device memory reported.
  step coreset_steps 120 --sections=coreset --coreset_parts=precision \
    --coreset_precision_ns=200000,1000000 --coreset_size=2000 --repeats=3
  step coreset_10pct 300 --sections=coreset --coreset_parts=precision \
    --coreset_precision_ns=1000000 --coreset_precision_size=100000 --repeats=1
fi
tar -czf "$OUT/bench_json.tgz" -C "$OUT" json && rm -rf "$OUT/json"
echo "done $(date -u +%T)"
