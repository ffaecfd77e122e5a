"""LaMDA utilities (B-freeze schedule, LaMDA++ rank allocation) and PiSSA's conversion to LoRA."""
import math

import pytest
import torch
from torch import nn

from adapterops import FusedLaMDALinear, FusedLoRALinear
from adapterops.lamda import BFreezeSchedule, allocate_ranks, effective_rank
from adapterops.pissa import to_lora


def _model():
    torch.manual_seed(0)
    return nn.Sequential(FusedLaMDALinear(16, 12, 8, 16.0, init="svd"), nn.ReLU(),
                         FusedLaMDALinear(12, 10, 4, 8.0, init="svd"), FusedLoRALinear(10, 6, 2, 4.0))


def _backward(model):
    model(torch.randn(5, 16)).square().sum().backward()


def test_schedule_freezes_leading_columns_then_all():
    model = _model()
    lamda1, lamda2 = model[0], model[2]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    schedule = BFreezeSchedule(model, total_steps=10, eta=0.3, optimizer=opt)
    assert schedule.layers == [lamda1, lamda2]
    # eta * T = 3: after step t, rank 8 has floor(8 t / 3) = 0, 2, 5, 8 columns frozen (t = 0..3),
    # rank 4 has 0, 1, 2, 4. Optimizer step t applies a gradient with the columns frozen after
    # step t - 1 zeroed, and step 3 is B's last update.
    frozen_before = {1: (0, 0), 2: (2, 1), 3: (5, 2)}
    for t in (1, 2, 3):
        before = [lamda1.lora_B.detach().clone(), lamda2.lora_B.detach().clone()]
        opt.zero_grad()
        _backward(model)
        schedule.step()
        assert schedule.step_count == t
        for layer, frozen in zip((lamda1, lamda2), frozen_before[t]):
            assert torch.count_nonzero(layer.lora_B.grad[:, :frozen]) == 0, (t, frozen)
            assert torch.count_nonzero(layer.lora_B.grad[:, frozen:]) > 0, (t, frozen)
            # B is marked frozen by the call for its last update; it keeps requires_grad, which
            # DDP and FSDP need.
            assert layer.lora_B_frozen == (t == 3), t
            assert layer.lora_B.requires_grad, t
        opt.step()
        for layer, frozen, old in zip((lamda1, lamda2), frozen_before[t], before):
            # With the optimizer's first moments zeroed too, Adam leaves frozen columns exactly alone.
            assert torch.equal(layer.lora_B[:, :frozen], old[:, :frozen]), t
            assert not torch.equal(layer.lora_B[:, frozen:], old[:, frozen:]), t
    frozen_B = [lamda1.lora_B.detach().clone(), lamda2.lora_B.detach().clone()]
    S_before = lamda1.lora_S.detach().clone()
    for _ in range(2):
        opt.zero_grad(set_to_none=False)  # a left-over gradient must not keep Adam moving B
        _backward(model)  # backward with B frozen: B's gradient is zero (no dB computed)
        for layer in (lamda1, lamda2):
            assert layer.lora_B.grad is not None and torch.count_nonzero(layer.lora_B.grad) == 0
        schedule.step()
        assert lamda1.lora_B.grad is None and lamda2.lora_B.grad is None
        assert lamda1.lora_S.grad is not None and torch.count_nonzero(lamda1.lora_S.grad) > 0
        opt.step()
        assert torch.equal(lamda1.lora_B, frozen_B[0]) and torch.equal(lamda2.lora_B, frozen_B[1])
    assert not torch.equal(lamda1.lora_S, S_before), "S stopped training with B"
    state = schedule.state_dict()
    resumed = BFreezeSchedule(_model(), total_steps=10, eta=0.3)
    assert not any(layer.lora_B_frozen for layer in resumed.layers)
    resumed.load_state_dict(state)
    assert resumed.step_count == 5 and all(layer.lora_B_frozen for layer in resumed.layers)
    assert all(layer.lora_B.requires_grad for layer in resumed.layers)
    resumed.load_state_dict({**state, "step_count": 2})  # back before the full freeze
    assert not any(layer.lora_B_frozen for layer in resumed.layers)


def test_frozen_B_gets_no_dB_from_the_fused_backward(monkeypatch):
    """Once B is frozen, the fused op is handed a detached B, so its backward is not asked for
    dB; B's (zero) gradient comes from `zero_gradient_for`, and dx, dS are unchanged."""
    import adapterops.modules.lowrank as lowrank_module
    layer = FusedLaMDALinear(16, 12, 8, 16.0, init="svd")
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).square().sum().backward()
    dx, dS = x.grad.clone(), layer.lora_S.grad.clone()
    opt = torch.optim.SGD([layer.lora_S, layer.lora_B], lr=0.1)
    schedule = BFreezeSchedule(layer, total_steps=1, eta=0.5, optimizer=opt)
    assert schedule.layers == [layer]
    schedule.step()  # total_steps=1: the first step is B's last update
    assert layer.lora_B_frozen
    x.grad = layer.lora_S.grad = layer.lora_B.grad = None
    seen = []
    real = lowrank_module.lowrank_linear

    def spy(x, weight, bias, lora_A, lora_B, *args, **kwargs):
        seen.append(lora_B.requires_grad)
        return real(x, weight, bias, lora_A, lora_B, *args, **kwargs)

    monkeypatch.setattr(lowrank_module, "lowrank_linear", spy)
    layer(x).square().sum().backward()
    assert seen == [False], "the fused op was handed a B that requires grad: it computes dB"
    assert torch.equal(layer.lora_B.grad, torch.zeros_like(layer.lora_B))
    torch.testing.assert_close(x.grad, dx, rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_S.grad, dS, rtol=0, atol=0)


def test_frozen_columns_exact_arithmetic():
    """0.1 * 48 is 4.800000000000001 in floats: floor(8 * 3 / 4.8) must still be 5."""
    schedule = BFreezeSchedule(_model(), total_steps=48, eta=0.1)
    assert [schedule.frozen_columns(8, t) for t in range(6)] == [0, 1, 3, 5, 6, 8]


@pytest.mark.parametrize("kwargs,match", [
    (dict(total_steps=0), "total_steps must be a positive int"),
    (dict(total_steps=10, eta=0.0), "eta must be in"),
    (dict(total_steps=10, eta=1.5), "eta must be in"),
])
def test_schedule_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BFreezeSchedule(_model(), **kwargs)
    with pytest.raises(ValueError, match="no LaMDA layers"):
        BFreezeSchedule(nn.Sequential(FusedLoRALinear(4, 4, 2, 2.0)), total_steps=5)


def test_effective_rank_extremes():
    assert effective_rank(torch.outer(torch.randn(20), torch.randn(30))) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.eye(12)) == pytest.approx(12.0, rel=1e-6)


def test_allocate_ranks_follows_effective_rank():
    torch.manual_seed(0)
    flat = torch.linalg.qr(torch.randn(64, 64))[0]               # effective rank 64
    steep = torch.randn(64, 2) @ torch.randn(2, 64)              # effective rank ~2
    mid = torch.linalg.qr(torch.randn(64, 64))[0] @ torch.diag(torch.logspace(0, -2, 64))
    ranks = allocate_ranks({"flat": flat, "steep": steep, "mid": mid}, mean_rank=16, min_rank=8, max_rank=40)
    assert ranks["flat"] > ranks["mid"] > ranks["steep"], ranks
    assert all(r % 8 == 0 and 8 <= r <= 40 for r in ranks.values()), ranks
    scores = {n: effective_rank(w) for n, w in (("flat", flat), ("steep", steep), ("mid", mid))}
    raw_flat = 16 * 3 * scores["flat"] / sum(scores.values())
    assert ranks["flat"] == min(40, round(raw_flat / 8) * 8)
    # a list of pairs works like a dict; min(shape) caps a small layer
    small = allocate_ranks([("a", torch.eye(6)), ("b", torch.eye(64))], mean_rank=16, min_rank=8, max_rank=64)
    assert small["a"] == 6


@pytest.mark.parametrize("kwargs,match", [
    (dict(mean_rank=4, min_rank=8, max_rank=16), "min_rank <= mean_rank <= max_rank"),
    (dict(mean_rank=10, min_rank=9, max_rank=15), "no multiple of 8"),
    (dict(mean_rank=0, min_rank=8, max_rank=16), "mean_rank must be a positive int"),
])
def test_allocate_ranks_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate_ranks({"w": torch.eye(16)}, **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        allocate_ranks({"w": torch.ones(3)}, mean_rank=8, min_rank=8, max_rank=8)


def test_pissa_to_lora_reproduces_trained_layer():
    linear = nn.Linear(20, 14, dtype=torch.float64)
    layer = FusedLoRALinear.from_linear(linear, 3, 6.0, init="pissa")
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    with torch.no_grad():
        layer.lora_A.add_(0.1 * torch.randn_like(A0))
        layer.lora_B.add_(0.1 * torch.randn_like(B0))
    A2, B2 = to_lora(layer.lora_A.detach(), layer.lora_B.detach(), A0, B0)
    assert A2.shape == (6, 20) and B2.shape == (14, 6)
    scaling = (2 * 6.0) / 6  # rank and alpha doubled: the same s
    x = torch.randn(4, 20, dtype=torch.float64)
    torch.testing.assert_close(linear(x) + scaling * x @ A2.t() @ B2.t(), layer(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="must match"):
        to_lora(A2, B2, A0, B0)
    assert math.isclose(layer.scaling, scaling)
