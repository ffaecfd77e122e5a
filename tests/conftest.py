"""Test set-up shared by every test file.

Without a GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET must be
set before adapterops first imports its kernels, hence here, at the top. Likewise the `cuda`
backend's C++ runs on CPU tensors (ADAPTEROPS_CSRC_ON_CPU=1: ATen's CPU GEMMs and the host
drivers of its kernels, built just in time on first use); its CUDA kernels themselves run only
on a GPU. With a GPU the same tests run on CUDA tensors (`device` fixture), compiled Triton
kernels and the CUDA build of adapterops._C.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ADAPTEROPS_CSRC_ON_CPU", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


def _interpreter_rounds_bf16_to_nearest() -> None:
    """Triton's interpreter (3.8, 3.9) converts fp32 to bf16 by truncation: its cast keeps the
    top 16 bits (487 of 1,024 random values differ from torch's conversion, every one rounded
    toward zero), and even its RTNE branch rounds half up without the carry into the
    exponent. A GPU rounds to nearest even. Unpatched, every bf16 result of a kernel carries a
    bias toward zero that no GPU has, and the bf16 tests measure that instead of the kernels.
    The patch converts with torch (round to nearest even); nothing else changes."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    cast, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def to_bf16(src):
        values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return interpreter.TensorHandle(bits, tl.bfloat16)

    def is_fp32_to_bf16(src, dst_type) -> bool:
        return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

    def cast_impl(self, src, dst_type):
        return to_bf16(src) if is_fp32_to_bf16(src, dst_type) else cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if is_fp32_to_bf16(src, dst_type) and rounding_mode == interpreter._ir.ROUNDING_MODE.RTNE:
            return to_bf16(src)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl, builder.create_fp_to_fp = cast_impl, create_fp_to_fp


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bf16_to_nearest()


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    """Says which code the cuda backend's tests exercise here (its CUDA kernels run only on a GPU)."""
    if torch.cuda.is_available():
        return "cuda backend: the CUDA build of adapterops._C on CUDA tensors"
    return ("cuda backend: its C++ on CPU tensors (host build, ADAPTEROPS_CSRC_ON_CPU=1); "
            "its CUDA kernels are compiled (make csrc-check) but do not run without a GPU")


@pytest.fixture(autouse=True)
def _fresh_backend_selection():
    """Tests change what backends' reasons read (the loaded extension, environment variables):
    each starts without cached selections."""
    from adapterops import dispatch
    dispatch.clear_cache()


# --- the kernel report, in the background ------------------------------------------------------
# `python -m benchmarks.kernel_report` compiles every Triton configuration for sm_90: about 700
# CPU-seconds, while most of the suite runs on one core (the Triton interpreter is single-threaded
# Python). When its tests are selected, the report starts as soon as the tests are collected, at
# the lowest CPU priority (nice 19: it takes what the suite leaves idle and yields to the
# multi-process and timing tests), and its tests run last, so that they wait only for what is
# left of it. tests/test_kernel_report.py's `report` fixture reads the result.
KERNEL_REPORT_TESTS = "tests/test_kernel_report.py"


def _start_kernel_report() -> tuple[subprocess.Popen, Path]:
    directory = Path(tempfile.mkdtemp(prefix="kernel_report_"))
    # The report needs real JITFunctions: it runs without the interpreter that conftest sets.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with open(directory / "stdout", "w") as out, open(directory / "stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.kernel_report", "--arch", "sm_90",
             "--csv", str(directory / "report.csv")],
            cwd=Path(__file__).resolve().parents[1], env=env, stdout=out, stderr=err,
            preexec_fn=lambda: os.nice(19))
    return proc, directory


@pytest.hookimpl(trylast=True)   # after -m / -k have deselected what they deselect
def pytest_collection_modifyitems(session, config, items):
    report = [item for item in items if item.nodeid.startswith(KERNEL_REPORT_TESTS)]
    if not report:
        return
    items[:] = [item for item in items if not item.nodeid.startswith(KERNEL_REPORT_TESTS)] + report
    config.adapterops_kernel_report = _start_kernel_report()


def pytest_sessionfinish(session, exitstatus):
    """A run stopped early (-x, Ctrl-C) leaves no report compiling behind it, nor its files."""
    started = getattr(session.config, "adapterops_kernel_report", None)
    if started is None:
        return
    proc, directory = started
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    shutil.rmtree(directory, ignore_errors=True)
