"""Smoke test of the host-overhead benchmark (benchmarks/overhead.py): its quick cases through
`harness.run` with a zero budget (each measurement: the warm-up and `MIN_SAMPLES` samples),
every provider in every mode measured, in a child process with TRITON_INTERPRET=0 and
ADAPTEROPS_CSRC_ON_CPU=0, where automatic dispatch serves CPU tensors with the torch backend
as it does for a CPU user; and, in this process (the tests' interpreter settings on CPU), the
automatic providers' rows saying why they are not timed."""
import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# `benchmarks` is not an installed package: import it from the checkout (see
# tests/test_benchmarks_smoke.py).
sys.path.insert(0, str(ROOT))
from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import harness, overhead  # noqa: E402

AUTO = ("ours_auto", "module_auto")

RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from benchmarks import harness, overhead
    rows = harness.run(overhead.BENCHMARKS, device=sys.argv[1], dtype=torch.bfloat16,
                       quick=True, cpu_budget_s=0.0)
    harness.write_results(rows, harness.summary_markdown(rows, overhead.BENCHMARKS),
                          Path(sys.argv[2]))
""")


def test_every_provider_and_mode_measured(device, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "ADAPTEROPS_CSRC_ON_CPU": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    env.pop("ADAPTEROPS_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", RUN, device, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    benchmarks = overhead.BENCHMARKS
    assert {b.name for b in benchmarks} == {f"overhead_{op}" for op in overhead.OPS}
    expected = sorted((b.name, str(case.M), p, m) for b in benchmarks
                      for case in b.cases(True, device) for p in b.providers for m in b.modes)
    got = sorted((row["op"], row["M"], row["provider"], row["mode"]) for row in table)
    assert got == expected, got
    on_cuda = device == "cuda"
    assert ("ours_triton" in overhead.PROVIDERS) == torch.cuda.is_available()
    for row in table:
        key = (row["op"], row["provider"], row["mode"])
        assert not row["error"], f"{key}: {row['error']}"
        p20, p50, p80 = (float(row[c]) for c in ("p20_ms", "p50_ms", "p80_ms"))
        # Host time of a call at these shapes: microseconds, well under a second.
        assert 0 < p20 <= p50 <= p80 < 1e3, f"{key}: percentiles {p20}, {p50}, {p80}"
        assert float(row["tflops"]) > 0 and float(row["gbps"]) > 0, f"{key}: {row}"
        assert row["saved_mb"] != "", key
        assert row["dtype"] == ("bf16" if on_cuda else "fp32"), f"{key}: dtype {row['dtype']}"
    summary = (tmp_path / "summary.md").read_text()
    for bench in benchmarks:
        for mode in bench.modes:
            assert f"## {bench.name} {mode}" in summary, f"no {bench.name} {mode} table"
    # python -m benchmarks knows every overhead op.
    assert all(cli.BENCHMARKS.get(b.name) is b for b in benchmarks)


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton interpreter on CPU is what the automatic rows refuse")
def test_automatic_dispatch_to_the_interpreter_is_not_timed():
    bench = overhead.BENCHMARKS[0]
    rows = harness.run([bench], device="cpu", dtype=torch.float32, quick=True,
                       cpu_budget_s=0.0, providers=AUTO)
    assert {(row["provider"], row["mode"]) for row in rows} == {
        (p, m) for p in AUTO for m in bench.modes}
    for row in rows:
        assert row["p50_ms"] is None and "TRITON_INTERPRET=0" in row["error"], row
