"""Tests of HD-PiSSA (methods.md §4): the layer op `hdpissa_linear`, the update op
`lowrank_update_`, the factors, `HDPiSSALinear`, `convert` and `HDPiSSAOptimizer` (virtual
ranks in one process, and gloo ranks in spawned processes).

Oracles: autograd on the explicit LoRA form in float64 for the layer's gradients; the float64
SVD for the factors; a float64 implementation of the algorithm written here (per-rank Adam,
the merged update) for the optimizer. The factors and Adam's moments are fp32 by design, so
the optimizer is compared with an fp32 tolerance.
"""
import copy
import dataclasses
import datetime
import io
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from adapterops import HDPiSSALinear, hdpissa_linear, lowrank_update_
from adapterops.hdpissa import HDPiSSAOptimizer, convert, init_factors
from utils import assert_close_to_reference, forbid_backend_calls

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# 1. The layer op.

@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    lead: tuple
    in_f: int
    out_f: int
    rank: int
    bias: bool = True
    transposed: bool = False
    x_grad: bool = True
    seed: int = 0


CASES = [
    Case("one-token-r16", (1,), 64, 48, 16, seed=1),
    Case("odd-r1-nobias", (37,), 70, 50, 1, bias=False, seed=2),
    Case("3d-r5-nodx", (3, 7), 56, 44, 5, x_grad=False, seed=3),
    Case("transposed-r64", (33,), 40, 72, 64, transposed=True, seed=4),
    Case("r128", (29,), 36, 130, 128, seed=5),
    Case("big-r16", (200,), 288, 160, 16, seed=6),
]


def _layer_inputs(case: Case) -> dict:
    g = torch.Generator().manual_seed(case.seed)
    K, N, r = case.in_f, case.out_f, case.rank
    return {"x": torch.randn(*case.lead, K, generator=g, dtype=torch.float64),
            "weight": torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5,
            "bias": torch.randn(N, generator=g, dtype=torch.float64) if case.bias else None,
            "lora_A": torch.randn(r, K, generator=g, dtype=torch.float64) / K ** 0.5,
            "lora_B": torch.randn(N, r, generator=g, dtype=torch.float64) / r ** 0.5,
            "grad_y": torch.randn(*case.lead, N, generator=g, dtype=torch.float64)}


def _run_layer(case, inputs, dtype, device, backend):
    """(y, {name: grad}) with the op (backend) or, backend None, the explicit LoRA form
    y = x W^T + b + s (x A^T) B^T - s (x A0^T) B0^T at A = A0, B = B0 (autograd)."""
    t = {n: (v.to(device=device, dtype=dtype) if v is not None else None) for n, v in inputs.items()}
    x = t["x"]
    if case.transposed:
        x = x.t().contiguous().t()
        assert not x.is_contiguous()
    names = (("x",) if case.x_grad else ()) + ("lora_A", "lora_B")
    leaves = {"x": x, "lora_A": t["lora_A"], "lora_B": t["lora_B"]}
    for n in names:
        leaves[n].requires_grad_()
    s = 0.7
    if backend is None:
        A0, B0 = t["lora_A"].detach(), t["lora_B"].detach()
        y = (F.linear(x, t["weight"], t["bias"]) + s * F.linear(F.linear(x, leaves["lora_A"]), leaves["lora_B"])
             - s * F.linear(F.linear(x, A0), B0))
    else:
        y = hdpissa_linear(x, t["weight"], t["bias"], leaves["lora_A"], leaves["lora_B"], s,
                           backend=backend)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], t["grad_y"])
    return y.detach(), dict(zip(names, grads))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer_matches_the_explicit_lora_form(case, backend, dtype, device):
    inputs = _layer_inputs(case)
    rounded = {n: (v.to(dtype).double() if v is not None else None) for n, v in inputs.items()}
    ref_y, ref_grads = _run_layer(case, rounded, torch.float64, device, None)
    base_y, base_grads = _run_layer(case, inputs, dtype, device, "torch")
    y, grads = _run_layer(case, inputs, dtype, device, backend)
    where = f"{case.id} {backend} {DTYPE_IDS[dtype]}"
    assert_close_to_reference(f"{where} y", y, ref_y, base_y)
    for name, grad in grads.items():
        assert_close_to_reference(f"{where} d{name}", grad, ref_grads[name], base_grads[name])
    # The forward is the base layer alone, and dx has no adapter term.
    y64, grads64 = _run_layer(case, rounded, torch.float64, device, "torch")
    base = F.linear(rounded["x"], rounded["weight"], rounded["bias"]).to(device)
    assert torch.allclose(y64, base, rtol=0, atol=1e-12)
    if case.x_grad:
        dx = torch.einsum("...n,nk->...k", rounded["grad_y"], rounded["weight"]).to(device)
        assert torch.allclose(grads64["x"], dx, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_layer_memory_contract(backend, device):
    """x is kept for gA, h = x A^T (M x r) for gB; nothing out x in is ever saved."""
    M, K, N, r = 40, 56, 48, 8
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g).to(device).requires_grad_()
    W, A, B = (torch.randn(*s, generator=g).to(device) for s in ((N, K), (r, K), (N, r)))
    params = {t.data_ptr() for t in (W, A, B)}

    def saved_shapes(train):
        for t, trains in zip((A, B), train):
            t.requires_grad_(trains)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = hdpissa_linear(x, W, None, A, B, 0.5, backend=backend)
        y.backward(torch.randn_like(y))
        return sorted(tuple(t.shape) for t in saved if t.data_ptr() not in params)

    assert saved_shapes((True, True)) == [(M, r), (M, K)]
    assert saved_shapes((False, True)) == [(M, r)]
    assert saved_shapes((True, False)) == [(M, K)]


def test_no_h_without_a_gradient_for_lora_B(monkeypatch):
    """h = x A^T costs a read of x and only gB uses it: not computed in eval or for a frozen B."""
    from adapterops.backends.triton import lowrank
    calls = []
    shrink = lowrank.shrink
    monkeypatch.setattr(lowrank, "shrink", lambda *a: calls.append(1) or shrink(*a))
    layer = HDPiSSALinear(24, 20, 2, 4.0, world_size=2, rank_index=0, backend="triton")
    x = torch.randn(5, 24)
    with torch.no_grad():
        layer(x)
    layer.lora_B.requires_grad_(False)
    layer(x).sum().backward()
    assert not calls and layer.lora_A.grad is not None
    layer.lora_B.requires_grad_(True)
    layer(x)
    assert calls == [1]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_opcheck(backend, device):
    g = torch.Generator().manual_seed(13)
    x, W, b = torch.randn(19, 24, generator=g), torch.randn(20, 24, generator=g), torch.randn(20, generator=g)
    A, B = torch.randn(4, 24, generator=g), torch.randn(20, 4, generator=g)
    x, W, b, A, B = (t.to(device) for t in (x, W, b, A, B))
    for t in (x, A, B):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.adapterops.hdpissa_linear_fwd.default,
                          (x, W, b, A, B, 0.5, True, backend))
    with torch.no_grad():
        _, h = torch.ops.adapterops.hdpissa_linear_fwd(x, W, b, A, B, 0.5, True, "torch")
    grad_y = torch.randn(19, 20, device=device)
    for needs in ((True, True, True), (False, False, True), (True, True, False)):
        torch.library.opcheck(torch.ops.adapterops.hdpissa_linear_bwd.default,
                              (grad_y, x.detach(), h, W, A.detach(), B.detach(), 0.5, *needs, backend))
    P, Q = torch.randn(20, 6, device=device), torch.randn(6, 24, device=device)
    for copy_ in (None, torch.empty(20, 24, dtype=torch.bfloat16, device=device)):
        torch.library.opcheck(torch.ops.adapterops.lowrank_update_.default,
                              (W.clone(), P, Q, -0.5, copy_, backend))


def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    model = convert(_net(), 2, 4.0, world_size=2, rank_index=1).to(device)
    x = torch.randn(6, 12, device=device, requires_grad=True)
    eager = torch.autograd.grad(model(x).square().sum(), [x] + [p for p in model.parameters() if p.requires_grad])
    compiled = torch.compile(model, fullgraph=True)
    got = torch.autograd.grad(compiled(x).square().sum(), [x] + [p for p in model.parameters() if p.requires_grad])
    for i, (a, e) in enumerate(zip(got, eager)):
        bound = 16 * torch.finfo(torch.float32).eps * e.abs().max().item()
        assert (a - e).abs().max().item() <= bound, f"gradient {i}: compiled differs from eager"


BAD_LAYER = [
    (dict(lora_B=torch.randn(20, 5)), ValueError, r"lora_B has shape \(20, 5\).*rank.*4"),
    (dict(lora_B=torch.randn(21, 4)), ValueError, r"lora_B has shape \(21, 4\).*out_features.*20"),
    (dict(lora_A=torch.randn(4, 23)), ValueError, r"lora_A has shape \(4, 23\).*24"),
    (dict(x=torch.randn(3, 25)), ValueError, r"x has shape \(3, 25\).*24"),
    (dict(lora_B=torch.randn(20, 4, dtype=torch.float64)), TypeError, "lora_B has dtype torch.float64"),
    (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
]


@pytest.mark.parametrize("change,error,match", BAD_LAYER)
def test_layer_bad_input(change, error, match, monkeypatch):
    forbid_backend_calls(monkeypatch, "hdpissa_forward")
    args = dict(x=torch.randn(3, 24), weight=torch.randn(20, 24), bias=None,
                lora_A=torch.randn(4, 24), lora_B=torch.randn(20, 4), scaling=0.5)
    args.update(change)
    with pytest.raises(error, match=match):
        hdpissa_linear(**args)


# 2. The update op.

@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("copy_dtype", [None, torch.float16, torch.bfloat16], ids=["nocopy", "fp16", "bf16"])
def test_update_matches_float64(backend, copy_dtype, device):
    g = torch.Generator().manual_seed(8)
    N, K, R = 70, 90, 36  # R not a multiple of 16, tiles cut in both dimensions
    W64, P64, Q64 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((N, K), (N, R), (R, K)))
    W = W64.float().to(device)
    copy_ = torch.empty(N, K, dtype=copy_dtype, device=device) if copy_dtype else None
    lowrank_update_(W, P64.float().to(device), Q64.float().to(device), -0.3, copy=copy_, backend=backend)
    expected = W64.float().double() - 0.3 * P64.float().double() @ Q64.float().double()
    # fp32 inputs: a dot of R products plus one add, a few fp32 ulps of the result's scale.
    bound = 4 * R ** 0.5 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    err = (W.double().cpu() - expected).abs().max().item()
    assert err <= bound, f"{backend} update: max error {err:.2e} > {bound:.2e}"
    if copy_ is not None:
        assert torch.equal(copy_, W.to(copy_dtype)), "the copy is not the updated W rounded to nearest"


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_update_into_a_strided_copy(backend, device):
    """The copy may be any 2-D view (here a transposed one): every element lands in its place."""
    g = torch.Generator().manual_seed(9)
    N, K, R = 37, 50, 8
    W, P, Q = (torch.randn(*s, generator=g).to(device) for s in ((N, K), (N, R), (R, K)))
    storage = torch.full((K, N), float("nan"), dtype=torch.bfloat16, device=device)
    copy_ = storage.t()
    expected = W.double() - 0.5 * P.double() @ Q.double()
    lowrank_update_(W, P, Q, -0.5, copy=copy_, backend=backend)
    assert not storage.isnan().any()
    assert torch.equal(copy_, W.to(torch.bfloat16))
    assert (W.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("layout", ["transposed", "stride0"])
def test_update_rejects_a_copy_that_overlaps_or_repeats_before_changing_weight(backend, layout,
                                                                               device):
    """A copy that aliases W (here W's transpose) or repeats elements would race (or make the
    torch backend raise after W changed): rejected before any backend runs, W untouched. W
    itself as its own copy is allowed."""
    W = torch.randn(6, 6, device=device)
    before = W.clone()
    copy_ = W.t() if layout == "transposed" else torch.zeros(1, 6, device=device).expand(6, 6)
    with pytest.raises(ValueError, match="overlaps weight" if layout == "transposed" else "repeats"):
        lowrank_update_(W, torch.ones(6, 1, device=device), torch.ones(1, 6, device=device), 1.0,
                        copy=copy_, backend=backend)
    assert torch.equal(W, before)
    lowrank_update_(W, torch.ones(6, 1, device=device), torch.ones(1, 6, device=device), 1.0,
                    copy=W, backend=backend)
    assert torch.equal(W, before + 1)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_update_rejects_a_weight_that_repeats_elements(backend, device):
    """A weight with a stride-0 dimension would have one element updated many times."""
    weight = torch.zeros(1, 8, device=device).expand(6, -1)
    with pytest.raises(ValueError, match=r"weight has strides \(0, 1\).*repeats elements"):
        lowrank_update_(weight, torch.randn(6, 2, device=device), torch.randn(2, 8, device=device), 0.5,
                        backend=backend)
    assert weight.abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_update_of_a_tensor_requiring_grad_raises_like_pytorch(backend, device):
    g = torch.Generator().manual_seed(3)
    W = (torch.randn(6, 8, generator=g) / 8 ** 0.5).to(device)
    P = torch.randn(6, 2, generator=g).to(device)
    Q = (torch.randn(2, 8, generator=g) / 8 ** 0.5).to(device)
    leaf = W.clone().requires_grad_()
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match=r"weight requires grad.*torch.no_grad"):
        lowrank_update_(leaf, P, Q, 0.5, backend=backend)
    torch.testing.assert_close(leaf.detach(), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"leaf Variable that requires grad"):
        leaf.add_(1.0)  # what PyTorch itself says
    with torch.no_grad():  # where optimizers update weights: allowed, as for add_
        lowrank_update_(leaf, P, Q, 0.5, backend=backend)
    torch.testing.assert_close(leaf.detach().double(), before.double() + 0.5 * P.double() @ Q.double())


def test_cuda_update_declines_a_copy_dtype_it_cannot_write(device):
    W = torch.randn(4, 5, device=device)
    before = W.clone()
    P, Q, copy_ = torch.ones(4, 1, device=device), torch.ones(1, 5, device=device), torch.empty(
        4, 5, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16 copies, not torch.float64"):
        lowrank_update_(W, P, Q, 1.0, copy=copy_, backend="cuda")
    assert torch.equal(W, before)
    lowrank_update_(W, P, Q, 1.0, copy=copy_, backend="torch")
    assert torch.equal(copy_, (before + 1).double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_update_of_a_low_precision_weight(dtype, device):
    """Unlike the Triton update (fp32 masters only), the cuda backend updates a 16-bit W in
    place: one GEMM with beta = 1, accumulated in fp32 and rounded once, so every element is
    within one ulp (of its dtype) of the float64 result."""
    g = torch.Generator().manual_seed(10)
    N, K, R = 40, 56, 12
    W64, P64, Q64 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((N, K), (N, R), (R, K)))
    expected = W64.to(dtype).double() - 0.25 * P64.to(dtype).double() @ Q64.to(dtype).double()
    got = W64.to(device, dtype)
    lowrank_update_(got, P64.to(device, dtype), Q64.to(device, dtype), -0.25, backend="cuda")
    err = (got.double().cpu() - expected).abs()
    # One rounding of the result (half an ulp, below eps |x|), plus the fp32 accumulation of R
    # products, far smaller; the update itself moves W by about 0.25 sqrt(R) ~ 0.9.
    bound = torch.finfo(dtype).eps * expected.abs() + 4 * R * torch.finfo(torch.float32).eps
    assert (err <= bound).all(), f"cuda update {dtype}: worst excess {(err - bound).max():.2e}"
    assert (got.double().cpu() - W64.to(dtype).double()).abs().max() > 0.5


def test_update_bad_input(monkeypatch):
    forbid_backend_calls(monkeypatch, "update_")
    W, P, Q = torch.zeros(6, 8), torch.zeros(6, 3), torch.zeros(3, 8)
    with pytest.raises(ValueError, match=r"Q has shape \(4, 8\).*inner size \(P.shape\[1\]\) = 3"):
        lowrank_update_(W, P, torch.zeros(4, 8), 1.0)
    with pytest.raises(ValueError, match=r"P has shape \(5, 3\).*weight.shape\[0\]"):
        lowrank_update_(W, torch.zeros(5, 3), Q, 1.0)
    with pytest.raises(TypeError, match="P has dtype torch.float64"):
        lowrank_update_(W, P.double(), Q, 1.0)
    with pytest.raises(ValueError, match=r"copy has shape \(6, 7\)"):
        lowrank_update_(W, P, Q, 1.0, copy=torch.zeros(6, 7, dtype=torch.bfloat16))
    # A 0-d tensor is a real scalar and is accepted; a 1-element 1-D one is not.
    with pytest.raises(TypeError, match="scale must be a Python float"):
        lowrank_update_(W, P, Q, torch.tensor([1.0]))


# 3. Factors.

@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_factors_are_slices_of_the_float64_svd(shape):
    g = torch.Generator().manual_seed(9)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
    K, r = 3, 4
    for k in range(K):
        A, B = init_factors(W, r, K, k)
        assert A.dtype == B.dtype == torch.float32 and A.shape == (r, shape[1]) and B.shape == (shape[0], r)
        sl = slice(k * r, (k + 1) * r)
        # Singular vectors are defined up to sign: compare the rank-r products and the norms.
        torch.testing.assert_close(B.double() @ A.double(), (U[:, sl] * sigma[sl]) @ Vh[sl],
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(A.double().norm(dim=1) ** 2, sigma[sl], rtol=1e-5, atol=0)
    # The slices together are the top K r of W.
    A_all = torch.cat([init_factors(W, r, K, k)[0] for k in range(K)])
    B_all = torch.cat([init_factors(W, r, K, k)[1] for k in range(K)], 1)
    torch.testing.assert_close(B_all.double() @ A_all.double(),
                               (U[:, :K * r] * sigma[:K * r]) @ Vh[:K * r], rtol=0, atol=1e-5)


def test_lowrank_svd_factors_are_close_and_identical_on_every_call():
    g = torch.Generator().manual_seed(10)
    # A spectrum that decays, as pretrained weights' do: randomised SVD is accurate there.
    U = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))[0]
    W = (U[:, :48] * (0.7 ** torch.arange(48.0, dtype=torch.float64))) @ V.t()
    exact = init_factors(W, 2, 3, 1)
    first = init_factors(W, 2, 3, 1, svd="lowrank", niter=4)
    torch.manual_seed(123)  # the caller's generator does not matter, and is left alone
    state = torch.get_rng_state()
    second = init_factors(W, 2, 3, 1, svd="lowrank", niter=4)
    assert torch.equal(torch.get_rng_state(), state), "the lowrank SVD drew from torch's generator"
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "lowrank factors are not repeatable"
    torch.testing.assert_close(first[1].double() @ first[0].double(),
                               exact[1].double() @ exact[0].double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=5, world_size=5), r"world_size \* rank <= min\(in_features, out_features\): 5 \* 5 = 25 > 24"),
    (dict(rank_index=3), r"rank_index must be an int in \[0, world_size\) = \[0, 3\), got 3"),
    (dict(rank_index=-1), r"rank_index must be an int in \[0, world_size\)"),
    (dict(svd="randomized"), "svd must be one of full, lowrank"),
    (dict(rank=0), "rank must be a positive int"),
])
def test_factor_bad_input(kwargs, match):
    args = dict(weight=torch.randn(24, 40), rank=2, world_size=3, rank_index=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        init_factors(**args)


# 4. The module and convert.

def test_layer_is_the_base_layer_and_holds_its_slice(device):
    linear = nn.Linear(40, 24, device=device)
    layer = HDPiSSALinear.from_linear(linear, rank=3, alpha=6.0, world_size=4, rank_index=2)
    x = torch.randn(5, 40, device=device)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)
    A, B = init_factors(linear.weight, 3, 4, 2)
    assert torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B)
    assert layer.master_weight is None  # fp32: the update goes to the weight itself
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    half = HDPiSSALinear.from_linear(nn.Linear(40, 24, dtype=torch.bfloat16), 3, 6.0, 4, 2)
    assert half.master_weight.dtype == torch.float32
    assert torch.equal(half.master_weight.to(torch.bfloat16), half.weight)
    assert set(half.consistency_tensors()) == {"weight", "master_weight", "bias", "factor_A", "factor_B"}
    with pytest.raises(ValueError, match=r"world_size \* rank"):
        HDPiSSALinear.from_linear(linear, rank=7, alpha=1.0, world_size=4, rank_index=0)


def _net(dtype=torch.float32):
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(),
                         nn.Sequential(nn.Linear(10, 9), nn.Tanh()), nn.Linear(9, 8)).to(dtype)


def test_a_state_dict_from_another_rank_keeps_this_ranks_slice():
    """Data-parallel trainers save on rank 0 and load everywhere: rank 1 must go on training
    its own slice, not rank 0's."""
    linear = nn.Linear(40, 24)
    rank0 = HDPiSSALinear.from_linear(linear, 3, 6.0, world_size=2, rank_index=0)
    rank1 = HDPiSSALinear.from_linear(nn.Linear(40, 24), 3, 6.0, world_size=2, rank_index=1)
    rank1.load_state_dict(rank0.state_dict())
    A, B = init_factors(linear.weight, 3, 2, 1)
    assert torch.equal(rank1.lora_A, A) and torch.equal(rank1.lora_B, B)
    assert torch.equal(rank1.weight, rank0.weight)


def test_layer_and_converted_model_pickle_and_keep_their_load_hook():
    """The hook that re-slices a rank's factors on load is a module-level function, so pickle
    and torch.save take the layer, and the hook still works after a load."""
    layer = HDPiSSALinear(16, 16, 2, 4, world_size=2, rank_index=0)
    restored = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(restored.lora_A, layer.lora_A, rtol=0, atol=0)
    model = convert(_net(), rank=2, alpha=4, world_size=2, rank_index=1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # The restored layer still re-slices its rank's factors after a load (the hook survived):
    # rank 0's state loaded into rank 1's layer gives rank 1's slice.
    rank0 = convert(_net(), rank=2, alpha=4, world_size=2, rank_index=0)
    rank0.load_state_dict(model.state_dict())
    loaded[0].load_state_dict(rank0[0].state_dict())
    torch.testing.assert_close(loaded[0].lora_A, loaded[0].factor_A[2:4], rtol=0, atol=0)


def test_convert_all_or_targets():
    model = convert(_net(), 2, 4.0, world_size=3, rank_index=1)
    assert [type(m).__name__ for m in (model[0], model[2][0], model[3])] == ["HDPiSSALinear"] * 3
    model = convert(_net(), 2, 4.0, world_size=3, rank_index=1, target_modules=["2.0"])
    assert type(model[2][0]) is HDPiSSALinear and type(model[0]) is nn.Linear
    with pytest.raises(ValueError,
                       match=r"no nn.Linear or Conv1D in the model matches .*its linear layers: 0, 2\.0, 3"):
        convert(_net(), 2, 4.0, world_size=3, rank_index=1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="pass world_size and rank_index"):
        convert(_net(), 2, 4.0)
    # One layer too small for K r: the error names it and no layer is replaced.
    model = _net()
    with pytest.raises(ValueError, match=r"layer 3: HD-PiSSA needs world_size \* rank .*3 \* 3 = 9 > 8"):
        convert(model, 3, 4.0, world_size=3, rank_index=0)
    assert not any(isinstance(m, HDPiSSALinear) for m in model.modules())


# 5. The optimizer, virtual ranks.

def _float64_hdpissa(base: nn.Module, xs, targets, K, r, alpha, lr, steps, betas=(0.9, 0.999), eps=1e-8):
    """The algorithm in float64, written out: rank k computes LoRA gradients of its fixed
    slice on shard k, runs its own Adam, and every step W += s Σ_k [(B_k - δB_k)(A_k - δA_k) -
    B_k A_k]. Returns the final weights of the linear layers in module order."""
    model = copy.deepcopy(base).double()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    s = alpha / r
    factors = []
    for lin in linears:
        U, sigma, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        root = sigma.sqrt()
        factors.append([(root[k * r:(k + 1) * r, None] * Vh[k * r:(k + 1) * r],
                         U[:, k * r:(k + 1) * r] * root[None, k * r:(k + 1) * r]) for k in range(K)])
    moments = {}
    for t in range(1, steps + 1):
        updates = [torch.zeros_like(lin.weight) for lin in linears]
        for k in range(K):
            adapters = [(A.clone().requires_grad_(), B.clone().requires_grad_()) for A, B in
                        (f[k] for f in factors)]
            originals = {}
            for lin, (A, B), f in zip(linears, adapters, factors):
                originals[lin] = lin.forward
                lin.forward = (lambda x, lin=lin, A=A, B=B, A0=f[k][0], B0=f[k][1]:
                               F.linear(x, lin.weight, lin.bias) + s * (x @ A.t()) @ B.t() - s * (x @ A0.t()) @ B0.t())
            loss = F.mse_loss(model(xs[k].double()), targets[k].double())
            grads = torch.autograd.grad(loss, [p for pair in adapters for p in pair])
            for lin in linears:
                lin.forward = originals[lin]
            for i, f in enumerate(factors):
                deltas = []
                for j in range(2):
                    g = grads[2 * i + j]
                    m, v = moments.get((i, k, j), (torch.zeros_like(g), torch.zeros_like(g)))
                    m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
                    moments[(i, k, j)] = (m, v)
                    deltas.append(lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps))
                (A, B), (dA, dB) = f[k], deltas
                updates[i] += (B - dB) @ (A - dA) - B @ A
        with torch.no_grad():
            for lin, u in zip(linears, updates):
                lin.weight += s * u
    return [lin.weight.detach() for lin in linears]


def _shards(K, per_rank=4, seed=12):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(per_rank, 12, generator=g) for _ in range(K)],
            [torch.randn(per_rank, 8, generator=g) for _ in range(K)])


def _train_virtual(model, xs, targets, lr, steps, opt=None):
    opt = opt or HDPiSSAOptimizer(model, lr=lr, virtual_ranks=True)
    for _ in range(steps):
        for k, (x, t) in enumerate(zip(xs, targets)):
            with opt.virtual_rank(k):
                F.mse_loss(model(x.to(next(model.parameters()).dtype)), t).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_virtual_ranks_match_the_float64_algorithm(backend, device):
    K, r, alpha, lr, steps = 3, 2, 4.0, 1e-2, 3
    base = _net()
    xs, targets = _shards(K)
    model = convert(copy.deepcopy(base), r, alpha, world_size=K, rank_index=0,
                    backend=backend).to(device)
    _train_virtual(model, [x.to(device) for x in xs], [t.to(device) for t in targets], lr, steps)
    expected = _float64_hdpissa(base, xs, targets, K, r, alpha, lr, steps)
    got = [m.weight for m in model.modules() if isinstance(m, HDPiSSALinear)]
    initial = [m.weight for m in base.modules() if isinstance(m, nn.Linear)]
    for i, (w, e, w0) in enumerate(zip(got, expected, initial)):
        update = e - w0.double()
        err = (w.detach().double().cpu() - e).abs().max().item()
        # fp32 factors, moments and weights: errors of a few fp32 ulps of W per step.
        bound = 16 * steps * torch.finfo(torch.float32).eps * e.abs().max().item()
        assert update.abs().max() > 100 * bound, "the update is too small for the test to see it"
        assert err <= bound, f"layer {i}: max error {err:.2e} vs float64 > {bound:.2e}"


def test_lr_scheduler_and_resume_reproduce_an_uninterrupted_run(tmp_path):
    K, steps = 2, 4
    xs, targets = _shards(K)
    full = convert(_net(torch.bfloat16), 2, 4.0, world_size=K, rank_index=0)
    opt = HDPiSSAOptimizer(full, lr=1e-2, virtual_ranks=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(steps):
        _train_virtual(full, xs, targets, None, 1, opt)
        sched.step()
    assert opt.param_groups[0]["lr"] == 1e-2 * 0.5 ** steps

    first = convert(_net(torch.bfloat16), 2, 4.0, world_size=K, rank_index=0)
    opt = HDPiSSAOptimizer(first, lr=1e-2, virtual_ranks=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        _train_virtual(first, xs, targets, None, 1, opt)
        sched.step()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
               tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed = convert(_net(torch.bfloat16), 2, 4.0, world_size=K, rank_index=0)
    resumed.load_state_dict(checkpoint["model"])
    opt = HDPiSSAOptimizer(resumed, lr=1e-2, virtual_ranks=True)
    opt.load_state_dict(checkpoint["opt"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.load_state_dict(checkpoint["sched"])
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    for _ in range(steps - 2):
        _train_virtual(resumed, xs, targets, None, 1, opt)
        sched.step()
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resuming"


def test_bf16_model_trains_its_fp32_master():
    """The update goes to the fp32 master; the bf16 weight is its rounding. Steps far below a
    bf16 ulp of W still move the master (they would round away in bf16)."""
    K = 2
    xs, targets = _shards(K)
    model = convert(_net(torch.bfloat16), 2, 4.0, world_size=K, rank_index=0)
    layers = [m for m in model.modules() if isinstance(m, HDPiSSALinear)]
    masters0 = [m.master_weight.clone() for m in layers]
    weights0 = [m.weight.detach().clone() for m in layers]
    _train_virtual(model, [x.bfloat16() for x in xs], [t.bfloat16() for t in targets], 1e-4, 2)
    for m, master0, weight0 in zip(layers, masters0, weights0):
        assert torch.equal(m.weight, m.master_weight.to(torch.bfloat16))
        moved = m.master_weight != master0
        assert moved.any(), "the master did not move"
        assert (moved & (m.weight == weight0)).any(), "no sub-ulp step was kept by the master"


def test_a_failed_step_changes_no_state():
    xs, targets = _shards(2)
    model = convert(_net(), 2, 4.0, world_size=2, rank_index=0)
    opt = HDPiSSAOptimizer(model, lr=1e-2, virtual_ranks=True)
    weights = copy.deepcopy(model.state_dict())
    with opt.virtual_rank(0):
        F.mse_loss(model(xs[0]), targets[0]).backward()
    with pytest.raises(RuntimeError, match=r"no gradient for 0.lora_A of virtual rank 1"):
        opt.step()  # rank 1 never ran backward
    assert not opt.state, "a failed step started Adam state"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items() if "lora" not in k)
    with pytest.raises(ZeroDivisionError):
        with opt.virtual_rank(1):
            F.mse_loss(model(xs[1]), targets[1]).backward()
            raise ZeroDivisionError("a failure inside the block")
    assert 1 not in opt._virtual_grads, "a failed virtual_rank block kept its gradients"


def test_optimizer_faults():
    xs, targets = _shards(2)
    model = convert(_net(), 2, 4.0, world_size=2, rank_index=0)
    opt = HDPiSSAOptimizer(model, lr=1e-2, virtual_ranks=True)
    with opt.virtual_rank(0):
        F.mse_loss(model(xs[0]), targets[0]).backward()
    with pytest.raises(RuntimeError, match=r"no gradient for 0.lora_A of virtual rank 1"):
        opt.step()  # rank 1 never ran backward
    mixed = _net()
    mixed[0] = HDPiSSALinear.from_linear(mixed[0], 2, 4.0, world_size=2, rank_index=0)
    mixed[3] = HDPiSSALinear.from_linear(mixed[3], 2, 4.0, world_size=3, rank_index=0)
    with pytest.raises(ValueError, match="converted with different world sizes"):
        HDPiSSAOptimizer(mixed, lr=1e-2)
    with pytest.raises(ValueError, match=r"rank 0 of 2, but this process is rank 0 of 1"):
        HDPiSSAOptimizer(model, lr=1e-2)  # no process group, not virtual
    with pytest.raises(ValueError, match="no HDPiSSALinear layer"):
        HDPiSSAOptimizer(_net(), lr=1e-2)
    with pytest.raises(ValueError, match="the model was cast after adapterops.hdpissa.convert"):
        HDPiSSAOptimizer(convert(_net(), 2, 4.0, world_size=2, rank_index=0).bfloat16(), lr=1e-2,
                         virtual_ranks=True)
    for bad in (dict(lr=float("inf")), dict(betas=(0.9,)), dict(eps=0.0), dict(betas=(0.9, 1.0))):
        with pytest.raises(ValueError, match="invalid Adam settings"):
            HDPiSSAOptimizer(model, **{"lr": 1e-2, **bad}, virtual_ranks=True)
    other = HDPiSSAOptimizer(convert(_net(), 2, 4.0, world_size=3, rank_index=0), lr=1e-2,
                             virtual_ranks=True)
    with pytest.raises(ValueError, match="the state was saved for"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_cast_after_the_optimizer_is_built_raises_at_step(backend):
    model = convert(nn.Sequential(nn.Linear(16, 16)), rank=2, alpha=4, world_size=1,
                    rank_index=0, backend=backend)
    opt = HDPiSSAOptimizer(model, lr=1e-2)
    model.half()
    with pytest.raises(RuntimeError, match=r"step\(\): layer 0 has a torch.float16 weight.*cast "
                                           r"after adapterops.hdpissa.convert"):
        opt.step()
    assert model[0].weight.dtype == torch.float16  # nothing was updated


# 6. Real ranks: gloo processes.

def _gloo_worker(rank, world, init_file, steps, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        xs, targets = _shards(world)
        model = convert(_net(), 2, 4.0)  # world size and rank from the process group
        opt = HDPiSSAOptimizer(model, lr=1e-2, bucket_mb=1e-4)  # tiny buckets: several collectives
        handed = []  # (dtype, bytes) of every all-gather's input in the last step
        # torch 2.13 names the single-tensor all-gather all_gather_single; 2.11-2.12
        # all_gather_into_tensor.
        name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        gather = getattr(dist, name)

        def counting(output, input, *args, **kwargs):
            handed.append((input.dtype, input.numel() * input.element_size()))
            return gather(output, input, *args, **kwargs)

        setattr(dist, name, counting)
        try:
            for _ in range(steps):
                F.mse_loss(model(xs[rank]), targets[rank]).backward()
                handed.clear()
                opt.step()
                opt.zero_grad()
        finally:
            setattr(dist, name, gather)
        from adapterops.distributed import check_consistency
        check_consistency(model)
        results[rank] = {"weights": [m.weight.detach().clone() for m in model.modules()
                                     if isinstance(m, HDPiSSALinear)], "handed": list(handed)}
    finally:
        dist.destroy_process_group()


def _gloo_fault_worker(rank, world, init_file, results):
    """Faults found on ONE rank: every rank must raise the same clear error, none may hang."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    try:
        errors = []
        xs, targets = _shards(world)
        model = convert(_net(), 2, 4.0)
        opt = HDPiSSAOptimizer(model, lr=1e-2)
        if rank != 1:  # rank 1 forgets its backward
            F.mse_loss(model(xs[rank]), targets[rank]).backward()
        try:
            opt.step()
        except RuntimeError as exc:
            errors.append(str(exc))
        wrong = convert(_net(), 2, 4.0, world_size=world, rank_index=0 if rank == 1 else rank)
        try:
            HDPiSSAOptimizer(wrong, lr=1e-2)  # rank 1 built its layers for rank 0
        except ValueError as exc:
            errors.append(str(exc))
        results[rank] = errors
    finally:
        dist.destroy_process_group()


def _gloo_resume_worker(rank, world, init_file, checkpoint_dir, results):
    """4 uninterrupted steps vs 2 steps, a checkpoint as data-parallel trainers write it (the
    model's state from rank 0 only, the optimizer's from every rank), 2 more steps."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        xs, targets = _shards(world)

        def train(model, opt, steps):
            for _ in range(steps):
                F.mse_loss(model(xs[rank]), targets[rank]).backward()
                opt.step()
                opt.zero_grad()

        full = convert(_net(), 2, 4.0)
        train(full, HDPiSSAOptimizer(full, lr=1e-2), 4)
        first = convert(_net(), 2, 4.0)
        opt = HDPiSSAOptimizer(first, lr=1e-2)
        train(first, opt, 2)
        if rank == 0:
            torch.save(first.state_dict(), f"{checkpoint_dir}/model.pt")
        torch.save(opt.state_dict(), f"{checkpoint_dir}/opt{rank}.pt")
        dist.barrier()
        resumed = convert(_net(), 2, 4.0)
        resumed.load_state_dict(torch.load(f"{checkpoint_dir}/model.pt"))
        opt = HDPiSSAOptimizer(resumed, lr=1e-2)
        opt.load_state_dict(torch.load(f"{checkpoint_dir}/opt{rank}.pt"))
        train(resumed, opt, 2)
        results[rank] = [name for (name, a), (_, b) in zip(full.state_dict().items(),
                                                           resumed.state_dict().items())
                         if not torch.equal(a, b)]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns processes: not in `make quick`
def test_gloo_resume_reproduces_an_uninterrupted_run(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_gloo_resume_worker, args=(2, str(tmp_path / "init"), str(tmp_path), results),
             nprocs=2, join=True)
    for rank in range(2):
        assert results[rank] == [], f"rank {rank}: {results[rank]} differ after resuming"


@pytest.mark.slow  # spawns processes: not in `make quick`
def test_gloo_a_fault_on_one_rank_raises_on_every_rank(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_gloo_fault_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in range(2):
        step_error, setup_error = results[rank]
        assert "rank 1: HDPiSSAOptimizer.step(): no gradient for 0.lora_A" in step_error, step_error
        assert ("rank 1: HDPiSSAOptimizer: layer 0 was built for rank 0 of 2, but this process is rank 1"
                in setup_error), setup_error


@pytest.mark.slow  # spawns processes: not in `make quick`
@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks_hold_identical_weights_equal_to_virtual_ranks(world, tmp_path):
    steps = 3
    results = mp.Manager().dict()
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "init"), steps, results), nprocs=world, join=True)
    weights = [results[k]["weights"] for k in range(world)]
    for k in range(1, world):
        for i, (a, b) in enumerate(zip(weights[0], weights[k])):
            assert torch.equal(a, b), f"rank {k} layer {i} differs from rank 0"
    virtual = convert(_net(), 2, 4.0, world_size=world, rank_index=0)
    _train_virtual(virtual, *_shards(world), 1e-2, steps)
    for i, (a, b) in enumerate(zip(weights[0], (m.weight for m in virtual.modules() if isinstance(m, HDPiSSALinear)))):
        assert torch.equal(a, b.detach()), f"layer {i}: real ranks and virtual ranks differ"
    # Only the steps travel: r (in + out) fp32 numbers per layer per rank, in one all-gather
    # per bucket (tiny buckets here: one per layer); besides them, one int64 layout check.
    layers = [(12, 10), (10, 9), (9, 8)]
    for k in range(world):
        handed = results[k]["handed"]
        steps_bytes = [b for dtype, b in handed if dtype == torch.float32]
        assert steps_bytes == [4 * 2 * (i + o) for i, o in layers], handed
        assert [dtype for dtype, _ in handed].count(torch.int64) == 1, handed
