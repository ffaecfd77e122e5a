// The routed op's non-GEMM work, one token (row) at a time, written once for the host driver
// (routed_gates.cpp, one lane) and the CUDA kernels (routed_gates_cuda.cu, a warp of 32 lanes per
// row); see `SerialLanes` in common.h. scalar_t is the op's dtype, acc_t its compute type
// (fp32), in which the probabilities and gates are stored.
//
// Forward, from hl = [h | logits] = x [A; Wg]^T (one GEMM):
//     p = softmax(logits),  g = p or its top_k (k largest kept, not renormalised, ties to the
//     lower head),  hg = [g_0 h | ... | g_{E-1} h]  (rounded to scalar_t)
// Backward, from u = s dY [B_0 | ... | B_{E-1}] (one GEMM):
//     dh = Σ_e g_e u_e,  dg_e = <u_e, h> (0 for a dropped head),  dp = dg + dprobs,
//     dlogits = p * (dp - <p, dp>),  seed = [dh | dlogits]  (rounded to scalar_t)
#pragma once

#include "common.h"

namespace adapterops {

template <typename scalar_t, typename acc_t, typename Lanes>
ADAPTEROPS_HOST_DEVICE void routed_gates_forward_row(
    const Lanes& lanes, const scalar_t* hl, int64_t rank, int64_t heads, int64_t top_k,
    scalar_t* h, acc_t* probs, acc_t* gates, scalar_t* hg) {
  const scalar_t* logits = hl + rank;
  acc_t largest = static_cast<acc_t>(logits[0]);
  for (int64_t e = lanes.first; e < heads; e += lanes.count)
    largest = largest > static_cast<acc_t>(logits[e]) ? largest : static_cast<acc_t>(logits[e]);
  largest = lanes.max(largest);
  acc_t total = 0;
  for (int64_t e = lanes.first; e < heads; e += lanes.count)
    total += exp_of(static_cast<acc_t>(logits[e]) - largest);
  total = lanes.sum(total);
  for (int64_t e = lanes.first; e < heads; e += lanes.count)
    probs[e] = exp_of(static_cast<acc_t>(logits[e]) - largest) / total;
  lanes.sync();
  if (top_k > 0) {
    // Head e is kept when fewer than top_k heads precede it in the order (p descending, head
    // index ascending): a stable sort's order, so ties go to the lower head.
    for (int64_t e = lanes.first; e < heads; e += lanes.count) {
      int64_t ahead = 0;
      for (int64_t j = 0; j < heads; ++j)
        ahead += (probs[j] > probs[e]) || (probs[j] == probs[e] && j < e);
      gates[e] = ahead < top_k ? probs[e] : acc_t(0);
    }
    lanes.sync();
  }
  const acc_t* kept = top_k > 0 ? gates : probs;
  // hg[e r + j] = g_e h_j over the flat index i = e r + j, lane-strided; (e, j) advance by the
  // stride's own (quotient, remainder) so no element pays an integer division.
  const int64_t step_e = lanes.count / rank, step_j = lanes.count % rank;
  int64_t e = lanes.first / rank, j = lanes.first % rank;
  for (int64_t i = lanes.first; i < heads * rank; i += lanes.count) {
    hg[i] = static_cast<scalar_t>(kept[e] * static_cast<acc_t>(hl[j]));
    e += step_e;
    j += step_j;
    if (j >= rank) {
      j -= rank;
      ++e;
    }
  }
  for (int64_t k = lanes.first; k < rank; k += lanes.count) h[k] = hl[k];
}

// dp_e = dg_e (0 for a head top-k dropped) + dprobs_e.
template <typename scalar_t, typename acc_t>
ADAPTEROPS_HOST_DEVICE acc_t routed_gate_grad(const scalar_t* u, const scalar_t* h, int64_t rank,
                                              int64_t e, const acc_t* gates, bool has_top_k,
                                              const acc_t* grad_probs) {
  acc_t dg = 0;
  if (!has_top_k || gates[e] != acc_t(0))
    for (int64_t j = 0; j < rank; ++j)
      dg += static_cast<acc_t>(u[e * rank + j]) * static_cast<acc_t>(h[j]);
  return dg + grad_probs[e];
}

template <typename scalar_t, typename acc_t, typename Lanes>
ADAPTEROPS_HOST_DEVICE void routed_gates_backward_row(
    const Lanes& lanes, const scalar_t* u, const scalar_t* h, const acc_t* probs,
    const acc_t* gates, bool has_top_k, const acc_t* grad_probs, int64_t rank, int64_t heads,
    scalar_t* seed) {
  const acc_t* kept = has_top_k ? gates : probs;
  for (int64_t j = lanes.first; j < rank; j += lanes.count) {
    acc_t dh = 0;
    for (int64_t e = 0; e < heads; ++e) dh += kept[e] * static_cast<acc_t>(u[e * rank + j]);
    seed[j] = static_cast<scalar_t>(dh);
  }
  acc_t p_dot_dp = 0;
  for (int64_t e = lanes.first; e < heads; e += lanes.count)
    p_dot_dp += probs[e] * routed_gate_grad(u, h, rank, e, gates, has_top_k, grad_probs);
  p_dot_dp = lanes.sum(p_dot_dp);
  // dp_e again rather than kept from the first loop: a lane holds a variable number of heads,
  // and recomputing costs E r multiply-adds per token, nothing next to the GEMMs.
  for (int64_t e = lanes.first; e < heads; e += lanes.count) {
    acc_t dp = routed_gate_grad(u, h, rank, e, gates, has_top_k, grad_probs);
    seed[rank + e] = static_cast<scalar_t>(probs[e] * (dp - p_dot_dp));
  }
}

}  // namespace adapterops
