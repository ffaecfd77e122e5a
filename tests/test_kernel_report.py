"""The kernel report (`python -m benchmarks.kernel_report`) compiles the Triton kernels for sm_90
without a GPU: every configuration it compiles must compile, every 16-bit kernel must use wgmma,
and no default configuration may spill registers.

It compiles every configuration (228 for sm_90, about 120 s with 2 jobs on the 2-core
development machine): what the dispatcher can launch is what must compile. No default
configuration spills there; the test holds the defaults to that, as the report does.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(completed process, CSV rows) of one report run, shared by the tests below."""
    path = tmp_path_factory.mktemp("kernel_report") / "report.csv"
    # conftest sets TRITON_INTERPRET=1 on machines without a GPU; the report needs real
    # JITFunctions, so it runs without it (it would otherwise re-run itself without it).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_report", "--arch", "sm_90",
         "--csv", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True)
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    return proc, rows


def _names(rows) -> str:
    return "\n".join(f"  {r['kernel']} {r['label']}: registers {r['registers']}, spills "
                     f"{r['spills']}, shared {r['shared']}, mma {r['mma']} {r['error'][:300]}"
                     for r in rows)


def test_report_exits_zero(report):
    proc, _ = report
    lines = proc.stdout.splitlines()
    failures = [line for line in lines if "FAIL:" in line]
    assert proc.returncode == 0, (
        f"the kernel report exited {proc.returncode}: {lines[-1] if lines else 'no output'}\n"
        + "\n".join(failures) + f"\nstderr (end):\n{proc.stderr[-2000:]}")


def test_every_configuration_compiles(report):
    _, rows = report
    assert rows, "the report wrote no rows"
    failed = [r for r in rows if r["error"]]
    assert not failed, (f"{len(failed)} of {len(rows)} configurations failed to compile:\n"
                        + _names(failed))


# Kernels whose work is elementwise (no `tl.dot`): they have no matrix instruction to check.
NO_DOT_KERNELS = {"routed_gate_grad_kernel"}


def test_16bit_kernels_use_wgmma(report):
    _, rows = report
    sixteen = [r for r in rows if r["dtype"] in ("float16", "bfloat16")]
    assert {r["kernel"] for r in sixteen} == {"gemm_lowrank_kernel", "lowrank_shrink_kernel",
                                              "lowrank_grad_pass_kernel", "routed_shrink_kernel",
                                              "routed_gate_grad_kernel"}, "a 16-bit kernel is missing"
    no_dot = [r for r in sixteen if r["kernel"] in NO_DOT_KERNELS]
    assert no_dot and all(r["mma"] == "none" for r in no_dot), _names(no_dot)
    without = [r for r in sixteen if r["mma"] != "wgmma" and r["kernel"] not in NO_DOT_KERNELS]
    assert not without, (f"{len(without)} of {len(sixteen)} 16-bit configurations do not use wgmma:\n"
                         + _names(without))


def test_no_default_configuration_spills(report):
    _, rows = report
    defaults = [r for r in rows if r["default"] == "True" and not r["error"]]
    spilling = [r for r in defaults if r["spills"] != "0"]
    assert not spilling, (f"{len(spilling)} of {len(defaults)} default configurations spill "
                          f"(bytes of spill stores + loads):\n" + _names(spilling))
