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
precisions). A backend that cannot serve a case here gives a row saying why, not a failure.

Writes DIR/smoke.csv and DIR/smoke.md after every case and exits 1 when any check fails.
"""
import argparse
import csv
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import adapterops

COLUMNS = ("case", "backend", "tensor", "status", "err", "torch_err", "bound", "scale",
           "seconds", "detail")
SCALING = 0.5


def _tensor(*shape, fan_in, dtype, device, grad=False):
    return (torch.randn(*shape, dtype=dtype, device=device) / fan_in ** 0.5).requires_grad_(grad)


def _sizes(device_type: str) -> dict:
    if device_type == "cuda":
        return {"M": 8192, "K": 4096, "N": 4096, "r": 16, "hydra_r": 8, "E": 4, "world": 8}
    return {"M": 16, "K": 64, "N": 32, "r": 16, "hydra_r": 8, "E": 4, "world": 2}


def _lowrank_case(lamda: bool):
    def make(size, device):
        M, K, N, r = size["M"], size["K"], size["N"], size["r"]
        bf16 = dict(dtype=torch.bfloat16, device=device)
        inputs = {"x": _tensor(M, K, fan_in=1, grad=True, **bf16),
                  "weight": _tensor(N, K, fan_in=K, **bf16), "bias": _tensor(N, fan_in=1, **bf16),
                  "lora_A": _tensor(r, K, fan_in=K, grad=not lamda, **bf16),
                  "lora_B": _tensor(N, r, fan_in=r, grad=True, **bf16)}
        if lamda:
            inputs["lora_S"] = _tensor(r, r, fan_in=r, grad=True, **bf16)

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
        inputs = {"x": _tensor(M, K, fan_in=1, grad=True, **bf16),
                  "weight": _tensor(N, K, fan_in=K, **bf16), "bias": _tensor(N, fan_in=1, **bf16),
                  "lora_A": _tensor(r, K, fan_in=K, grad=True, **bf16),
                  "lora_B": _tensor(E, N, r, fan_in=r, grad=True, **bf16),
                  "router_weight": _tensor(E, K, fan_in=K, grad=True, **bf16)}

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
    inputs = {"x": _tensor(M, K, fan_in=1, grad=True, **bf16),
              "weight": _tensor(N, K, fan_in=K, **bf16), "bias": _tensor(N, fan_in=1, **bf16),
              "lora_A": _tensor(r, K, fan_in=K, grad=True, **bf16),
              "lora_B": _tensor(N, r, fan_in=r, grad=True, **bf16)}

    def run(t, backend):
        return {"y": adapterops.hdpissa_linear(t["x"], t["weight"], t["bias"], t["lora_A"],
                                               t["lora_B"], SCALING, backend=backend)}
    return inputs, run


def _update_case(size, device):
    K, N, inner = size["K"], size["N"], 2 * size["world"] * size["r"]
    fp32 = dict(dtype=torch.float32, device=device)
    inputs = {"weight": _tensor(N, K, fan_in=K, **fp32), "P": _tensor(N, inner, fan_in=inner, **fp32),
              "Q": _tensor(inner, K, fan_in=K, **fp32)}

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


def _results(inputs: dict, run: Callable, backend: str, dtype: Optional[torch.dtype],
             grad_outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """run's outputs and the gradients (d<name>) of every input that requires one, from the
    output gradients `grad_outputs`; the inputs are first cast to `dtype` (None: kept), as
    fresh leaves."""
    leaves = {name: (t.detach().to(dtype) if dtype is not None else t.detach())
              .requires_grad_(t.requires_grad) for name, t in inputs.items()}
    outputs = run(leaves, backend)
    wanted = [name for name, t in leaves.items() if t.requires_grad]
    grads = {}
    if wanted:
        differentiable = [name for name, out in outputs.items() if out.requires_grad]
        grads = dict(zip((f"d{name}" for name in wanted), torch.autograd.grad(
            [outputs[name] for name in differentiable], [leaves[name] for name in wanted],
            [grad_outputs[name].to(outputs[name].dtype) for name in differentiable])))
    return {name: t.detach() for name, t in {**outputs, **grads}.items()}


def check_case(name: str, backend: str, device: torch.device) -> list[dict]:
    """The rows of one case on one backend: one per output and gradient, or one saying why the
    backend cannot serve it."""
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
        reference = _results(inputs, run, "torch", torch.float64, grad_outputs)
        baseline = _results(inputs, run, "torch", None, grad_outputs)
        try:
            actual = _results(inputs, run, backend, None, grad_outputs)
        except ValueError as exc:
            if f"backend {backend!r} was forced" not in str(exc):
                raise
            return [{"case": name, "backend": backend, "status": "unavailable",
                     "detail": str(exc)}]
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:
        return [{"case": name, "backend": backend, "status": "error",
                 "detail": f"{type(exc).__name__}: {exc}".replace("\n", " ")}]
    finally:
        torch.set_float32_matmul_precision(previous)
    seconds = time.perf_counter() - start
    rows = []
    for tensor, ref in reference.items():
        got, base = actual[tensor], baseline[tensor]
        scale = ref.abs().max().item() if ref.numel() else 0.0
        err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
        torch_err = (base.double() - ref).abs().max().item() if ref.numel() else 0.0
        bound = 2 * torch_err + torch.finfo(got.dtype).eps * scale
        finite = bool(torch.isfinite(got).all())
        rows.append({"case": name, "backend": backend, "tensor": tensor,
                     "status": "ok" if finite and err <= bound else "FAIL", "err": err,
                     "torch_err": torch_err, "bound": bound, "scale": scale, "seconds": seconds,
                     "detail": "" if finite else "non-finite values"})
    return rows


def write(rows: list[dict], out_dir: Path, device_name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "smoke.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
    failed = sum(row["status"] in ("FAIL", "error") for row in rows)
    lines = ["# Correctness smoke", "", f"{device_name}, torch {torch.__version__}; "
             "bound = 2 x torch's error in the dtype + 1 ulp at the reference's scale; "
             f"{len(rows)} rows, {failed} failed", "",
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
    return 1 if any(row["status"] in ("FAIL", "error") for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
