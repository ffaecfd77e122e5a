"""The kernel report (`python -m benchmarks.kernel_report`) compiles the Triton kernels for sm_90
without a GPU: every configuration it compiles must compile, every 16-bit kernel must use wgmma,
and no default configuration may spill registers, serialize its wgmma, get a ptxas performance
advisory or compile a reduction to a fenced atomic; the sm_90 GEMM path must use TMA.

It compiles every configuration (about 700 CPU-seconds for sm_90 on the 2-core development
machine): what the dispatcher can launch is what must compile. conftest starts the report in
the background at the lowest CPU priority when these tests are collected and runs them last,
so that the compiles use what the rest of the suite leaves idle. The rules that judge
the compiled code are tested here too, on SASS and ptxas text that breaks each of them, so a
rule that cannot fail would show.
"""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `benchmarks` is not an installed package: import it from the checkout.
sys.path.insert(0, str(ROOT))
from benchmarks import kernel_report  # noqa: E402

# The report runs in a subprocess (every kernel compiled for sm_90): slow, so not in
# `make quick` (pyproject.toml's `slow` marker).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(request):
    """(completed process, CSV rows) of one report run, shared by the tests below. conftest
    starts the run in the background when these tests are collected (and orders them last)."""
    proc, directory = request.config.adapterops_kernel_report
    proc.wait()
    completed = subprocess.CompletedProcess(proc.args, proc.returncode,
                                            (directory / "stdout").read_text(),
                                            (directory / "stderr").read_text())
    rows = []
    if (directory / "report.csv").exists():
        with open(directory / "report.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    return completed, rows


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
# The low-rank finishing kernels have one only with S (h1 S^T, g S).
NO_DOT_KERNELS = {"routed_gate_grad_kernel", "routed_shrink_finish_kernel", "nf4_dequantize_kernel"}
FINISH_KERNELS = {"lowrank_shrink_finish_kernel", "lowrank_grad_pass_finish_kernel"}


def _no_dot(row) -> bool:
    return row["kernel"] in NO_DOT_KERNELS or (row["kernel"] in FINISH_KERNELS
                                               and " S=False" in row["label"])


def test_16bit_kernels_use_wgmma(report):
    _, rows = report
    # With fp32 adapters on a 16-bit x ("+fp32" in the label) only the GEMMs' main loops are
    # 16-bit products; the passes multiply in fp32 (full fp32 runs on FMAs by design).
    mixed = [r for r in rows if "+fp32" in r["label"]]
    mixed_gemms = [r for r in mixed if r["kernel"].startswith("gemm_")]
    assert mixed_gemms and all(r["mma"] == "wgmma" for r in mixed_gemms), _names(mixed_gemms)
    sixteen = [r for r in rows if r["dtype"] in ("float16", "bfloat16") and r not in mixed]
    assert {r["kernel"] for r in sixteen} == {"gemm_lowrank_kernel", "gemm_lowrank_tma_kernel",
                                              "lowrank_shrink_kernel", "lowrank_grad_pass_kernel",
                                              "lowrank_grad_a_kernel",
                                              "routed_shrink_kernel", "routed_gate_grad_kernel",
                                              *NO_DOT_KERNELS, *FINISH_KERNELS}, \
        "a 16-bit kernel is missing"
    no_dot = [r for r in sixteen if _no_dot(r)]
    assert no_dot and all(r["mma"] == "none" for r in no_dot), _names(no_dot)
    without = [r for r in sixteen if r["mma"] != "wgmma" and not _no_dot(r)]
    assert not without, (f"{len(without)} of {len(sixteen)} 16-bit configurations do not use wgmma:\n"
                         + _names(without))


def test_no_default_configuration_spills(report):
    _, rows = report
    defaults = [r for r in rows if r["default"] == "True" and not r["error"]]
    spilling = [r for r in defaults if r["spills"] != "0"]
    assert not spilling, (f"{len(spilling)} of {len(defaults)} default configurations spill "
                          f"(bytes of spill stores + loads):\n" + _names(spilling))


def test_no_default_configuration_is_slow_by_its_compiled_code(report):
    _, rows = report
    defaults = [r for r in rows if r["default"] == "True" and not r["error"]]
    # A finishing kernel's MMAs are its r x r tail (loop "partials"): the wgmma rules judge
    # main loops of MMAs only, and a GEMM's must be pipelined.
    slow = [r for r in defaults
            if (r["wgmma_serialized"] != "no" and r["loop"] != "partials")
            or (r["loop"] == "gemm" and r["wgmma_waits"] not in ("pipelined", "none"))
            or r["advisories"] != "none" or r["reductions"] == kernel_report.FENCED]
    assert not slow, (f"{len(slow)} of {len(defaults)} default configurations serialize wgmma, "
                      "wait for a GEMM's MMAs, get ptxas advisories or fence their "
                      "reductions:\n" + _names(slow))
    assert {r["loop"] for r in defaults} == {"gemm", "stream", "partials"}
    # The grad pass's reductions are there, and relaxed.
    grad_pass = [r for r in defaults if r["kernel"] == "lowrank_grad_pass_kernel"
                 and "dB=True" in r["label"]]
    assert grad_pass and all(r["reductions"] == "REDG" for r in grad_pass), _names(grad_pass)


def test_sm90_gemm_path_uses_tma(report):
    _, rows = report
    tma = [r for r in rows if r["kernel"] == "gemm_lowrank_tma_kernel"]
    assert tma, "no tensor-descriptor GEMM configuration in the report"
    without = [r for r in tma if r["tma"] != "yes"]
    assert not without, _names(without)
    assert all(r["tma"] == "no" for r in rows if r["kernel"] == "gemm_lowrank_kernel")


def test_tma_configurations_compile_only_where_they_launch():
    configs = kernel_report._load_configs()
    tma = [i for i, cfg in enumerate(configs) if cfg.expects_tma]
    pointer = [i for i, cfg in enumerate(configs) if not cfg.expects_tma]
    assert tma and pointer
    jobs = kernel_report._jobs(configs, tma + pointer[:1], ("aligned", "odd"), ("sm_90", "sm_80"))
    assert {(s, arch) for i, s, arch in jobs if i in tma} == {("aligned", "sm_90")}
    assert len([job for job in jobs if job[0] == pointer[0]]) == 4


# The rules themselves, on text that breaks each of them.

def _sass(*instructions: str) -> list:
    """cuobjdump-style lines, 16 bytes apart from address 0."""
    text = "\n".join(f"        /*{16 * i:04x}*/                   {ins} ;   /* 0x000 */"
                     for i, ins in enumerate(instructions))
    return kernel_report._sass_instructions(text)


HGMMA = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0"
WAIT_ALL = "WARPGROUP.DEPBAR.LE gsb0, 0x0"
WAIT_ONE = "WARPGROUP.DEPBAR.LE gsb0, 0x1"


def test_serialized_wgmma_is_found_in_the_main_loop():
    # A loop from 0x10 whose every HGMMA waits for all before it: serialized.
    serialized = _sass("MOV R1, R2", HGMMA, WAIT_ALL, HGMMA, WAIT_ALL, "@P0 BRA 0x10", "EXIT")
    assert kernel_report._wgmma_serialized_in_sass(serialized)
    # The pipelined form: a group of HGMMAs, one left in flight.
    pipelined = _sass("MOV R1, R2", HGMMA, HGMMA, WAIT_ONE, "@P0 BRA 0x10", WAIT_ALL, "EXIT")
    assert not kernel_report._wgmma_serialized_in_sass(pipelined)
    # A serialized tail loop of one HGMMA after a pipelined main loop of two: the main loop
    # (the one with the most HGMMAs) decides.
    tail = _sass("MOV R1, R2", HGMMA, HGMMA, WAIT_ONE, "@P0 BRA 0x10", WAIT_ALL,
                 HGMMA, WAIT_ALL, "@P1 BRA 0x60", "EXIT")
    assert not kernel_report._wgmma_serialized_in_sass(tail)
    # A persistent GEMM: the tile loop (from 0x10) holds the pipelined K-loop (from 0x20) and
    # an epilogue MMA waited for; the K-loop decides, though the tile loop holds more HGMMAs.
    persistent = _sass("MOV R1, R2", "MOV R3, R4", HGMMA, HGMMA, WAIT_ONE, "@P0 BRA 0x20",
                       WAIT_ALL, HGMMA, WAIT_ALL, "@P1 BRA 0x10", "EXIT")
    assert kernel_report._wgmma_waits(persistent) == "pipelined"
    assert not kernel_report._wgmma_serialized_in_sass(_sass("MOV R1, R2", "EXIT"))


def test_wgmma_waits_are_classified():
    assert kernel_report._wgmma_waits(_sass("MOV R1, R2", "EXIT")) == "none"
    # One left in flight across iterations.
    assert kernel_report._wgmma_waits(
        _sass("MOV R1, R2", HGMMA, HGMMA, WAIT_ONE, "@P0 BRA 0x10", WAIT_ALL, "EXIT")) == "pipelined"
    # The chain of one tl.dot (two k16 steps) issues back to back, then waits for all: the
    # grad pass's loop.
    assert kernel_report._wgmma_waits(
        _sass("MOV R1, R2", HGMMA, HGMMA, WAIT_ALL, "@P0 BRA 0x10", "EXIT")) == "per group"
    assert kernel_report._wgmma_waits(
        _sass("MOV R1, R2", HGMMA, WAIT_ALL, HGMMA, WAIT_ALL, "@P0 BRA 0x10", "EXIT")) == "per HGMMA"


def test_reductions_are_classified():
    fenced = _sass("MEMBAR.ALL.GPU", "ERRBAR", "ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R0, [R2.64], R4",
                   "CCTL.IVALL", "EXIT")
    assert kernel_report._reductions(fenced) == kernel_report.FENCED
    relaxed = _sass("REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R8", "EXIT")
    assert kernel_report._reductions(relaxed) == "REDG"
    assert kernel_report._reductions(_sass("STG.E.128 desc[UR4][R2.64], R8", "EXIT")) == "none"


def test_advisories_and_the_failure_rules():
    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
           "serialized due to ...\nptxas info    : (C7514) Potential Performance Loss: wgmma...")
    assert kernel_report._advisories(log) == ["C7514", "C7515"]
    good = {"error": "", "arch": "sm_90", "shared": 1000, "default": True, "spills": 0,
            "wgmma_serialized": "no", "wgmma_waits": "pipelined", "advisories": "none",
            "reductions": "REDG", "expects_tma": True, "tma": "yes", "loop": "gemm"}
    assert kernel_report._problems(good) == []
    for change in ({"spills": 8}, {"spills": "?"}, {"wgmma_serialized": "yes"},
                   {"wgmma_waits": "per group"}, {"wgmma_waits": "?"},
                   {"advisories": "C7514"}, {"reductions": kernel_report.FENCED},
                   {"tma": "no"}, {"shared": 10 ** 6}, {"error": "boom"},
                   {"loop": "stream", "wgmma_serialized": "yes"}):
        assert kernel_report._problems({**good, **change}), f"{change} passed the report"
    # A streaming pass may wait for each iteration's MMAs; a finishing kernel's MMAs are its
    # r x r tail, outside the wgmma rules.
    assert kernel_report._problems({**good, "loop": "stream", "wgmma_waits": "per group"}) == []
    assert kernel_report._problems({**good, "loop": "partials", "wgmma_serialized": "yes",
                                    "wgmma_waits": "per HGMMA"}) == []
    # A configuration that is not the default is held to the shared-memory limit only.
    assert kernel_report._problems({**good, "default": False, "wgmma_serialized": "yes",
                                    "spills": 8}) == []
