"""Benchmarks of `adapterops.lowrank_linear` (adapterops/ops/lowrank.py), as four ops:

- `lamda`: W and A frozen, S and B trainable (methods.md §2);
- `lora`: W frozen, A and B trainable, no S (methods.md §1);
- `lamda_dropout`, `lora_dropout`: the same with adapter dropout p = 0.1 in training (the rate
  LoRAFusion's kernels are measured at) in every provider but the floor: the compositions apply
  `F.dropout` to the adapter's input, PEFT its own `lora_dropout`, adapterops `dropout=0.1`.
  `triton_p0` is the fused op without dropout in the same run: the target is the fused op with
  dropout within 5% of it ("triton vs triton_p0" >= 0.95x).
- `lamda_fp32_adapter`, `lora_fp32_adapter`: A, S and B in fp32 on the run's 16-bit x and W
  (PEFT's default, `autocast_adapter_dtype=True`): the compositions compute as PEFT does (x cast
  to fp32 for the adapter, the base output plus the fp32 term, rounded to x's dtype), PEFT is
  its own default layer. (In an fp32 run they are the plain ops.)

x requires a gradient in both (a layer inside a network passes dx on). W and bias are frozen.

Providers, timed side by side:
- `floor`: the frozen base layer alone, `F.linear(x, W, b)`; its backward is the one base GEMM
  dX = dY W (autograd computes nothing else: W and b are frozen).
- `torch_eager`: the unfused composition a PEFT-style layer runs, autograd through plain ops:
  `F.linear(x, W, b) + F.linear(F.linear(F.linear(x, A), S), B) * s`.
- `addmm`: the strongest simple alternative: cuBLAS GEMMs and one in-place accumulate,
  `F.linear(x, W, b).addmm_(h2, B^T, alpha=s)`.
- `peft` (lora only; PEFT has no LaMDA layer): a real PEFT LoRA layer (`peft.tuners.lora.Linear`,
  injected into a one-layer model with `peft.inject_adapter_in_model`) holding the same W, bias,
  A and B, with lora_alpha = s r so that its scaling is s. When `import peft` fails its rows
  carry the ImportError. peft is not a dependency of adapterops (`pip install peft`).
- `torch`, `triton`, `cuda`: adapterops.lowrank_linear with backend="torch" (the reference),
  backend="triton" (the fused kernels) and backend="cuda" (the compiled C++ fallback: cuBLAS
  GEMMs with the low-rank term folded in as beta = 1 accumulation). On CPU the cuda provider
  runs only with ADAPTEROPS_CSRC_ON_CPU=1 (its rows carry the reason otherwise).

FLOP model (M tokens, K = in, N = out, rank r; 2 FLOPs per multiply-add; bias, scaling and
elementwise adds not counted):
- forward: base x W^T 2MKN; x A^T 2MrK; h1 S^T 2Mr^2 (lamda only); h2 B^T 2MrN.
- backward: W is frozen, so the base costs dX = dY W alone, 2MKN (not the 2x of a layer
  that trains W). Adapter: g = dY B 2MNr; dB = dY^T h2 2MNr; (g S) A into dX 2MrK; plus for
  lamda g S 2Mr^2 and dS = g^T h1 2Mr^2, for lora dA = g^T x 2MrK.
- floor: 2MKN forward, 2MKN backward.
Byte model (the minimum: each input read once, each output written once, in the dtype):
- forward reads x, W, bias, A, S (lamda), B and writes y.
- backward reads dY, W, A, S (lamda), B and what the gradients need (lamda: h1, h2; lora: x,
  h1) and writes dX and the weight gradients (lamda: dS, dB; lora: dA, dB).
- floor: forward reads x, W, bias and writes y; backward reads dY, W and writes dX.
"""
import functools

import torch
import torch.nn.functional as F

import adapterops

from .harness import Case, OpBenchmark, Workload, make_tensor

PROVIDERS = {"lamda": ("floor", "torch_eager", "addmm", "torch", "triton", "cuda"),
             "lora": ("floor", "torch_eager", "addmm", "peft", "torch", "triton", "cuda")}
PROVIDERS.update({f"{name}_{variant}": providers + (("triton_p0",) if variant == "dropout" else ())
                  for name, providers in list(PROVIDERS.items())
                  for variant in ("dropout", "fp32_adapter")})
SCALING = 0.5
DROPOUT = 0.1
# (in, out) of LLaMA-7B-like projections: square attention, MLP up, MLP down.
FULL_FEATURES = ((4096, 4096), (4096, 11008), (11008, 4096))
FULL_TOKENS = (16, 512, 2048, 8192)
FULL_RANKS = (8, 16, 64, 128)
# The quick CPU cases must finish within minutes with triton under the interpreter, which runs
# a 128 x 256 x 256 fused forward in about 2 s on this project's 2-core development machine.
QUICK = {"cuda": (((4096, 4096),), (512, 8192), (16,)),
         "cpu": (((256, 256),), (16, 128), (16,))}
# The shape the targets are stated at (docs/performance.md, "Targets"); on CPU a stand-in for a dry run.
HEADLINE = {"cuda": Case(M=8192, K=4096, N=4096, r=16), "cpu": Case(M=16, K=64, N=32, r=16)}


def cases(quick: bool, device_type: str) -> list[Case]:
    features, tokens, ranks = (QUICK[device_type] if quick
                               else (FULL_FEATURES, FULL_TOKENS, FULL_RANKS))
    return [Case(M=M, K=K, N=N, r=r) for K, N in features for M in tokens for r in ranks]


def headline(device_type: str) -> list[Case]:
    return [HEADLINE[device_type]]


def _flops(case: Case, provider: str, lamda: bool) -> tuple[float, float]:
    M, K, N, r = case.M, case.K, case.N, case.r
    base = 2 * M * K * N
    if provider == "floor":
        return base, base
    forward = base + 2 * M * r * (K + N) + (2 * M * r * r if lamda else 0)
    backward = base + 4 * M * N * r + 2 * M * r * K + (4 * M * r * r if lamda else 2 * M * r * K)
    return forward, backward


def _bytes(case: Case, provider: str, lamda: bool, element_size: int,
           adapter_size: int) -> tuple[float, float]:
    """(forward, backward) bytes: x, W, bias, y, dY, dX and a LoRA's saved x in
    `element_size`; the adapter, its gradients and its M x r activations in `adapter_size`."""
    M, K, N, r = case.M, case.K, case.N, case.r
    x, y, W = M * K, M * N, N * K
    if provider == "floor":
        return (x + W + N + y) * element_size, (y + W + x) * element_size
    adapter = r * K + N * r + (r * r if lamda else 0)        # A, B and S: read once
    saved_h = 2 * M * r if lamda else M * r                   # lamda: h1, h2; lora: h1 (and x)
    grads = r * r + N * r if lamda else r * K + N * r         # dS, dB or dA, dB
    forward = (x + W + N + y) * element_size + adapter * adapter_size
    backward = ((y + W + x + (0 if lamda else x)) * element_size
                + (adapter + saved_h + grads) * adapter_size)
    return forward, backward


def _peft_layer(weight, bias, lora_A, lora_B, dropout: float):
    """A PEFT LoRA layer over nn.Linear(K, N) whose parameters share storage with the given
    tensors, in training mode with lora_dropout = `dropout`: returns the layer and its
    trainable (A, B) parameters, the leaves autograd reaches."""
    import peft  # imported here: a missing peft is one provider's error, not the suite's

    r, K = lora_A.shape
    N = weight.shape[0]
    base = torch.nn.Linear(K, N, device="meta")
    base.weight = torch.nn.Parameter(weight, requires_grad=False)
    base.bias = torch.nn.Parameter(bias, requires_grad=False)
    config = peft.LoraConfig(r=r, lora_alpha=SCALING * r, lora_dropout=dropout, target_modules=["0"])
    model = peft.inject_adapter_in_model(config, torch.nn.Sequential(base))
    layer = model[0]
    if layer.scaling["default"] != SCALING:
        raise RuntimeError(f"peft scaling {layer.scaling['default']}, want {SCALING}")
    adapter = []
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        parameter = torch.nn.Parameter(tensor.detach(), requires_grad=True)
        getattr(layer, name)["default"].weight = parameter
        adapter.append(parameter)
    return layer.train(), tuple(adapter)


def workload(provider: str, case: Case, dtype: torch.dtype, device: torch.device, *,
             lamda: bool, dropout: float = 0.0, fp32_adapter: bool = False) -> Workload:
    """Fresh tensors for `case` and the provider's forward on them (with adapter dropout
    `dropout` in training; with `fp32_adapter`, the adapter in fp32)."""
    M, K, N, r = case.M, case.K, case.N, case.r
    make = functools.partial(make_tensor, dtype=dtype, device=device)
    make_adapter = functools.partial(make_tensor, dtype=torch.float32 if fp32_adapter else dtype,
                                     device=device)
    x = make(M, K, fan_in=1, trainable=True)
    weight, bias = make(N, K, fan_in=K), make(N, fan_in=1)
    lora_A = make_adapter(r, K, fan_in=K, trainable=not lamda)
    lora_S = make_adapter(r, r, fan_in=r, trainable=True) if lamda else None
    lora_B = make_adapter(N, r, fan_in=r, trainable=True)
    adapter = tuple(t for t in (lora_A, lora_S, lora_B) if t is not None)

    def shrink():
        x_adapter = x.to(lora_A.dtype)  # PEFT's cast (x itself when the dtypes agree)
        h = F.linear(F.dropout(x_adapter, dropout) if dropout else x_adapter, lora_A)
        return F.linear(h, lora_S) if lamda else h

    def fused(backend: str, p: float = dropout):
        return lambda: adapterops.lowrank_linear(x, weight, bias, lora_A, lora_B, SCALING, lora_S,
                                                 dropout=p, backend=backend)

    forwards = {
        "floor": lambda: F.linear(x, weight, bias),
        "torch_eager": lambda: (F.linear(x, weight, bias) + F.linear(shrink(), lora_B) * SCALING).to(x.dtype),
        "addmm": lambda: F.linear(x, weight, bias).to(lora_B.dtype).addmm_(
            shrink(), lora_B.t(), alpha=SCALING).to(x.dtype),
        "torch": fused("torch"), "triton": fused("triton"), "cuda": fused("cuda"),
        "triton_p0": fused("triton", 0.0),
    }
    if provider == "peft":
        if lamda:
            raise ValueError("peft has no LaMDA layer")
        layer, adapter = _peft_layer(weight, bias, lora_A, lora_B, dropout)
        forwards["peft"] = lambda: layer(x)
    uses_adapter = provider != "floor"
    fwd_flops, bwd_flops = _flops(case, provider, lamda)
    fwd_bytes, bwd_bytes = _bytes(case, provider, lamda, x.element_size(), lora_B.element_size())
    return Workload(
        forward=forwards[provider],
        grad_inputs=(x,) + (tuple(t for t in adapter if t.requires_grad) if uses_adapter else ()),
        weights=(weight, bias) + (adapter if uses_adapter else ()),
        fwd_flops=fwd_flops, bwd_flops=bwd_flops, fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)


BENCHMARKS = tuple(
    # The fp32-adapter ops have no target yet: the sweep times them, the headline does not.
    OpBenchmark(name=name, cases=cases, providers=PROVIDERS[name],
                headline=None if name.endswith("_fp32_adapter") else headline,
                workload=functools.partial(workload, lamda=name.startswith("lamda"),
                                           dropout=DROPOUT if name.endswith("_dropout") else 0.0,
                                           fp32_adapter=name.endswith("_fp32_adapter")),
                baseline="floor",
                # ("triton", "cuda"): the cuda fallback's time over triton's (target <= 1.2).
                speedups=(("triton", "torch_eager"), ("triton", "addmm"), ("triton", "cuda"),
                          ("cuda", "torch_eager"))
                + ((("triton", "peft"),) if "peft" in PROVIDERS[name] else ())
                + ((("triton", "triton_p0"),) if "triton_p0" in PROVIDERS[name] else ()))
    for name in PROVIDERS)
