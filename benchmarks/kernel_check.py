"""`python -m benchmarks.kernel_check [--device cuda|cpu] [--out DIR] [--checks NAME,...]
[--preflight]`: every Triton kernel on small multi-tile shapes against the torch backend, so
that a hardware fault, a miscompile or a wrong launch names its kernel before any number is
timed.

Each check in `CHECKS` runs one op of the public API with `backend="triton"` (forward and every
gradient; the update in place, with and without its rounded copy) at shapes chosen to force one
path through the launchers: the sm_90 tensor-descriptor (TMA) GEMM (16-bit, contiguous, widths
multiples of 8), the pointer GEMM (an odd in_features, a transposed x), the shrink
and the grad pass with and without S (with dB and dS), whole and split with their finishing
kernels, the routed shrink and gate-gradient kernels (dense and top-k), HD-PiSSA's factor
gradients and the update. Every dimension spans several tiles of the default configuration,
the last one partial (on a GPU: M = 300 rows, in/out of 264-1040, ranks 8-40; under the
interpreter, tiny stand-ins over its 32-wide tiles). Full fp32 (the pointer GEMM and the
passes on FMAs) is left to the test suite: 6 more compiles here.

A row per output and gradient: the error rule of the smoke and the unit tests (at most twice
the torch backend's own error in the same dtype against a float64 reference, plus one rounding
unit), and the Triton kernels the check's phase launched (forward rows: the forward's, gradient
rows: the backward's), which must be exactly the check's expected ones: a check that ran a
different kernel than intended fails. Launches are read from torch.profiler's CUDA kernel
names on a GPU and, under the interpreter, by wrapping the kernels' launch (`[grid]`).

On CUDA it runs with ADAPTEROPS_AUTOTUNE=0 (one configuration per shape, no autotuning: 28
cold Triton compiles, an expected 20-30 s on an H100, not yet measured there; see `CHECKS`) and
CUDA_LAUNCH_BLOCKING=1, so an asynchronous fault is raised at the launch that caused it (an
error row lists the kernels launched until then, the culprit last), unless those variables are
set already. On
CPU it sets TRITON_INTERPRET=1 (unless set) before the kernels are first imported.

Writes DIR/kernel_check.csv and DIR/kernel_check.md after every check and exits 1 when any row
fails. `--preflight` instead checks, in seconds, that the installation can run at all: that
adapterops.kernels, peft and transformers import and that the triton backend serves a tensor
on the device (a small forward against the torch backend); it prints its verdict and exits 1
on any problem.
"""
import argparse
import contextlib
import dataclasses
import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .smoke import BUILDERS, compare, lowrank_inputs, results, write_csv

# The Triton kernels, by their names in adapterops.kernels (and in a GPU's profile).
SHRINK = "lowrank_shrink_kernel"
SHRINK_FINISH = "lowrank_shrink_finish_kernel"
GRAD_PASS = "lowrank_grad_pass_kernel"
GRAD_FINISH = "lowrank_grad_pass_finish_kernel"
TMA_GEMM = "gemm_lowrank_tma_kernel"
POINTER_GEMM = "gemm_lowrank_kernel"
ROUTED_SHRINK = "routed_shrink_kernel"
ROUTED_SHRINK_FINISH = "routed_shrink_finish_kernel"
GATE_GRAD = "routed_gate_grad_kernel"
UPDATE = "lowrank_update_kernel"
GRAD_A = "lowrank_grad_a_kernel"
DEQUANT = "nf4_dequantize_kernel"


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    op: str                    # "lowrank", "routed", "hdpissa", "update" or "dequant" (smoke.BUILDERS)
    dtype: torch.dtype
    sizes: dict                # device type -> {M, K (in), N (out), r, E (heads), P (inner)}
    forward: tuple             # the Triton kernels the forward launches (the update: the call)
    backward: tuple = ()       # ... and the backward
    options: dict = dataclasses.field(default_factory=dict)  # the builder's keyword arguments
    precision: Optional[str] = None  # torch's fp32 matmul precision for the check


BF16, FP32 = torch.bfloat16, torch.float32
# Shapes. The shrink and the grad pass split their loop over K (shrink) or N (grad pass), and
# finish in a second kernel, when their row blocks are fewer than the SMs and the loop is long
# enough (adapterops.backends.triton.lowrank.split_loop: at least 2 x 4 tiles on a GPU, 2 under
# the interpreter, which counts 3 SMs); each shape below takes one form on both devices:
# - a GPU (132 SMs on an H100 or H200), M = 300 rows: 5 row blocks of the 64-row passes, 3 of
#   the 128-row TMA GEMM, the last ones partial. NOSPLIT: in = 272 (3 shrink steps of 128, 5
#   GEMM K steps of 64), out = 400 (7 grad-pass steps of 64, 2 GEMM column tiles of 256).
#   SPLIT: in = out = 1040 (9 and 17 steps: 2 and 4 splits; 5 GEMM column tiles). Widths are
#   multiples of 16, which Triton specializes as it does the smoke's 4096: the smoke's
#   compiles of the same kernels and flags are then cache hits.
# - the interpreter (tiles of 32, 3 persistent GEMM programs): NOSPLIT has 3 row blocks (as many
#   as its SMs), SPLIT 2; in = 48 and out = 40 span 2 tiles each.
NOSPLIT = {"cuda": dict(M=300, K=272, N=400), "cpu": dict(M=72, K=48, N=40)}
SPLIT = {"cuda": dict(M=300, K=1040, N=1040), "cpu": dict(M=40, K=48, N=40)}


def sizes(shape: dict, **more) -> dict:
    return {device: dict(s, **more) for device, s in shape.items()}


# The table: one check per line or two (name, op, dtype, sizes per device, the Triton kernels
# its forward and its backward must launch, exactly). Distinct kernel compiles on a GPU
# (ADAPTEROPS_AUTOTUNE=0; a specialization an earlier check compiled is a cache hit):
# 4 + 4 + 4 + 2 + 3 + 5 + 4 + 1 + 1 + 1 = 29, and 4 with dropout (the masked shrink, the two masked
# dx GEMMs, the dA kernel); at 0.4-1.9 s each on triton 3.6, 11-53 s, about 20 s typically (the
# GEMMs cost the most, the finishing kernels the least).
CHECKS = (
    # LaMDA (A frozen): the shrink and grad pass with S, dB and dS, whole and split; the TMA
    # GEMM forward and for dx.
    Check("lamda_tma", "lowrank", BF16, sizes(NOSPLIT, r=16),
          (SHRINK, TMA_GEMM), (GRAD_PASS, TMA_GEMM), dict(lamda=True)),
    Check("lamda_tma_split", "lowrank", BF16, sizes(SPLIT, r=16),
          (SHRINK, SHRINK_FINISH, TMA_GEMM), (GRAD_PASS, GRAD_FINISH, TMA_GEMM), dict(lamda=True)),
    # LoRA (no S; dA on cuBLAS), in = 273 (rows of 546 bytes: no TMA descriptor), rank 40
    # (bucket 64, 3 chunks of 16): the pointer GEMM both ways.
    Check("lora_pointer_odd_in_r40", "lowrank", BF16,
          {"cuda": dict(M=300, K=273, N=264, r=40), "cpu": dict(M=72, K=41, N=40, r=40)},
          (SHRINK, POINTER_GEMM), (GRAD_PASS, POINTER_GEMM)),
    # x transposed (column stride M): the pointer GEMM forward, the TMA GEMM for dx.
    Check("lamda_transposed_x", "lowrank", BF16, sizes(NOSPLIT, r=16),
          (SHRINK, POINTER_GEMM), (GRAD_PASS, TMA_GEMM), dict(lamda=True, transposed_x=True)),
    # Adapter dropout (p = 0.1, a fixed seed): LaMDA's masked shrink, split, and the dx TMA
    # GEMM's masked epilogue; LoRA's on the pointer GEMM, with the dA kernel.
    Check("lamda_dropout_tma_split", "lowrank", BF16, sizes(SPLIT, r=16),
          (SHRINK, SHRINK_FINISH, TMA_GEMM), (GRAD_PASS, GRAD_FINISH, TMA_GEMM),
          dict(lamda=True, dropout=0.1)),
    Check("lora_dropout_pointer_odd_in_r40", "lowrank", BF16,
          {"cuda": dict(M=300, K=273, N=264, r=40), "cpu": dict(M=72, K=41, N=40, r=40)},
          (SHRINK, POINTER_GEMM), (GRAD_PASS, POINTER_GEMM, GRAD_A), dict(dropout=0.1)),
    # HydraLoRA, r = 8 (padded to 16), E = 4 (the grad pass at E r = 32): dense with the whole
    # shrink and grad pass, top-2 with the split ones.
    Check("hydra_dense", "routed", BF16, sizes(NOSPLIT, r=8, E=4),
          (ROUTED_SHRINK, TMA_GEMM), (GRAD_PASS, GATE_GRAD, TMA_GEMM)),
    Check("hydra_top2_split", "routed", BF16, sizes(SPLIT, r=8, E=4),
          (ROUTED_SHRINK, ROUTED_SHRINK_FINISH, TMA_GEMM),
          (GRAD_PASS, GRAD_FINISH, GATE_GRAD, TMA_GEMM), dict(top_k=2)),
    # HD-PiSSA: the base layer on cuBLAS; the shrink (h, for gB) and grad pass without S, split.
    Check("hdpissa_split", "hdpissa", BF16, sizes(SPLIT, r=16),
          (SHRINK, SHRINK_FINISH), (GRAD_PASS, GRAD_FINISH)),
    # The update (fp32 W): inner size 2 K r = 64 with a bf16 copy in full fp32; 40 (a partial
    # inner chunk) without a copy in TF32 (on a GPU; the interpreter computes full fp32).
    Check("update_copy_highest", "update", FP32, sizes(NOSPLIT, P=64), (UPDATE,), (),
          dict(copy=BF16), "highest"),
    Check("update_nocopy_high", "update", FP32, sizes(NOSPLIT, P=40), (UPDATE,), (), {}, "high"),
    # A 4-bit weight dequantized into bf16 (odd element count on a GPU: 401 x 273).
    Check("nf4_dequant", "dequant", BF16, {"cuda": dict(N=401, K=273), "cpu": dict(N=40, K=49)},
          (DEQUANT,)),
)


def _is_kernel(obj) -> bool:
    import triton
    return isinstance(obj, triton.runtime.jit.KernelInterface)


def _kernel_modules() -> list:
    import adapterops.kernels as package
    return [importlib.import_module(f"{package.__name__}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__)]


def kernel_names() -> set[str]:
    """Every launchable Triton kernel: the @triton.jit functions of adapterops.kernels named
    *_kernel (the others are helpers that kernels call, never launched)."""
    return {obj.fn.__name__ for module in _kernel_modules() for attr, obj in vars(module).items()
            if attr.endswith("_kernel") and _is_kernel(obj)}


class _Recording:
    """Stands in for an interpreted kernel: records its name at every launch (`kernel[grid]`).
    Under the interpreter only: on a GPU the launchers would take it for an interpreted kernel
    and change their configuration."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(self.kernel.fn.__name__)
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@contextlib.contextmanager
def _interpreted_launches(log: list):
    patched = [(module, attr, obj) for module in _kernel_modules()
               for attr, obj in vars(module).items() if attr.endswith("_kernel") and _is_kernel(obj)]
    for module, attr, obj in patched:
        setattr(module, attr, _Recording(obj, log))
    try:
        yield
    finally:
        for module, attr, obj in patched:
            setattr(module, attr, obj)


def _triton_name(device_kernel: str, known: set[str]) -> Optional[str]:
    """The Triton kernel a profiler's CUDA kernel name is (Triton names the kernel after its
    function, older versions with a suffix), or None (cuBLAS, ATen)."""
    matches = [k for k in known if device_kernel == k or device_kernel.startswith(k + "_")]
    return max(matches, key=len) if matches else None


@contextlib.contextmanager
def _gpu_launches(log: list, blind: list):
    """Records the Triton kernels the GPU ran inside the block, from torch.profiler's CUDA
    kernel events; appends True to `blind` when the profiler saw no CUDA kernel at all."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    known = kernel_names()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    try:
        with prof:
            yield
            torch.cuda.synchronize()
    finally:
        try:  # after a fault too: the kernels that ran name the culprit
            device_kernels = [event.name for event in prof.events()
                              if event.device_type == DeviceType.CUDA]
        except Exception:
            device_kernels = []
        if not device_kernels:
            blind.append(True)
        log += [name for name in (_triton_name(k, known) for k in device_kernels) if name]


def _unique(names: list) -> list:
    return list(dict.fromkeys(names))


def expected_kernels(check: Check, device: torch.device) -> dict[str, tuple]:
    """The check's expected kernels per phase. Before sm_90 the launchers have no TMA path:
    the pointer GEMM serves there."""
    expected = {"forward": check.forward, "backward": check.backward}
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        expected = {phase: tuple(_unique([POINTER_GEMM if k == TMA_GEMM else k for k in names]))
                    for phase, names in expected.items()}
    return expected


def run_check(check: Check, device: torch.device) -> list[dict]:
    """The rows of one check: one per output and gradient, or one saying what went wrong."""
    expected = expected_kernels(check, device)
    launched = {"forward": [], "backward": []}
    blind: list = []

    def phase(name):
        if device.type == "cuda":
            return _gpu_launches(launched[name], blind)
        return _interpreted_launches(launched[name])

    def names(phase_name: str) -> str:
        return " ".join(_unique(launched[phase_name])) or "(none)"

    common = {"check": check.name, "expected": " ".join(expected["forward"] + expected["backward"])}
    previous = torch.get_float32_matmul_precision()
    if check.precision is not None:
        torch.set_float32_matmul_precision(check.precision)
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        inputs, run = BUILDERS[check.op](check.sizes[device.type], check.dtype, device,
                                         **check.options)
        with torch.no_grad():
            shapes = {name: out.shape for name, out in run(inputs, "torch").items()}
        grad_outputs = {name: torch.randn(shape, device=device) for name, shape in shapes.items()}
        reference = results(inputs, run, "torch", torch.float64, grad_outputs)
        baseline = results(inputs, run, "torch", None, grad_outputs)
        actual = results(inputs, run, "triton", None, grad_outputs, phase)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:
        return [{**common, "status": "error",
                 "kernels": " ".join(_unique(launched["forward"] + launched["backward"])),
                 "detail": f"{type(exc).__name__}: {exc} (the Triton kernels launched until "
                           f"then, the last one the likeliest culprit: forward "
                           f"{names('forward')}, backward {names('backward')})"
                           .replace("\n", " ")}]
    finally:
        torch.set_float32_matmul_precision(previous)
    seconds = time.perf_counter() - start
    rows = []
    for tensor, ref in reference.items():
        phase_name = "forward" if tensor in shapes else "backward"
        row = {**common, "phase": phase_name, "kernels": names(phase_name),
               "expected": " ".join(expected[phase_name]), "seconds": seconds,
               **compare(tensor, actual[tensor], ref, baseline[tensor])}
        problems = [row["detail"]] if row["detail"] else []
        if row["status"] == "FAIL" and not problems:
            problems.append(f"error {row['err']:.3g} > bound {row['bound']:.3g}")
        if blind:
            row["status"] = "error"
            problems.append("the profiler recorded no CUDA kernel: which kernels ran is unknown")
        elif set(launched[phase_name]) != set(expected[phase_name]):
            row["status"] = "FAIL"
            problems.append(f"the {phase_name} launched {names(phase_name)}, expected "
                            f"{' '.join(expected[phase_name]) or '(none)'}")
        row["detail"] = "; ".join(problems)
        rows.append(row)
    return rows


COLUMNS = ("check", "phase", "tensor", "status", "kernels", "expected", "err", "torch_err",
           "bound", "scale", "seconds", "detail")
FAILED = ("FAIL", "error")


def write(rows: list[dict], out_dir: Path, device_name: str) -> None:
    write_csv(rows, out_dir / "kernel_check.csv", COLUMNS)
    failed = sum(row["status"] in FAILED for row in rows)
    lines = ["# Kernel check", "", f"{device_name}, torch {torch.__version__}; bound = 2 x "
             "torch's error in the dtype + 1 ulp at the reference's scale; kernels: the Triton "
             "kernels the row's phase launched", "",
             f"{len(rows)} rows, {failed} failed", "",
             "| check | tensor | status | kernels | err | bound | s | detail |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        numbers = (f"{row['err']:.3g} | {row['bound']:.3g} | {row['seconds']:.1f}"
                   if "err" in row else " | | ")
        lines.append(f"| {row['check']} | {row.get('tensor', '')} | {row['status']} | "
                     f"{row['kernels']} | {numbers} | {row['detail'][:300].replace('|', '/')} |")
    (out_dir / "kernel_check.md").write_text("\n".join(lines) + "\n")


def preflight(device: torch.device) -> list[str]:
    """What stops this installation from running the Triton kernels on `device` (empty: nothing):
    imports that fail, a triton backend that cannot serve a tensor there, or a wrong result."""
    problems = []
    for module in ("adapterops.kernels", "peft", "transformers"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            problems.append(f"import {module} failed: {type(exc).__name__}: {exc}")
    if problems and problems[0].startswith("import adapterops.kernels"):
        return problems
    try:
        torch.manual_seed(0)
        inputs, run = lowrank_inputs(dict(M=16, K=32, N=32, r=16), BF16, device)
        with torch.no_grad():
            reference = run({k: v.double() for k, v in inputs.items()}, "torch")["y"]
            baseline = run(inputs, "torch")["y"]
            actual = run(inputs, "triton")["y"]
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # the forced backend's ValueError names every reason
        problems.append(f"the triton backend did not serve a {device.type} tensor: "
                        f"{type(exc).__name__}: {exc}")
        return problems
    row = compare("y", actual, reference, baseline)
    if row["status"] != "ok":
        problems.append(f"the triton backend's lowrank_linear on {device.type} is wrong: "
                        f"error {row['err']:.3g} > bound {row['bound']:.3g} {row['detail']}")
    return problems


# Set for the run when not set already (and restored after it, for callers in the same process).
ENV_DEFAULTS = {
    # Read when adapterops first imports its kernels.
    "cpu": {"TRITON_INTERPRET": "1", "ADAPTEROPS_AUTOTUNE": "0"},
    # Read when CUDA initializes: an asynchronous fault is raised at the launch that caused it.
    "cuda": {"CUDA_LAUNCH_BLOCKING": "1", "ADAPTEROPS_AUTOTUNE": "0"},
}


@contextlib.contextmanager
def _defaults(variables: dict):
    unset = [name for name in variables if name not in os.environ]
    os.environ.update({name: variables[name] for name in unset})
    try:
        yield
    finally:
        for name in unset:
            os.environ.pop(name, None)


def _preflight_main(device: torch.device) -> int:
    start = time.perf_counter()
    problems = preflight(device)
    took = f"{time.perf_counter() - start:.1f} s"
    if problems:
        print(f"PREFLIGHT FAILED on {device.type} ({took}):", *problems, sep="\n  ", flush=True)
        return 1
    print(f"preflight ok on {device.type} ({took}): adapterops.kernels, peft and transformers "
          f"import; the triton backend served a {device.type} tensor and matched the torch "
          "backend", flush=True)
    return 0


def _check_main(chosen: list[str], by_name: dict, device: torch.device, out: Path) -> int:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows: list[dict] = []
    for name in chosen:
        check_rows = run_check(by_name[name], device)
        rows += check_rows
        write(rows, out, device_name)
        kernels = _unique([k for row in check_rows for k in row["kernels"].split()])
        print(f"{name} ({' '.join(kernels)}): "
              + ", ".join(f"{row.get('tensor', '')} {row['status']}" for row in check_rows),
              flush=True)
        for row in check_rows:
            if row["status"] in FAILED:
                print(f"kernel_check: {row['status']} {name} {row.get('tensor', '')} "
                      f"[{row['kernels']}]: {row['detail']}", file=sys.stderr, flush=True)
    failed = sum(row["status"] in FAILED for row in rows)
    print(f"kernel_check: {len(rows)} rows, {failed} failed", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checks", default=",".join(check.name for check in CHECKS),
                        help="comma-separated check names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--preflight", action="store_true",
                        help="only check that the installation can run the kernels here")
    args = parser.parse_args(argv)
    by_name = {check.name: check for check in CHECKS}
    chosen = [name for name in args.checks.split(",") if name]
    unknown = [name for name in chosen if name not in by_name]
    if unknown or not chosen:
        parser.error(f"unknown or missing checks: {unknown}; known: {', '.join(by_name)}")
    device = torch.device(args.device)
    with _defaults(ENV_DEFAULTS[device.type]):
        return _preflight_main(device) if args.preflight else _check_main(chosen, by_name, device,
                                                                          args.out)

if __name__ == "__main__":
    raise SystemExit(main())
