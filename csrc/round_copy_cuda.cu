// The update's rounding (round_copy.h) on CUDA: a grid-stride loop, one element per thread per
// step; consecutive threads take consecutive elements of a row, so a row-major W and copy are
// read and written coalesced.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "round_copy.h"

namespace adapterops {
namespace {

constexpr int kThreads = 256;

// kDense: both tensors contiguous, so element i sits at offset i (no index division).
template <typename source_t, typename target_t, bool kDense>
__global__ void __launch_bounds__(kThreads)
round_copy_kernel(const source_t* __restrict__ source, int64_t source_row_stride,
                  int64_t source_col_stride, target_t* __restrict__ target,
                  int64_t target_row_stride, int64_t target_col_stride, int64_t numel,
                  int64_t cols) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t from = kDense ? i : strided_offset(i, cols, source_row_stride, source_col_stride);
    const int64_t to = kDense ? i : strided_offset(i, cols, target_row_stride, target_col_stride);
    target[to] = static_cast<target_t>(static_cast<at::opmath_type<source_t>>(source[from]));
  }
}

}  // namespace

void round_copy_cuda(const at::Tensor& source, at::Tensor& target) {
  const int64_t numel = source.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(source.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Enough blocks to fill every SM several times over; the loop covers the rest.
  const int64_t wanted = (numel + kThreads - 1) / kThreads;
  const int64_t most = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const unsigned blocks = static_cast<unsigned>(std::min(wanted, most));
  const bool dense = source.is_contiguous() && target.is_contiguous();
  ADAPTEROPS_DISPATCH_FLOAT_TYPES(source.scalar_type(), "round_copy_cuda", [&] {
    using source_t = scalar_t;
    ADAPTEROPS_DISPATCH_FLOAT_TYPES(target.scalar_type(), "round_copy_cuda", [&] {
      auto kernel = dense ? round_copy_kernel<source_t, scalar_t, true>
                          : round_copy_kernel<source_t, scalar_t, false>;
      kernel<<<blocks, kThreads, 0, stream>>>(
          source.const_data_ptr<source_t>(), source.stride(0), source.stride(1),
          target.mutable_data_ptr<scalar_t>(), target.stride(0), target.stride(1), numel,
          source.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace adapterops
