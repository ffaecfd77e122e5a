"""Benchmarks of HD-PiSSA's two ops (adapterops/ops/hdpissa.py and update.py, methods.md §4), as the ops
`hdpissa` (the layer, `adapterops.hdpissa_linear`) and `hdpissa_update` (the step's
update-and-exchange phase, `adapterops.lowrank_update_`).

## hdpissa: the layer (modes fwd, bwd, fwdbwd)

W and bias frozen; x, lora_A (r, in) and lora_B (out, r) trainable, as in HD-PiSSA training.
The forward is the base layer alone; backward gives dx = dY W, gA = s (dY B)^T x and
gB = s dY^T (x A^T). The issue's target: backward <= 1.15x the floor's (the dX GEMM) at
M = 8192, in = out = 4096, r = 16, bf16.

Providers, timed side by side:
- `floor`: the frozen base layer alone, `F.linear(x, W, b)`; its backward is the one base GEMM
  dX = dY W.
- `torch_eager`: the explicit LoRA form with autograd through plain ops,
  `F.linear(x, W, b) + s F.linear(F.linear(x, A), B) - s F.linear(F.linear(x, A0), B0)` with A0,
  B0 detached copies of A, B: the output equals the base layer's (up to rounding) and autograd
  gives the same gradients.
- `addmm`: the strongest simple alternative: a small autograd Function (`_AddmmLayer`) whose
  forward is `F.linear(x, W, b)` saving x, and whose backward is cuBLAS GEMMs: dx = dY W,
  g = dY (s B), gA = g^T x, gB = dY^T (s x A^T) (h = x A^T recomputed from the saved x).
- `official`: the published scheme's materialised adapter, `F.linear(x, W + s (B A - B0 A0), b)`,
  autograd through it: out x in temporaries in forward (W_eff saved for dx) and the out x in
  gradient dY^T x in backward. The released code (MuLabPKU/HD-PiSSA, hd_pissa.py) is costlier
  still: it adds a second full-size GEMM, `F.linear(x.float(), B A * 1e-16 * alpha)`, in fp32;
  this form keeps its defining cost (an out x in adapter and its gradient) in one GEMM.
- `torch`, `triton`, `cuda`: adapterops.hdpissa_linear with backend="torch" (the reference),
  backend="triton" (the fused kernels) and backend="cuda" (the compiled C++ fallback; on CPU
  only with ADAPTEROPS_CSRC_ON_CPU=1).

FLOP model (M tokens, K = in, N = out, rank r; 2 FLOPs per multiply-add; bias, scaling and
elementwise ops not counted). As in routed.py, every provider but the floor is credited with
the op's model FLOPs, whatever it actually runs, so tflops compare providers at equal useful
work; extra work shows in p50, not in tflops.
- forward: the base x W^T, 2MKN.
- backward: dX = dY W 2MKN (W is frozen: no dW); g = dY B 2MNr; gA = g^T x 2MrK;
  h = x A^T 2MrK; gB = dY^T h 2MNr. h is credited here, where it is used: torch and triton
  compute it in the forward (and save it, M x r), addmm in the backward, so 2MrK (0.4% of the
  base at K = N = 4096, r = 16) moves between the fwd and bwd tflops of those providers.
- What the others actually run: torch_eager runs the two adapter paths, 2 x 2Mr(K + N) more in
  forward and about 2MNr + 4MrK more in backward (A0 and B0 pass dx terms), plus M x N adds;
  official runs B A and B0 A0 (2 x 2NrK) and W-sized adds in forward, and in backward dx =
  dY W_eff 2MKN plus dW_eff = dY^T x 2MKN and dA, dB from it (2 x 2NrK): about twice the
  floor's backward.
- floor: 2MKN forward, 2MKN backward.
Byte model (the minimum: each input read once, each output written once, all in the dtype):
- forward reads x, W, bias and writes y (the floor's forward: the adapter adds nothing).
- backward reads dY, W, x, A, B and writes dX, gA, gB.
- floor: forward as above; backward reads dY, W and writes dX.

Cases: like routed.py, the target rank (r = 16) on every LLaMA-7B projection and every M
(12 cases), and r = 64 on the square 4096 x 4096 projection only (4 cases): 16, not the 24 of
the whole product; HD-PiSSA's backward has the structure of LoRA's, whose shapes lowrank.py
already sweeps.

## hdpissa_update: the step's update-and-exchange phase (mode update)

One optimizer step's work after each rank's Adam: gather every rank's steps (δA_k, δB_k) and
apply W <- W - s Σ_k [δB_k (A_k - δA_k) + B_k δA_k] to each of L = 8 layers of (in, out), with
K (the Case's `world`) ranks simulated in one process ("virtual ranks"). W is the fp32 master
weight, the factors and steps fp32, whatever the run's --dtype (the op declares dtype fp32, so
its rows say fp32), and no bf16 copy of W is written (`lowrank_update_(copy=None)`). No
autograd; every call changes W in place (the values do not affect the time). The issue's
targets: the update at >= 80% of the copy bandwidth (read off as GB/s against
`floor`), and the phase >= 2x faster than `official` for 8 layers and K = 8.

Exchange. Every provider that needs every rank's steps builds them inside the timed call, as
the real step does: ours stacks the K ranks' δA and δB per layer (what
`HDPiSSAOptimizer(virtual_ranks=True)` does; on real ranks one all-gather per bucket fills the
same tensors), the official scheme stacks A, B, δA and δB (its four all-gathers per layer).
Likewise ours builds P = [δB_1 | B_1 | ...] (out x 2Kr) and Q = [A_1 - δA_1; δA_1; ...]
(2Kr x in) inside the call, as adapterops.hdpissa does before each update.

Providers, per layer:
- `floor`: a W-sized read and write, `dst.copy_(W)` into a second fp32 buffer: the memory
  floor of the update (no exchange).
- `official`: the published scheme on one process: torch.stack of the K ranks' A, B, δA, δB
  (the four all-gathers), a zero W-sized accumulator, then per rank
  `delta -= δB_k @ A_k + B_k @ δA_k - δB_k @ δA_k` (three out x in products, 3K GEMMs per
  layer, each materialised and summed), and `W += s delta`.
- `torch_eager`: `W.sub_(P @ Q, alpha=s)`: one out x in temporary.
- `addmm`: `W.addmm_(P, Q, alpha=-s)` (cuBLAS, in place).
- `torch`, `triton`, `cuda`: `adapterops.lowrank_update_(W, P, Q, -s, backend=...)`; cuda is
  cuBLAS's in-place addmm (beta = 1) plus its rounding kernel for the copy; triton is the fused
  one-pass kernel, torch the reference (an addmm_ behind the dispatcher).

FLOP model (per layer, times L; W is out x in, K ranks): the one GEMM W -= s P Q of inner
size 2 K r, 2 out in (2 K r), credited to every provider but the floor (a copy: 0). official
actually runs 3K GEMMs of inner size r, 6 out in K r (1.5x), and per rank about 12 W-sized
memory passes (three products written, three adds reading two W-sized tensors and writing
one). fp32 matmuls run at torch's default precision ("highest": no TF32) in every provider.
Byte model (per layer, times L, fp32): W read and written, 2 out in, plus the factors and
steps read once, 2 K r (out + in) (as many numbers as P and Q); the floor: 2 out in. So the
floor's GB/s is the copy bandwidth and a provider's is the update's, comparable directly.

What bounds the update: 2 (2 K r) FLOPs per W element against 8 bytes (its read and write),
K r / 2 FLOPs per byte: 16 at K = 2, 64 at K = 8 (r = 16). An H100 SXM's fp32 CUDA cores give
about 67 TFLOP/s against 3.35 TB/s, 20 FLOPs per byte, so in full fp32 the update is
bandwidth-bound only up to K r of about 40 (K = 2 at r = 16); at K = 4 and K = 8 it is
compute-bound, about 1.6x and 3x slower than a copy. The 80% target there needs TF32
(`torch.set_float32_matmul_precision("high")`, which the Triton kernel and cuBLAS both
follow); the suite measures torch's default. (An estimate from the datasheet, not yet
measured.)

Cases: (in, out) = (4096, 4096), r = 16, K in {2, 4, 8}; quick on CUDA K = 8 only; on CPU one
tiny case (128 x 128, r = 8, K = 2). L = 8 layers everywhere. Under the interpreter the Triton
update runs about 9 ms per 32 x 32 tile of W (2-core development machine), so 256 x 256 would
take 4.5 s a call (about 25 s for the case), 128 x 128 a quarter of that.

Full GPU sweep, estimated (not yet measured on a GPU): 16 hdpissa cases x 6 providers x 3
modes and 3 hdpissa_update cases x 6 providers, about 0.15 s of `do_bench` each (25 ms warm-up
+ 100 ms timed + its estimate): about 45 s and 3 s.
"""
import functools

import torch
import torch.nn.functional as F

import adapterops

from .harness import UPDATE, Case, OpBenchmark, Workload, make_tensor

PROVIDERS = ("floor", "torch_eager", "addmm", "official", "torch", "triton", "cuda")
SCALING = 0.5
LAYERS = 8
# (in, out) of LLaMA-7B-like projections: square attention, MLP up, MLP down.
FULL_FEATURES = ((4096, 4096), (4096, 11008), (11008, 4096))
FULL_TOKENS = (16, 512, 2048, 8192)
TARGET_RANK = 16
SQUARE_ONLY_RANKS = (64,)
# Under the interpreter the quick CPU layer cases take about as long as lowrank.py's.
QUICK = {"cuda": ((4096, 4096), (512, 8192)), "cpu": ((256, 256), (16, 128))}
UPDATE_FULL = ((4096, 4096), 16, (2, 4, 8))   # (in, out), r, K (world)
UPDATE_QUICK = {"cuda": ((4096, 4096), 16, (8,)), "cpu": ((128, 128), 8, (2,))}
# The shapes the targets are stated at (docs/performance.md, "Targets"); on CPU stand-ins for a dry run.
HEADLINE = {"cuda": Case(M=8192, K=4096, N=4096, r=TARGET_RANK),
            "cpu": Case(M=16, K=64, N=32, r=8)}
UPDATE_HEADLINE = {"cuda": Case(M=None, K=4096, N=4096, r=TARGET_RANK, world=8),
                   "cpu": Case(M=None, K=64, N=32, r=4, world=2)}


def layer_cases(quick: bool, device_type: str) -> list[Case]:
    if quick:
        (K, N), tokens = QUICK[device_type]
        return [Case(M=M, K=K, N=N, r=TARGET_RANK) for M in tokens]
    plan = ([(K, N, TARGET_RANK) for K, N in FULL_FEATURES]
            + [(*FULL_FEATURES[0], r) for r in SQUARE_ONLY_RANKS])
    return [Case(M=M, K=K, N=N, r=r) for K, N, r in plan for M in FULL_TOKENS]


def update_cases(quick: bool, device_type: str) -> list[Case]:
    (K, N), r, worlds = UPDATE_QUICK[device_type] if quick else UPDATE_FULL
    return [Case(M=None, K=K, N=N, r=r, world=world) for world in worlds]


def layer_headline(device_type: str) -> list[Case]:
    return [HEADLINE[device_type]]


def update_headline(device_type: str) -> list[Case]:
    return [UPDATE_HEADLINE[device_type]]


class _AddmmLayer(torch.autograd.Function):
    """y = F.linear(x, W, b) saving x; backward: the HD-PiSSA gradients as cuBLAS GEMMs (W and
    bias frozen). The scaling multiplies the small operands (B: N x r, h: M x r), never an
    M x N or N x K tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        g = torch.mm(grad_y, lora_B * ctx.scaling)
        grad_B = torch.mm(grad_y.t(), torch.mm(x, lora_A.t()).mul_(ctx.scaling))
        return torch.mm(grad_y, weight), None, None, torch.mm(g.t(), x), grad_B, None


def _layer_flops(case: Case, provider: str) -> tuple[float, float]:
    M, K, N, r = case.M, case.K, case.N, case.r
    base = 2 * M * K * N
    if provider == "floor":
        return base, base
    return base, base + 4 * M * r * (K + N)


def _layer_bytes(case: Case, provider: str, element_size: int) -> tuple[float, float]:
    M, K, N, r = case.M, case.K, case.N, case.r
    x, y, W = M * K, M * N, N * K
    forward = x + W + N + y
    if provider == "floor":
        return forward * element_size, (y + W + x) * element_size
    adapter = r * K + N * r        # A and B read, gA and gB written
    return forward * element_size, (y + W + x + adapter + x + adapter) * element_size


def layer_workload(provider: str, case: Case, dtype: torch.dtype,
                   device: torch.device) -> Workload:
    """Fresh tensors for `case` and the provider's forward on them."""
    M, K, N, r = case.M, case.K, case.N, case.r
    make = functools.partial(make_tensor, dtype=dtype, device=device)
    x = make(M, K, fan_in=1, trainable=True)
    weight, bias = make(N, K, fan_in=K), make(N, fan_in=1)
    lora_A = make(r, K, fan_in=K, trainable=True)
    lora_B = make(N, r, fan_in=r, trainable=True)
    A0, B0 = lora_A.detach().clone(), lora_B.detach().clone()
    adapter = (lora_A, lora_B)

    def eager():
        delta = F.linear(F.linear(x, lora_A), lora_B) * SCALING
        return F.linear(x, weight, bias) + delta - F.linear(F.linear(x, A0), B0) * SCALING

    def official():
        return F.linear(x, weight + SCALING * (lora_B @ lora_A - B0 @ A0), bias)

    def ours(backend):
        return lambda: adapterops.hdpissa_linear(x, weight, bias, lora_A, lora_B, SCALING,
                                                 backend=backend)

    forwards = {"floor": lambda: F.linear(x, weight, bias), "torch_eager": eager,
                "addmm": lambda: _AddmmLayer.apply(x, weight, bias, lora_A, lora_B, SCALING),
                "official": official, "torch": ours("torch"), "triton": ours("triton"),
                "cuda": ours("cuda")}
    uses_adapter = provider != "floor"
    fwd_flops, bwd_flops = _layer_flops(case, provider)
    fwd_bytes, bwd_bytes = _layer_bytes(case, provider, x.element_size())
    return Workload(
        forward=forwards[provider],
        grad_inputs=(x,) + (adapter if uses_adapter else ()),
        weights=(weight, bias) + ((*adapter, A0, B0) if uses_adapter else ()),
        fwd_flops=fwd_flops, bwd_flops=bwd_flops, fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


def _operands(factor_A, factor_B, delta_A, delta_B):
    """(P, Q) of the update W -= s P Q from every rank's fixed factors (factor_A (K r, in),
    factor_B (out, K r), as each layer keeps them) and stacked steps (delta_A (K, r, in),
    delta_B (K, out, r)), laid out as adapterops.hdpissa lays them out."""
    world, r, in_features = delta_A.shape
    out_features, inner = factor_B.shape[0], 2 * world * r
    A = factor_A.view(world, r, in_features)
    B = factor_B.view(out_features, world, r).permute(1, 0, 2)
    P = torch.stack((delta_B, B), dim=1).permute(2, 0, 1, 3).reshape(out_features, inner)
    return P, torch.stack((A - delta_A, delta_A), dim=1).reshape(inner, in_features)


class _Layer:
    """One layer's update inputs on K virtual ranks: the fp32 master W, each rank's fixed
    factors (A_k, B_k, also concatenated as every rank keeps them) and its Adam steps."""

    def __init__(self, case: Case, device: torch.device):
        K, N, r, world = case.K, case.N, case.r, case.world
        make = functools.partial(make_tensor, dtype=torch.float32, device=device)
        self.weight = make(N, K, fan_in=K)
        self.A = [make(r, K, fan_in=K) for _ in range(world)]
        self.B = [make(N, r, fan_in=r) for _ in range(world)]
        self.delta_A = [make(r, K, fan_in=K) * 1e-3 for _ in range(world)]
        self.delta_B = [make(N, r, fan_in=r) * 1e-3 for _ in range(world)]
        self.factor_A, self.factor_B = torch.cat(self.A, 0), torch.cat(self.B, 1)

    def tensors(self) -> tuple:
        return (self.weight, self.factor_A, self.factor_B,
                *self.A, *self.B, *self.delta_A, *self.delta_B)

    def operands(self):
        """P and Q after the exchange (the K ranks' steps stacked)."""
        return _operands(self.factor_A, self.factor_B, torch.stack(self.delta_A),
                         torch.stack(self.delta_B))

    def official(self) -> None:
        """The published update: four gathers, 3K materialised products, one add into W."""
        A, B = torch.stack(self.A), torch.stack(self.B)
        delta_A, delta_B = torch.stack(self.delta_A), torch.stack(self.delta_B)
        delta = torch.zeros_like(self.weight)
        for k in range(len(self.A)):
            delta -= delta_B[k] @ A[k] + B[k] @ delta_A[k] - delta_B[k] @ delta_A[k]
        self.weight.add_(delta, alpha=SCALING)


def _update_counts(case: Case, provider: str) -> tuple[float, float]:
    K, N, r, world = case.K, case.N, case.r, case.world
    if provider == "floor":
        return 0.0, LAYERS * 2 * N * K * 4
    return (LAYERS * 2 * N * K * 2 * world * r,
            LAYERS * (2 * N * K + 2 * world * r * (N + K)) * 4)


def update_workload(provider: str, case: Case, dtype: torch.dtype,
                    device: torch.device) -> Workload:
    """Fresh fp32 tensors for L layers of `case` (dtype is the op's fp32: see the docstring) and the
    provider's update of all of them."""
    layers = [_Layer(case, device) for _ in range(LAYERS)]
    copies = [torch.empty_like(layer.weight) for layer in layers] if provider == "floor" else []

    def floor():
        for layer, copy in zip(layers, copies):
            copy.copy_(layer.weight)

    def eager(layer):
        P, Q = layer.operands()
        layer.weight.sub_(P @ Q, alpha=SCALING)

    def addmm(layer):
        P, Q = layer.operands()
        layer.weight.addmm_(P, Q, alpha=-SCALING)

    def ours(backend):
        def apply(layer):
            P, Q = layer.operands()
            adapterops.lowrank_update_(layer.weight, P, Q, -SCALING, backend=backend)
        return apply

    per_layer = {"torch_eager": eager, "addmm": addmm, "official": _Layer.official,
                 "torch": ours("torch"), "triton": ours("triton"),
                 "cuda": ours("cuda")}.get(provider)

    def every_layer():
        for layer in layers:
            per_layer(layer)

    flops, io_bytes = _update_counts(case, provider)
    return Workload(
        forward=floor if provider == "floor" else every_layer, grad_inputs=(),
        weights=tuple(t for layer in layers for t in layer.tensors()) + tuple(copies),
        fwd_flops=flops, bwd_flops=0.0, fwd_bytes=io_bytes, bwd_bytes=0.0)


BENCHMARKS = (
    OpBenchmark(name="hdpissa", cases=layer_cases, headline=layer_headline, providers=PROVIDERS,
                workload=layer_workload, baseline="floor",
                speedups=(("triton", "official"), ("triton", "torch_eager"),
                          ("triton", "addmm"), ("triton", "cuda"))),
    OpBenchmark(name="hdpissa_update", cases=update_cases, headline=update_headline,
                providers=PROVIDERS, workload=update_workload, baseline="floor",
                speedups=(("triton", "official"), ("triton", "torch_eager"),
                          ("triton", "addmm"), ("triton", "cuda")),
                modes=(UPDATE,), dtype=torch.float32),
)
