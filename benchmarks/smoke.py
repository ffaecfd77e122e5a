"""`python -m benchmarks.smoke [--device cuda|cpu] [--backends triton,cuda] [--out DIR]`: a
correctness smoke of every op at the shapes the README's targets are stated at (on CPU, small
stand-ins), before anything is timed: a fast kernel that is wrong must not produce a number.

Per op and backend: the outputs (and, for the autograd ops, every gradient, from one fixed
output gradient) against the torch backend on float64 copies of the same inputs, with the rule
of the unit tests (tests/utils.py): the backend's max abs error may be at most twice the torch
backend's own error in the same dtype, plus one unit of the dtype's rounding at the
reference's scale. Cases: `lamda` and `lora` (`lowrank_linear`, bf16, M = 8192, in = out = 4096,
r = 16; `_dropout`: with adapter dropout 0.1 and a fixed seed; `_fp32_adapter`: the adapter in
fp32 on the bf16 x and W), `hydra` and `hydra_top2`
(`routed_lowrank_linear`, r = 8, E = 4, dense and top-2),
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
    """The smoke's sizes: M rows, K (in), N (out), rank r, E heads and the update's inner size
    P = 2 x ranks x r (8 ranks on a GPU, 2 on CPU); the routed cases set their own r (CASES)."""
    if device_type == "cuda":
        return {"M": 8192, "K": 4096, "N": 4096, "r": 16, "E": 4, "P": 2 * 8 * 16}
    return {"M": 16, "K": 64, "N": 32, "r": 16, "E": 4, "P": 2 * 2 * 16}


# The input builders, shared with benchmarks/kernel_check.py: builder(sizes, dtype, device,
# **options) -> (inputs, run(inputs, backend) -> {output name: tensor}), the inputs leaves of
# `dtype` scaled by their fan-in, `sizes` holding M, K (in), N (out), r, E (heads), P (inner).
def lowrank_inputs(s: dict, dtype, device, lamda: bool = False, transposed_x: bool = False,
                   dropout: float = 0.0, fp32_adapter: bool = False):
    """`lowrank_linear`: LaMDA (`lamda`: A frozen, S trained) or LoRA; x transposed (column
    stride M) when `transposed_x`; adapter dropout `dropout` with a fixed seed (so that every
    backend, the float64 reference included, draws the same mask); the adapter in fp32 on the
    16-bit x and W with `fp32_adapter` (its float64 reference: every tensor in float64)."""
    M, K, N, r = s["M"], s["K"], s["N"], s["r"]
    t = dict(dtype=dtype, device=device)
    a = dict(dtype=torch.float32 if fp32_adapter else dtype, device=device)
    x = random_tensor(K, M, fan_in=1, **t).t() if transposed_x else random_tensor(M, K, fan_in=1, **t)
    inputs = {"x": x.requires_grad_(True), "weight": random_tensor(N, K, fan_in=K, **t),
              "bias": random_tensor(N, fan_in=1, **t),
              "lora_A": random_tensor(r, K, fan_in=K, grad=not lamda, **a),
              "lora_B": random_tensor(N, r, fan_in=r, grad=True, **a)}
    if lamda:
        inputs["lora_S"] = random_tensor(r, r, fan_in=r, grad=True, **a)

    seed = torch.tensor([20261207], device=device) if dropout else None

    def run(v, backend):
        return {"y": adapterops.lowrank_linear(v["x"], v["weight"], v["bias"], v["lora_A"],
                                               v["lora_B"], SCALING, v.get("lora_S"),
                                               dropout=dropout, dropout_seed=seed,
                                               backend=backend)}
    return inputs, run


def routed_inputs(s: dict, dtype, device, top_k: Optional[int] = None):
    """`routed_lowrank_linear` (HydraLoRA), dense (`top_k` None) or top-k, with its router
    probabilities."""
    M, K, N, r, E = s["M"], s["K"], s["N"], s["r"], s["E"]
    t = dict(dtype=dtype, device=device)
    inputs = {"x": random_tensor(M, K, fan_in=1, grad=True, **t),
              "weight": random_tensor(N, K, fan_in=K, **t), "bias": random_tensor(N, fan_in=1, **t),
              "lora_A": random_tensor(r, K, fan_in=K, grad=True, **t),
              "lora_B": random_tensor(E, N, r, fan_in=r, grad=True, **t),
              "router_weight": random_tensor(E, K, fan_in=K, grad=True, **t)}

    def run(v, backend):
        y, probs = adapterops.routed_lowrank_linear(
            v["x"], v["weight"], v["bias"], v["lora_A"], v["lora_B"], v["router_weight"],
            SCALING, top_k=top_k, return_router_probs=True, backend=backend)
        return {"y": y, "probs": probs}
    return inputs, run


def hdpissa_inputs(s: dict, dtype, device):
    """`hdpissa_linear`."""
    M, K, N, r = s["M"], s["K"], s["N"], s["r"]
    t = dict(dtype=dtype, device=device)
    inputs = {"x": random_tensor(M, K, fan_in=1, grad=True, **t),
              "weight": random_tensor(N, K, fan_in=K, **t), "bias": random_tensor(N, fan_in=1, **t),
              "lora_A": random_tensor(r, K, fan_in=K, grad=True, **t),
              "lora_B": random_tensor(N, r, fan_in=r, grad=True, **t)}

    def run(v, backend):
        return {"y": adapterops.hdpissa_linear(v["x"], v["weight"], v["bias"], v["lora_A"],
                                               v["lora_B"], SCALING, backend=backend)}
    return inputs, run


def update_inputs(s: dict, dtype, device, copy: Optional[torch.dtype] = None):
    """`lowrank_update_` on a clone of W (N x K) by P (N x inner) Q (inner x K), with a rounded
    copy of dtype `copy` (None: without)."""
    K, N, P = s["K"], s["N"], s["P"]
    t = dict(dtype=dtype, device=device)
    inputs = {"weight": random_tensor(N, K, fan_in=K, **t), "P": random_tensor(N, P, fan_in=P, **t),
              "Q": random_tensor(P, K, fan_in=K, **t)}

    def run(v, backend):
        weight = v["weight"].clone()
        out = {"weight": weight}
        if copy is not None:
            out["copy"] = torch.empty_like(weight, dtype=copy)
        adapterops.lowrank_update_(weight, v["P"], v["Q"], 1e-2, copy=out.get("copy"),
                                   backend=backend)
        return out
    return inputs, run


def dequant_inputs(s: dict, dtype, device):
    """`NF4Weight.dequantize` of an N x K 4-bit weight in bitsandbytes' layout (random codes,
    an odd element count where N K is odd, one scale per 64 elements; a 16-entry table standing
    in for NF4's, whose values the kernel does not depend on) into `dtype`. The inputs are the
    codes and scales as floats, so that the float64 reference run takes them too: it
    dequantizes to fp32, where every product is exact."""
    N, K = s["N"], s["K"]
    numel = N * K
    inputs = {"codes": torch.randint(0, 16, (numel,), device=device).to(torch.float32),
              "scales": torch.rand(-(-numel // 64), device=device) + 0.5}
    code = torch.linspace(-1, 1, 16, device=device)

    def run(v, backend):
        nibbles = torch.cat([v["codes"].to(torch.uint8), v["codes"].new_zeros(numel % 2, dtype=torch.uint8)])
        weight = adapterops.NF4Weight(packed=(nibbles[0::2] << 4) | nibbles[1::2],
                                      absmax=v["scales"].float(), code=code, shape=(N, K),
                                      blocksize=64, dtype=dtype)
        exact = v["scales"].dtype == torch.float64
        return {"weight": weight.dequantize(torch.float32 if exact else dtype, backend=backend)}
    return inputs, run


BUILDERS: dict[str, Callable] = {"lowrank": lowrank_inputs, "routed": routed_inputs,
                                 "hdpissa": hdpissa_inputs, "update": update_inputs,
                                 "dequant": dequant_inputs}


def _case(op: str, dtype: torch.dtype = torch.bfloat16, sizes: Optional[dict] = None, **options):
    """A smoke case's make(size, device): BUILDERS[op] at the smoke's sizes (those in `sizes`
    replaced), in `dtype`, with the builder's `options`."""
    def make(size, device):
        return BUILDERS[op](dict(size, **(sizes or {})), dtype, device, **options)
    return make


# name -> (make(size, device) -> (inputs, run(inputs, backend) -> {output name: tensor}),
#          the fp32 matmul precision it runs at (None: torch's setting))
CASES: dict[str, tuple[Callable, Optional[str]]] = {
    "lamda": (_case("lowrank", lamda=True), None),
    "lora": (_case("lowrank"), None),
    "lamda_dropout": (_case("lowrank", lamda=True, dropout=0.1), None),
    "lora_dropout": (_case("lowrank", dropout=0.1), None),
    "lamda_fp32_adapter": (_case("lowrank", lamda=True, fp32_adapter=True), None),
    "lora_fp32_adapter": (_case("lowrank", fp32_adapter=True), None),
    "hydra": (_case("routed", sizes=dict(r=8)), None),
    "hydra_top2": (_case("routed", sizes=dict(r=8), top_k=2), None),
    "hdpissa": (_case("hdpissa"), None),
    "update_highest": (_case("update", torch.float32, copy=torch.bfloat16), "highest"),
    "update_high": (_case("update", torch.float32, copy=torch.bfloat16), "high"),
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


def write_csv(rows: list[dict], path: Path, columns: tuple) -> None:
    """`rows` as a CSV file at `path` (its folder made), a column per name in `columns` (a row
    without one: empty); shared with benchmarks/kernel_check.py."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in columns} for row in rows)


def write(rows: list[dict], out_dir: Path, device_name: str) -> None:
    write_csv(rows, out_dir / "smoke.csv", COLUMNS)
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
