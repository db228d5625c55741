// share_kernels::project_complement: declarations shared by the CPU (projection.cpp) and CUDA
// (cuda/projection.cu) kernels. Plain C++: nvcc and the host compiler both include it.
#pragma once

#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>

namespace share_kernels {

// remove: X - M (Mᵀ X);  retain: M (Mᵀ X).
enum class Mode { kRemove, kRetain };

// ValueError for anything but "remove" / "retain".
Mode parse_mode(std::string_view mode);

// ValueError / TypeError (c10::ValueError, c10::TypeError) unless X is (d, n), M is (d, k), both
// one floating dtype on one device of type `device`. `index` >= 0 names the layer of a grouped call.
void check_problem(const at::Tensor& X, const at::Tensor& M, c10::DeviceType device, int64_t index = -1);

// The same for every pair of a grouped call (equal list lengths, one dtype and device for all).
void check_group(at::TensorList Xs, at::TensorList Ms, c10::DeviceType device);

}  // namespace share_kernels
