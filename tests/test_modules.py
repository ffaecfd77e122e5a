"""FusedLoRALinear, FusedLaMDALinear and FusedHydraLoRALinear: inits, merge, dropout, training,
compile, copies, meta tensors, bad input.

The modules run the default dispatch (Triton under the interpreter on CPU, compiled Triton on
a GPU); op-level numerics are tested in test_lowrank.py.
"""
import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterops
from adapterops import FusedLaMDALinear, FusedLoRALinear
from adapterops.backends.reference import dropout as host_dropout

ALL_INITS = [(FusedLoRALinear, "lora"), (FusedLoRALinear, "pissa"), (FusedLoRALinear, "pissa_niter_4"),
             (FusedLaMDALinear, "lora"), (FusedLaMDALinear, "svd")]


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("cls,init", ALL_INITS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_output_unchanged_at_init(cls, init, dtype, device):
    linear = nn.Linear(40, 24, device=device, dtype=dtype)
    original = linear.weight.detach().clone()
    layer = cls.from_linear(linear, rank=6, alpha=12.0, init=init)
    x = torch.randn(2, 5, 40, device=device, dtype=dtype)
    # Only rounding separates W_res + s B S A from W: a few ulps of the dtype.
    bound = 64 * torch.finfo(dtype).eps
    err = _rel_err(layer(x), linear(x))
    assert err <= bound, f"{cls.__name__} init={init} {dtype}: relative error {err:.2e} > {bound:.2e}"
    assert torch.equal(linear.weight, original), "from_linear must not modify the source layer"
    if init in ("lora",):
        assert torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("cls", [FusedLoRALinear, FusedLaMDALinear])
def test_parameters_and_trainability(cls, device):
    layer = cls(30, 20, rank=4, alpha=8, device=device)
    assert layer.scaling == 2.0
    assert layer.weight.shape == (20, 30) and layer.bias.shape == (20,)
    assert layer.lora_A.shape == (4, 30) and layer.lora_B.shape == (20, 4)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    if cls is FusedLaMDALinear:
        assert layer.lora_S.shape == (4, 4)
        assert trainable == {"lora_S", "lora_B"}
    else:
        assert layer.lora_S is None
        assert trainable == {"lora_A", "lora_B"}
    text = repr(layer)
    for piece in ("rank=4", "alpha=8", "init='lora'", "backend=auto"):
        assert piece in text, (piece, text)


def test_pissa_factors_are_the_principal_directions():
    w = torch.randn(24, 40, dtype=torch.float64)
    linear = nn.Linear(40, 24, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = FusedLoRALinear.from_linear(linear, 5, 10.0, init="pissa")
    U, sigma, Vh = torch.linalg.svd(w, full_matrices=False)
    top = (U[:, :5] * sigma[:5]) @ Vh[:5]
    torch.testing.assert_close(layer.scaling * layer.lora_B @ layer.lora_A, top, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight + top, w, rtol=0, atol=1e-12)


def test_lamda_svd_init_structure():
    linear = nn.Linear(32, 20, dtype=torch.float64)
    layer = FusedLaMDALinear.from_linear(linear, 6, 3.0, init="svd")
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.t(), torch.eye(6, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.t() @ layer.lora_B, torch.eye(6, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    sigma = torch.linalg.svdvals(linear.weight.detach())[:6]
    torch.testing.assert_close(torch.diagonal(layer.lora_S) * layer.scaling, sigma, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls,init", ALL_INITS)
def test_merge_matches_after_training_step(cls, init, device):
    layer = cls.from_linear(nn.Linear(36, 28, device=device), 4, 8.0, init=init)
    with torch.no_grad():
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))  # a trained, non-zero adapter
    x = torch.randn(7, 36, device=device)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    err, bound = _rel_err(merged(x), layer(x)), 64 * torch.finfo(torch.float32).eps
    assert err <= bound, f"{cls.__name__} init={init}: merged vs layer relative error {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("cls", [FusedLoRALinear, FusedLaMDALinear])
def test_dropout_path(cls, device):
    layer = cls(24, 16, rank=3, alpha=6.0, dropout=0.5, device=device)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24, device=device)
    torch.manual_seed(1)
    y = layer(x)
    # The fused op's seed, drawn from torch's generator, and its mask (the host replica).
    torch.manual_seed(1)
    seed = torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64, device=device)
    dropped = host_dropout.dropped(x, seed, 0.5)
    h = dropped @ layer.lora_A.t()
    if layer.lora_S is not None:
        h = h @ layer.lora_S.t()
    expected = x @ layer.weight.t() + layer.bias + layer.scaling * h @ layer.lora_B.t()
    torch.testing.assert_close(y, expected)
    layer.eval()  # no dropout in eval: the fused path
    expected_eval = x @ layer.weight.t() + layer.bias + layer.scaling * (
        (x @ layer.lora_A.t()) @ (layer.lora_S.t() if layer.lora_S is not None else torch.eye(3, device=device))
    ) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected_eval, rtol=1e-5, atol=1e-5)


def _train(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int, lr: float) -> list:
    """Adam on the layer's trainable parameters against an MSE loss; the loss per step."""
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls,init", [(FusedLoRALinear, "lora"), (FusedLaMDALinear, "svd")])
def test_training_reduces_loss(cls, init, device):
    """A frozen random base plus a low-rank target shift: the adapter must learn the shift.

    The shift reads x through W's top-8 right singular vectors, the subspace LaMDA's frozen A
    spans under the "svd" init (a frozen A can only adapt within its row space)."""
    base = nn.Linear(32, 24, device=device)
    top_inputs = torch.linalg.svd(base.weight.detach(), full_matrices=False)[2][:8]
    shift = torch.randn(24, 8, device=device) @ top_inputs / math.sqrt(8)
    layer = cls.from_linear(base, 8, 16.0, init=init)
    x = torch.randn(64, 32, device=device)
    target = base(x).detach() + x @ shift.t()
    losses = _train(layer, x, target, steps=40, lr=1e-2)
    assert losses[-1] < 0.3 * losses[0], losses


def test_torch_compile_fullgraph_matches_eager(device):
    model = nn.Sequential(FusedLaMDALinear(24, 32, 4, 8.0, device=device), nn.GELU(),
                          FusedLoRALinear(32, 16, 4, 8.0, device=device))
    with torch.no_grad():
        for m in model:
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()
    x = torch.randn(2, 3, 24, device=device, requires_grad=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    eager_y = model(x)
    eager_grads = torch.autograd.grad(eager_y.square().sum(), [x] + trained)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), [x] + trained)
    # Inductor fuses the GELU and square around our ops and rounds them in another order than
    # eager: allow a few fp32 ulps at each tensor's own scale, no more.
    pairs = [("y", y, eager_y)] + [(f"grad {i}", g, e) for i, (g, e) in enumerate(zip(grads, eager_grads))]
    for name, got, want in pairs:
        ulps = 16 * torch.finfo(torch.float32).eps * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=ulps, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rank=0), ValueError, "rank must be a positive int"),
    (dict(alpha=0), ValueError, "alpha must be a finite non-zero"),
    (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
    (dict(init="kaiming"), ValueError, "init must be one of"),
    (dict(init="pissa", rank=25), ValueError, "rank must be <= 20"),
    (dict(backend="cutlass"), ValueError, "known backends"),
    (dict(in_features=0), ValueError, "in_features must be a positive int"),
    (dict(alpha=-4.0, init="pissa"), ValueError, "scaling = alpha / rank must be > 0"),
])
def test_constructor_bad_input(kwargs, error, match):
    args = dict(in_features=30, out_features=20, rank=4, alpha=8.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        FusedLoRALinear(**args)


def test_from_linear_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedLaMDALinear.from_linear(nn.Conv1d(3, 3, 1), 2, 4.0)
    with pytest.raises(ValueError, match="init must be one of"):
        FusedLaMDALinear.from_linear(nn.Linear(8, 8), 2, 4.0, init="pissa")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_bad_input_named(dropout):
    """The op checks the layer's input before computing, with dropout or without."""
    layer = FusedLaMDALinear(30, 20, rank=4, alpha=8.0, dropout=dropout)
    with pytest.raises(ValueError, match=r"x has shape \(3, 31\).*30"):
        layer(torch.randn(3, 31))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(3, 30, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has torch.float16"):
        layer(torch.randn(3, 30, dtype=torch.float16))


def test_autocast_runs_in_the_autocast_dtype(device):
    """Under torch.autocast an fp32 layer computes in the autocast dtype, like nn.Linear, and
    its fp32 parameters get fp32 gradients."""
    layer = FusedLoRALinear(16, 12, rank=4, alpha=8.0, device=device)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16, device=device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
        expected = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == expected.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32


def test_wrong_input_features_named():
    layer = FusedLaMDALinear(30, 20, rank=4, alpha=8.0)
    with pytest.raises(ValueError, match=r"x has shape \(3, 31\).*30"):
        layer(torch.randn(3, 31))
    assert adapterops.FusedLaMDALinear is FusedLaMDALinear


# FusedHydraLoRALinear (HydraLoRA).

def test_hydra_init_and_parameters(device):
    linear = nn.Linear(40, 24, device=device)
    original = linear.weight.detach().clone()
    layer = adapterops.FusedHydraLoRALinear.from_linear(linear, rank=6, num_heads=3, alpha=12.0,
                                                        top_k=2)
    assert layer.scaling == 2.0 and layer.top_k == 2 and layer.num_heads == 3
    assert layer.lora_A.shape == (6, 40) and layer.lora_B.shape == (3, 24, 6)
    assert layer.lora_router.shape == (3, 40)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_router"}, trainable
    assert torch.count_nonzero(layer.lora_B) == 0, "every head B_e starts at zero"
    # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(in_features).
    bound = 1 / math.sqrt(40)
    for name in ("lora_A", "lora_router"):
        t = getattr(layer, name)
        assert t.abs().max() <= bound and t.abs().max() > 0.5 * bound, name
    x = torch.randn(2, 5, 40, device=device)
    # B = 0: the base layer's output, up to the GEMM's summation order (a few fp32 ulps).
    err, bound = _rel_err(layer(x), linear(x)), 64 * torch.finfo(torch.float32).eps
    assert err <= bound, f"output at init: relative error {err:.2e} > {bound:.2e}"
    assert torch.equal(linear.weight, original), "from_linear must not modify the source layer"
    for piece in ("rank=6", "num_heads=3", "top_k=2", "alpha=12.0", "backend=auto"):
        assert piece in repr(layer), (piece, repr(layer))


def _two_regime_task(device, n=256, in_f=16, out_f=12, r=4):
    """Tokens of two regimes (feature 0 is +2 or -2): the target adds U_1 V^T x in regime 1 and
    U_2 V^T x in regime 2, one input subspace V, two output maps. One shared A can span V; only
    a routed pair of heads represents both maps (a single linear adapter cannot switch its
    output map on the regime)."""
    g = torch.Generator().manual_seed(71)
    regime = torch.arange(n) % 2
    x = torch.randn(n, in_f, generator=g)
    x[:, 0] = torch.where(regime == 0, 2.0, -2.0)
    V = torch.linalg.qr(torch.randn(in_f, r, generator=g))[0]
    U = torch.randn(2, out_f, r, generator=g)
    shift = torch.einsum("nor,ir,ni->no", U[regime], V, x)
    return x.to(device), shift.to(device), regime.to(device)


def test_hydra_heads_specialise_and_loss_falls(device):
    x, shift, regime = _two_regime_task(device)
    base = nn.Linear(16, 12, device=device)
    target = (base(x) + shift).detach()
    # The torch backend: 150 steps through the Triton interpreter take about 50 s, and the
    # kernels' gradients are checked against float64 in test_routed.py.
    layer = adapterops.FusedHydraLoRALinear.from_linear(base, rank=4, num_heads=2, alpha=4.0,
                                                        backend="torch")
    losses = _train(layer, x, target, steps=150, lr=2e-2)
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    _, probs = adapterops.routed_lowrank_linear(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_router, layer.scaling,
        return_router_probs=True, backend="torch")
    head0 = [probs[regime == k, 0].mean().item() for k in (0, 1)]
    assert abs(head0[0] - head0[1]) > 0.8, f"head 0's mean gate per regime {head0}: no specialisation"


def test_hydra_balance_loss_is_kept_for_the_trainer(device):
    layer = adapterops.FusedHydraLoRALinear(20, 12, rank=4, num_heads=4, alpha=8.0, top_k=2,
                                            balance_loss_weight=0.01, device=device)
    model = nn.Sequential(layer, nn.GELU())
    x = torch.randn(3, 7, 20, device=device)
    model(x)
    _, probs = adapterops.routed_lowrank_linear(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_router,
        layer.scaling, top_k=2, return_router_probs=True)
    expected = 0.01 * adapterops.hydra.balance_loss(probs, 2)
    torch.testing.assert_close(layer.last_balance_loss, expected)
    collected = adapterops.hydra.collect_balance_loss(model)
    torch.testing.assert_close(collected, expected)
    collected.backward()
    assert layer.lora_router.grad is not None and layer.lora_router.grad.abs().sum() > 0
    assert layer.last_balance_loss is None, "collecting resets the kept loss"
    model(x)  # kept again, then not collected before eval()
    layer.eval()
    model(x)
    assert layer.last_balance_loss is None, "no balance loss outside training, none left over"
    layer.train()
    y = model(x[:0])  # an empty batch: nothing to balance, and no error
    assert y.shape == (0, 7, 12) and layer.last_balance_loss is None


def test_hydra_copy_and_pickle_after_a_training_forward_leave_the_balance_loss_behind():
    """A deep copy after a training forward (an EMA, "keep the best model") or a pickle works:
    the kept loss belongs to the batch's graph, not to the layer."""
    layer = adapterops.FusedHydraLoRALinear(16, 16, rank=4, num_heads=3, alpha=8,
                                            balance_loss_weight=0.01, backend="torch")
    layer(torch.randn(7, 16)).sum().backward()
    assert layer.last_balance_loss is not None and layer.last_balance_loss.grad_fn is not None
    twin = copy.deepcopy(layer)
    # The copy has none, the original keeps its own for the trainer.
    assert twin.last_balance_loss is None and layer.last_balance_loss is not None
    x = torch.randn(3, 16)
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
    restored = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)


def test_hydra_dropout_path_shares_one_mask(device):
    layer = adapterops.FusedHydraLoRALinear(24, 16, rank=3, num_heads=3, alpha=6.0, top_k=2,
                                            dropout=0.5, device=device)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24, device=device)
    torch.manual_seed(1)
    y = layer(x)
    # The fused op's seed, drawn from torch's generator, and its mask (the host replica).
    torch.manual_seed(1)
    seed = torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64, device=device)
    h = host_dropout.dropped(x, seed, 0.5) @ layer.lora_A.t()
    probs = torch.softmax(x @ layer.lora_router.t(), dim=-1)  # the router sees x undropped
    keep = torch.zeros_like(probs).scatter_(-1, probs.topk(2, -1).indices, 1.0)
    gates = probs * keep
    expected = x @ layer.weight.t() + layer.bias + layer.scaling * sum(
        gates[:, e:e + 1] * (h @ layer.lora_B[e].t()) for e in range(3))
    torch.testing.assert_close(y, expected)
    layer.eval()  # no dropout in eval: the fused path
    h = x @ layer.lora_A.t()
    expected_eval = x @ layer.weight.t() + layer.bias + layer.scaling * sum(
        gates[:, e:e + 1] * (h @ layer.lora_B[e].t()) for e in range(3))
    torch.testing.assert_close(layer(x), expected_eval, rtol=1e-5, atol=1e-5)


def test_hydra_fp32_adapters_on_a_bf16_base_train_fused(monkeypatch, device):
    """adapter_dtype=None: from_linear on a bf16 nn.Linear keeps A, the heads and the router in
    fp32 (PEFT's default); training (with dropout) runs the fused op on the mixed dtypes at
    every call, the gradients are fp32 and the loss falls. layer_options records the dtype
    (from_linear with it rebuilds the same layer, as load_adapters does); adapter_dtype
    "bfloat16" forces bf16, and a pairing the op does not take is refused by name."""
    from adapterops.backends import BACKENDS

    x, shift, _ = _two_regime_task(device, n=64)
    linear = nn.Linear(16, 12, device=device, dtype=torch.bfloat16)
    layer = adapterops.FusedHydraLoRALinear.from_linear(linear, rank=4, num_heads=2, alpha=4.0,
                                                        top_k=1, dropout=0.1)
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    adapter = {n: getattr(layer, n) for n in ("lora_A", "lora_B", "lora_router")}
    assert all(t.dtype == torch.float32 for t in adapter.values()), {n: t.dtype for n, t in adapter.items()}
    assert layer.layer_options()["adapter_dtype"] == "float32"
    served = []
    for backend in BACKENDS.values():
        def spy(*args, _forward=backend.routed_forward, _name=backend.name):
            served.append((_name, args[0].dtype, args[3].dtype, args[8]))  # x, lora_A, dropout
            return _forward(*args)
        monkeypatch.setattr(backend, "routed_forward", spy)
    x = x.to(torch.bfloat16)
    target = (linear(x).float() + shift).detach()
    opt = torch.optim.Adam(adapter.values(), lr=5e-2)
    losses = []
    for _ in range(10):
        loss = F.mse_loss(layer(x).float(), target)
        opt.zero_grad()
        loss.backward()
        for name, t in adapter.items():
            # Every head starts at 0: at the first step only the heads' gradient is non-zero.
            assert t.grad.dtype == torch.float32, name
            assert t.grad.abs().max() > 0 or (name != "lora_B" and not losses), name
        opt.step()
        losses.append(loss.item())
    assert len(served) == 10 and served[0][0] != "torch", served
    assert set(served) == {(served[0][0], torch.bfloat16, torch.float32, 0.1)}, served
    assert losses[-1] < 0.8 * losses[0], losses
    rebuilt = adapterops.FusedHydraLoRALinear.from_linear(linear, **layer.layer_options(),
                                                          initialise=False)
    rebuilt.load_adapter_state(layer.adapter_state())
    layer.eval(), rebuilt.eval()
    assert rebuilt.lora_B.dtype == torch.float32 and torch.equal(rebuilt(x), layer(x))
    forced = adapterops.FusedHydraLoRALinear.from_linear(linear, rank=4, num_heads=2, alpha=4.0,
                                                         adapter_dtype="bfloat16")
    assert all(getattr(forced, n).dtype == torch.bfloat16 for n in adapter)
    assert forced.layer_options()["adapter_dtype"] == "bfloat16"
    config = adapterops.AdapterConfig(method="hydra", rank=4, alpha=4.0, num_heads=2,
                                      adapter_dtype=torch.bfloat16)
    assert config.options_for(adapterops.FusedHydraLoRALinear)["adapter_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="adapter_dtype torch.float16 on a torch.bfloat16 base"):
        adapterops.FusedHydraLoRALinear.from_linear(linear, rank=4, num_heads=2, alpha=4.0,
                                                    adapter_dtype=torch.float16)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_heads=0), ValueError, "num_heads must be a positive int"),
    (dict(rank=0), ValueError, "rank must be a positive int"),
    (dict(top_k=0), ValueError, r"top_k must be in \[1, E\] = \[1, 4\] \(E = num_heads\), got 0"),
    (dict(top_k=5), ValueError, r"top_k must be in \[1, E\] = \[1, 4\] \(E = num_heads\), got 5"),
    (dict(top_k=True), TypeError, "top_k must be an int or None, got bool"),
    (dict(alpha=float("nan")), ValueError, "alpha must be a finite non-zero"),
    (dict(dropout=-0.1), ValueError, r"dropout must be a number in \[0, 1\)"),
    (dict(balance_loss_weight=-1.0), ValueError, "balance_loss_weight must be a finite number >= 0"),
    (dict(backend="cutlass"), ValueError, "known backends"),
])
def test_hydra_constructor_bad_input(kwargs, error, match):
    args = dict(in_features=30, out_features=20, rank=4, num_heads=4, alpha=8.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        adapterops.FusedHydraLoRALinear(**args)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_hydra_forward_bad_input_named(dropout):
    layer = adapterops.FusedHydraLoRALinear(30, 20, rank=4, num_heads=2, alpha=8.0, dropout=dropout)
    with pytest.raises(ValueError, match=r"x has shape \(3, 31\).*30"):
        layer(torch.randn(3, 31))
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has torch.float16"):
        layer(torch.randn(3, 30, dtype=torch.float16))
    with pytest.raises(TypeError, match="nn.Linear"):
        adapterops.FusedHydraLoRALinear.from_linear(nn.Conv1d(3, 3, 1), 2, 2, 4.0)


# Meta tensors: how large models are built before loading.

def test_ops_and_layers_on_meta_inputs_give_meta_results():
    x, weight, lora_A, lora_B = (torch.empty(*shape, device="meta")
                                 for shape in ((5, 8), (6, 8), (2, 8), (6, 2)))
    lora_S = torch.empty(2, 2, device="meta")
    expected = F.linear(x, weight)
    for y in (adapterops.lowrank_linear(x, weight, None, lora_A, lora_B, 0.5),
              adapterops.lowrank_linear(x, weight, None, lora_A, lora_B, 0.5, lora_S),
              adapterops.hdpissa_linear(x, weight, None, lora_A, lora_B, 0.5),
              adapterops.routed_lowrank_linear(x, weight, None, lora_A,
                                               torch.empty(3, 6, 2, device="meta"),
                                               torch.empty(3, 8, device="meta"), 0.5, top_k=2)):
        assert y.device.type == "meta" and y.shape == expected.shape and y.dtype == expected.dtype
    with torch.device("meta"):
        layers = [FusedLoRALinear(8, 6, rank=2, alpha=4), FusedLaMDALinear(8, 6, rank=2, alpha=4),
                  adapterops.FusedHydraLoRALinear(8, 6, rank=2, num_heads=3, alpha=4),
                  adapterops.HDPiSSALinear(8, 6, 2, 4, world_size=1, rank_index=0, initialise=False)]
    for layer in layers:
        y = layer(torch.empty(4, 3, 8, device="meta"))
        assert y.device.type == "meta" and y.shape == (4, 3, 6)
