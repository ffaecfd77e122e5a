// The routed multi-head low-rank linear (HydraLoRA) on the `cuda` backend.
//
//     [h | logits] = x [A; Wg]^T           one GEMM, one read of x (logits in x's dtype, as the
//                                          torch backend and the official code have them)
//     p, g, hg = routed_gates_forward(...)  softmax (fp32), top-k, hg = [g_0 h | ... ]: a kernel
//     y = bias + s hg Bcat^T               the routed sum as ONE GEMM of inner size E r
//     y += x W^T                           the base GEMM accumulates onto it (beta = 1)
//
//     dBcat = s dY^T hg,  u = s dY Bcat     (Bcat = [B_0 | ... | B_{E-1}], out x E r)
//     seed = [dh | dlogits] = routed_gates_backward(u, h, p, g, dprobs)   a kernel
//     dx = seed [A; Wg];  dx += dY W        beta = 1
//     [dA; dWg] = seed^T x                  one GEMM, one read of x
//
// Bcat and [A; Wg] are per-call copies of the adapter's weights (E r (in + out) elements).
//
// Adapter dropout (dropout = p > 0, on A's input only, ONE mask shared by every head; the router
// and the base GEMM see x): with x_d = x * kept / (1 - p) (dropout_apply, the mask of dropout.h
// drawn from dropout_seed),
//     [h | logits] = [x_d A^T | x Wg^T]    two GEMMs (x_d is not x)
//     dx = kept * (dh A) / (1 - p);  dx += dlogits Wg;  dx += dY W    beta = 1
//     dA = dh^T x_d,  dWg = dlogits^T x
// x_d is a transient of each pass, regenerated from the seed, never returned or saved; dx's
// low-rank term is masked before the router's and the base GEMM's terms accumulate onto it.
//
// fp32 adapters on a 16-bit base (lora_A, lora_B, router_weight in fp32; x, weight, bias in fp16
// or bf16: PEFT's default): the adapter path runs in fp32, as the reference backend (PEFT's math):
//     x_a = fp32(x) (x_d: dropped x_a when p > 0),  [h | logits] = [x_d A^T | x_a Wg^T]   fp32
//     p, g, hg: the gate kernel on fp32 [h | logits] (h, hg fp32)
//     y = x W^T + bias (x's dtype);  y = round(fp32(y) + s hg Bcat^T)                  one add_
//     dY_a = fp32(dY),  dBcat = s dY_a^T hg,  u = s dY_a Bcat,  [dh | dlogits] fp32
//     dx = dY W (x's dtype);  dx = round(fp32(dx) + [dh A (masked) | dlogits Wg])      one add_
//     dA = dh^T x_d,  dWg = dlogits^T x_a                                              fp32
// The base GEMMs stay in x's dtype; the fp32 adapter terms are added in place, in fp32 with one
// rounding to x's dtype (ATen's mixed-dtype add_), instead of the beta = 1 accumulation, which
// needs one dtype. x_a and dY_a are transient fp32 copies (M x in, M x out) of this fallback:
// cuBLAS GEMMs need one dtype, while the Triton kernels convert in registers. When every tensor
// shares x's dtype none of this runs: x_a is x, dY_a is dY (Tensor::to returns the tensor
// itself) and y, dx take the beta = 1 forms above.
#include "common.h"

namespace adapterops {
namespace {

constexpr const char* kForward = "routed_lowrank_linear_fwd_cuda";
constexpr const char* kBackward = "routed_lowrank_linear_bwd_cuda";

at::ScalarType probs_dtype(const at::Tensor& x) {
  return at::promote_types(x.scalar_type(), at::kFloat);
}

at::Tensor heads_side_by_side(const at::Tensor& lora_B) {
  return lora_B.permute({1, 0, 2}).reshape({lora_B.size(1), lora_B.size(0) * lora_B.size(2)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lowrank_linear_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& router_weight,
    double scaling, std::optional<int64_t> top_k, double dropout,
    const std::optional<at::Tensor>& dropout_seed) {
  check_args(kForward, {{"x", x}, {"weight", weight}, {"bias", or_undefined(bias), 1}});
  check_args(kForward,
             {{"lora_A", lora_A}, {"lora_B", lora_B, 3}, {"router_weight", router_weight}});
  const bool fp32_adapter = check_adapter_dtype(kForward, {"x", x}, {"lora_A", lora_A});
  const int64_t tokens = x.size(0), heads = lora_B.size(0), rank = lora_B.size(2);
  TORCH_CHECK(heads >= 1 && router_weight.size(0) == heads && lora_A.size(0) == rank, kForward,
              ": lora_B ", lora_B.sizes(), ", lora_A ", lora_A.sizes(), " and router_weight ",
              router_weight.sizes(), " must agree on E >= 1 heads of rank r");
  TORCH_CHECK(!top_k.has_value() || (*top_k >= 1 && *top_k <= heads), kForward, ": top_k=",
              top_k.value_or(0), " must be in [1, ", heads, "] (lora_B.shape[0] heads)");
  TORCH_CHECK(dropout <= 0 || dropout_seed.has_value(), kForward, ": dropout is ", dropout,
              " but dropout_seed is None");
  // x in the adapter's dtype: x itself, or (fp32 adapters) a transient fp32 copy.
  const at::Tensor x_a = x.to(lora_A.scalar_type());
  at::Tensor hl = dropout > 0
                      ? at::cat({at::mm(dropout_apply(x_a, *dropout_seed, dropout), lora_A.t()),
                                 at::mm(x_a, router_weight.t())},
                                1)
                      : at::mm(x_a, at::cat({lora_A, router_weight}).t()).contiguous();
  // h, hg (and the gate kernel's scalar_t) in the adapter's dtype; p in fp32 (x's compute type).
  at::Tensor h = at::empty({tokens, rank}, lora_A.options());
  at::Tensor hg = at::empty({tokens, heads * rank}, lora_A.options());
  at::Tensor probs = at::empty({tokens, heads}, x.options().dtype(probs_dtype(x)));
  at::Tensor gates = top_k.has_value() ? at::empty_like(probs) : at::empty({0}, probs.options());
  routed_gates_forward(hl, rank, top_k.value_or(0), h, probs, gates, hg);
  at::Tensor y;
  if (fp32_adapter) {
    y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    y.add_(scaled_mm(hg, heads_side_by_side(lora_B).t(), scaling));
  } else {
    y = low_rank_term(hg, heads_side_by_side(lora_B).t(), bias, scaling);
    y.addmm_(x, weight.t());
  }
  return {y, h, hg, probs, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lowrank_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_probs, const std::optional<at::Tensor>& x,
    const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& hg,
    const std::optional<at::Tensor>& probs, const std::optional<at::Tensor>& gates,
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& dropout_seed,
    double scaling, double dropout, bool need_x, bool need_A, bool need_B, bool need_router) {
  check_args(kBackward, {{"grad_y", grad_y}, {"x", or_undefined(x)}, {"weight", weight}});
  check_args(kBackward, {{"lora_A", lora_A}, {"lora_B", lora_B, 3},
                         {"router_weight", router_weight}, {"h", or_undefined(h)},
                         {"hg", or_undefined(hg)}});
  const bool fp32_adapter = check_adapter_dtype(kBackward, {"grad_y", grad_y}, {"lora_A", lora_A});
  const bool need_gate_grads = need_x || need_A || need_router;
  TORCH_CHECK(!(need_A || need_router) || x.has_value(), kBackward,
              ": dA or dWg was asked for but x is None");
  TORCH_CHECK(!need_gate_grads || (h.has_value() && probs.has_value()), kBackward,
              ": dx, dA or dWg was asked for but h or probs is None");
  TORCH_CHECK(!need_B || hg.has_value(), kBackward, ": dB was asked for but hg is None");
  const bool has_dropout = dropout > 0;
  TORCH_CHECK(!has_dropout || dropout_seed.has_value(), kBackward, ": dropout is ", dropout,
              " but dropout_seed is None");
  const int64_t tokens = grad_y.size(0), heads = lora_B.size(0), out = lora_B.size(1),
                rank = lora_B.size(2);
  // A gradient not asked for: an empty tensor, a new one each (outputs may not alias).
  const auto none = [&] { return at::empty({0}, grad_y.options()); };
  at::Tensor dx = none(), dA = none(), dB = none(), dWg = none();
  // dY in the adapter's dtype: grad_y itself, or (fp32 adapters) a transient fp32 copy.
  const at::Tensor dy = grad_y.to(lora_A.scalar_type());
  if (need_B)
    dB = scaled_mm(dy.t(), *hg, scaling).view({out, heads, rank}).permute({1, 0, 2}).contiguous();
  if (!need_gate_grads) return {dx, dA, dB, dWg};
  const bool has_top_k = gates.has_value();
  using Named = std::pair<const char*, const at::Tensor*>;
  const std::initializer_list<Named> per_head = {
      {"probs", &*probs}, {"grad_probs", &grad_probs}, {"gates", has_top_k ? &*gates : &*probs}};
  for (const auto& [name, t] : per_head) {
    TORCH_CHECK(t->scalar_type() == probs_dtype(grad_y) && t->device() == grad_y.device() &&
                    t->dim() == 2 && t->size(0) == tokens && t->size(1) == heads,
                kBackward, ": ", name, " must be a ", probs_dtype(grad_y), " (", tokens, ", ",
                heads, ") tensor on ", grad_y.device(), ", got ", t->scalar_type(), " ",
                t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(h->size(0) == tokens && h->size(1) == rank, kBackward, ": h must be (", tokens,
              ", ", rank, "), got ", h->sizes());
  at::Tensor u = scaled_mm(dy, heads_side_by_side(lora_B), scaling);
  at::Tensor seed = at::empty({tokens, rank + heads}, lora_A.options());
  const at::Tensor gates_or_probs = has_top_k ? gates->contiguous() : probs->contiguous();
  routed_gates_backward(u, h->contiguous(), probs->contiguous(), gates_or_probs, has_top_k,
                        grad_probs.contiguous(), seed);
  // dx = dY W + term, term the adapter's part in the adapter's dtype: accumulated onto
  // (beta = 1), or (fp32 adapters) added in fp32 to dY W in x's dtype, rounded once.
  const auto add_base = [&](at::Tensor term) {
    if (!fp32_adapter) {
      term.addmm_(grad_y, weight);
      return term;
    }
    at::Tensor base = at::mm(grad_y, weight);
    base.add_(term);
    return base;
  };
  // x in the adapter's dtype (x itself, or a transient fp32 copy) for dA and dWg.
  const at::Tensor x_a = (need_A || need_router) ? x->to(lora_A.scalar_type()) : at::Tensor();
  if (has_dropout) {
    const at::Tensor dh = seed.narrow(1, 0, rank), dlogits = seed.narrow(1, rank, heads);
    if (need_x) {
      at::Tensor term = dropout_apply(at::mm(dh, lora_A), *dropout_seed, dropout);
      term.addmm_(dlogits, router_weight);
      dx = add_base(term);
    }
    if (need_A) dA = at::mm(dh.t(), dropout_apply(x_a, *dropout_seed, dropout));
    if (need_router) dWg = at::mm(dlogits.t(), x_a);
    return {dx, dA, dB, dWg};
  }
  if (need_x) dx = add_base(at::mm(seed, at::cat({lora_A, router_weight})));
  if (need_A || need_router) {
    // The rows of [dA; dWg] asked for, as one GEMM. A custom op's outputs may not alias each
    // other, so dWg (E x in) is copied out when dA shares the product.
    const int64_t first = need_A ? 0 : rank, last = need_router ? rank + heads : rank;
    at::Tensor dA_Wg = at::mm(seed.narrow(1, first, last - first).t(), x_a);
    if (need_A) dA = dA_Wg.narrow(0, 0, rank);
    if (need_router) dWg = need_A ? dA_Wg.narrow(0, rank, heads).clone() : dA_Wg;
  }
  return {dx, dA, dB, dWg};
}

}  // namespace

TORCH_LIBRARY_IMPL(adapterops, CPU, m) {
  m.impl(kForward, &routed_lowrank_linear_fwd);
  m.impl(kBackward, &routed_lowrank_linear_bwd);
}

#ifdef ADAPTEROPS_WITH_CUDA
TORCH_LIBRARY_IMPL(adapterops, CUDA, m) {
  m.impl(kForward, &routed_lowrank_linear_fwd);
  m.impl(kBackward, &routed_lowrank_linear_bwd);
}
#endif

}  // namespace adapterops
