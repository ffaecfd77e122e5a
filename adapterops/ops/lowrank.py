"""The fused low-rank linear: LoRA, PiSSA (LoRA with an SVD init) and LaMDA.

    h1 = x A^T          (M x r)      A = lora_A (r, in)
    h2 = h1 S^T         (M x r)      S = lora_S (r, r), optional (h2 = h1 without it)
    y  = x W^T + bias + s h2 B^T     W = weight (out, in), B = lora_B (out, r), s = scaling

x is (..., in) and is flattened to M = prod(leading dims) tokens; y is (..., out) in x's
dtype (fp32, fp16 or bf16; every backend accumulates in fp32).

Adapters in fp32 on a 16-bit base (PEFT's default, `autocast_adapter_dtype=True`): lora_A,
lora_B and lora_S may share fp32 while x, weight and bias share fp16 or bf16. The low-rank path
is then computed as PEFT computes it, in fp32 (x cast to fp32 as it is read; h1, h2 and g S in
fp32; the term added to the base product in fp32 and the sum rounded once to x's dtype), and
the gradients of A, B and S are fp32; dx is in x's dtype.

Dropout (`dropout` = p > 0, PEFT's semantics: on the adapter's input only, the base GEMM sees
x): x_d = x * kept / (1 - p) replaces x in h1 = x_d A^T, dA = (g S)^T x_d and dx's low-rank
term, dx = dY W + kept * ((g S) A) / (1 - p). The mask is a pure function of (seed, row,
column) (`adapterops.backends.reference.dropout`), which every backend draws the same and
regenerates where it needs it: nothing mask- or x_d-sized is saved, only the 1-element seed.
The seed is drawn from torch's generator per call unless `dropout_seed` is given.

Gradients (methods.md §2):

    g = s dY B,  dB = s dY^T h2,  dS = g^T h1,  dx = dY W + (g S) A,  dA = (g S)^T x,
    dW = dY^T x,  dbias = sum over tokens of dY

Memory contract (decided here, computed by whichever backend runs): backward saves x only
when lora_A or weight needs a gradient (LoRA mode); otherwise (LaMDA: W and A frozen) it saves
only the M x r activations h1 (for dS) and h2 (for dB), each only when that gradient is
needed. With lora_B frozen, backward does not compute dB at all.

Backends: `triton` (CUDA sm_80+, or CPU under TRITON_INTERPRET=1; fp32, fp16, bf16; rank <= 128),
`cuda` (the compiled C++ of csrc/: CUDA tensors in fp32, fp16, bf16, any rank) and `torch`
(everything else); see `adapterops.dispatch`. Under `torch.autocast` the op runs in
the autocast dtype.

Declared once (`adapterops.ops.declare`): custom ops `adapterops::lowrank_linear_fwd` and
`_bwd` for `torch.compile`, and an eager autograd Function onto the same functions.
"""
from typing import Optional

from torch import Tensor

from .. import dispatch
from .checks import (all_plain, autocast_on, cast_for_autocast, check_base_and_A, check_dim,
                     check_dropout, check_scaling, check_tensor, plain_scaling)
from .declare import DeclaredOp


def _backend(backend, x, lora_A):
    # What the backends' reasons depend on: device, dtypes, rank.
    signature = (x.device, x.dtype, lora_A.dtype, lora_A.shape[0])
    return (dispatch.cached("lowrank", backend, signature)
            or dispatch.select("lowrank", backend, signature=signature, x=x, lora_A=lora_A))


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             lora_S: Optional[Tensor], scaling: float, dropout: float,
             dropout_seed: Optional[Tensor], backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h1, h2) for 2-D x; h2 is None or empty when there is no S."""
    return _backend(backend, x, lora_A).lowrank_forward(x, weight, bias, lora_A, lora_B, lora_S,
                                                        scaling, dropout, dropout_seed)


def _gradients(grad_y: Tensor, x: Optional[Tensor], h1: Optional[Tensor], h2: Optional[Tensor],
               weight: Tensor, lora_A: Tensor, lora_B: Tensor, lora_S: Optional[Tensor],
               dropout_seed: Optional[Tensor], scaling: float, dropout: float, need_x: bool,
               need_A: bool, need_B: bool, need_S: bool, backend: Optional[str]) -> tuple:
    """(dx, dA, dB, dS), None where not asked for."""
    return _backend(backend, grad_y, lora_A).lowrank_backward(
        grad_y, x, h1, h2, weight, lora_A, lora_B, lora_S, dropout_seed, scaling, dropout,
        need_x, need_A, need_B, need_S)


def _save(inputs, output, needs) -> tuple:
    """The memory contract: x only for dA or dW; h1 only for dS; h2 (h1 without S) only for dB;
    with dropout, the 1-element seed (the mask is regenerated from it)."""
    x, weight, bias, lora_A, lora_B, lora_S, _, _, dropout_seed = inputs[:9]
    _, h1, h2 = output
    _, need_W, _, need_A, need_B, need_S = needs[:6]
    return (x if (need_A or need_W) else None, h1 if need_S else None,
            (h2 if lora_S is not None else h1) if need_B else None, weight, lora_A, lora_B, lora_S,
            dropout_seed)


def _fake(x, weight, bias, lora_A, lora_B, lora_S, scaling, dropout, dropout_seed, backend):
    M, r = x.shape[0], lora_A.shape[0]
    # h1 and h2 in the adapter's dtype (fp32 adapters on a 16-bit x: fp32).
    return (x.new_empty((M, weight.shape[0])), lora_A.new_empty((M, r)),
            lora_A.new_empty((M, r)) if lora_S is not None else lora_A.new_empty(0))


_lowrank_op = DeclaredOp("lowrank_linear", forward=_forward, gradients=_gradients, save=_save,
                         fake=_fake, trained=("x", "lora_A", "lora_B", "lora_S"),
                         reads={"lora_A": ("x",), "lora_B": ("h2",), "lora_S": ("h1",)},
                         options=("scaling", "dropout"))


def _plain_args(x, weight, bias, lora_A, lora_B, scaling, lora_S) -> bool:
    """The common case in one pass: arguments `check_lowrank_args` accepts."""
    if not (all_plain(x, weight, bias, lora_A, lora_B, lora_S)
            and weight.dim() == lora_A.dim() == lora_B.dim() == 2 and plain_scaling(scaling)):
        return False
    (out_features, in_features), (rank, a_in), (b_out, b_rank) = (weight.shape, lora_A.shape,
                                                                   lora_B.shape)
    return (x.shape[-1] == in_features == a_in and b_out == out_features and b_rank == rank >= 1
            and (bias is None or bias.shape == (out_features,))
            and (lora_S is None or lora_S.shape == (rank, rank)))


def check_lowrank_args(x, weight, bias, lora_A, lora_B, scaling, lora_S) -> float:
    """Validates every argument of `lowrank_linear`; returns scaling as a float."""
    if _plain_args(x, weight, bias, lora_A, lora_B, scaling, lora_S):
        return float(scaling)
    check_tensor("lora_B", lora_B, ndim=2)
    check_tensor("lora_S", lora_S, ndim=2, optional=True)
    out_features, in_features, rank = check_base_and_A(x, weight, bias, lora_A, lora_B=lora_B,
                                                       lora_S=lora_S, fp32_adapter_allowed=True)
    check_dim("lora_B", lora_B, 0, out_features, "out_features (weight.shape[0])")
    check_dim("lora_B", lora_B, 1, rank, "the rank (lora_A.shape[0])")
    if lora_S is not None:
        check_dim("lora_S", lora_S, 0, rank, "the rank (lora_A.shape[0])")
        check_dim("lora_S", lora_S, 1, rank, "the rank (lora_A.shape[0])")
    return check_scaling(scaling)


def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                   lora_B: Tensor, scaling: float, lora_S: Optional[Tensor] = None, *,
                   dropout: float = 0.0, dropout_seed: Optional[Tensor] = None,
                   backend: Optional[str] = None) -> Tensor:
    """y = x W^T + bias + scaling * ((x_d A^T) S^T) B^T; see this module's docstring.

    dropout: the probability p of dropping an element of the adapter's input (x_d = x without
    dropout); pass it in training only, as `nn.Dropout` drops in training only. dropout_seed:
    a 1-element int64 tensor on x's device that fixes the mask; None draws one per call from
    torch's generator.

    backend: None picks the first backend that supports the input (`ADAPTEROPS_BACKEND`
    overrides); "triton", "cuda" or "torch" forces one, and raises ValueError if it cannot serve.
    """
    if autocast_on(x):
        x, weight, bias, lora_A, lora_B, lora_S = cast_for_autocast(x, weight, bias, lora_A,
                                                                     lora_B, lora_S)
    scaling = check_lowrank_args(x, weight, bias, lora_A, lora_B, scaling, lora_S)
    if not (type(dropout) is float and dropout == 0.0 and dropout_seed is None):
        dropout, dropout_seed = check_dropout(dropout, dropout_seed, x)
    # (A bad backend name raises in dispatch, before any kernel.)
    return _lowrank_op(x, weight, bias, lora_A, lora_B, lora_S, scaling, dropout, dropout_seed,
                       backend)
