"""HydraLoRA utilities (adapterops/hydra.py): the Switch-style balance loss, its collection from a
model, and the k-means choice of the number of heads.

1. balance_loss against hand-computed values (dyadic probabilities, so fp32 is exact), ties to
   the lower head, its gradient E f / M, (..., E) input, low-precision input, bad input.
2. collect_balance_loss on a tree of fake layers: the sum, reset, the zero result, bad input.
3. suggest_num_heads on planted Gaussian blobs: the planted k and sizes, determinism, the
   subsampled silhouette path, the max_heads and n - 1 caps, empty clusters, bad input.
"""
import pytest
import torch
from torch import nn

from adapterops.hydra import (_centroids, _fill_empty_clusters, _kmeans, balance_loss, collect_balance_loss,
                              suggest_num_heads)

# 4 tokens, E = 3; every value is dyadic, so every sum below is exact in fp32.
PROBS = torch.tensor([[0.5, 0.25, 0.25],
                      [0.25, 0.5, 0.25],
                      [0.125, 0.25, 0.625],
                      [0.5, 0.375, 0.125]])


def _assert_exact(name, actual, expected):
    assert actual.dtype == torch.float32 and actual.dim() == 0, \
        f"{name}: want a 0-dim fp32 tensor, got {actual.dtype} of shape {tuple(actual.shape)}"
    assert actual.item() == expected, \
        f"{name}: {actual.item()!r} != {expected!r} (off by {actual.item() - expected:.3e})"


def _f_from_grad(probs, top_k):
    """f recovered from autograd: d loss / d probs[t, e] = E f_e / M for every token t."""
    leaf = probs.clone().requires_grad_(True)
    balance_loss(leaf, top_k).backward()
    tokens, heads = probs.reshape(-1, probs.shape[-1]).shape
    return (leaf.grad.reshape(tokens, heads) * tokens / heads), leaf.grad


def test_balance_loss_hand_computed_top1():
    # argmax per token: heads 0, 1, 2, 0 -> counts [2, 1, 1], f = [1/2, 1/4, 1/4]
    # P = column means = [1.375, 1.375, 1.25] / 4 = [0.34375, 0.34375, 0.3125]
    # loss = 3 (0.5 * 0.34375 + 0.25 * 0.34375 + 0.25 * 0.3125) = 3 * 0.3359375 = 1.0078125
    _assert_exact("top-1 loss", balance_loss(PROBS), 1.0078125)
    _assert_exact("top_k=1 is the dense default", balance_loss(PROBS, 1), 1.0078125)


def test_balance_loss_hand_computed_top2():
    # top 2 per token (ties to the lower index): {0, 1}, {1, 0}, {2, 1}, {0, 1}
    # (token 0 ties heads 1 and 2 at 0.25 and takes 1; token 1 ties heads 0 and 2 and takes 0)
    # counts [3, 4, 1] over M k = 8 assignments: f = [3/8, 1/2, 1/8]
    # loss = 3 (0.375 * 0.34375 + 0.5 * 0.34375 + 0.125 * 0.3125) = 3 * 0.33984375 = 1.01953125
    _assert_exact("top-2 loss", balance_loss(PROBS, 2), 1.01953125)
    f, _ = _f_from_grad(PROBS, 2)
    torch.testing.assert_close(f[0], torch.tensor([0.375, 0.5, 0.125]), rtol=0, atol=1e-7,
                               msg=lambda m: f"top-2 f recovered from the gradient: {m}")
    # top_k = E routes every token everywhere: f uniform, loss = E * Σ P / E = Σ P = 1
    _assert_exact("top_k = E", balance_loss(PROBS, 3), 1.0)


def test_balance_loss_perfect_balance_is_one():
    # each head is the argmax of exactly one token (f = 1/4) and P = 1/4 for every head
    rows = torch.tensor([0.5, 0.25, 0.125, 0.125])
    balanced = torch.stack([rows.roll(i) for i in range(4)])
    _assert_exact("balanced top-1", balance_loss(balanced), 1.0)
    _assert_exact("balanced top-2", balance_loss(balanced, 2), 1.0)
    _assert_exact("uniform probabilities", balance_loss(torch.full((6, 4), 0.25), 3), 1.0)
    # the worst case: every token sure of head 0 gives E
    collapsed = torch.zeros(5, 4).index_fill_(1, torch.tensor([0]), 1.0)
    _assert_exact("collapsed router", balance_loss(collapsed), 4.0)


def test_balance_loss_ties_go_to_the_lower_index():
    tied = torch.tensor([[0.25, 0.375, 0.375],    # heads 1 and 2 tie: 1 wins
                         [0.375, 0.25, 0.375],    # heads 0 and 2 tie: 0 wins
                         [0.25, 0.25, 0.5]])      # no tie: 2
    f, _ = _f_from_grad(tied, None)
    expected = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    torch.testing.assert_close(f[0], expected, rtol=1e-6, atol=0,
                               msg=lambda m: f"tied top-1 f (expected heads 1, 0, 2): {m}")
    # 64 equal heads: an unstable sort puts some other head first (torch's CPU sort does)
    f, _ = _f_from_grad(torch.full((3, 64), 1 / 64), 3)
    assert f[0].nonzero().flatten().tolist() == [0, 1, 2], \
        f"64 tied heads, top-3: f nonzero at heads {f[0].nonzero().flatten().tolist()}, want [0, 1, 2]"
    # all heads tied on every token: top-1 takes head 0, top-2 heads 0 and 1
    for top_k, want in ((None, [1.0, 0.0, 0.0, 0.0]), (2, [0.5, 0.5, 0.0, 0.0])):
        f, _ = _f_from_grad(torch.full((7, 4), 0.25), top_k)
        torch.testing.assert_close(f[3], torch.tensor(want), rtol=1e-6, atol=0,
                                   msg=lambda m, top_k=top_k: f"uniform probs, top_k={top_k}: {m}")


@pytest.mark.parametrize("top_k", [None, 1, 2, 5])
def test_balance_loss_gradient_is_E_f_over_M(top_k):
    torch.manual_seed(1)
    tokens, heads = 37, 5
    probs = torch.softmax(torch.randn(tokens, heads), dim=-1)
    k = top_k or 1
    counts = [0] * heads  # the oracle: count by hand, token by token
    for row in probs.tolist():
        for e in sorted(range(heads), key=lambda e: -row[e])[:k]:
            counts[e] += 1
    f = torch.tensor(counts, dtype=torch.float64) / (tokens * k)
    expected_loss = heads * (f * probs.double().mean(0)).sum().item()
    loss = balance_loss(probs, top_k)
    assert abs(loss.item() - expected_loss) <= 1e-6, f"loss {loss.item()} vs float64 {expected_loss}"
    _, grad = _f_from_grad(probs, top_k)
    want = (heads * f / tokens).float().expand(tokens, heads)
    err = (grad - want).abs().max().item()
    assert err <= 1e-7, f"d loss / d probs differs from E f / M by {err:.3e} (top_k={top_k})"


def test_balance_loss_flattens_leading_dims_and_upcasts():
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(2, 3, 6), dim=-1)
    flat = balance_loss(probs.reshape(6, 6), 2)
    assert torch.equal(balance_loss(probs, 2), flat), "(2, 3, E) input differs from its (6, E) flattening"
    assert torch.equal(balance_loss(probs.transpose(0, 1), 2), flat), "non-contiguous input differs"
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        low = probs.to(dtype)
        loss = balance_loss(low, 2)
        assert loss.dtype == torch.float32 and loss.dim() == 0, f"{dtype} input gave {loss.dtype} {tuple(loss.shape)}"
        reference = balance_loss(low.float(), 2) if dtype != torch.float64 else flat
        err = (loss - reference).abs().item()
        assert err <= 1e-6, f"{dtype} loss differs from fp32 by {err:.3e}"
        assert loss.device == probs.device


@pytest.mark.parametrize("probs,top_k,error,match", [
    ([[0.5, 0.5]], None, TypeError, "probs must be a Tensor"),
    (torch.ones(2, 3, dtype=torch.int64), None, TypeError, "probs must be a floating-point"),
    (torch.tensor(1.0), None, ValueError, r"probs must be .*shape \(\)"),
    (torch.ones(4, 0), None, ValueError, r"probs must be .*shape \(4, 0\)"),
    (torch.ones(0, 3), None, ValueError, r"probs must be .*shape \(0, 3\)"),
    (torch.ones(2, 0, 3), None, ValueError, r"probs must be .*shape \(2, 0, 3\)"),
    (torch.ones(4, 3), 0, ValueError, r"top_k must be in \[1, E\] = \[1, 3\].*got 0"),
    (torch.ones(4, 3), 4, ValueError, r"top_k must be in \[1, E\] = \[1, 3\].*got 4"),
    (torch.ones(4, 3), True, TypeError, r"top_k must be an int or None, got bool"),
    (torch.ones(4, 3), 2.0, TypeError, r"top_k must be an int or None, got float"),
])
def test_balance_loss_bad_input(probs, top_k, error, match):
    with pytest.raises(error, match=match):
        balance_loss(probs, top_k)


class _FakeLayer(nn.Module):
    """Stands in for a HydraLoRA layer: keeps `weight * w.sum()` like a weighted balance loss."""

    def __init__(self, value, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.full((2,), value if value is not None else 0.0, dtype=dtype))
        self.last_balance_loss = None if value is None else 0.5 * self.w.sum()


class _Root(nn.Module):
    def __init__(self, children, own):
        super().__init__()
        self.body = nn.Sequential(*children)
        self.last_balance_loss = own


def test_collect_balance_loss_sums_and_resets(device):
    a, b, c, shared = _FakeLayer(1.0), _FakeLayer(None), _FakeLayer(3.0), _FakeLayer(0.25)
    model = _Root([a, nn.Sequential(b, nn.ReLU(), c), shared, shared],
                  own=torch.tensor(0.125, device=device)).to(device)
    for layer in (a, c, shared):  # .to() replaced the parameters: rebuild the kept losses on them
        layer.last_balance_loss = 0.5 * layer.w.sum()
    # a: 0.5 * 2 = 1, c: 3, shared (counted once): 0.25, the root's own 0.125, b: None
    kept = collect_balance_loss(model, reset=False)
    assert kept.item() == 4.375, f"sum of kept losses {kept.item()} != 4.375 (off by {kept.item() - 4.375})"
    assert a.last_balance_loss is not None and model.last_balance_loss is not None, "reset=False cleared a loss"
    again = collect_balance_loss(model, reset=False)
    assert again.item() == 4.375, f"a second reset=False collection gave {again.item()}, not 4.375"
    total = collect_balance_loss(model)
    assert total.item() == 4.375, f"sum {total.item()} != 4.375"
    total.backward()
    for name, layer in (("a", a), ("c", c), ("shared", shared)):
        assert torch.equal(layer.w.grad, torch.full_like(layer.w, 0.5)), f"gradient of {name}: {layer.w.grad}"
    assert all(m.last_balance_loss is None for m in (model, a, b, c, shared)), "reset left a kept loss"
    zero = collect_balance_loss(model)
    assert zero.item() == 0.0 and zero.dim() == 0, f"after reset: {zero}"
    assert zero.dtype == torch.float32 and zero.device == a.w.device, f"zero on {zero.device} {zero.dtype}"


def test_collect_balance_loss_zero_result_and_bad_input():
    zero = collect_balance_loss(nn.Sequential(nn.ReLU(), nn.GELU()))
    assert zero.dim() == 0 and zero.item() == 0.0, f"no layers: {zero}"
    assert zero.dtype == torch.float32 and zero.device.type == "cpu", f"no parameters: {zero.device} {zero.dtype}"
    double = collect_balance_loss(nn.Linear(3, 2, dtype=torch.float64))
    assert double.dtype == torch.float32, f"the zero of a float64 model is {double.dtype}, not fp32"
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        collect_balance_loss([_FakeLayer(1.0)])
    bad = nn.Sequential(_FakeLayer(1.0))
    bad[0].last_balance_loss = torch.ones(3)
    with pytest.raises(TypeError, match=r"last_balance_loss of module '0' .*shape \(3,\)"):
        collect_balance_loss(bad)


def _blobs(sizes, dim=16, spread=12.0, seed=0):
    """Gaussian blobs (unit noise) around centres drawn spread apart; rows in random order."""
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(len(sizes), dim, generator=g)
    x = torch.cat([c + torch.randn(n, dim, generator=g) for c, n in zip(centres, sizes)])
    return x[torch.randperm(len(x), generator=g)]


def test_collect_balance_loss_refuses_a_loss_without_its_graph():
    """A layer that ran under torch.no_grad (reentrant checkpointing's first pass) keeps a loss
    with no graph: collecting it with gradients on would train nothing, so it raises; under
    no_grad (no gradient wanted) it is summed."""
    layer = _FakeLayer(1.0)
    with torch.no_grad():
        layer.last_balance_loss = 0.5 * layer.w.sum()
    model = nn.Sequential(nn.Identity(), layer)
    with pytest.raises(RuntimeError, match=r"module '1'.*without autograd.*use_reentrant"):
        collect_balance_loss(model)
    assert layer.last_balance_loss is not None, "a refused collection cleared the loss"
    with torch.no_grad():
        assert collect_balance_loss(model).item() == 1.0
    layer.w.requires_grad_(False)   # a frozen router: no gradient is lost
    layer.last_balance_loss = 0.5 * layer.w.sum()
    assert collect_balance_loss(model).item() == 1.0

@pytest.mark.parametrize("sizes", [[60, 40, 20], [50, 40, 30, 25, 15]])
def test_suggest_num_heads_finds_planted_clusters(sizes):
    k, found = suggest_num_heads(_blobs(sizes))
    assert (k, found) == (len(sizes), sizes), f"planted {len(sizes)} blobs of {sizes}, got k={k} sizes {found}"


def test_suggest_num_heads_is_deterministic():
    x = _blobs([30, 25, 20, 15], seed=3) + 4.0 * torch.randn(90, 16)  # overlap: the draws matter
    first = suggest_num_heads(x, seed=7)
    assert suggest_num_heads(x, seed=7) == first, "same seed, different answer"
    assert suggest_num_heads(x.clone(), seed=7, max_heads=6) == suggest_num_heads(x, seed=7, max_heads=6)
    assert suggest_num_heads(_blobs([60, 40, 20]), seed=123) == (3, [60, 40, 20]), "another seed misses the blobs"


def test_suggest_num_heads_subsampled_silhouette():
    sizes = [300, 200, 100]
    x = _blobs(sizes, seed=4)
    k, found = suggest_num_heads(x, max_samples=64)
    assert (k, found) == (3, sizes), f"with a 64-point silhouette subset: k={k} sizes {found}, want 3 {sizes}"
    assert suggest_num_heads(x, max_samples=64) == (k, found), "the subset is not deterministic"


def test_suggest_num_heads_caps():
    sizes = [50, 40, 30, 25, 15]
    x = _blobs(sizes, seed=5)
    for max_heads in (2, 3, 4):
        k, found = suggest_num_heads(x, max_heads=max_heads)
        assert k == max_heads, f"5 blobs with max_heads={max_heads}: k={k}"
        assert len(found) == k and sum(found) == 160 and min(found) > 0, f"max_heads={max_heads}: sizes {found}"
        assert found == sorted(found, reverse=True), f"sizes not descending: {found}"
    three = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0]])
    assert suggest_num_heads(three) == (2, [2, 1]), "3 samples cap k at n - 1 = 2"


def test_suggest_num_heads_fills_empty_clusters():
    # 3 distinct points in 14 samples: k-means++ runs out of distinct centres for k > 3, so
    # Lloyd must fill empty clusters; no size may be 0.
    x = torch.cat([torch.zeros(8, 4), torch.ones(4, 4), torch.full((2, 4), 5.0)])
    for max_heads in (3, 8):
        k, found = suggest_num_heads(x, max_heads=max_heads)
        assert sum(found) == 14 and min(found) > 0 and len(found) == k, f"max_heads={max_heads}: k={k} sizes {found}"
    assert suggest_num_heads(x, max_heads=3) == (3, [8, 4, 2])
    # identical samples: every k-means++ centre is the same point, so every cluster but one
    # starts empty; every silhouette is 0, and the tie goes to the lower k
    for max_heads in (2, 4):
        got = suggest_num_heads(torch.zeros(5, 3), max_heads=max_heads)
        assert got == (2, [4, 1]), f"5 identical samples, max_heads={max_heads}: {got}, want (2, [4, 1])"
    # the rule itself: cluster 2 is empty; the point farthest from its own centre among
    # clusters of two or more (point 1, distance 9; point 3 is alone at 16) moves there
    labels = torch.tensor([0, 0, 1, 3, 0])
    sq_dist = torch.tensor([[1.0, 5, 5, 5], [9, 5, 5, 5], [5, 2, 5, 5], [5, 5, 5, 16], [0, 5, 5, 5]])
    filled = _fill_empty_clusters(labels, sq_dist, 4)
    assert filled.tolist() == [0, 2, 1, 3, 0], f"empty cluster 2 filled as {filled.tolist()}"


def test_kmeans_keeps_the_best_restart():
    """n_init restarts draw from one generator in turn: the result must be the restart of
    least inertia among the single runs that the same generator gives one after another."""
    x = torch.randn(80, 3, dtype=torch.float64)  # one cloud, k = 5: restarts land in different optima
    def inertia(labels):
        return (x - _centroids(x, labels, 5)[labels]).square().sum().item()
    generator = torch.Generator().manual_seed(11)
    singles = [inertia(_kmeans(x, 5, 1, 100, generator)) for _ in range(6)]
    assert len(set(singles)) > 1, f"the restarts all agree ({singles[0]}): the test needs differing optima"
    best = inertia(_kmeans(x, 5, 6, 100, torch.Generator().manual_seed(11)))
    assert best == min(singles), f"best of 6 restarts has inertia {best}, the least single run {min(singles)}"


@pytest.mark.parametrize("features,kwargs,error,match", [
    ([[0.0, 1.0]] * 4, {}, TypeError, "features must be a Tensor"),
    (torch.ones(5, 2, dtype=torch.int32), {}, TypeError, "features must be a floating-point"),
    (torch.ones(6), {}, ValueError, r"features must be .*shape \(6,\)"),
    (torch.ones(2, 4), {}, ValueError, r"n >= 3 samples, got shape \(2, 4\)"),
    (torch.tensor([[0.0], [1.0], [float("nan")], [2.0]]), {}, ValueError, r"shape \(4, 1\) hold non-finite"),
    (torch.tensor([[0.0], [1.0], [float("inf")], [2.0]]), {}, ValueError, "non-finite"),
    (torch.randn(6, 2), dict(max_heads=1), ValueError, "max_heads must be an int >= 2, got 1"),
    (torch.randn(6, 2), dict(max_heads=True), ValueError, "max_heads must be an int >= 2, got True"),
    (torch.randn(6, 2), dict(max_heads=3.0), ValueError, "max_heads must be an int >= 2, got 3.0"),
    (torch.randn(6, 2), dict(n_init=0), ValueError, "n_init must be an int >= 1, got 0"),
    (torch.randn(6, 2), dict(max_iter=0), ValueError, "max_iter must be an int >= 1, got 0"),
    (torch.randn(6, 2), dict(max_samples=0), ValueError, "max_samples must be an int >= 1, got 0"),
    (torch.randn(6, 2), dict(seed=1.5), ValueError, "seed must be an int, got 1.5"),
])
def test_suggest_num_heads_bad_input(features, kwargs, error, match):
    with pytest.raises(error, match=match):
        suggest_num_heads(features, **kwargs)
