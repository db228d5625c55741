// Schemas of the share_kernels extension ops, and the input checks the kernels share.
// The CPU and CUDA kernels register themselves in projection.cpp and cuda/projection.cu;
// stability_loss.cpp registers the CPU kernel that the Python stability_loss ops call.
#include <Python.h>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "projection.h"

// `import share_kernels._C` only has to load this library so that its static registrations run;
// the Python module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace share_kernels {

Mode parse_mode(std::string_view mode) {
  if (mode == "remove") return Mode::kRemove;
  TORCH_CHECK_VALUE(mode == "retain", "project_complement: mode must be \"remove\" or \"retain\"; got \"", mode,
                    "\"");
  return Mode::kRetain;
}

void check_problem(const at::Tensor& X, const at::Tensor& M, c10::DeviceType device, int64_t index) {
  const std::string x = index < 0 ? "X" : "Xs[" + std::to_string(index) + "]";
  const std::string m = index < 0 ? "M" : "Ms[" + std::to_string(index) + "]";
  TORCH_CHECK_VALUE(X.dim() == 2, "project_complement: ", x, " must be 2-D (d, n); got shape ", X.sizes());
  TORCH_CHECK_VALUE(M.dim() == 2, "project_complement: ", m, " must be 2-D (d, k); got shape ", M.sizes());
  TORCH_CHECK_VALUE(M.size(0) == X.size(0), "project_complement: ", m, " must have as many rows as ", x,
                    "; got ", x, " ", X.sizes(), " and ", m, " ", M.sizes());
  TORCH_CHECK_TYPE(X.scalar_type() == M.scalar_type(), "project_complement: ", x, " and ", m,
                   " must have the same dtype; got ", X.scalar_type(), " and ", M.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(X.scalar_type()), "project_complement: dtype ", X.scalar_type(),
                   " is not supported (use float32, float64, float16 or bfloat16)");
  TORCH_CHECK_VALUE(X.device() == M.device() && X.device().type() == device, "project_complement: ", x,
                    " and ", m, " must be on one ", c10::DeviceTypeName(device), " device; got ", X.device(),
                    " and ", M.device());
}

void check_group(at::TensorList Xs, at::TensorList Ms, c10::DeviceType device) {
  TORCH_CHECK_VALUE(Xs.size() == Ms.size(), "project_complement_grouped: Xs and Ms must have the same length; got ",
                    Xs.size(), " and ", Ms.size());
  for (size_t i = 0; i < Xs.size(); ++i) {
    check_problem(Xs[i], Ms[i], device, static_cast<int64_t>(i));
    TORCH_CHECK_TYPE(Xs[i].scalar_type() == Xs[0].scalar_type(),
                     "project_complement_grouped: all layers must share one dtype; got ", Xs[0].scalar_type(),
                     " for layer 0 and ", Xs[i].scalar_type(), " for layer ", i);
    TORCH_CHECK_VALUE(Xs[i].device() == Xs[0].device(),
                      "project_complement_grouped: all layers must be on one device; got ", Xs[0].device(),
                      " for layer 0 and ", Xs[i].device(), " for layer ", i);
  }
}

}  // namespace share_kernels

TORCH_LIBRARY(share_kernels, m) {
  // The fake kernels live in this Python module; torch imports it when it needs them.
  m.set_python_module("share_kernels.ops.project_complement");
  m.def("project_complement(Tensor X, Tensor M, str mode=\"remove\") -> Tensor");
  m.def("project_complement_grouped(Tensor[] Xs, Tensor[] Ms, str mode=\"remove\") -> Tensor[]");
  // Private: the CPU kernel behind the stability_loss ops (share_kernels/ops/stability_loss.py,
  // which owns their schemas, checks and autograd). (loss, dA, dB); dA, dB undefined (None)
  // without grad_out.
  m.def("_stability_loss_cpu(Tensor A, Tensor B, Tensor prev_delta, float alpha, Tensor? grad_out) -> (Tensor, Tensor, Tensor)");
  // Private: the CPU kernel's float tanh, exposed for its accuracy test: (tanh x, 1 - tanh² x, tanh y).
  m.def("_tanh_cpu(Tensor x, Tensor y) -> (Tensor, Tensor, Tensor)");
}
