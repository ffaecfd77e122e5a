"""Issue 14's findings, one regression test each: copies, pickles, casts, checksums and edge
inputs that an adversarial run found mishandled."""
import copy
import io
import pickle
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterops import (FusedHydraLoRALinear, FusedLaMDALinear, FusedLoRALinear, HDPiSSALinear,
                        hdpissa_linear, lowrank_linear, lowrank_update_, routed_lowrank_linear)
from adapterops.hdpissa import HDPiSSAOptimizer, convert

BACKENDS = ("triton", "cuda", "torch")


def _lowrank_inputs(device, dtype=torch.float32, M=5, K=8, N=6, r=2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g, dtype=dtype).to(device)
    weight = (torch.randn(N, K, generator=g, dtype=dtype) / K ** 0.5).to(device)
    lora_A = (torch.randn(r, K, generator=g, dtype=dtype) / K ** 0.5).to(device)
    lora_B = torch.randn(N, r, generator=g, dtype=dtype).to(device)
    return x, weight, lora_A, lora_B


# 1. A deep copy after a training forward (EMA, "keep the best model").
def test_hydra_layer_deep_copies_and_pickles_after_a_training_forward():
    layer = FusedHydraLoRALinear(16, 16, rank=4, num_heads=3, alpha=8, balance_loss_weight=0.01,
                                 backend="torch")
    layer(torch.randn(7, 16)).sum().backward()
    assert layer.last_balance_loss is not None and layer.last_balance_loss.grad_fn is not None
    twin = copy.deepcopy(layer)
    # The loss belongs to the batch's graph, not to the layer: the copy has none, the
    # original keeps its own for the trainer.
    assert twin.last_balance_loss is None and layer.last_balance_loss is not None
    x = torch.randn(3, 16)
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
    restored = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)


# 2. pickle / torch.save of HD-PiSSA layers and converted models.
def test_hdpissa_layer_and_converted_model_pickle_and_keep_their_load_hook():
    layer = HDPiSSALinear(16, 16, 2, 4, world_size=2, rank_index=0)
    restored = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(restored.lora_A, layer.lora_A, rtol=0, atol=0)
    model = convert(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)), rank=2, alpha=4,
                    world_size=2, rank_index=1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # The restored layer still re-slices its rank's factors after a load (the hook survived):
    # rank 0's state loaded into rank 1's layer gives rank 1's slice.
    rank0 = convert(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)), rank=2,
                    alpha=4, world_size=2, rank_index=0)
    rank0.load_state_dict(model.state_dict())
    loaded[0].load_state_dict(rank0[0].state_dict())
    torch.testing.assert_close(loaded[0].lora_A, loaded[0].factor_A[2:4], rtol=0, atol=0)


# 3. A cast after the optimizer was built.
@pytest.mark.parametrize("backend", BACKENDS)
def test_cast_after_the_optimizer_is_built_raises_at_step(backend):
    model = convert(nn.Sequential(nn.Linear(16, 16)), rank=2, alpha=4, world_size=1,
                    rank_index=0, backend=backend)
    opt = HDPiSSAOptimizer(model, lr=1e-2)
    model.half()
    with pytest.raises(RuntimeError, match=r"step\(\): layer 0 has a torch.float16 weight.*cast "
                                           r"after adapterops.hdpissa.convert"):
        opt.step()
    assert model[0].weight.dtype == torch.float16  # nothing was updated


# 5. scaling outside fp32's range.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", [1e300, -1e39, 3.5e38])
def test_scaling_outside_float32_range_is_rejected_up_front(backend, scaling, device):
    x, weight, lora_A, lora_B = _lowrank_inputs(device)
    with pytest.raises(ValueError, match=r"scaling must be within float32's range"):
        lowrank_linear(x, weight, None, lora_A, lora_B, scaling, backend=backend)
    with pytest.raises(ValueError, match=r"scaling must be within float32's range"):
        hdpissa_linear(x, weight, None, lora_A, lora_B, scaling, backend=backend)
    with pytest.raises(ValueError, match=r"scale must be within float32's range"):
        lowrank_update_(weight.clone(), lora_B, lora_A, scaling, backend=backend)


# 7. lowrank_update_ into memory it must not write, or into a tensor autograd tracks.
@pytest.mark.parametrize("backend", BACKENDS)
def test_update_rejects_a_weight_that_repeats_elements(backend, device):
    _, _, lora_A, lora_B = _lowrank_inputs(device)
    weight = torch.zeros(1, lora_A.shape[1], device=device).expand(lora_B.shape[0], -1)
    with pytest.raises(ValueError, match=r"weight has strides \(0, 1\).*repeats elements"):
        lowrank_update_(weight, lora_B, lora_A, 0.5, backend=backend)
    assert weight.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_of_a_tensor_requiring_grad_raises_like_pytorch(backend, device):
    _, weight, lora_A, lora_B = _lowrank_inputs(device)
    leaf = weight.clone().requires_grad_()
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match=r"weight requires grad.*torch.no_grad"):
        lowrank_update_(leaf, lora_B, lora_A, 0.5, backend=backend)
    torch.testing.assert_close(leaf.detach(), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"leaf Variable that requires grad"):
        leaf.add_(1.0)  # what PyTorch itself says
    with torch.no_grad():  # where optimizers update weights: allowed, as for add_
        lowrank_update_(leaf, lora_B, lora_A, 0.5, backend=backend)
    torch.testing.assert_close(leaf.detach().double(),
                               before.double() + 0.5 * lora_B.double() @ lora_A.double())


# 8. Meta tensors: how large models are built before loading.
def test_all_meta_inputs_give_meta_results():
    x, weight, lora_A, lora_B = (t.to("meta") for t in _lowrank_inputs("cpu"))
    lora_S = torch.empty(2, 2, device="meta")
    expected = F.linear(x, weight)
    for y in (lowrank_linear(x, weight, None, lora_A, lora_B, 0.5),
              lowrank_linear(x, weight, None, lora_A, lora_B, 0.5, lora_S),
              hdpissa_linear(x, weight, None, lora_A, lora_B, 0.5),
              routed_lowrank_linear(x, weight, None, lora_A, torch.empty(3, 6, 2, device="meta"),
                                    torch.empty(3, 8, device="meta"), 0.5, top_k=2)):
        assert y.device.type == "meta" and y.shape == expected.shape and y.dtype == expected.dtype
    with torch.device("meta"):
        layers = [FusedLoRALinear(8, 6, rank=2, alpha=4), FusedLaMDALinear(8, 6, rank=2, alpha=4),
                  FusedHydraLoRALinear(8, 6, rank=2, num_heads=3, alpha=4),
                  HDPiSSALinear(8, 6, 2, 4, world_size=1, rank_index=0, initialise=False)]
    for layer in layers:
        y = layer(torch.empty(4, 3, 8, device="meta"))
        assert y.device.type == "meta" and y.shape == (4, 3, 6)


# 9. Every real scalar type that converts exactly.
@pytest.mark.parametrize("scaling", [np.float32(0.5), np.float64(0.5), np.int64(2), torch.tensor(0.5),
                                     torch.tensor(2, dtype=torch.int32), 0.5])
def test_scaling_accepts_every_exact_real_scalar(scaling):
    x, weight, lora_A, lora_B = _lowrank_inputs("cpu")
    expected = lowrank_linear(x, weight, None, lora_A, lora_B, float(scaling), backend="torch")
    torch.testing.assert_close(lowrank_linear(x, weight, None, lora_A, lora_B, scaling,
                                              backend="torch"), expected, rtol=0, atol=0)
    torch.testing.assert_close(hdpissa_linear(x, weight, None, lora_A, lora_B, scaling,
                                              backend="torch"), F.linear(x, weight), rtol=0, atol=0)


@pytest.mark.parametrize("scaling", [True, np.bool_(True), torch.tensor([0.5]), torch.tensor(1j),
                                     "0.5", 2 ** 60 + 1, torch.tensor(0.5, requires_grad=True)])
def test_scaling_rejects_what_is_not_an_exact_real_scalar(scaling):
    x, weight, lora_A, lora_B = _lowrank_inputs("cpu")
    with pytest.raises((TypeError, ValueError), match="scaling"):
        lowrank_linear(x, weight, None, lora_A, lora_B, scaling, backend="torch")


@pytest.mark.parametrize("top_k", [np.int64(2), np.int32(2), torch.tensor(2)])
def test_top_k_accepts_integer_scalars(top_k):
    x, weight, lora_A, _ = _lowrank_inputs("cpu")
    heads, router = torch.randn(3, 6, 2), torch.randn(3, 8)
    expected = routed_lowrank_linear(x, weight, None, lora_A, heads, router, 0.5, top_k=2,
                                     backend="torch")
    torch.testing.assert_close(routed_lowrank_linear(x, weight, None, lora_A, heads, router, 0.5,
                                                     top_k=top_k, backend="torch"),
                               expected, rtol=0, atol=0)
    layer = FusedHydraLoRALinear(8, 6, rank=2, num_heads=3, alpha=4, top_k=top_k)
    assert type(layer.top_k) is int and layer.top_k == 2
    with pytest.raises(TypeError, match="top_k"):
        routed_lowrank_linear(x, weight, None, lora_A, heads, router, 0.5, top_k=np.float64(2.0))


# 6. NaN in lora_B with scaling = 0: PyTorch's composition propagates it, so does every backend.
def _nan_masks(outputs):
    return [t.isnan() for t in outputs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["lora", "lamda", "routed"])
def test_nan_in_lora_B_propagates_at_scaling_zero(backend, op, device):
    x, weight, lora_A, lora_B = _lowrank_inputs(device)
    lora_S = torch.randn(2, 2, device=device) if op == "lamda" else None
    if op == "routed":
        lora_B = torch.stack([lora_B, -lora_B, 2 * lora_B])
        lora_B[1, 3, 0] = float("nan")
        router = torch.randn(3, x.shape[1], device=device)
    else:
        lora_B[3, 0] = float("nan")

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B)]
        S = lora_S.detach().clone().requires_grad_() if lora_S is not None else None
        y = fn(*leaves, S)
        y.sum().backward()
        return [y] + [t.grad for t in leaves] + ([S.grad] if S is not None else [])

    if op == "routed":
        def ours(x_, A, B, _):
            return routed_lowrank_linear(x_, weight, None, A, B, router, 0.0, backend=backend)

        def composition(x_, A, B, _):
            gates = torch.softmax(F.linear(x_, router), dim=-1)
            h = F.linear(x_, A)
            heads = sum(gates[:, e:e + 1] * F.linear(h, B[e]) for e in range(3))
            return F.linear(x_, weight) + 0.0 * heads
    else:
        def ours(x_, A, B, S):
            return lowrank_linear(x_, weight, None, A, B, 0.0, S, backend=backend)

        def composition(x_, A, B, S):
            h = F.linear(x_, A)
            h = F.linear(h, S) if S is not None else h
            return F.linear(x_, weight) + 0.0 * F.linear(h, B)

    got, expected = run(ours), run(composition)
    assert expected[0].isnan().any()  # the composition does propagate it
    for i, (a, b) in enumerate(zip(_nan_masks(got), _nan_masks(expected))):
        assert torch.equal(a, b), f"{backend} {op}: output/grad {i} has NaN at {a.nonzero().tolist()}, " \
                                  f"the composition at {b.nonzero().tolist()}"


# 10. Threads under the Triton interpreter.
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU tensors")
def test_interpreted_triton_calls_from_two_threads_all_succeed():
    x, weight, lora_A, lora_B = _lowrank_inputs("cpu")
    expected = lowrank_linear(x, weight, None, lora_A, lora_B, 0.5, backend="triton")
    failures, results = [], []

    def calls():
        for _ in range(12):
            try:
                results.append(lowrank_linear(x, weight, None, lora_A, lora_B, 0.5, backend="triton"))
            except Exception as exc:  # noqa: BLE001 (every failure is counted and reported)
                failures.append(repr(exc))

    threads = [threading.Thread(target=calls) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, f"{len(failures)} of 24 calls failed: {failures[0]}"
    assert len(results) == 24
    for y in results:
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
