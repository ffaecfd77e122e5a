"""Dequantizing a 4-bit weight in bitsandbytes' layout (NF4 or FP4) into a dense buffer.

    out[i] = code[nibble(i)] * scales[i // BLOCKSIZE]        (fp32 product, then out's dtype)

`packed` holds two 4-bit codes per byte, the high nibble first; `scales` is one fp32 absmax per
block of BLOCKSIZE consecutive elements (decoded from its 8-bit codes beforehand under double
quantization: two small host ops, as bitsandbytes does, so that no multiply-add here can fuse
into an FMA and round differently). The result equals `bitsandbytes.functional.dequantize_4bit`
bit for bit.

A memory-bound pass: per element half a byte read, 2 or 4 bytes written (the 16-entry code
table and the scales stay in L1/L2). Each program takes BLOCK bytes (2 BLOCK elements), looks
both nibbles up, and writes them interleaved: one contiguous, coalesced store. Compiled for
sm_90 with sizes divisible by 16, the packed bytes load and the outputs store as 16-byte
vectors (ld/st.global.v4.b32); the interleave goes through shared memory (4 KiB per program
for fp32, 2 KiB for 16-bit) and the code and scale lookups are 4-byte gathers. Not yet timed
on a GPU.
"""
import triton
import triton.language as tl


@triton.jit
def nf4_dequantize_kernel(packed_ptr, scales_ptr, code_ptr, out_ptr, numel, num_bytes,
                          BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    # num_bytes = ceil(numel / 2) is an argument, not computed here, so that a launch with
    # sizes divisible by 16 specializes on it and the masked loads and stores vectorize.
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = byte < num_bytes
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    # BLOCKSIZE is even: both elements of a byte lie in one block.
    scale = tl.load(scales_ptr + (2 * byte) // BLOCKSIZE, mask=in_range, other=0.0)
    high = tl.load(code_ptr + (packed >> 4)) * scale
    low = tl.load(code_ptr + (packed & 15)) * scale
    element = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + element, tl.interleave(high, low).to(out_ptr.dtype.element_ty),
             mask=element < numel)
