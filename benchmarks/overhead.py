"""Host overhead per call: what each op and module costs the Python
thread at shapes so small that the arithmetic is negligible, as four ops, one per op family:

- `overhead_lora`: `adapterops.lowrank_linear` in LoRA mode (x, A, B trainable) and
  `FusedLoRALinear`;
- `overhead_lamda`: the same op in LaMDA mode (x, S, B trainable, A frozen) and
  `FusedLaMDALinear`;
- `overhead_hydra`: `adapterops.routed_lowrank_linear`, dense routing (x, A, the heads B and
  the router trainable), and `FusedHydraLoRALinear`;
- `overhead_hdpissa`: `adapterops.hdpissa_linear` (x, A, B trainable) and `HDPiSSALinear`
  (world_size 1).

Run them alone with
    python -m benchmarks --ops overhead_lora,overhead_lamda,overhead_hydra,overhead_hdpissa
(one name per op: a case holds only shapes, and LoRA, LaMDA and HD-PiSSA share theirs); on CPU
prefixed with `TRITON_INTERPRET=0 ADAPTEROPS_CSRC_ON_CPU=0` (see `ours_auto` below). A run of
every op (no --ops) includes them; `--headline` does not (they declare no headline shape).

Cases: in = out = 64, r = 8 (HydraLoRA: E = 4 heads), M in {1, 16, 256} tokens (`--quick`:
M = 16, the shape the issue states its CPU numbers at), no bias (LLaMA's projections have
none). W is frozen everywhere. The run's dtype (--dtype, bf16 by default) where CUDA is
available; fp32 where it is not, whatever --dtype says (the ops declare it, and the rows say
so): bf16 GEMMs on a CPU without bf16 units are slow enough to add compute to the host time
these ops are after. Modes fwd (autograd recording) and fwdbwd (one forward then its
backward), as the harness defines them; no bwd-alone mode.

Providers, timed side by side:
- `linear`: `F.linear(x, W)` alone, x requiring grad (its backward: dX = dY W): the floor,
  the least a layer can cost.
- `composition`: the op written as plain PyTorch, autograd through plain ops; what the op
  replaces and what its overhead target is stated against (ours <= 1.3x this; the summary's
  ratios are to it): LoRA `F.linear(x, W) + s F.linear(F.linear(x, A), B)`; LaMDA the same
  with `F.linear(., S)` between; HydraLoRA routed.py's `torch_eager` (fp32 softmax gates cast
  back, hg = [g_e h], the heads side by side, one expand GEMM); HD-PiSSA hdpissa.py's
  `torch_eager` (`F.linear(x, W) + s B A x - s B0 A0 x` with detached copies A0, B0: the base
  output, the factors' gradients).
- `ours_torch`: the op with backend="torch" (forced: the dispatcher checks that one backend).
- `ours_auto`: the op with backend=None (the dispatcher tries triton, then cuda, then torch).
  On CPU it is timed only where automatic dispatch serves the call with the torch backend, as
  it does for a CPU user; `python -m benchmarks` without a GPU sets TRITON_INTERPRET=1 and
  ADAPTEROPS_CSRC_ON_CPU=1 (the tests do too), which route CPU tensors to the Triton
  interpreter or the host build of the C++, so there its rows carry that reason; run with
  `TRITON_INTERPRET=0 ADAPTEROPS_CSRC_ON_CPU=0` to time it.
- `ours_triton`, `ours_cuda` (CUDA machines only: absent from the providers where CUDA is not
  available, since on CPU they would time the Triton interpreter and the host build, not the
  GPU path): the op with backend="triton" / "cuda".
- `module_torch`, `module_auto`: the module (FusedLoRALinear, FusedLaMDALinear,
  FusedHydraLoRALinear, HDPiSSALinear; training mode, no dropout, no balance loss) called on
  x, with backend="torch" / None (`module_auto` as `ours_auto` on CPU): the op's cost plus the
  module's own Python (nn.Module.__call__, the forward's branches).

What is measured: HOST time per call, the wall time of the Python call, with `overhead_timer`
in place of the harness's default timing:
- On CPU, with one intra-op thread (`torch.set_num_threads(1)` while timing, restored after,
  as the issue measured: the work under test, Python and the dispatcher, is single-threaded,
  and GEMMs this small gain nothing from more), everything the call does is on the host, so
  wall time is host time.
- On CUDA, nothing synchronises inside a sample: the time is what the Python thread spends
  issuing the call (argument checks, dispatch, autograd, kernel launches), not the kernels'
  run. The stream is synchronised before each sample (outside the timed region), so a sample
  starts with an empty launch queue, and a sample is at most `CUDA_MAX_CALLS` calls (a few
  hundred launches even in fwdbwd), so the queue of pending launches (about a thousand deep)
  does not fill and block the host. A synchronisation inside the op (a `.item()`, say) does
  show: it is host time spent waiting. (Not yet run on a GPU.)
Batching: a 5 us call is too short to time one by one (the timer's own cost and its jitter
are a sizeable part of it), so one sample is N calls in a row timed together, divided by N,
with N chosen after the warm-up so that a sample lasts about `SAMPLE_S` (10 ms: 2,000 calls
of 5 us, the issue's batch), at least one call (at most `CUDA_MAX_CALLS` on CUDA). Samples
are taken until the budget (`--cpu-budget-s`, default 0.3 s, on every device for these ops)
has passed, at least `MIN_SAMPLES`; p20, p50 and p80 are the quantiles of the samples' means.
Python's garbage collector is off while timing (as in `timeit`). Warm-up: one call, then
calls for `WARMUP_S`, before any sample. The issue's own method, best of 5 x 2000 calls, is
the minimum of five such means: compare it with p20 (on the development machine, LoRA at
M = 16, the two agreed within 10% for linear, composition and ours_torch, fwd and fwdbwd).
Timed one by one with the harness's default loop, the same calls gave a p50 up to 15% below
the batched mean and a p80 above it: the per-call times are skewed to the right, and their
median drops the slow calls that a training loop pays for; a batch's mean keeps them.

Stability, measured on the 2-core development VM, idle: two runs' p50 agree within about 5%
(the median over all 144 measurements of the full cases); the worst tenth differ by 20% or
more at the default budget of 0.3 s (slow phases of the machine outlast a measurement) and by
about 10% at `--cpu-budget-s 1`. So use `--cpu-budget-s 1` for numbers to compare (the full
CPU cases then take about 2.5 minutes and `--quick` under one; at the default budget, about
60 s and 20 s), repeat a run before reading a difference under 10%, and run nothing else
meanwhile.

tflops and gbps use the FLOP and byte models of lowrank.py, routed.py and hdpissa.py (with
bias there, none here; `linear` gets the floor's): at these shapes they show only how far from
any hardware bound the calls are. saved_mb is the harness's, as for every op.

Not yet here: CUDA graphs, capturing fwd and fwdbwd once and
timing the replays, on the triton and cuda backends. The CUDA rows themselves (ours_triton,
ours_cuda and the rest on a GPU) are written but not yet measured: no GPU was lent when this
file was written; on one, `python -m benchmarks --device cuda --ops overhead_lora,...`.
"""
import functools
import gc
import math
import time
from typing import Callable

import numpy
import torch
import torch.nn.functional as F

import adapterops
from adapterops import dispatch

from . import hdpissa, lowrank, routed
from .harness import QUANTILES, Case, OpBenchmark, Workload, make_tensor

OPS = ("lora", "lamda", "hydra", "hdpissa")
FEATURES = 64          # in = out
RANK = 8
HEADS = 4              # HydraLoRA
SCALING = 0.5
FULL_TOKENS = (1, 16, 256)
QUICK_TOKENS = (16,)
SAMPLE_S = 0.01        # a sample's length: N calls timed together
MIN_SAMPLES = 5
WARMUP_S = 0.05
CUDA_MAX_CALLS = 8     # calls per sample on CUDA: the launch queue must not fill (docstring)
CPU_THREADS = 1
DTYPE = None if torch.cuda.is_available() else torch.float32  # see the module docstring
PROVIDERS = (("linear", "composition", "ours_torch", "ours_auto")
             + (("ours_triton", "ours_cuda") if torch.cuda.is_available() else ())
             + ("module_torch", "module_auto"))
BACKENDS = {"torch": "torch", "auto": None, "triton": "triton", "cuda": "cuda"}
FAMILY = {"lora": "lowrank", "lamda": "lowrank", "hydra": "routed", "hdpissa": "hdpissa"}


def cases(quick: bool, device_type: str, *, op: str) -> list[Case]:
    heads = HEADS if op == "hydra" else None
    return [Case(M=M, K=FEATURES, N=FEATURES, r=RANK, heads=heads)
            for M in (QUICK_TOKENS if quick else FULL_TOKENS)]


def overhead_timer(fn: Callable, device: torch.device, budget_s: float) -> list[float]:
    """p20, p50, p80 ms of host time per call of fn: the quantiles of batched samples' means
    (see the module docstring)."""
    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    threads = torch.get_num_threads()
    gc_was_enabled = gc.isenabled()
    if not on_cuda:
        torch.set_num_threads(CPU_THREADS)
    gc.disable()
    try:
        fn()  # first-call work (Triton's compile, lazy initialisation) stays out of the warm-up
        sync()
        calls, spent, start = 0, 0.0, time.perf_counter()
        while calls < 2 or time.perf_counter() - start < WARMUP_S:
            t0 = time.perf_counter()
            fn()
            spent += time.perf_counter() - t0
            sync()
            calls += 1
        per_sample = max(1, math.ceil(SAMPLE_S / (spent / calls)))
        if on_cuda:
            per_sample = min(per_sample, CUDA_MAX_CALLS)
        means_ms = []
        start = time.perf_counter()
        while len(means_ms) < MIN_SAMPLES or time.perf_counter() - start < budget_s:
            sync()
            t0 = time.perf_counter()
            for _ in range(per_sample):
                fn()
            means_ms.append((time.perf_counter() - t0) / per_sample * 1e3)
        sync()
    finally:
        torch.set_num_threads(threads)
        if gc_was_enabled:
            gc.enable()
    return [float(q) for q in numpy.quantile(means_ms, QUANTILES)]


def _tensors(op: str, case: Case, dtype: torch.dtype, device: torch.device) -> dict:
    """The op's inputs (W frozen, no bias), trainable as the op is trained."""
    M, K, N, r = case.M, case.K, case.N, case.r
    make = functools.partial(make_tensor, dtype=dtype, device=device)
    t = {"x": make(M, K, fan_in=1, trainable=True), "weight": make(N, K, fan_in=K),
         "lora_A": make(r, K, fan_in=K, trainable=op != "lamda")}
    if op == "lamda":
        t["lora_S"] = make(r, r, fan_in=r, trainable=True)
    if op == "hydra":
        t["lora_B"] = make(case.heads, N, r, fan_in=r, trainable=True)
        t["router_weight"] = make(case.heads, K, fan_in=K, trainable=True)
    else:
        t["lora_B"] = make(N, r, fan_in=r, trainable=True)
    if op == "hdpissa":
        t["A0"], t["B0"] = t["lora_A"].detach().clone(), t["lora_B"].detach().clone()
    return t


def _composition(op: str, t: dict) -> Callable:
    x, W, A, B = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    if op == "lora":
        return lambda: F.linear(x, W) + SCALING * F.linear(F.linear(x, A), B)
    if op == "lamda":
        S = t["lora_S"]
        return lambda: F.linear(x, W) + SCALING * F.linear(F.linear(F.linear(x, A), S), B)
    if op == "hdpissa":
        A0, B0 = t["A0"], t["B0"]
        return lambda: (F.linear(x, W) + SCALING * F.linear(F.linear(x, A), B)
                        - SCALING * F.linear(F.linear(x, A0), B0))
    Wg = t["router_weight"]
    (M, _), (E, N, r) = x.shape, B.shape

    def hydra():
        h = F.linear(x, A)
        gates = F.softmax(F.linear(x, Wg), dim=-1, dtype=torch.float32).to(x.dtype)
        hg = (gates[:, :, None] * h[:, None, :]).reshape(M, E * r)
        return F.linear(x, W) + SCALING * F.linear(hg, B.permute(1, 0, 2).reshape(N, E * r))
    return hydra


def _ours(op: str, t: dict, backend) -> Callable:
    x, W, A, B = t["x"], t["weight"], t["lora_A"], t["lora_B"]
    if op in ("lora", "lamda"):
        S = t.get("lora_S")
        return lambda: adapterops.lowrank_linear(x, W, None, A, B, SCALING, S, backend=backend)
    if op == "hydra":
        Wg = t["router_weight"]
        return lambda: adapterops.routed_lowrank_linear(x, W, None, A, B, Wg, SCALING,
                                                        backend=backend)
    return lambda: adapterops.hdpissa_linear(x, W, None, A, B, SCALING, backend=backend)


def _module(op: str, case: Case, dtype: torch.dtype, device: torch.device, backend):
    common = {"bias": False, "device": device, "dtype": dtype, "backend": backend}
    K, N, r, alpha = case.K, case.N, case.r, SCALING * case.r
    if op == "lora":
        return adapterops.FusedLoRALinear(K, N, r, alpha, **common)
    if op == "lamda":
        return adapterops.FusedLaMDALinear(K, N, r, alpha, **common)
    if op == "hydra":
        return adapterops.FusedHydraLoRALinear(K, N, r, case.heads, alpha, **common)
    return adapterops.HDPiSSALinear(K, N, r, alpha, world_size=1, rank_index=0, **common)


def _check_auto(op: str, x, weight, lora_A, lora_B) -> None:
    """On CPU, automatic dispatch is timed only where it serves with the torch backend, as it
    does for a CPU user (see the module docstring)."""
    inputs = {"x": x, "weight": weight, "lora_A": lora_A}
    if op == "hydra":
        inputs["lora_B"] = lora_B
    chosen = dispatch.select(FAMILY[op], None, **inputs).name
    if x.device.type == "cpu" and chosen != "torch":
        raise RuntimeError(
            f"automatic dispatch serves these CPU tensors with the {chosen} backend here "
            "(TRITON_INTERPRET=1 or ADAPTEROPS_CSRC_ON_CPU=1, which python -m benchmarks sets "
            "without a GPU), not with torch as for a CPU user; run with TRITON_INTERPRET=0 "
            "ADAPTEROPS_CSRC_ON_CPU=0 to time it")


def _counts(op: str, case: Case, provider: str, element_size: int) -> tuple:
    """(fwd FLOPs, bwd FLOPs, fwd bytes, bwd bytes) from the op's own benchmark file."""
    model = "floor" if provider == "linear" else "torch"
    if op in ("lora", "lamda"):
        flops = lowrank._flops(case, model, op == "lamda")
        io = lowrank._bytes(case, model, op == "lamda", element_size, element_size)
    elif op == "hydra":
        flops, io = routed._flops(case, model), routed._bytes(case, model, element_size)
    else:
        flops = hdpissa._layer_flops(case, model)
        io = hdpissa._layer_bytes(case, model, element_size)
    return (*flops, *io)


def workload(provider: str, case: Case, dtype: torch.dtype, device: torch.device, *,
             op: str) -> Workload:
    """Fresh tensors (or a fresh module) for `case` and the provider's forward on them."""
    kind, _, backend_key = provider.partition("_")
    if backend_key in ("triton", "cuda") and device.type != "cuda":
        raise ValueError(f"{provider}: the host overhead of the {backend_key} backend is timed "
                         "on CUDA only")
    backend = BACKENDS.get(backend_key)
    if kind == "module":
        module = _module(op, case, dtype, device, backend)
        x = make_tensor(case.M, case.K, fan_in=1, dtype=dtype, device=device, trainable=True)
        if backend_key == "auto":
            _check_auto(op, x, module.weight, module.lora_A, module.lora_B)
        forward = functools.partial(module, x)
        trainable = tuple(p for p in module.parameters() if p.requires_grad)
        weights = tuple(module.parameters()) + tuple(b for b in module.buffers())
    else:
        t = _tensors(op, case, dtype, device)
        x = t["x"]
        if provider == "linear":
            forward = functools.partial(F.linear, x, t["weight"])
        elif provider == "composition":
            forward = _composition(op, t)
        else:
            if backend_key == "auto":
                _check_auto(op, x, t["weight"], t["lora_A"], t["lora_B"])
            forward = _ours(op, t, backend)
        adapter = tuple(v for k, v in t.items() if k not in ("x", "weight"))
        trainable = () if provider == "linear" else tuple(v for v in adapter if v.requires_grad)
        weights = (t["weight"],) + (() if provider == "linear" else adapter)
    fwd_flops, bwd_flops, fwd_bytes, bwd_bytes = _counts(op, case, provider, x.element_size())
    return Workload(forward=forward, grad_inputs=(x,) + trainable, weights=weights,
                    fwd_flops=fwd_flops, bwd_flops=bwd_flops, fwd_bytes=fwd_bytes,
                    bwd_bytes=bwd_bytes)


BENCHMARKS = tuple(
    OpBenchmark(name=f"overhead_{op}", cases=functools.partial(cases, op=op),
                providers=PROVIDERS, workload=functools.partial(workload, op=op),
                baseline="composition", modes=("fwd", "fwdbwd"), dtype=DTYPE,
                timer=overhead_timer)
    for op in OPS)
