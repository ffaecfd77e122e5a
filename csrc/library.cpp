// The `cuda` backend's ops, registered under the `adapterops` namespace. Each mirrors the
// Python custom op of the same name without `_cuda` (adapterops/ops/*.py; the in-place update
// keeps its trailing underscore: lowrank_update_ -> lowrank_update_cuda_): the same
// arguments in the same order, less `backend` (these ARE a backend), and the same outputs
// (a gradient not asked for is an empty tensor). The Python module part reports how the
// extension was built, for `python -m adapterops.info`.
#include <torch/extension.h>

#include "common.h"

TORCH_LIBRARY(adapterops, m) {
  m.def("lowrank_linear_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
        "Tensor lora_B, Tensor? lora_S, float scaling, float dropout, Tensor? dropout_seed) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("lowrank_linear_bwd_cuda(Tensor grad_y, Tensor? x, Tensor? h1, Tensor? h2, "
        "Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? lora_S, Tensor? dropout_seed, "
        "float scaling, float dropout, bool need_x, bool need_A, bool need_B, bool need_S) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("routed_lowrank_linear_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
        "Tensor lora_B, Tensor router_weight, float scaling, SymInt? top_k, float dropout, "
        "Tensor? dropout_seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("routed_lowrank_linear_bwd_cuda(Tensor grad_y, Tensor grad_probs, Tensor? x, Tensor? h, "
        "Tensor? hg, Tensor? probs, Tensor? gates, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "Tensor router_weight, Tensor? dropout_seed, float scaling, float dropout, bool need_x, "
        "bool need_A, bool need_B, bool need_router) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("hdpissa_linear_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
        "Tensor lora_B, float scaling, bool need_h) -> (Tensor, Tensor)");
  m.def("hdpissa_linear_bwd_cuda(Tensor grad_y, Tensor? x, Tensor? h, Tensor weight, "
        "Tensor lora_A, Tensor lora_B, float scaling, bool need_x, bool need_A, bool need_B) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("lowrank_update_cuda_(Tensor(a!) weight, Tensor P, Tensor Q, float scale, "
        "Tensor(b!)? copy) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "adapterops' CUDA C++ backend: importing this module registers its ops.";
#ifdef ADAPTEROPS_WITH_CUDA
  module.attr("with_cuda") = true;
  module.def("kernel_image_problem", &adapterops::kernel_image_problem, pybind11::arg("device"),
             "Empty when the CUDA kernels can run on CUDA device `device`, else why not.");
#else
  module.attr("with_cuda") = false;
#endif
}
