// CPU kernels of share_kernels::project_complement and project_complement_grouped.
//
// Every X (d, n) is cut into blocks of nb columns and at::parallel_for hands each thread a run of
// blocks (of all layers at once in the grouped op). Per block, in the compute dtype (fp32, or
// fp64 for fp64 inputs):
//   W = X[:, j:j+nb];  P = Mᵀ W (k, nb);  W -= M P (remove) or W = M P (retain);  out[:, j:j+nb] = W
// nb is chosen so that W and P stay in cache between the two products: X is read from memory
// once and out written once. W is the output block itself when X is fp32/fp64, a per-thread
// buffer when X is fp16/bf16; P is per-thread. Nothing of size d x n is allocated but out.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "projection.h"

namespace share_kernels {
namespace {

// Working set (W plus P) per block: about a core's L2 on current x86 servers, so that W is still
// in cache when the update reads it back.
constexpr int64_t kBlockBytes = 1024 * 1024;

struct Layer {
  at::Tensor X, M, out;  // M in the compute dtype
  int64_t nb;            // columns per block
  int64_t first_block;   // index of the layer's first block in the flat block range
};

int64_t block_columns(int64_t d, int64_t k, int64_t n, int64_t elem_size) {
  int64_t nb = kBlockBytes / std::max<int64_t>(1, (d + k) * elem_size);
  // With large k the two products are compute-bound: keep them wide enough to run as efficient
  // GEMMs, even if the block then lives in L3 rather than L2.
  nb = std::max<int64_t>(nb, std::min<int64_t>(k, 256));
  nb = std::clamp<int64_t>(nb / 16 * 16, 16, 1024);
  // At least four blocks per thread so that a short matrix still keeps every core busy.
  const int64_t parts = 4 * at::get_num_threads();
  const int64_t balanced = (n + parts - 1) / parts;
  nb = std::min(nb, std::max<int64_t>(16, (balanced + 15) / 16 * 16));
  return std::min(nb, std::max<int64_t>(n, 1));
}

void project_block(const Layer& l, int64_t j0, int64_t nb, Mode mode, float* w_buf, void* p_buf) {
  const int64_t d = l.X.size(0), k = l.M.size(1);
  const auto acc = l.M.options();
  const at::Tensor x_blk = l.X.narrow(1, j0, nb);
  at::Tensor out_blk = l.out.narrow(1, j0, nb);
  at::Tensor w = w_buf == nullptr ? out_blk : at::from_blob(w_buf, {d, nb}, acc);
  at::Tensor p = at::from_blob(p_buf, {k, nb}, acc);
  w.copy_(x_blk);
  at::mm_out(p, l.M.t(), w);
  if (mode == Mode::kRemove) {
    w.addmm_(l.M, p, /*beta=*/1, /*alpha=*/-1);
  } else {
    at::mm_out(w, l.M, p);
  }
  if (w_buf != nullptr) out_blk.copy_(w);
}

std::vector<at::Tensor> project(at::TensorList Xs, at::TensorList Ms, Mode mode) {
  std::vector<at::Tensor> outs;
  if (Xs.empty()) return outs;
  const at::ScalarType dtype = Xs[0].scalar_type();
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t elem_size = static_cast<int64_t>(c10::elementSize(acc));
  const bool direct = dtype == acc;  // fp32 / fp64: the output block is the work buffer

  std::vector<Layer> layers;
  std::vector<int64_t> first_blocks;
  int64_t blocks = 0, max_w = 0, max_p = 1;
  for (size_t i = 0; i < Xs.size(); ++i) {
    const int64_t d = Xs[i].size(0), n = Xs[i].size(1), k = Ms[i].size(1);
    const int64_t nb = block_columns(d, k, n, elem_size);
    // BLAS takes M row- or column-major (QR returns column-major); anything else is copied once
    // here rather than by every block's product.
    at::Tensor M = Ms[i].to(acc);
    if (M.stride(0) != 1 && M.stride(1) != 1) M = M.contiguous();
    layers.push_back({Xs[i], M, at::empty({d, n}, Xs[i].options()), nb, blocks});
    first_blocks.push_back(blocks);
    outs.push_back(layers.back().out);
    blocks += (n + nb - 1) / nb;
    max_w = std::max(max_w, d * nb);
    max_p = std::max(max_p, k * nb);
  }

  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: keep the ops on these private
    // buffers out of autograd explicitly.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<char> p_buf(max_p * elem_size);
    std::vector<float> w_buf(direct ? 0 : max_w);
    for (int64_t b = begin; b < end; ++b) {
      // Layers without columns own no blocks and share their first_block with the next layer.
      const size_t li = std::upper_bound(first_blocks.begin(), first_blocks.end(), b) - first_blocks.begin() - 1;
      const Layer& l = layers[li];
      const int64_t j0 = (b - l.first_block) * l.nb;
      project_block(l, j0, std::min(l.nb, l.X.size(1) - j0), mode, direct ? nullptr : w_buf.data(), p_buf.data());
    }
  });
  return outs;
}

at::Tensor project_complement_cpu(const at::Tensor& X, const at::Tensor& M, std::string_view mode) {
  const Mode m = parse_mode(mode);
  check_problem(X, M, c10::DeviceType::CPU);
  return project({X}, {M}, m)[0];
}

std::vector<at::Tensor> project_complement_grouped_cpu(at::TensorList Xs, at::TensorList Ms, std::string_view mode) {
  const Mode m = parse_mode(mode);
  check_group(Xs, Ms, c10::DeviceType::CPU);
  return project(Xs, Ms, m);
}

}  // namespace
}  // namespace share_kernels

TORCH_LIBRARY_IMPL(share_kernels, CPU, m) {
  m.impl("project_complement", &share_kernels::project_complement_cpu);
  m.impl("project_complement_grouped", &share_kernels::project_complement_grouped_cpu);
}
