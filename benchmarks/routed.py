"""Benchmark of `adapterops.routed_lowrank_linear` (adapterops/ops/routed.py), the HydraLoRA
layer (methods.md §3), as the op `hydra`: W and bias frozen; x, lora_A (r, in), the heads
lora_B (E, out, r) and the router Wg (E, in) trainable, as in HydraLoRA training. Dense routing
(top_k=None) throughout.

Providers, timed side by side:
- `floor`: the frozen base layer alone, `F.linear(x, W, b)`; its backward is the one base GEMM
  dX = dY W (W and b are frozen).
- `torch_eager`: the unfused composition a straightforward implementation runs, autograd
  through plain ops: h = x A^T, g = softmax(x Wg^T) (in fp32, cast back), hg = [g_0 h | ... |
  g_{E-1} h] (M x E r), Bcat = [B_0 | ... | B_{E-1}] built from lora_B inside the forward, and
  `F.linear(x, W, b) + F.linear(hg, Bcat) * s`.
- `addmm`: the strongest simple alternative: the same h, g, hg and Bcat, then one cuBLAS
  accumulate, `F.linear(x, W, b).addmm_(hg, Bcat^T, alpha=s)`.
- `official`: the published HydraLoRA layer's loop (Clin0212/HydraLoRA, peft/tuners/lora.py):
  `result = F.linear(x, W, b)`, the same g, then per head
  `result = result + g[:, e:e+1] * F.linear(F.linear(x, A), B_e) * s` in a Python loop; it
  recomputes x A^T for every head, as the released code does.
- `torch`, `triton`, `cuda`: adapterops.routed_lowrank_linear with backend="torch" (the
  reference), backend="triton" (the fused kernels) and backend="cuda" (the compiled C++
  fallback; on CPU only with ADAPTEROPS_CSRC_ON_CPU=1).

FLOP model (M tokens, K = in, N = out, rank r, E heads; 2 FLOPs per multiply-add; bias,
scaling, softmax, gating and elementwise adds not counted). As in lowrank.py, every provider
but the floor is credited with the op's model FLOPs, whatever it actually runs, so tflops
compare providers at equal useful work; `official` actually runs E - 1 extra shrinks
((E - 1) 2MrK forward, twice that backward, for dA and dX), and E rank-r expands in place of one
of inner size E r (the same FLOPs in smaller GEMMs). Its extra time shows in p50, not in tflops.
- forward: base x W^T 2MKN; shrink and router logits x [A; Wg]^T 2M(r+E)K; the routed sum
  hg Bcat^T 2M(E r)N.
- backward: W is frozen, so the base costs dX = dY W alone, 2MKN. Adapter: u = dY Bcat 2MN(E r)
  (giving dh and the gate gradients); dB = (g dY)^T h 2MN(E r); dA and dWg 2M(r+E)K; the low-rank
  part of dX, [dh | dlogits] [A; Wg], 2M(r+E)K.
- floor: 2MKN forward, 2MKN backward.
Byte model (the minimum: each input read once, each output written once, all in the dtype):
- forward reads x, W, bias, A, B, Wg and writes y.
- backward reads dY, W, A, B, Wg and what the gradients need (x, h, g) and writes dX, dA, dB,
  dWg.
- floor: forward reads x, W, bias and writes y; backward reads dY, W and writes dX.

Cases. The Triton path serves E r <= 256 (adapterops/ops/routed.py); `cases` drops any
combination past it. The full sweep is 28 cases, not the 96 of the whole product (in, out) x M
x r in {8, 16, 64} x E in {2, 4, 8} less E r > 256: the full sweep of every op (lowrank.py's 96
cases too) must finish within 10 minutes on one H100, and HydraLoRA's own questions, how time
grows with the heads and with the rank, need one shape, not three. So:
- the target setting (r=8, E=4; the headline case is M=8192, in = out = 4096, bf16) on every
  LLaMA-7B projection and every M: 12 cases;
- on the square 4096 x 4096 projection, every M, one axis moved at a time from the target:
  E in {2, 8} at r=8 and r in {16, 64} at E=4 (E r from 16 to 256, the Triton limit): 16 cases.
Estimated, not yet measured on a GPU: a case is 6 providers x 3 modes of `do_bench`, about
0.15 s each (25 ms warm-up + 100 ms timed + its estimate), about 3 s a case, 1.5 minutes for
the 28.
"""
import functools

import torch
import torch.nn.functional as F

import adapterops

from .harness import Case, OpBenchmark, Workload, make_tensor

PROVIDERS = ("floor", "torch_eager", "addmm", "official", "torch", "triton", "cuda")
SCALING = 0.5
MAX_HEADS_X_RANK = 256  # the Triton backend's limit on E r
# (in, out) of LLaMA-7B-like projections: square attention, MLP up, MLP down.
FULL_FEATURES = ((4096, 4096), (4096, 11008), (11008, 4096))
FULL_TOKENS = (16, 512, 2048, 8192)
TARGET = (8, 4)  # (r, E)
# (r, E) moved one axis at a time from TARGET, on the square projection only.
SQUARE_ONLY = ((8, 2), (8, 8), (16, 4), (64, 4))
# Under the interpreter a quick CPU case takes about as long as one of lowrank.py's (M=16:
# 9 s, M=128: 27 s on this project's 2-core development machine), so the quick CPU run of
# every op takes about 2 minutes there (1:50 measured).
QUICK = {"cuda": ((4096, 4096), (512, 8192)), "cpu": ((256, 256), (16, 128))}
# The shape the targets are stated at (docs/performance.md, "Targets"); on CPU a stand-in for a dry run.
HEADLINE = {"cuda": Case(M=8192, K=4096, N=4096, r=8, heads=4),
            "cpu": Case(M=16, K=64, N=32, r=8, heads=4)}


def cases(quick: bool, device_type: str) -> list[Case]:
    r, E = TARGET
    if quick:
        (K, N), tokens = QUICK[device_type]
        return [Case(M=M, K=K, N=N, r=r, heads=E) for M in tokens]
    plan = ([(K, N, r, E) for K, N in FULL_FEATURES]
            + [(*FULL_FEATURES[0], rank, heads) for rank, heads in SQUARE_ONLY])
    return [Case(M=M, K=K, N=N, r=r, heads=E) for K, N, r, E in plan for M in FULL_TOKENS
            if E * r <= MAX_HEADS_X_RANK]


def headline(device_type: str) -> list[Case]:
    return [HEADLINE[device_type]]


def _flops(case: Case, provider: str) -> tuple[float, float]:
    M, K, N, r, E = case.M, case.K, case.N, case.r, case.heads
    base = 2 * M * K * N
    if provider == "floor":
        return base, base
    shrink, routed = 2 * M * (r + E) * K, 2 * M * E * r * N
    return base + shrink + routed, base + 2 * routed + 2 * shrink


def _bytes(case: Case, provider: str, element_size: int) -> tuple[float, float]:
    M, K, N, r, E = case.M, case.K, case.N, case.r, case.heads
    x, y, W = M * K, M * N, N * K
    if provider == "floor":
        return (x + W + N + y) * element_size, (y + W + x) * element_size
    adapter = r * K + E * N * r + E * K          # A, B and Wg: read once; dA, dB, dWg: written
    saved = x + M * r + M * E                    # x, h, g
    forward = x + W + N + adapter + y
    backward = y + W + adapter + saved + x + adapter
    return forward * element_size, backward * element_size


def workload(provider: str, case: Case, dtype: torch.dtype, device: torch.device) -> Workload:
    """Fresh tensors for `case` and the provider's forward on them."""
    M, K, N, r, E = case.M, case.K, case.N, case.r, case.heads
    make = functools.partial(make_tensor, dtype=dtype, device=device)
    x = make(M, K, fan_in=1, trainable=True)
    weight, bias = make(N, K, fan_in=K), make(N, fan_in=1)
    lora_A = make(r, K, fan_in=K, trainable=True)
    lora_B = make(E, N, r, fan_in=r, trainable=True)  # random, not HydraLoRA's zero init
    router_weight = make(E, K, fan_in=K, trainable=True)
    adapter = (lora_A, lora_B, router_weight)

    def gates():
        logits = F.linear(x, router_weight)
        return F.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)

    def gated_shrink():
        """hg = [g_0 h | ... | g_{E-1} h] (M x E r) and Bcat = [B_0 | ... | B_{E-1}] (N x E r)."""
        h = F.linear(x, lora_A)
        hg = (gates()[:, :, None] * h[:, None, :]).reshape(M, E * r)
        return hg, lora_B.permute(1, 0, 2).reshape(N, E * r)

    def eager():
        hg, b_cat = gated_shrink()
        return F.linear(x, weight, bias) + F.linear(hg, b_cat) * SCALING

    def addmm():
        hg, b_cat = gated_shrink()
        return F.linear(x, weight, bias).addmm_(hg, b_cat.t(), alpha=SCALING)

    def official():
        result = F.linear(x, weight, bias)
        route = gates()
        for e in range(E):
            delta = F.linear(F.linear(x, lora_A), lora_B[e])
            result = result + route[:, e:e + 1] * delta * SCALING
        return result

    def ours(backend):
        return lambda: adapterops.routed_lowrank_linear(
            x, weight, bias, lora_A, lora_B, router_weight, SCALING, backend=backend)

    forwards = {"floor": lambda: F.linear(x, weight, bias), "torch_eager": eager,
                "addmm": addmm, "official": official, "torch": ours("torch"),
                "triton": ours("triton"), "cuda": ours("cuda")}
    uses_adapter = provider != "floor"
    fwd_flops, bwd_flops = _flops(case, provider)
    fwd_bytes, bwd_bytes = _bytes(case, provider, x.element_size())
    return Workload(
        forward=forwards[provider],
        grad_inputs=(x,) + (adapter if uses_adapter else ()),
        weights=(weight, bias) + (adapter if uses_adapter else ()),
        fwd_flops=fwd_flops, bwd_flops=bwd_flops, fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


BENCHMARKS = (OpBenchmark(name="hydra", cases=cases, headline=headline, providers=PROVIDERS,
                          workload=workload,
                          baseline="floor",
                          speedups=(("triton", "official"), ("triton", "torch_eager"),
                                    ("triton", "addmm"), ("triton", "cuda"))),)
