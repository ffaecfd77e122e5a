#include "common.h"

namespace adapterops {

void check_args(const char* op, std::initializer_list<Arg> args) {
  const Arg* first = nullptr;
  for (const Arg& arg : args) {
    if (!arg.tensor.defined()) continue;
    TORCH_CHECK(arg.tensor.dim() == arg.ndim, op, ": ", arg.name, " must have ", arg.ndim,
                " dimensions, got shape ", arg.tensor.sizes());
    if (first == nullptr) {
      first = &arg;
      const at::ScalarType dtype = arg.tensor.scalar_type();
      TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ",
                  arg.name, " must be float32, float16 or bfloat16, got ", dtype);
      continue;
    }
    TORCH_CHECK(arg.tensor.scalar_type() == first->tensor.scalar_type(), op, ": ", arg.name,
                " is ", arg.tensor.scalar_type(), " but ", first->name, " is ",
                first->tensor.scalar_type());
    TORCH_CHECK(arg.tensor.device() == first->tensor.device(), op, ": ", arg.name, " is on ",
                arg.tensor.device(), " but ", first->name, " is on ", first->tensor.device());
  }
}

bool check_adapter_dtype(const char* op, const Arg& base, const Arg& adapter) {
  const at::ScalarType base_dtype = base.tensor.scalar_type(),
                       adapter_dtype = adapter.tensor.scalar_type();
  const bool fp32_on_16_bit =
      adapter_dtype == at::kFloat && (base_dtype == at::kHalf || base_dtype == at::kBFloat16);
  TORCH_CHECK(adapter_dtype == base_dtype || fp32_on_16_bit, op, ": ", adapter.name, " is ",
              adapter_dtype, " but ", base.name, " is ", base_dtype, " (the adapter must share ",
              base.name, "'s dtype, or be float32 on a float16 or bfloat16 ", base.name, ")");
  TORCH_CHECK(adapter.tensor.device() == base.tensor.device(), op, ": ", adapter.name, " is on ",
              adapter.tensor.device(), " but ", base.name, " is on ", base.tensor.device());
  return fp32_on_16_bit;
}

const at::Tensor& or_undefined(const std::optional<at::Tensor>& tensor) {
  static const at::Tensor undefined;
  return tensor.has_value() ? *tensor : undefined;
}

at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  // BLAS skips the product when alpha is 0, dropping a NaN or inf of a @ b that PyTorch's
  // composition 0 * (a @ b) propagates: alpha 0 takes that composition.
  if (alpha == 0) return at::mm(a, b).mul_(0);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/alpha);
}

at::Tensor low_rank_term(const at::Tensor& h, const at::Tensor& b_t,
                         const std::optional<at::Tensor>& bias, double alpha) {
  if (alpha == 0) {  // see scaled_mm
    at::Tensor term = scaled_mm(h, b_t, 0);
    return bias.has_value() ? term.add_(*bias) : term;
  }
  if (bias.has_value()) return at::addmm(*bias, h, b_t, /*beta=*/1, /*alpha=*/alpha);
  return scaled_mm(h, b_t, alpha);
}

}  // namespace adapterops
