#!/usr/bin/env bash
# A GPU session's evidence in ONE command of at most 8 minutes (BUDGET_S, default 470 s, under
# the device tool's 10-minute command limit), everything written under $OUT as it goes, most
# important first. Every step has a time limit taken from what is left; timeline.txt records
# each step's start, length and exit status, so a run cut short still says what it did.
#   1. env.txt: GPU, versions, `python -m adapterops.info`. install.log: the package installed
#      without dependencies or build isolation (the GPU image has no package registry) and
#      WITHOUT the CUDA extension (ADAPTEROPS_SKIP_CUDA=1: seconds, where building adapterops._C
#      in the install takes minutes). The extension is built just in time in the background,
#      for this GPU's architecture only, niced, on half the cores (cuda_build.log), while
#      steps 2-4 run the Triton and PyTorch paths.
#   2. smoke/: every op at the target shapes, triton against the torch backend (float64
#      reference), forward and every gradient (python -m benchmarks.smoke).
#   3-4. headline/: LaMDA and LoRA (bf16, M = 8192, in = out = 4096, r = 16), HydraLoRA (r = 8,
#      E = 4), the HD-PiSSA layer and update (K = 8, r = 16, fp32 W, "highest"), providers
#      floor, torch_eager, addmm, peft, official, triton, each with the torch.profiler table of
#      its launches (profile.md); headline-high/: the update at fp32 "high" (TF32).
#      Then, when the extension is built (waited for until CUDA_WAIT_S into the run, at most
#      the budget):
#      smoke-cuda/ and headline-cuda/ (floor and cuda, with profiles).
#   5. tests.log: the test suite on CUDA, kernel tests first (correctness of the odd shapes
#      on real hardware ranks above more timings), then sweep/: the full sweep, in what is left.
# Commit $OUT under benchmarks/results/<gpu>-<date>/ with the machine named (env.txt).
#
# DRY_RUN=1 runs the same steps on CPU: tiny shapes under the Triton interpreter, the cuda
# backend's host build, no install, one test file and a one-case sweep. tests/test_gpu_run.py
# runs it in `make test`, so this script cannot rot between GPU sessions.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
PY=${PY:-python3}
DRY_RUN=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-470}
CUDA_WAIT_S=${CUDA_WAIT_S:-300}
mkdir -p "$OUT"
: > "$OUT/timeline.txt"

if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1 ADAPTEROPS_CSRC_ON_CPU=1
  DEVICE_ARGS=(--device cpu --cpu-budget-s 0)
  SMOKE_ARGS=(--device cpu)
  TESTS=(tests/test_import.py)
  SWEEP_ARGS=(--headline --ops lora --providers floor)
else
  DEVICE_ARGS=(--device cuda)
  SMOKE_ARGS=(--device cuda)
  TESTS=(tests/test_lowrank.py tests/test_routed.py tests/test_hdpissa.py
         tests/test_cuda_backend.py tests)
  SWEEP_ARGS=()
fi
HEADLINE_PROVIDERS=floor,torch_eager,addmm,peft,official,triton

left() { echo $((BUDGET_S - SECONDS)); }
min() { echo $(($1 < $2 ? $1 : $2)); }

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log, for at most
# LIMIT_S seconds (and never past the budget); skipped when under 5 s are left.
step() {
  local name=$1 limit start rc
  limit=$(min "$2" "$(left)")
  shift 2
  if [ "$limit" -lt 5 ]; then
    echo "$name: skipped, $(left) s of the budget left" | tee -a "$OUT/timeline.txt"
    return
  fi
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: started at ${start} s, took $((SECONDS - start)) s (limit ${limit} s), exit $rc" \
    | tee -a "$OUT/timeline.txt"
  tail -n 4 "$OUT/$name.log"
}

# 1. The machine and the install.
{
  echo "git $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  date -u +%Y-%m-%dT%H:%M:%SZ
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  else
    echo "no nvidia-smi"
  fi
  nproc
} > "$OUT/env.txt"
if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: install skipped" > "$OUT/install.log"
else
  step install 120 env ADAPTEROPS_SKIP_CUDA=1 \
    "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
"$PY" -m adapterops.info >> "$OUT/env.txt" 2>&1
"$PY" -c "import importlib.metadata as m
for p in ('torch', 'triton', 'peft', 'transformers', 'numpy'):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, 'not installed')" >> "$OUT/env.txt" 2>&1

if [ "$DRY_RUN" != 1 ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c \
    "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))")
  export TORCH_CUDA_ARCH_LIST
fi
BUILD_START=$SECONDS
MAX_JOBS=$(($(nproc) / 2 > 1 ? $(nproc) / 2 : 1)) nice -n 19 timeout "$CUDA_WAIT_S" "$PY" -c "
from adapterops.backends.cuda import extension
ext = extension.load()
print(ext.how or 'not loaded', ext.reason or '')
raise SystemExit(ext.module is None)" > "$OUT/cuda_build.log" 2>&1 &
BUILD_PID=$!

# 2-4. Correctness, then the headline numbers with their launch profiles.
step smoke 90 "$PY" -m benchmarks.smoke "${SMOKE_ARGS[@]}" --backends triton --out "$OUT/smoke"
step headline 200 "$PY" -m benchmarks --headline --profile --fp32-precision highest \
  --providers "$HEADLINE_PROVIDERS" "${DEVICE_ARGS[@]}" --out "$OUT/headline"
step headline-high 60 "$PY" -m benchmarks --headline --profile --fp32-precision high \
  --ops hdpissa_update --providers "$HEADLINE_PROVIDERS" "${DEVICE_ARGS[@]}" \
  --out "$OUT/headline-high"

WAIT_UNTIL=$(min "$CUDA_WAIT_S" "$BUDGET_S")
while kill -0 "$BUILD_PID" 2> /dev/null && [ "$SECONDS" -lt "$WAIT_UNTIL" ]; do sleep 1; done
if kill -0 "$BUILD_PID" 2> /dev/null; then
  kill "$BUILD_PID"
  build_rc=timeout
else
  wait "$BUILD_PID"
  build_rc=$?
fi
echo "cuda_build: started at ${BUILD_START} s, done by ${SECONDS} s, exit $build_rc" \
  | tee -a "$OUT/timeline.txt"
if [ "$build_rc" = 0 ]; then
  step smoke-cuda 60 "$PY" -m benchmarks.smoke "${SMOKE_ARGS[@]}" --backends cuda \
    --out "$OUT/smoke-cuda"
  step headline-cuda 60 "$PY" -m benchmarks --headline --profile --fp32-precision highest \
    --providers floor,cuda "${DEVICE_ARGS[@]}" --out "$OUT/headline-cuda"
else
  # Later processes must not start the build again (or wait on a killed build's lock).
  export ADAPTEROPS_JIT_BUILD=0
  tail -n 20 "$OUT/cuda_build.log"
fi

# 5. The test suite on this device, then the rest of the sweep, in what is left.
step tests $(($(left) - 60)) "$PY" -m pytest -v -rs -p no:cacheprovider --durations=15 \
  "${TESTS[@]}"
step sweep "$(left)" "$PY" -m benchmarks "${SWEEP_ARGS[@]}" "${DEVICE_ARGS[@]}" --out "$OUT/sweep"
echo "done in ${SECONDS} s; results in $OUT" | tee -a "$OUT/timeline.txt"
