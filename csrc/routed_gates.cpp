// The routed op's gate work (routed_gates.h) on the device of its tensors: the CUDA kernels of
// routed_gates_cuda.cu, or this file's host driver (rows in parallel, one lane each) for CPU tensors.
// Every tensor is contiguous here (the callers in routed.cpp make them so).
#include <ATen/Parallel.h>

#include "routed_gates.h"

namespace adapterops {

void routed_gates_forward(const at::Tensor& hl, int64_t rank, int64_t top_k, at::Tensor& h,
                          at::Tensor& probs, at::Tensor& gates, at::Tensor& hg) {
#ifdef ADAPTEROPS_WITH_CUDA
  if (hl.is_cuda()) return routed_gates_forward_cuda(hl, rank, top_k, h, probs, gates, hg);
#endif
  TORCH_CHECK(hl.is_cpu(), "routed_gates_forward: tensors on ", hl.device(),
              " need the CUDA build of adapterops._C");
  const int64_t tokens = hl.size(0), heads = probs.size(1);
  ADAPTEROPS_DISPATCH_FLOAT_TYPES(hl.scalar_type(), "routed_gates_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hl_ptr = hl.const_data_ptr<scalar_t>();
    scalar_t* h_ptr = h.mutable_data_ptr<scalar_t>();
    scalar_t* hg_ptr = hg.mutable_data_ptr<scalar_t>();
    acc_t* probs_ptr = probs.mutable_data_ptr<acc_t>();
    acc_t* gates_ptr = top_k > 0 ? gates.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        routed_gates_forward_row(SerialLanes{}, hl_ptr + m * (rank + heads), rank, heads, top_k,
                                 h_ptr + m * rank, probs_ptr + m * heads,
                                 gates_ptr ? gates_ptr + m * heads : nullptr,
                                 hg_ptr + m * heads * rank);
    });
  });
}

void routed_gates_backward(const at::Tensor& u, const at::Tensor& h, const at::Tensor& probs,
                           const at::Tensor& gates, bool has_top_k, const at::Tensor& grad_probs,
                           at::Tensor& seed) {
#ifdef ADAPTEROPS_WITH_CUDA
  if (u.is_cuda())
    return routed_gates_backward_cuda(u, h, probs, gates, has_top_k, grad_probs, seed);
#endif
  TORCH_CHECK(u.is_cpu(), "routed_gates_backward: tensors on ", u.device(),
              " need the CUDA build of adapterops._C");
  const int64_t tokens = u.size(0), rank = h.size(1), heads = probs.size(1);
  ADAPTEROPS_DISPATCH_FLOAT_TYPES(u.scalar_type(), "routed_gates_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* h_ptr = h.const_data_ptr<scalar_t>();
    const acc_t* probs_ptr = probs.const_data_ptr<acc_t>();
    const acc_t* gates_ptr = has_top_k ? gates.const_data_ptr<acc_t>() : probs_ptr;
    const acc_t* grad_probs_ptr = grad_probs.const_data_ptr<acc_t>();
    scalar_t* seed_ptr = seed.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        routed_gates_backward_row(SerialLanes{}, u_ptr + m * heads * rank, h_ptr + m * rank,
                                  probs_ptr + m * heads, gates_ptr + m * heads, has_top_k,
                                  grad_probs_ptr + m * heads, rank, heads,
                                  seed_ptr + m * (rank + heads));
    });
  });
}

}  // namespace adapterops
