#!/usr/bin/env bash
# One GPU session's evidence in three device calls (each under the device tool's 10-minute limit):
#   bash benchmarks/gpu_run.sh tests                                # install, info, the test suite on CUDA
#   bash benchmarks/gpu_run.sh bench lamda,lora                     # the full sweep of these ops
#   bash benchmarks/gpu_run.sh bench hydra,hdpissa,hdpissa_update   # the rest, then the kernel report
# (all ops in one call, `bench` alone, may not fit: the full sweep is estimated at 6.5-7.5 min.)
# results.csv is rewritten after every case, so a sweep cut short keeps what it measured.
# Everything lands in $OUT (default: benchmarks/results/gpu-run); commit what the second call
# writes under benchmarks/results/. The GPU image has torch and triton but no package registry:
# the package is installed without dependencies or build isolation.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
PY=${PY:-python3}
case "${1:-}" in
  tests|bench) ;;
  *) echo "usage: bash benchmarks/gpu_run.sh tests | bench [OPS]" >&2; exit 2 ;;
esac
OPS=${2:-}
mkdir -p "$OUT"
# The install also builds the cuda backend (adapterops._C) when nvcc is there: all 16 cores.
MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed:"; tail -20 "$OUT/install.log"; exit 1; }
case "${1:-}" in
  tests)
    $PY -m adapterops.info | tee "$OUT/info.txt"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    make test PYTHON="$PY" PYTEST_ARGS="-q -rs --durations=15 --junitxml=$OUT/tests.xml" 2>&1 \
      | tee "$OUT/tests.log" | tail -40
    ;;
  bench)
    dir="$OUT/cuda-$(date +%Y-%m-%d)${OPS:+-${OPS//,/-}}"
    timeout 480 $PY -m benchmarks --device cuda --out "$dir" ${OPS:+--ops "$OPS"} 2>&1 \
      | tee "$OUT/bench${OPS:+-${OPS//,/-}}.log" | tail -60
    # The kernel report with the last ops (or with all of them): about 2 minutes on 16 cores.
    if [ -z "$OPS" ] || [[ "$OPS" == *hdpissa* ]]; then
      $PY -m benchmarks.kernel_report --arch sm_90 --csv "$OUT/kernel_report.csv" > "$OUT/kernel_report.txt" 2>&1
      tail -1 "$OUT/kernel_report.txt"
    fi
    ;;
esac
