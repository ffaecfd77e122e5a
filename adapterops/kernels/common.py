"""Small `@triton.jit` helpers shared by the kernels of several op families."""
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST casts both tiles to fp32 first. The launcher sets it for bf16 under the Triton
    interpreter only: there (triton 3.8 and 3.9) `tl.dot` on bf16 tiles returns garbage
    (relative error ~1e10) while fp32 is exact, so the cast keeps bf16 testable on a CPU.
    INPUT_PRECISION ("ieee" or "tf32") follows torch's fp32 matmul setting; it only matters
    for fp32 tiles on a GPU.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
