"""`benchmarks/kernel_check.py` (the GPU run's per-kernel check and its preflight): every check
passes and names the kernels it launched, which are every launchable kernel; a wrong result
and a kernel other than the intended one both fail, naming the kernel; the table's GPU
expectations match what the launchers choose on an H100; the preflight names what stops a run.
Without a GPU, under the interpreter (tiny shapes); with one, on CUDA."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# `benchmarks` is not an installed package: import it from the checkout.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import kernel_check  # noqa: E402


def _rows(out: Path) -> list[dict]:
    with open(out / "kernel_check.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_check_passes_and_names_the_kernels_it_launched(device, tmp_path):
    assert kernel_check.main(["--device", device, "--out", str(tmp_path)]) == 0, \
        (tmp_path / "kernel_check.md").read_text()
    rows = _rows(tmp_path)
    assert {row["check"] for row in rows} == {check.name for check in kernel_check.CHECKS}
    bad = [row for row in rows if row["status"] != "ok"]
    assert not bad, bad
    for row in rows:
        assert row["kernels"] and set(row["kernels"].split()) == set(row["expected"].split()), row
    # Forward and every gradient: LaMDA's x, S and B; the update's weight and copy.
    tensors = {(row["check"], row["tensor"]) for row in rows}
    assert {t for c, t in tensors if c == "lamda_tma"} == {"y", "dx", "dlora_S", "dlora_B"}
    assert {t for c, t in tensors if c == "update_copy_highest"} == {"weight", "copy"}
    # Every launchable kernel is some check's: a new kernel needs its line in CHECKS.
    exercised = {k for row in rows for k in row["kernels"].split()}
    assert exercised == kernel_check.kernel_names(), \
        f"kernels no check launches: {kernel_check.kernel_names() - exercised}"


def test_a_wrong_result_fails_and_names_its_kernel(device, tmp_path, monkeypatch, capsys):
    """A grad pass whose dB is 5% off (as a hardware fault or a miscompile would make it)."""
    from adapterops.backends.triton import lowrank
    grad_pass = lowrank.grad_pass

    def broken(*args):
        gS, dB, dS = grad_pass(*args)
        return gS, dB * 1.05 if dB is not None else None, dS

    monkeypatch.setattr(lowrank, "grad_pass", broken)
    assert kernel_check.main(["--device", device, "--checks", "lamda_tma",
                              "--out", str(tmp_path)]) == 1
    status = {row["tensor"]: row for row in _rows(tmp_path)}
    assert {t: row["status"] for t, row in status.items()} == {
        "y": "ok", "dx": "ok", "dlora_S": "ok", "dlora_B": "FAIL"}, status
    assert "lowrank_grad_pass_kernel" in status["dlora_B"]["kernels"].split()
    err = capsys.readouterr().err
    assert "FAIL lamda_tma dlora_B" in err and "lowrank_grad_pass_kernel" in err, err


def test_a_kernel_other_than_the_intended_one_fails(device, tmp_path, monkeypatch):
    """Right numbers from the wrong kernel: the pointer GEMM where the TMA GEMM was meant."""
    from adapterops.backends.triton import lowrank
    monkeypatch.setattr(lowrank, "tma_layout", lambda *args: None)
    assert kernel_check.main(["--device", device, "--checks", "lamda_tma",
                              "--out", str(tmp_path)]) == 1
    for row in _rows(tmp_path):
        assert row["status"] == "FAIL" and float(row["err"]) <= float(row["bound"]), row
        assert "gemm_lowrank_kernel" in row["kernels"].split(), row
        assert "expected" in row["detail"] and "gemm_lowrank_tma_kernel" in row["detail"], row


# Runs in a fresh process without TRITON_INTERPRET (compiled kernels' launchers), every launch
# recorded instead of run, on CPU tensors of the GPU shapes, as an H100 would have them
# launched: 132 SMs and the tensor-descriptor path. It reaches into the launchers' internals
# (launch, device_reasons, _programs_and_tma): rename one and this says so.
SIMULATED_H100 = """
import contextlib, os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ["ADAPTEROPS_AUTOTUNE"] = "0"
sys.path.insert(0, sys.argv[1])
import torch
from adapterops.backends.triton import dequant, lowrank, routed, update
from benchmarks import kernel_check

log = []
for module in (lowrank, routed, update, dequant):
    assert hasattr(module, "launch") and hasattr(module, "device_reasons"), module
    module.launch = lambda kernel, grid, args, config, **constexprs: log.append(kernel.fn.__name__)
    module.device_reasons = lambda device, kernel: []
assert hasattr(lowrank, "_programs_and_tma")
lowrank._programs_and_tma = lambda device: (132, True)

for check in kernel_check.CHECKS:
    launched = {"forward": [], "backward": []}

    @contextlib.contextmanager
    def phase(name):
        start = len(log)
        yield
        launched[name] += log[start:]

    torch.manual_seed(0)
    if check.precision is not None:
        torch.set_float32_matmul_precision(check.precision)
    inputs, run = kernel_check.BUILDERS[check.op](check.sizes["cuda"], check.dtype, "cpu",
                                                  **check.options)
    with torch.no_grad():
        shapes = {name: out.shape for name, out in run(inputs, "torch").items()}
    kernel_check.results(inputs, run, "triton", None,
                         {name: torch.randn(shape) for name, shape in shapes.items()}, phase)
    torch.set_float32_matmul_precision("highest")
    for name, expected in (("forward", check.forward), ("backward", check.backward)):
        if set(launched[name]) != set(expected):
            print(f"{check.name} {name}: launched {launched[name]}, expected {expected}")
print("simulated")
"""


def test_the_gpu_table_is_what_the_launchers_choose_on_an_h100():
    done = subprocess.run([sys.executable, "-c", SIMULATED_H100, str(REPO)], capture_output=True,
                          text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0 and done.stdout.strip() == "simulated", \
        done.stdout[-3000:] + done.stderr[-3000:]


def test_profiler_names_map_to_triton_kernels():
    known = {"gemm_lowrank_kernel", "gemm_lowrank_tma_kernel", "lowrank_shrink_kernel",
             "lowrank_shrink_finish_kernel"}
    assert kernel_check._triton_name("gemm_lowrank_kernel", known) == "gemm_lowrank_kernel"
    assert kernel_check._triton_name("gemm_lowrank_tma_kernel", known) == "gemm_lowrank_tma_kernel"
    assert kernel_check._triton_name("lowrank_shrink_kernel_0d1d2d", known) == "lowrank_shrink_kernel"
    assert (kernel_check._triton_name("lowrank_shrink_finish_kernel", known)
            == "lowrank_shrink_finish_kernel")
    assert kernel_check._triton_name("sm90_xmma_gemm_bf16bf16_bf16f32", known) is None


def test_preflight_passes_here_and_names_what_stops_a_run(device, monkeypatch, capsys):
    assert kernel_check.main(["--preflight", "--device", device]) == 0
    assert f"preflight ok on {device}" in capsys.readouterr().out
    from adapterops import dispatch
    from adapterops.backends import BACKENDS
    why = "triton is not importable (ImportError: simulated by test_kernel_check)"
    monkeypatch.setattr(BACKENDS["triton"], "unavailable_reason", lambda: why)
    dispatch.clear_cache()
    problems = kernel_check.preflight(torch.device(device))
    assert len(problems) == 1 and why in problems[0], problems
    assert kernel_check.main(["--preflight", "--device", device]) == 1
    out = capsys.readouterr().out
    assert "PREFLIGHT FAILED" in out and why in out, out


@pytest.mark.parametrize("module", ["peft", "transformers"])
def test_preflight_fails_when_an_import_fails(device, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` then raises ImportError
    problems = kernel_check.preflight(torch.device(device))
    assert [p for p in problems if p.startswith(f"import {module} failed")], problems
