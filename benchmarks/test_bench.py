"""pytest-benchmark over the `--quick` sweep of every op in `python -m benchmarks` (the same
cases, providers and modes, built by the same harness code), bf16 as in its default run.

`pytest benchmarks/ -q` times each (op, case, provider, mode) with the `benchmark` fixture;
pytest-benchmark's own options apply (`--benchmark-json`, `--benchmark-compare`, ...). A
provider that cannot run here (peft not installed, say) is skipped with its reason.
"""
import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = harness.DTYPES["bf16"]
ROUNDS = 3

PARAMS = [pytest.param(bench, case, provider, mode,
                       id=f"{bench.name}-{case.label().replace('=', '').replace(' ', '-')}-"
                          f"{provider}-{mode}")
          for bench in cli.BENCHMARKS.values()
          for case in bench.cases(True, DEVICE.type)
          for provider in bench.providers
          for mode in bench.modes]


@pytest.mark.parametrize("bench, case, provider, mode", PARAMS)
def test_bench(benchmark, bench, case, provider, mode):
    try:
        prepared = harness.prepare(bench, provider, case, DTYPE, DEVICE)
    except ImportError as exc:
        pytest.skip(f"{provider}: {type(exc).__name__}: {exc}")
    fn = prepared.mode_fn(mode)
    if DEVICE.type == "cuda":
        call = fn

        def fn():
            call()
            torch.cuda.synchronize()  # time the kernels, not their launch

    benchmark.extra_info.update(op=bench.name, provider=provider, mode=mode,
                                saved_mb=(None if prepared.saved_bytes is None
                                          else prepared.saved_bytes / harness.MB),
                                flops=prepared.workload.flops(mode),
                                bytes=prepared.workload.io_bytes(mode),
                                **{k: v for k, v in vars(case).items() if v is not None})
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
