// The update's rounding (round_copy.h) on the device of its tensors: the CUDA kernel of
// round_copy_cuda.cu, or a host loop for CPU tensors.
#include <ATen/Parallel.h>

#include "round_copy.h"

namespace adapterops {

void round_copy(const at::Tensor& source, at::Tensor& target) {
#ifdef ADAPTEROPS_WITH_CUDA
  if (source.is_cuda()) return round_copy_cuda(source, target);
#endif
  TORCH_CHECK(source.is_cpu(), "round_copy: tensors on ", source.device(),
              " need the CUDA build of adapterops._C");
  const int64_t cols = source.size(1);
  ADAPTEROPS_DISPATCH_FLOAT_TYPES(source.scalar_type(), "round_copy", [&] {
    using source_t = scalar_t;
    const source_t* from = source.const_data_ptr<source_t>();
    ADAPTEROPS_DISPATCH_FLOAT_TYPES(target.scalar_type(), "round_copy", [&] {
      scalar_t* to = target.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, source.numel(), 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          to[strided_offset(i, cols, target.stride(0), target.stride(1))] = static_cast<scalar_t>(
              static_cast<at::opmath_type<source_t>>(from[strided_offset(i, cols, source.stride(0), source.stride(1))]));
      });
    });
  });
}

}  // namespace adapterops
