// Shared by every op of the `cuda` backend (adapterops._C).
//
// The ops are written once against ATen and run on CUDA tensors (cuBLAS GEMMs, the custom
// kernels in *.cu) and on CPU tensors (ATen's CPU GEMMs, the host drivers of the same kernels).
// The CPU path exists so that CI machines without a GPU run this C++ code against the float64
// reference; it is not a CPU backend. ADAPTEROPS_WITH_CUDA is defined when the CUDA sources
// are compiled in (setup.py and the just-in-time build add it); without it only the CPU
// registrations exist.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <string>

#ifdef __CUDACC__
#define ADAPTEROPS_HOST_DEVICE __host__ __device__
#else
#define ADAPTEROPS_HOST_DEVICE
#endif

// The dtypes of the `cuda` backend: fp32, fp16, bf16 (float64 runs on the torch backend, the
// test oracle). Inside, scalar_t is the dtype (AT_DISPATCH's convention).
#define ADAPTEROPS_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace adapterops {

// A row of work is split over `count` lanes: the host drivers give one lane (a serial loop),
// the CUDA kernels a warp of 32. Row functions take the lanes as a template argument, so the
// same math runs in both; `sum` and `max` combine one value per lane into the row's total and
// `sync` orders the row's global memory writes before later reads by other lanes.
struct SerialLanes {
  static constexpr int first = 0;
  static constexpr int count = 1;
  template <typename T> T sum(T value) const { return value; }
  template <typename T> T max(T value) const { return value; }
  void sync() const {}
};

ADAPTEROPS_HOST_DEVICE inline float exp_of(float v) { return ::expf(v); }

// An op's argument for `check_args`: its name, the tensor (undefined: an absent optional, not
// checked) and the number of dimensions it must have.
struct Arg {
  const char* name;
  const at::Tensor& tensor;
  int64_t ndim = 2;
};

// Every defined tensor has its ndim and the dtype and device of the first one; the error names
// the op, the argument and what it got. (The Python ops check shapes before any backend runs;
// this guards direct calls of torch.ops.adapterops.*_cuda.)
void check_args(const char* op, std::initializer_list<Arg> args);

// The adapter's dtype and device against the base's (the first argument of each group, both
// already through `check_args`): the adapter shares the base's dtype, or is fp32 on a fp16 or
// bf16 base (fp32 adapters on a 16-bit model, PEFT's default); it shares the base's device.
// Returns whether the adapter is fp32 on a 16-bit base. The error names the op and both arguments.
bool check_adapter_dtype(const char* op, const Arg& base, const Arg& adapter);

// An optional tensor argument as a tensor, undefined when absent (for `check_args`).
const at::Tensor& or_undefined(const std::optional<at::Tensor>& tensor);

// out = alpha * (a @ b): the scale is the GEMM's alpha (beta = 0: out's old contents are not read);
// alpha = 0 keeps a NaN or inf of a @ b, as 0 * (a @ b) does.
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha);

// bias + alpha * (h @ b_t), the low-rank term a base GEMM then accumulates onto (beta = 1);
// bias may be absent.
at::Tensor low_rank_term(const at::Tensor& h, const at::Tensor& b_t,
                         const std::optional<at::Tensor>& bias, double alpha);

// The non-GEMM work, on the device of its arguments (routed_gates.cpp, round_copy.cpp,
// dropout.cpp and *_cuda.cu).
void routed_gates_forward(const at::Tensor& hl, int64_t rank, int64_t top_k, at::Tensor& h,
                          at::Tensor& probs, at::Tensor& gates, at::Tensor& hg);
void routed_gates_backward(const at::Tensor& u, const at::Tensor& h, const at::Tensor& probs,
                           const at::Tensor& gates, bool has_top_k, const at::Tensor& grad_probs,
                           at::Tensor& seed);
void round_copy(const at::Tensor& source, at::Tensor& target);
// The adapter dropout of a 2-D tensor (dropout.h): t * kept * (1 / (1 - p)) in t's dtype (the
// product in fp32, rounded once), a new contiguous tensor; seed is a 1-element int64 tensor on
// t's device, read on the device for CUDA tensors (no host sync).
at::Tensor dropout_apply(const at::Tensor& t, const at::Tensor& seed, double p);

#ifdef ADAPTEROPS_WITH_CUDA
void routed_gates_forward_cuda(const at::Tensor& hl, int64_t rank, int64_t top_k, at::Tensor& h,
                               at::Tensor& probs, at::Tensor& gates, at::Tensor& hg);
void routed_gates_backward_cuda(const at::Tensor& u, const at::Tensor& h, const at::Tensor& probs,
                                const at::Tensor& gates, bool has_top_k,
                                const at::Tensor& grad_probs, at::Tensor& seed);
void round_copy_cuda(const at::Tensor& source, at::Tensor& target);
void dropout_apply_cuda(const at::Tensor& in, const at::Tensor& seed, uint32_t threshold,
                        float scale, at::Tensor& out);
// Empty when the CUDA kernels have an image for `device`, else the CUDA error (kernel_image_cuda.cu).
std::string kernel_image_problem(int64_t device);
#endif

}  // namespace adapterops
