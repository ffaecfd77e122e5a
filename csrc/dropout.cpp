// The adapter dropout (dropout.h) on the device of its tensor: the CUDA kernel of
// dropout_cuda.cu, or a host loop for CPU tensors.
#include <ATen/Parallel.h>

#include <cmath>

#include "dropout.h"

namespace adapterops {

at::Tensor dropout_apply(const at::Tensor& t, const at::Tensor& seed, double p) {
  TORCH_CHECK(t.dim() == 2, "dropout_apply: the tensor must have 2 dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout_apply: p must be in [0, 1], got ", p);
  TORCH_CHECK(seed.defined(), "dropout_apply: the seed is missing");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "dropout_apply: the seed must be a 1-element int64 tensor, got shape ",
              seed.sizes(), " and dtype ", seed.scalar_type());
  TORCH_CHECK(seed.device() == t.device(), "dropout_apply: the seed is on ", seed.device(),
              " but the tensor is on ", t.device());
  // round(p 2^16) as Python's round (half to even: nearbyint in the default rounding mode), and
  // 1 / (1 - p) in double, then fp32 (the float the reference's x * scale multiplies by).
  const auto threshold = static_cast<uint32_t>(std::nearbyint(p * 65536.0));
  const float scale = p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.0f;
  const at::Tensor in = t.contiguous();
  at::Tensor out = at::empty_like(in, at::MemoryFormat::Contiguous);
#ifdef ADAPTEROPS_WITH_CUDA
  if (in.is_cuda()) {
    dropout_apply_cuda(in, seed, threshold, scale, out);
    return out;
  }
#endif
  TORCH_CHECK(in.is_cpu(), "dropout_apply: tensors on ", in.device(),
              " need the CUDA build of adapterops._C");
  const int64_t rows = in.size(0), cols = in.size(1), groups = (cols + 7) / 8;
  // A CPU tensor's seed is read here directly (no device to sync with).
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  ADAPTEROPS_DISPATCH_FLOAT_TYPES(in.scalar_type(), "dropout_apply", [&] {
    const scalar_t* from = in.const_data_ptr<scalar_t>();
    scalar_t* to = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows * groups, 512, [&](int64_t begin, int64_t end) {
      for (int64_t index = begin; index < end; ++index) {
        const int64_t row = index / groups;
        dropout_apply_group(from + row * cols, to + row * cols, row, index % groups, cols, key,
                            threshold, scale);
      }
    });
  });
  return out;
}

}  // namespace adapterops
