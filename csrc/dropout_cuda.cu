// The adapter dropout (dropout.h) on CUDA: a grid-stride loop, one thread per group of 8
// consecutive columns of a row (the 8 elements one Philox call serves). The seed is read from
// device memory by each thread, never on the host: no sync, and a CUDA graph replays it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "dropout.h"

namespace adapterops {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
dropout_apply_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                     const int64_t* __restrict__ seed, int64_t rows, int64_t cols,
                     int64_t groups, uint32_t threshold, float scale) {
  const uint64_t key = static_cast<uint64_t>(*seed);
  const int64_t total = rows * groups;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = index / groups;
    dropout_apply_group(in + row * cols, out + row * cols, row, index % groups, cols, key,
                        threshold, scale);
  }
}

}  // namespace

void dropout_apply_cuda(const at::Tensor& in, const at::Tensor& seed, uint32_t threshold,
                        float scale, at::Tensor& out) {
  const int64_t rows = in.size(0), cols = in.size(1), groups = (cols + 7) / 8;
  if (rows * groups == 0) return;
  const c10::cuda::CUDAGuard guard(in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Enough blocks to fill every SM several times over; the loop covers the rest.
  const int64_t wanted = (rows * groups + kThreads - 1) / kThreads;
  const int64_t most = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const unsigned blocks = static_cast<unsigned>(std::min(wanted, most));
  ADAPTEROPS_DISPATCH_FLOAT_TYPES(in.scalar_type(), "dropout_apply_cuda", [&] {
    dropout_apply_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        seed.const_data_ptr<int64_t>(), rows, cols, groups, threshold, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace adapterops
