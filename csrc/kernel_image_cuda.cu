// Whether this library's CUDA kernels can run on a device. Every *_cuda.cu is compiled for the
// same TORCH_CUDA_ARCH_LIST, so one probe kernel answers for all: without a cubin for the
// device's architecture or PTX it can compile, launches would fail with "no kernel image is
// available", and the Python backend declines the device up front instead.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <string>

#include "common.h"

namespace adapterops {
namespace {

__global__ void probe_kernel() {}

}  // namespace

std::string kernel_image_problem(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (status == cudaSuccess) return "";
  (void)cudaGetLastError();  // not sticky: clear it so later CUDA calls do not report it
  return cudaGetErrorString(status);
}

}  // namespace adapterops
