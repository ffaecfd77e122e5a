#!/usr/bin/env bash
# A GPU session's evidence in ONE command of at most 8 minutes (BUDGET_S, default 470 s, under
# the device tool's 10-minute command limit), everything written under $OUT as it goes, most
# important first. Every step has a time limit taken from what is left; timeline.txt records
# each step's start, length and exit status, so a run cut short still says what it did, and its
# last line names the steps that did not exit 0 (the script then exits 1).
#   1. env.txt: GPU, versions, `python -m adapterops.info`. install.log: the package installed
#      without dependencies or build isolation (the GPU image has no package registry) and
#      WITHOUT the CUDA extension (ADAPTEROPS_SKIP_CUDA=1: seconds, where building adapterops._C
#      in the install takes minutes). The extension is built just in time in the background,
#      for this GPU's architecture only, niced, on half the cores (cuda_build.log), while
#      steps 2-6 run the Triton and PyTorch paths.
#   2. preflight.log: adapterops.kernels, peft and transformers import and the triton backend
#      serves a tensor on the device (python -m benchmarks.kernel_check --preflight). If not,
#      the run STOPS there (timeline.txt and stdout say why; exit 1): nothing after it could be
#      trusted.
#   3. kernel_check/: every Triton kernel on small multi-tile shapes (TMA and pointer GEMM,
#      shrink and grad pass whole and split with their finishing kernels, routed kernels, the
#      update) against the torch backend, each row naming the kernels its phase launched
#      (python -m benchmarks.kernel_check), so a hardware fault names its kernel.
#   4. smoke/: every op at the target shapes, triton against the torch backend (float64
#      reference), forward and every gradient (python -m benchmarks.smoke; an unavailable
#      backend is a failure on CUDA).
#   5. headline/: LaMDA and LoRA (bf16, M = 8192, in = out = 4096, r = 16), HydraLoRA (r = 8,
#      E = 4), the HD-PiSSA layer and update (K = 8, r = 16, fp32 W, "highest"), providers
#      floor, torch_eager, addmm, peft, official, triton, each with the torch.profiler table of
#      its launches (profile.md); headline-high/: the update at fp32 "high" (TF32).
#   6. tests-triton.log: while the extension still builds, the Triton-path kernel tests
#      (tests/test_lowrank.py, test_routed.py, test_hdpissa.py without the tests that need the
#      cuda backend), with ADAPTEROPS_JIT_BUILD=0 so they never start a second build.
#   7. Then, when the extension is built (waited for until CUDA_WAIT_S into the run, at most
#      the budget; timeline.txt says how long the run idled for it): smoke-cuda/ and
#      headline-cuda/ (floor and cuda, with profiles).
#   8. tests.log: the rest of the test suite on CUDA, the cuda backend's kernel tests first
#      (correctness of the odd shapes on real hardware ranks above more timings; without
#      tests/test_gpu_run.py, this script's CPU dry run), then sweep/: the full sweep, in what
#      is left.
# Commit $OUT under benchmarks/results/<gpu>-<date>/ with the machine named (env.txt).
#
# DRY_RUN=1 runs the same steps on CPU: tiny shapes under the Triton interpreter (the preflight
# and kernel check too), the cuda backend's host build, no install, one small test in each test
# step and a one-case sweep. tests/test_gpu_run.py runs it in `make test`, so this script cannot rot
# between GPU sessions.
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
  DEVICE=cpu
  DEVICE_ARGS=(--device cpu --cpu-budget-s 0)
  TESTS_DURING_BUILD=(tests/test_import.py::test_import_is_lean)
  TESTS_AFTER_BUILD=(tests/test_import.py::test_info_runs_and_names_backends)
  SWEEP_ARGS=(--headline --ops lora --providers floor)
else
  DEVICE=cuda
  DEVICE_ARGS=(--device cuda)
  TESTS_DURING_BUILD=(tests/test_lowrank.py tests/test_routed.py tests/test_hdpissa.py)
  TESTS_AFTER_BUILD=(tests/test_cuda_backend.py tests/test_lowrank.py tests/test_routed.py
                     tests/test_hdpissa.py tests --ignore=tests/test_gpu_run.py)
  SWEEP_ARGS=()
fi
HEADLINE_PROVIDERS=floor,torch_eager,addmm,peft,official,triton,triton_p0
# The tests split in two by the extension: the tests of the cuda backend (those with "cuda"
# in their name or parameters, and the Triton-limit tests that fall back to it) wait for its
# build; the others of the three kernel test files run while it is in flight; everything else
# once it is done, so each test runs once (tests/test_gpu_run.py checks the partition).
TESTS_DURING_BUILD_K="not cuda and not test_triton_declines_beyond_its_limits"
TESTS_AFTER_BUILD_K="cuda or test_triton_declines_beyond_its_limits or not (test_lowrank.py or test_routed.py or test_hdpissa.py)"
# Time limits. Cold Triton compiles on triton 3.6 took 0.4-1.9 s each when compiled here.
# - preflight: imports (torch, triton, transformers, peft: about 10 s on a cold disk), CUDA
#   start-up and 2 compiles (4 s): 60 s.
# - kernel_check: 28 distinct kernel compiles (see CHECKS in benchmarks/kernel_check.py;
#   ADAPTEROPS_AUTOTUNE=0 there) x 1.9 s = 53 s at worst, plus 15 s of imports, CUDA and
#   profiler start-up and 9 small checks: 75 s (about 20-30 s expected).
# - smoke: about 25 cold compiles (its kernels with their flags, and the GEMM's autotuning
#   candidates) x 1.9 s = 48 s, plus 15 s of start-up and 25 s for 7 cases at 8192 tokens
#   with their float64 references: 90 s. The kernel check's shapes share the smoke's
#   specializations, so most of those compiles are cache hits by then.
PREFLIGHT_LIMIT_S=60
KERNEL_CHECK_LIMIT_S=75
SMOKE_LIMIT_S=90

left() { echo $((BUDGET_S - SECONDS)); }
min() { echo $(($1 < $2 ? $1 : $2)); }
max() { echo $(($1 > $2 ? $1 : $2)); }
NOT_OK=()  # the steps that did not exit 0, named in the last line of timeline.txt

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log, for at most
# LIMIT_S seconds (and never past the budget); skipped when under 5 s are left. Sets STEP_RC
# to the exit status ("skipped" when skipped).
step() {
  local name=$1 limit start
  limit=$(min "$2" "$(left)")
  shift 2
  if [ "$limit" -lt 5 ]; then
    echo "$name: skipped, $(left) s of the budget left" | tee -a "$OUT/timeline.txt"
    STEP_RC=skipped
    NOT_OK+=("$name(skipped)")
    return
  fi
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  STEP_RC=$?
  echo "$name: started at ${start} s, took $((SECONDS - start)) s (limit ${limit} s), exit $STEP_RC" \
    | tee -a "$OUT/timeline.txt"
  [ "$STEP_RC" = 0 ] || NOT_OK+=("$name(exit $STEP_RC)")
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
    "$PY" -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
fi
# Bounded: a hanging CUDA start-up must not eat the budget unseen (no step's limit covers these).
timeout 60 "$PY" -m adapterops.info >> "$OUT/env.txt" 2>&1
timeout 30 "$PY" -c "import importlib.metadata as m
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

# 2. Can this installation run the kernels at all? If not, stop: nothing after it would mean
# anything, and the reason is the one result worth the session.
step preflight "$PREFLIGHT_LIMIT_S" "$PY" -m benchmarks.kernel_check --preflight --device "$DEVICE"
if [ "$STEP_RC" != 0 ]; then
  kill "$BUILD_PID" 2> /dev/null
  echo "STOPPED at ${SECONDS} s: the preflight failed (exit $STEP_RC), so no step after it ran:" \
    "$(grep -v '^preflight ok' "$OUT/preflight.log" | tail -n 6 | tr '\n' ' ')" \
    | tee -a "$OUT/timeline.txt"
  exit 1
fi

# 3-5. Correctness (every kernel, then every op at the target shapes), then the headline
# numbers with their launch profiles.
step kernel_check "$KERNEL_CHECK_LIMIT_S" "$PY" -m benchmarks.kernel_check --device "$DEVICE" \
  --out "$OUT/kernel_check"
step smoke "$SMOKE_LIMIT_S" "$PY" -m benchmarks.smoke --device "$DEVICE" --backends triton \
  --out "$OUT/smoke"
step headline 240 "$PY" -m benchmarks --headline --profile --fp32-precision highest \
  --providers "$HEADLINE_PROVIDERS" "${DEVICE_ARGS[@]}" --out "$OUT/headline"
step headline-high 60 "$PY" -m benchmarks --headline --profile --fp32-precision high \
  --ops hdpissa_update --providers "$HEADLINE_PROVIDERS" "${DEVICE_ARGS[@]}" \
  --out "$OUT/headline-high"

# 6. While the extension builds: the Triton-path tests, until the build's deadline (at least
# 90 s of them if the build is already done), keeping 60 s for what follows.
WAIT_UNTIL=$(min "$CUDA_WAIT_S" "$BUDGET_S")
step tests-triton "$(min "$(max 90 $((WAIT_UNTIL - SECONDS)))" $(($(left) - 60)))" \
  env ADAPTEROPS_JIT_BUILD=0 "$PY" -m pytest -v -rs -p no:cacheprovider --durations=15 \
  -k "$TESTS_DURING_BUILD_K" "${TESTS_DURING_BUILD[@]}"

# 7. The extension: what is left of its build, then its steps.
WAIT_START=$SECONDS
while kill -0 "$BUILD_PID" 2> /dev/null && [ "$SECONDS" -lt "$WAIT_UNTIL" ]; do sleep 1; done
if kill -0 "$BUILD_PID" 2> /dev/null; then
  kill "$BUILD_PID"
  build_rc=timeout
else
  wait "$BUILD_PID"
  build_rc=$?
fi
echo "cuda_build: started at ${BUILD_START} s, done by ${SECONDS} s" \
  "(idle $((SECONDS - WAIT_START)) s waiting for it), exit $build_rc" | tee -a "$OUT/timeline.txt"
if [ "$build_rc" = 0 ]; then
  step smoke-cuda 60 "$PY" -m benchmarks.smoke --device "$DEVICE" --backends cuda \
    --out "$OUT/smoke-cuda"
  step headline-cuda 60 "$PY" -m benchmarks --headline --profile --fp32-precision highest \
    --providers floor,cuda "${DEVICE_ARGS[@]}" --out "$OUT/headline-cuda"
else
  NOT_OK+=("cuda_build($build_rc)")
  # Later processes must not start the build again (or wait on a killed build's lock).
  export ADAPTEROPS_JIT_BUILD=0
  tail -n 20 "$OUT/cuda_build.log"
fi

# 8. The rest of the test suite on this device, then the rest of the sweep, in what is left.
step tests $(($(left) - 60)) "$PY" -m pytest -v -rs -p no:cacheprovider --durations=15 \
  -k "$TESTS_AFTER_BUILD_K" "${TESTS_AFTER_BUILD[@]}"
step sweep "$(left)" "$PY" -m benchmarks "${SWEEP_ARGS[@]}" "${DEVICE_ARGS[@]}" --out "$OUT/sweep"
echo "done in ${SECONDS} s; results in $OUT; steps that did not exit 0: ${NOT_OK[*]:-none}" \
  | tee -a "$OUT/timeline.txt"
# The exit status says the same: 1 when any step failed, was cut or was skipped.
[ ${#NOT_OK[@]} -eq 0 ]
