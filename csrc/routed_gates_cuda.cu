// The routed op's gate work (routed_gates.h) on CUDA: one warp per token, 4 tokens per block of
// 128 threads. A row's work is O(E r) loads and multiply-adds (E heads of rank r), memory-bound
// next to the GEMMs around it; a warp spreads a row's E r elements over its lanes (coalesced
// loads and stores of h, hg, u and the seed), and a row that ends past the last token leaves
// the whole warp idle, so the warp shuffles below never see a partial warp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "routed_gates.h"

namespace adapterops {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;

struct WarpLanes {
  int first;
  static constexpr int count = kWarp;
  template <typename T> __device__ T sum(T value) const {
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
      value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
  }
  template <typename T> __device__ T max(T value) const {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      T other = __shfl_xor_sync(0xffffffffu, value, offset);
      value = other > value ? other : value;
    }
    return value;
  }
  // Orders this warp's global writes of a row (probabilities, gates) before its lanes read them.
  __device__ void sync() const { __syncwarp(); }
};

__device__ inline int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
routed_gates_forward_kernel(const scalar_t* __restrict__ hl, int64_t tokens, int64_t rank,
                            int64_t heads, int64_t top_k, scalar_t* __restrict__ h,
                            acc_t* probs, acc_t* gates, scalar_t* __restrict__ hg) {
  const int64_t m = warp_row();
  if (m >= tokens) return;
  routed_gates_forward_row(WarpLanes{static_cast<int>(threadIdx.x % kWarp)},
                           hl + m * (rank + heads), rank, heads, top_k, h + m * rank,
                           probs + m * heads, gates ? gates + m * heads : nullptr,
                           hg + m * heads * rank);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
routed_gates_backward_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ h,
                             const acc_t* __restrict__ probs, const acc_t* __restrict__ gates,
                             bool has_top_k, const acc_t* __restrict__ grad_probs,
                             int64_t tokens, int64_t rank, int64_t heads,
                             scalar_t* __restrict__ seed) {
  const int64_t m = warp_row();
  if (m >= tokens) return;
  routed_gates_backward_row(WarpLanes{static_cast<int>(threadIdx.x % kWarp)},
                            u + m * heads * rank, h + m * rank, probs + m * heads,
                            gates + m * heads, has_top_k, grad_probs + m * heads, rank, heads,
                            seed + m * (rank + heads));
}

unsigned blocks_for(int64_t tokens) {
  return static_cast<unsigned>((tokens + kRowsPerBlock - 1) / kRowsPerBlock);
}

}  // namespace

void routed_gates_forward_cuda(const at::Tensor& hl, int64_t rank, int64_t top_k, at::Tensor& h,
                               at::Tensor& probs, at::Tensor& gates, at::Tensor& hg) {
  const int64_t tokens = hl.size(0), heads = probs.size(1);
  if (tokens == 0) return;
  const c10::cuda::CUDAGuard guard(hl.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  ADAPTEROPS_DISPATCH_FLOAT_TYPES(hl.scalar_type(), "routed_gates_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    routed_gates_forward_kernel<scalar_t, acc_t><<<blocks_for(tokens), kWarp * kRowsPerBlock, 0, stream>>>(
        hl.const_data_ptr<scalar_t>(), tokens, rank, heads, top_k, h.mutable_data_ptr<scalar_t>(),
        probs.mutable_data_ptr<acc_t>(), top_k > 0 ? gates.mutable_data_ptr<acc_t>() : nullptr,
        hg.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void routed_gates_backward_cuda(const at::Tensor& u, const at::Tensor& h, const at::Tensor& probs,
                                const at::Tensor& gates, bool has_top_k,
                                const at::Tensor& grad_probs, at::Tensor& seed) {
  const int64_t tokens = u.size(0), rank = h.size(1), heads = probs.size(1);
  if (tokens == 0) return;
  const c10::cuda::CUDAGuard guard(u.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  ADAPTEROPS_DISPATCH_FLOAT_TYPES(u.scalar_type(), "routed_gates_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* probs_ptr = probs.const_data_ptr<acc_t>();
    routed_gates_backward_kernel<scalar_t, acc_t><<<blocks_for(tokens), kWarp * kRowsPerBlock, 0, stream>>>(
        u.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), probs_ptr,
        has_top_k ? gates.const_data_ptr<acc_t>() : probs_ptr, has_top_k,
        grad_probs.const_data_ptr<acc_t>(), tokens, rank, heads, seed.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace adapterops
