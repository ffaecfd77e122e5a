// HD-PiSSA's layer and fused W update on the `cuda` backend.
//
//     y = x W^T + bias,  h = x A^T (only when gB needs it)
//     g = s dY B,  gA = g^T x,  gB = s dY^T h,  dx = dY W      (cuBLAS through ATen; s is alpha)
//     update: W += scale P Q in place (one GEMM, beta = 1), then copy = W rounded to copy's
//             dtype (round_copy: one pass over W)
#include <ATen/MemoryOverlap.h>

#include "common.h"

namespace adapterops {
namespace {

constexpr const char* kForward = "hdpissa_linear_fwd_cuda";
constexpr const char* kBackward = "hdpissa_linear_bwd_cuda";
constexpr const char* kUpdate = "lowrank_update_cuda_";

std::tuple<at::Tensor, at::Tensor> hdpissa_linear_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, bool need_h) {
  check_args(kForward, {{"x", x}, {"weight", weight}, {"bias", or_undefined(bias), 1},
                        {"lora_A", lora_A}, {"lora_B", lora_B}});
  return {at::linear(x, weight, bias), need_h ? at::mm(x, lora_A.t()) : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hdpissa_linear_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
    const std::optional<at::Tensor>& h, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, bool need_x, bool need_A, bool need_B) {
  check_args(kBackward, {{"grad_y", grad_y}, {"x", or_undefined(x)}, {"h", or_undefined(h)},
                         {"weight", weight}, {"lora_A", lora_A}, {"lora_B", lora_B}});
  TORCH_CHECK(!need_A || x.has_value(), kBackward, ": gA was asked for but x is None");
  TORCH_CHECK(!need_B || h.has_value(), kBackward, ": gB was asked for but h is None");
  // A gradient not asked for: an empty tensor, a new one each (outputs may not alias).
  const auto none = [&] { return at::empty({0}, grad_y.options()); };
  at::Tensor dx = need_x ? at::mm(grad_y, weight) : none();
  at::Tensor gA = need_A ? at::mm(scaled_mm(grad_y, lora_B, scaling).t(), *x) : none();
  at::Tensor gB = need_B ? scaled_mm(grad_y.t(), *h, scaling) : none();
  return {dx, gA, gB};
}

void lowrank_update_(at::Tensor weight, const at::Tensor& P, const at::Tensor& Q, double scale,
                     const std::optional<at::Tensor>& copy) {
  check_args(kUpdate, {{"weight", weight}, {"P", P}, {"Q", Q}});
  TORCH_CHECK(P.size(0) == weight.size(0) && Q.size(1) == weight.size(1) && P.size(1) == Q.size(0),
              kUpdate, ": weight ", weight.sizes(), " += P ", P.sizes(), " @ Q ", Q.sizes(),
              " does not fit");
  // Everything about copy is checked before W changes: a failed call leaves W as it was.
  if (copy.has_value()) {
    const at::ScalarType dtype = copy->scalar_type();
    TORCH_CHECK(copy->sizes() == weight.sizes() && copy->device() == weight.device() &&
                    (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16),
                kUpdate, ": copy (", dtype, " ", copy->sizes(), " on ", copy->device(),
                ") must be float32, float16 or bfloat16 of weight's shape ", weight.sizes(),
                " on ", weight.device());
    // Each element is written once, by the thread that reads it from W: copy may be W itself,
    // but must not repeat elements or overlap W otherwise.
    at::assert_no_internal_overlap(*copy);
    at::assert_no_partial_overlap(weight, *copy);
  }
  weight.addmm_(P, Q, /*beta=*/1, /*alpha=*/scale);
  // W as its own copy holds the result already (and the kernel's inputs must not alias).
  const bool copy_is_weight = copy.has_value() && copy->data_ptr() == weight.data_ptr() &&
                              copy->strides() == weight.strides() &&
                              copy->scalar_type() == weight.scalar_type();
  if (copy.has_value() && !copy_is_weight) {
    at::Tensor target = *copy;
    round_copy(weight, target);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(adapterops, CPU, m) {
  m.impl(kForward, &hdpissa_linear_fwd);
  m.impl(kBackward, &hdpissa_linear_bwd);
  m.impl(kUpdate, &lowrank_update_);
}

#ifdef ADAPTEROPS_WITH_CUDA
TORCH_LIBRARY_IMPL(adapterops, CUDA, m) {
  m.impl(kForward, &hdpissa_linear_fwd);
  m.impl(kBackward, &hdpissa_linear_bwd);
  m.impl(kUpdate, &lowrank_update_);
}
#endif

}  // namespace adapterops
