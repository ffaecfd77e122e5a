"""`python -m benchmarks.smoke [--device cuda|cpu] [--backends triton,cuda] [--out DIR]`: a
correctness smoke of every op at the shapes the README's targets are stated at (on CPU, small
stand-ins), before anything is timed: a fast kernel that is wrong must not produce a number.

Per op and backend: the outputs (and, for the autograd ops, every gradient, from one fixed
output gradient) against the torch backend on float64 copies of the same inputs, with the rule
of the unit tests (tests/utils.py): the backend's max abs error may be at most twice the torch
backend's own error in the same dtype, plus one unit of the dtype's rounding at the
reference's scale. Cases: `lamda` and `lora` (`lowrank_linear`, bf16, M = 8192, in = out = 4096,
r = 16), `hydra` and `hydra_top2` (`routed_lowrank_linear`, r = 8, E = 4, dense and top-2),
`hdpissa` (`hdpissa_linear`, r = 16), `update_highest` and `update_high` (`lowrank_update_`,
fp32 W 4096 x 4096, inner size 2 K r = 256 for K = 8 ranks, a bf16 copy; at both fp32 matmul
precisions).

A backend that was asked for (`--backends`) and cannot serve a case gives a row with the
backend's reasons (the dispatcher's message, as `python -m adapterops.info` would explain it).
On a CUDA device that row is a failure (status `UNAVAILABLE`): the smoke exists to check the
backends there, and a triton that failed to import must not pass as "0 failed". On CPU (the
dry run, where a backend may legitimately be absent) it is reported (status `unavailable`) and
counted apart from the checks, so a run that checked nothing says so instead of "0 failed".

Writes DIR/smoke.csv and DIR/smoke.md after every case, prints a verdict line (and every failure,
with its reasons, on stderr) and exits 1 when any check fails.
"""
import argparse
import contextlib
import csv
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import adapterops

COLUMNS = ("case", "backend", "tensor", "status", "err", "torch_err", "bound", "scale",
           "seconds", "detail")
SCALING = 0.5


def random_tensor(*shape, fan_in, dtype, device, grad=False):
    """Normal values scaled by 1 / sqrt(fan_in) (unit-size products), a leaf."""
    return (torch.randn(*shape, dtype=dtype, device=device) / fan_in ** 0.5).requires_grad_(grad)


def _sizes(device_type: str) -> dict:
    if device_type == "cuda":
        return {"M": 8192, "K": 4096, "N": 4096, "r": 16, "hydra_r": 8, "E": 4, "world": 8}
    return {"M": 16, "K": 64, "N": 32, "r": 16, "hydra_r": 8, "E": 4, "world": 2}


def _lowrank_case(lamda: bool):
    def make(size, device):
        M, K, N, r = size["M"], size["K"], size["N"], size["r"]
        bf16 = dict(dtype=torch.bfloat16, device=device)
        inputs = {"x": random_tensor(M, K, fan_in=1, grad=True, **bf16),
                  "weight": random_tensor(N, K, fan_in=K, **bf16),
                  "bias": random_tensor(N, fan_in=1, **bf16),
                  "lora_A": random_tensor(r, K, fan_in=K, grad=not lamda, **bf16),
                  "lora_B": random_tensor(N, r, fan_in=r, grad=True, **bf16)}
        if lamda:
            inputs["lora_S"] = random_tensor(r, r, fan_in=r, grad=True, **bf16)

        def run(t, backend):
            return {"y": adapterops.lowrank_linear(t["x"], t["weight"], t["bias"], t["lora_A"],
                                                   t["lora_B"], SCALING, t.get("lora_S"),
                                                   backend=backend)}
        return inputs, run
    return make


def _routed_case(top_k: Optional[int]):
    def make(size, device):
        M, K, N, r, E = size["M"], size["K"], size["N"], size["hydra_r"], size["E"]
        bf16 = dict(dtype=torch.bfloat16, device=device)
        inputs = {"x": random_tensor(M, K, fan_in=1, grad=True, **bf16),
                  "weight": random_tensor(N, K, fan_in=K, **bf16),
                  "bias": random_tensor(N, fan_in=1, **bf16),
                  "lora_A": random_tensor(r, K, fan_in=K, grad=True, **bf16),
                  "lora_B": random_tensor(E, N, r, fan_in=r, grad=True, **bf16),
                  "router_weight": random_tensor(E, K, fan_in=K, grad=True, **bf16)}

        def run(t, backend):
            y, probs = adapterops.routed_lowrank_linear(
                t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["router_weight"],
                SCALING, top_k=top_k, return_router_probs=True, backend=backend)
            return {"y": y, "probs": probs}
        return inputs, run
    return make


def _hdpissa_case(size, device):
    M, K, N, r = size["M"], size["K"], size["N"], size["r"]
    bf16 = dict(dtype=torch.bfloat16, device=device)
    inputs = {"x": random_tensor(M, K, fan_in=1, grad=True, **bf16),
              "weight": random_tensor(N, K, fan_in=K, **bf16),
              "bias": random_tensor(N, fan_in=1, **bf16),
              "lora_A": random_tensor(r, K, fan_in=K, grad=True, **bf16),
              "lora_B": random_tensor(N, r, fan_in=r, grad=True, **bf16)}

    def run(t, backend):
        return {"y": adapterops.hdpissa_linear(t["x"], t["weight"], t["bias"], t["lora_A"],
                                               t["lora_B"], SCALING, backend=backend)}
    return inputs, run


def _update_case(size, device):
    K, N, inner = size["K"], size["N"], 2 * size["world"] * size["r"]
    fp32 = dict(dtype=torch.float32, device=device)
    inputs = {"weight": random_tensor(N, K, fan_in=K, **fp32),
              "P": random_tensor(N, inner, fan_in=inner, **fp32),
              "Q": random_tensor(inner, K, fan_in=K, **fp32)}

    def run(t, backend):
        weight = t["weight"].clone()
        copy = torch.empty_like(weight, dtype=torch.bfloat16)
        adapterops.lowrank_update_(weight, t["P"], t["Q"], 1e-2, copy=copy, backend=backend)
        return {"weight": weight, "copy": copy}
    return inputs, run


# name -> (make(size, device) -> (inputs, run(inputs, backend) -> {output name: tensor}),
#          the fp32 matmul precision it runs at (None: torch's setting))
CASES: dict[str, tuple[Callable, Optional[str]]] = {
    "lamda": (_lowrank_case(lamda=True), None),
    "lora": (_lowrank_case(lamda=False), None),
    "hydra": (_routed_case(top_k=None), None),
    "hydra_top2": (_routed_case(top_k=2), None),
    "hdpissa": (_hdpissa_case, None),
    "update_highest": (_update_case, "highest"),
    "update_high": (_update_case, "high"),
}


def results(inputs: dict, run: Callable, backend: str, dtype: Optional[torch.dtype],
            grad_outputs: dict[str, Tensor],
            phase: Callable[[str], contextlib.AbstractContextManager] = lambda name:
            contextlib.nullcontext()) -> dict[str, Tensor]:
    """run's outputs and the gradients (d<name>) of every input that requires one, from the
    output gradients `grad_outputs`; the inputs are first cast to `dtype` (None: kept, layout
    included), as fresh leaves. The forward runs inside `phase("forward")`, the backward (when
    any input requires a gradient) inside `phase("backward")`."""
    leaves = {name: (t.detach().to(dtype) if dtype is not None else t.detach())
              .requires_grad_(t.requires_grad) for name, t in inputs.items()}
    with phase("forward"):
        outputs = run(leaves, backend)
    wanted = [name for name, t in leaves.items() if t.requires_grad]
    grads = {}
    if wanted:
        differentiable = [name for name, out in outputs.items() if out.requires_grad]
        with phase("backward"):
            grads = dict(zip((f"d{name}" for name in wanted), torch.autograd.grad(
                [outputs[name] for name in differentiable], [leaves[name] for name in wanted],
                [grad_outputs[name].to(outputs[name].dtype) for name in differentiable])))
    return {name: t.detach() for name, t in {**outputs, **grads}.items()}


def compare(tensor: str, got: Tensor, ref: Tensor, base: Tensor) -> dict:
    """One tensor's verdict under the rule of the unit tests (tests/utils.py): `got` (the backend
    under test) may be off the float64 reference `ref` by at most twice the error of `base` (the
    torch backend in got's dtype) plus one unit of got's rounding at ref's scale."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    torch_err = (base.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = 2 * torch_err + torch.finfo(got.dtype).eps * scale
    finite = bool(torch.isfinite(got).all())
    return {"tensor": tensor, "status": "ok" if finite and err <= bound else "FAIL", "err": err,
            "torch_err": torch_err, "bound": bound, "scale": scale,
            "detail": "" if finite else "non-finite values"}


def unavailable_status(device_type: str) -> str:
    """The status of a case a requested backend cannot serve: a failure (UNAVAILABLE) on a CUDA
    device, where every backend asked for must serve; a note (unavailable) elsewhere."""
    return "UNAVAILABLE" if device_type == "cuda" else "unavailable"


FAILED = ("FAIL", "error", "UNAVAILABLE")


def check_case(name: str, backend: str, device: torch.device) -> list[dict]:
    """The rows of one case on one backend: one per output and gradient, or one saying why the
    backend cannot serve it (its reasons) or what went wrong."""
    make, precision = CASES[name]
    previous = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        inputs, run = make(_sizes(device.type), device)
        with torch.no_grad():
            shapes = {name: out.shape for name, out in run(inputs, "torch").items()}
        grad_outputs = {name: torch.randn(shape, device=device) for name, shape in shapes.items()}
        reference = results(inputs, run, "torch", torch.float64, grad_outputs)
        baseline = results(inputs, run, "torch", None, grad_outputs)
        try:
            actual = results(inputs, run, backend, None, grad_outputs)
        except ValueError as exc:
            # The dispatcher's message names every reason the forced backend gave.
            if f"backend {backend!r} was forced" not in str(exc):
                raise
            return [{"case": name, "backend": backend, "status": unavailable_status(device.type),
                     "detail": str(exc).replace("\n", " ")}]
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:
        return [{"case": name, "backend": backend, "status": "error",
                 "detail": f"{type(exc).__name__}: {exc}".replace("\n", " ")}]
    finally:
        torch.set_float32_matmul_precision(previous)
    seconds = time.perf_counter() - start
    return [{"case": name, "backend": backend, "seconds": seconds,
             **compare(tensor, actual[tensor], ref, baseline[tensor])}
            for tensor, ref in reference.items()]


def verdict(rows: list[dict]) -> str:
    """One line: FAILED, passed or NOTHING WAS CHECKED, then how many tensors were compared and
    how many were wrong, with the cases that errored or that a backend could not serve counted
    apart. A run that compared nothing never reads as "0 wrong"."""
    checked = [row for row in rows if row["status"] in ("ok", "FAIL")]
    count = {status: sum(row["status"] == status for row in rows)
             for status in ("FAIL", "error", "UNAVAILABLE", "unavailable")}
    failures = sum(count[status] for status in FAILED)
    parts = ([f"{len(checked)} tensors checked, {count['FAIL']} wrong"] if checked
             else ["nothing was checked"] if failures else [])
    if count["error"]:
        parts.append(f"{count['error']} case(s) errored")
    if count["UNAVAILABLE"]:
        parts.append(f"{count['UNAVAILABLE']} case(s) UNAVAILABLE on a requested backend "
                     "(a failure on a CUDA device)")
    if count["unavailable"]:
        parts.append(f"{count['unavailable']} case(s) unavailable on a requested backend "
                     "(not checked; not a failure off CUDA)")
    head = "FAILED" if failures else "passed" if checked else "NOTHING WAS CHECKED"
    return f"{head}: " + "; ".join(parts)


def write(rows: list[dict], out_dir: Path, device_name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "smoke.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
    lines = ["# Correctness smoke", "", f"{device_name}, torch {torch.__version__}; "
             "bound = 2 x torch's error in the dtype + 1 ulp at the reference's scale", "",
             verdict(rows), "",
             "| case | backend | tensor | status | err | torch err | bound | s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] in ("ok", "FAIL"):
            lines.append(f"| {row['case']} | {row['backend']} | {row['tensor']} | {row['status']} "
                         f"| {row['err']:.3g} | {row['torch_err']:.3g} | {row['bound']:.3g} "
                         f"| {row['seconds']:.1f} |")
        else:
            lines.append(f"| {row['case']} | {row['backend']} | | {row['status']}: "
                         f"{row['detail'][:300]} | | | | |")
    (out_dir / "smoke.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smoke",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, from {', '.join(CASES)} (default: all)")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    backends = [name for name in args.backends.split(",") if name]
    unknown = [name for name in backends if name not in adapterops.dispatch.backend_names()]
    cases = [name for name in args.cases.split(",") if name]
    unknown += [name for name in cases if name not in CASES]
    if unknown or not backends or not cases:
        parser.error(f"unknown or missing backends/cases: {unknown}")
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for name in cases:
        for backend in backends:
            rows += check_case(name, backend, device)
            write(rows, args.out, device_name)
            last = rows[-1]
            print(f"{name} {backend}: " + (", ".join(f"{row['tensor']} {row['status']}"
                                                     for row in rows if row["case"] == name
                                                     and row["backend"] == backend)
                                           if last["status"] in ("ok", "FAIL")
                                           else f"{last['status']}: {last['detail'][:200]}"),
                  flush=True)
    for row in rows:
        if row["status"] in FAILED:
            print(f"smoke: {row['status']} {row['case']} {row['backend']} "
                  + (row.get("tensor") or "") + ": "
                  + (row["detail"] or f"error {row['err']:.3g} > bound {row['bound']:.3g}"),
                  file=sys.stderr, flush=True)
    print(f"smoke: {verdict(rows)}", flush=True)
    return 1 if any(row["status"] in FAILED for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
