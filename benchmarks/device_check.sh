#!/usr/bin/env bash
# The one prepared check for when a GPU is lent (an H200, 15 minutes of device time in
# all, one call at most 10 minutes): run it from the repository root with $OUT set.
#
#   OUT=/tmp/device_check bash benchmarks/device_check.sh     # anywhere with a GPU
#
# Through the device tool (docs/performance.md, "On a lent GPU"): command
# `bash benchmarks/device_check.sh`, timeout_s 540. It uses the machine's own python3
# and packages (jax 0.11.2 with CUDA, flax, pytest: nothing is installed; the project
# must run on jax 0.10.x and 0.11.x) and the repository from PYTHONPATH. Each part has
# its own time limit so that the whole stays under 8 minutes, and writes under $OUT:
#   env.txt                 jax version, devices, nvidia-smi
#   kernels_tests.log/.xml  the compiled Triton kernels against the pure-JAX reference,
#                           then paged steps == dense forward with the Triton kernel
#   kernels.jsonl/.log      benchmarks/kernels.py (time, bytes, bandwidth vs copy)
#   serving.jsonl/.log      benchmarks/serving.py at a real attention width
#   summary.txt             each part's exit status and seconds
set -u
OUT=${OUT:?set OUT to a directory for the results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JENGA_JAX_CACHE_DIR=off  # a fresh machine: no persistent compile cache to reuse
PY=${PY:-python3}

part() {  # part NAME SECONDS COMMAND...: run with a limit, log, record status and time
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/summary.txt"
}

{
  $PY -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__); print(jax.devices())'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Correctness on the GPU: the compiled kernels vs the reference, then whole paged
#    steps (the Triton kernel chosen by platform) against the dense forward.
part kernels_tests 200 $PY -m pytest -x -q -p no:cacheprovider \
  --junitxml="$OUT/kernels_tests.xml" \
  tests/test_pallas_kernels.py::test_triton_compiled_on_gpu tests/test_paged_exactness.py

# 2. Kernel speed: decode at batch 1-256, contexts 8K and 32K, every kind, bf16.
part kernels 150 $PY benchmarks/kernels.py --batches 1 64 256 --contexts 8192 32768 \
  --iters 10 --json "$OUT/kernels.jsonl"

# 3. Serving: jenga against paged on one scenario at a real width (d_model 1024, 32
#    query / 8 KV heads of 128), two timed runs each.
part serving 120 $PY benchmarks/serving.py --scenarios gemma3-sharegpt --allocators jenga paged \
  --repeats 2 --requests 64 --width real --json "$OUT/serving.jsonl"

cat "$OUT/summary.txt"
