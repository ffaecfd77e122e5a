// The low-rank linear (LoRA, PiSSA, LaMDA) on the `cuda` backend: cuBLAS GEMMs through ATen,
// the low-rank terms folded into the base GEMMs as accumulation (beta = 1).
//
//     h1 = x A^T,  h2 = h1 S^T (h2 = h1 without S),  y = x W^T + bias + s h2 B^T
//     g = s dY B,  dB = s dY^T h2,  dS = g^T h1,  dx = dY W + (g S) A,  dA = (g S)^T x
//
// Forward: y = bias + s h2 B^T (a GEMM of inner size r, alpha = s), then the base GEMM
// accumulates onto it, y += x W^T (beta = 1): cuBLAS reads the low-rank term in the epilogue of
// a compute-bound GEMM, where it costs next to nothing, instead of a separate memory-bound pass
// over y; no M x out temporary, no elementwise pass. Backward likewise: dx = (g S) A, then
// dx += dY W with beta = 1; the scaled GEMMs take s as alpha. The memory contract (LaMDA saves
// only h1/h2, never x) is the Python op's: backward gets x only when dA needs it.
//
// Adapter dropout (dropout = p > 0, on the adapter's input only; the base GEMM sees x): with
// x_d = x * kept / (1 - p) (dropout_apply, the mask of dropout.h drawn from dropout_seed),
//     h1 = x_d A^T,  dx = dY W + kept * ((g S) A) / (1 - p),  dA = (g S)^T x_d
// x_d is a transient of each pass, regenerated from the seed, never returned or saved; dx's
// low-rank term is masked before dY W accumulates onto it (beta = 1).
//
// fp32 adapters on a 16-bit base (lora_A, lora_B, lora_S in fp32; x, weight, bias in fp16 or
// bf16: PEFT's default): the low-rank path runs in fp32, as the reference backend (PEFT's math):
//     x_a = fp32(x) (dropped when p > 0),  h1 = x_a A^T,  h2 = h1 S^T            fp32
//     y = x W^T + bias (x's dtype);  y = round(fp32(y) + s h2 B^T)                one add_
//     dY_a = fp32(dY),  g = s dY_a B,  dB = s dY_a^T h2,  dS = g^T h1,  dA = (g S)^T x_a
//     dx = dY W (x's dtype);  dx = round(fp32(dx) + (g S) A [masked])             one add_
// The base GEMMs stay in x's dtype; the fp32 low-rank term (a GEMM with alpha = s) is then added
// in place, in fp32 with one rounding to x's dtype (ATen's mixed-dtype add_), instead of the
// beta = 1 accumulation, which needs one dtype. h1, h2 (returned, and taken back by backward),
// dA, dB and dS are fp32; y and dx are in x's dtype. x_a and dY_a are transient fp32 copies
// (M x in, M x out) of this fallback: cuBLAS GEMMs need one dtype, while the Triton kernels
// convert in registers. When every tensor shares x's dtype, none of this runs: x_a is x, dY_a
// is dY (Tensor::to returns the tensor itself) and y, dx take the beta = 1 forms above.
#include "common.h"

namespace adapterops {
namespace {

constexpr const char* kForward = "lowrank_linear_fwd_cuda";
constexpr const char* kBackward = "lowrank_linear_bwd_cuda";

// The adapter's input: x in the adapter's dtype (x itself when it has it; else a transient
// copy), dropped when dropout > 0 (a new tensor regenerated from the seed).
at::Tensor adapter_input(const at::Tensor& x, at::ScalarType dtype, double dropout,
                         const std::optional<at::Tensor>& dropout_seed) {
  at::Tensor input = x.to(dtype);
  return dropout > 0 ? dropout_apply(input, *dropout_seed, dropout) : input;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_linear_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_S,
    double scaling, double dropout, const std::optional<at::Tensor>& dropout_seed) {
  check_args(kForward, {{"x", x}, {"weight", weight}, {"bias", or_undefined(bias), 1}});
  check_args(kForward,
             {{"lora_A", lora_A}, {"lora_B", lora_B}, {"lora_S", or_undefined(lora_S)}});
  const bool fp32_adapter = check_adapter_dtype(kForward, {"x", x}, {"lora_A", lora_A});
  TORCH_CHECK(dropout <= 0 || dropout_seed.has_value(), kForward, ": dropout is ", dropout,
              " but dropout_seed is None");
  at::Tensor h1 =
      at::mm(adapter_input(x, lora_A.scalar_type(), dropout, dropout_seed), lora_A.t());
  at::Tensor h2 = lora_S.has_value() ? at::mm(h1, lora_S->t()) : h1;
  at::Tensor y;
  if (fp32_adapter) {
    y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    y.add_(scaled_mm(h2, lora_B.t(), scaling));
  } else {
    y = low_rank_term(h2, lora_B.t(), bias, scaling);
    y.addmm_(x, weight.t());
  }
  return {y, h1, lora_S.has_value() ? h2 : at::empty({0}, lora_A.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
    const std::optional<at::Tensor>& h1, const std::optional<at::Tensor>& h2,
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_S, const std::optional<at::Tensor>& dropout_seed,
    double scaling, double dropout, bool need_x, bool need_A, bool need_B, bool need_S) {
  check_args(kBackward, {{"grad_y", grad_y}, {"x", or_undefined(x)}, {"weight", weight}});
  check_args(kBackward, {{"lora_A", lora_A}, {"lora_B", lora_B}, {"lora_S", or_undefined(lora_S)},
                         {"h1", or_undefined(h1)}, {"h2", or_undefined(h2)}});
  const bool fp32_adapter = check_adapter_dtype(kBackward, {"grad_y", grad_y}, {"lora_A", lora_A});
  TORCH_CHECK(!need_A || x.has_value(), kBackward, ": dA was asked for but x is None");
  TORCH_CHECK(!need_S || h1.has_value(), kBackward, ": dS was asked for but h1 is None");
  TORCH_CHECK(!need_B || h2.has_value(), kBackward, ": dB was asked for but h2 is None");
  const bool has_dropout = dropout > 0;
  TORCH_CHECK(!has_dropout || dropout_seed.has_value(), kBackward, ": dropout is ", dropout,
              " but dropout_seed is None");
  // A gradient not asked for: an empty tensor, a new one each (outputs may not alias).
  const auto none = [&] { return at::empty({0}, grad_y.options()); };
  at::Tensor dx = none(), dA = none(), dB = none(), dS = none();
  if (!need_x && !need_A && !need_B && !need_S) return {dx, dA, dB, dS};
  // dY in the adapter's dtype: grad_y itself, or (fp32 adapters) a transient fp32 copy.
  const at::Tensor dy = grad_y.to(lora_A.scalar_type());
  if (need_B) dB = scaled_mm(dy.t(), *h2, scaling);
  if (need_x || need_A || need_S) {
    at::Tensor g = scaled_mm(dy, lora_B, scaling);
    if (need_S) dS = at::mm(g.t(), *h1);
    if (!need_x && !need_A) return {dx, dA, dB, dS};
    at::Tensor gS = lora_S.has_value() ? at::mm(g, *lora_S) : g;
    if (need_x) {
      at::Tensor term = at::mm(gS, lora_A);
      if (has_dropout) term = dropout_apply(term, *dropout_seed, dropout);
      if (fp32_adapter) {
        dx = at::mm(grad_y, weight);
        dx.add_(term);
      } else {
        dx = term;
        dx.addmm_(grad_y, weight);
      }
    }
    if (need_A)
      dA = at::mm(gS.t(), adapter_input(*x, lora_A.scalar_type(), dropout, dropout_seed));
  }
  return {dx, dA, dB, dS};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapterops, CPU, m) {
  m.impl(kForward, &lowrank_linear_fwd);
  m.impl(kBackward, &lowrank_linear_bwd);
}

#ifdef ADAPTEROPS_WITH_CUDA
TORCH_LIBRARY_IMPL(adapterops, CUDA, m) {
  m.impl(kForward, &lowrank_linear_fwd);
  m.impl(kBackward, &lowrank_linear_bwd);
}
#endif

}  // namespace adapterops
