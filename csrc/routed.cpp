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
  check_args(kForward, {{"x", x}, {"weight", weight}, {"bias", or_undefined(bias), 1},
                        {"lora_A", lora_A}, {"lora_B", lora_B, 3},
                        {"router_weight", router_weight}});
  const int64_t tokens = x.size(0), heads = lora_B.size(0), rank = lora_B.size(2);
  TORCH_CHECK(heads >= 1 && router_weight.size(0) == heads && lora_A.size(0) == rank, kForward,
              ": lora_B ", lora_B.sizes(), ", lora_A ", lora_A.sizes(), " and router_weight ",
              router_weight.sizes(), " must agree on E >= 1 heads of rank r");
  TORCH_CHECK(!top_k.has_value() || (*top_k >= 1 && *top_k <= heads), kForward, ": top_k=",
              top_k.value_or(0), " must be in [1, ", heads, "] (lora_B.shape[0] heads)");
  TORCH_CHECK(dropout <= 0 || dropout_seed.has_value(), kForward, ": dropout is ", dropout,
              " but dropout_seed is None");
  at::Tensor hl = dropout > 0
                      ? at::cat({at::mm(dropout_apply(x, *dropout_seed, dropout), lora_A.t()),
                                 at::mm(x, router_weight.t())},
                                1)
                      : at::mm(x, at::cat({lora_A, router_weight}).t()).contiguous();
  at::Tensor h = at::empty({tokens, rank}, x.options());
  at::Tensor hg = at::empty({tokens, heads * rank}, x.options());
  at::Tensor probs = at::empty({tokens, heads}, x.options().dtype(probs_dtype(x)));
  at::Tensor gates = top_k.has_value() ? at::empty_like(probs) : at::empty({0}, probs.options());
  routed_gates_forward(hl, rank, top_k.value_or(0), h, probs, gates, hg);
  at::Tensor y = low_rank_term(hg, heads_side_by_side(lora_B).t(), bias, scaling);
  y.addmm_(x, weight.t());
  return {y, h, hg, probs, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lowrank_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& grad_probs, const std::optional<at::Tensor>& x,
    const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& hg,
    const std::optional<at::Tensor>& probs, const std::optional<at::Tensor>& gates,
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& dropout_seed,
    double scaling, double dropout, bool need_x, bool need_A, bool need_B, bool need_router) {
  check_args(kBackward, {{"grad_y", grad_y}, {"x", or_undefined(x)}, {"h", or_undefined(h)},
                         {"hg", or_undefined(hg)}, {"weight", weight}, {"lora_A", lora_A},
                         {"lora_B", lora_B, 3}, {"router_weight", router_weight}});
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
  if (need_B)
    dB = scaled_mm(grad_y.t(), *hg, scaling).view({out, heads, rank}).permute({1, 0, 2}).contiguous();
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
  at::Tensor u = scaled_mm(grad_y, heads_side_by_side(lora_B), scaling);
  at::Tensor seed = at::empty({tokens, rank + heads}, grad_y.options());
  const at::Tensor gates_or_probs = has_top_k ? gates->contiguous() : probs->contiguous();
  routed_gates_backward(u, h->contiguous(), probs->contiguous(), gates_or_probs, has_top_k,
                        grad_probs.contiguous(), seed);
  if (has_dropout) {
    const at::Tensor dh = seed.narrow(1, 0, rank), dlogits = seed.narrow(1, rank, heads);
    if (need_x) {
      dx = dropout_apply(at::mm(dh, lora_A), *dropout_seed, dropout);
      dx.addmm_(dlogits, router_weight);
      dx.addmm_(grad_y, weight);
    }
    if (need_A) dA = at::mm(dh.t(), dropout_apply(*x, *dropout_seed, dropout));
    if (need_router) dWg = at::mm(dlogits.t(), *x);
    return {dx, dA, dB, dWg};
  }
  if (need_x) {
    dx = at::mm(seed, at::cat({lora_A, router_weight}));
    dx.addmm_(grad_y, weight);
  }
  if (need_A || need_router) {
    // The rows of [dA; dWg] asked for, as one GEMM. A custom op's outputs may not alias each
    // other, so dWg (E x in) is copied out when dA shares the product.
    const int64_t first = need_A ? 0 : rank, last = need_router ? rank + heads : rank;
    at::Tensor dA_Wg = at::mm(seed.narrow(1, first, last - first).t(), *x);
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
