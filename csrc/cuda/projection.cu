// CUDA kernels of share_kernels::project_complement and project_complement_grouped.
//
// Two launches per group of up to kMaxGroup layers, P in the compute dtype (fp32, or fp64):
//   project_kernel: P_s = M[rows of split s]ᵀ X[rows of split s]   (k, n) per split s
//   update_kernel:  out = X - M P (remove) or M P (retain), P = sum_s P_s, the subtraction done
//                   in the epilogue, so no d x n intermediate exists besides out.
// Splitting the rows of X (the reduction of Mᵀ X) keeps the SMs busy when n is small; the
// partial products are summed in a fixed order, so results are deterministic.
//
// Both kernels give each thread two columns of X (c0 + tid and c0 + tid + kThreads: coalesced
// loads and stores along a row) and stage the small M tiles in shared memory, where every
// thread of a warp reads the same element (broadcast; the tiles are padded by one column so that
// staging a column-major M is free of bank conflicts too). Layer descriptors travel as one
// __grid_constant__ kernel parameter, so a grouped call needs no host-to-device copy.
//
// Only device-neutral c10 headers are used (stream and guard through c10's virtual guard), so
// this file also compiles against the headers of a CPU build of torch.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../projection.h"

namespace share_kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kCols = 2 * kThreads;  // columns per CTA
constexpr int kRowsA = 16;           // rows of X staged per step of project_kernel
constexpr int kChunkB = 8;           // values of k staged per step of update_kernel
constexpr int kMaxGroup = 40;        // layers per launch: the descriptors must fit in 4 KB of parameters

// Rows of out per CTA of update_kernel (fewer for fp64 to bound the registers of the accumulator).
template <typename acc_t>
constexpr int rows_b() {
  return sizeof(acc_t) == 8 ? 16 : 32;
}

template <typename scalar_t, typename acc_t>
struct Layer {
  const scalar_t* X;  // (d, n), row stride ldx, unit column stride
  const scalar_t* M;  // (d, k), strides sm0, sm1 (QR returns column-major M: no copy for it)
  scalar_t* out;      // (d, n), contiguous
  acc_t* P;           // (splits, k, n), contiguous
  int64_t ldx, sm0, sm1;
  int d, n, k;
  int splits, rows_per_split;
  int first_cta_a, first_cta_b;  // the layer's first CTA in each kernel's flat grid
};

template <typename scalar_t, typename acc_t>
struct Group {
  Layer<scalar_t, acc_t> layer[kMaxGroup];
  int count;
  bool retain;
};
static_assert(sizeof(Group<double, double>) <= 4096, "kernel parameters are limited to 4 KB");

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Stages M[t0:t0+ROWS, r0:r0+COLS] (zero outside rows [t0, t_end) and columns [r0, k)) into
// tile[ROWS][COLS + 1], walking M along its unit stride so that the loads coalesce.
template <int ROWS, int COLS, typename scalar_t, typename acc_t>
__device__ inline void stage_m(acc_t (&tile)[ROWS][COLS + 1], const scalar_t* M, int64_t sm0, int64_t sm1, int t0,
                               int t_end, int r0, int k) {
  const bool rows_fast = sm0 == 1;  // column-major M, as torch.linalg.qr returns it
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
    const int i = rows_fast ? e % ROWS : e / COLS, c = rows_fast ? e / ROWS : e % COLS;
    const int t = t0 + i, r = r0 + c;
    tile[i][c] = t < t_end && r < k ? static_cast<acc_t>(M[t * sm0 + r * sm1]) : acc_t(0);
  }
}

// The layer a CTA belongs to: the last one whose first CTA is <= cta (layers without CTAs share
// their first CTA with the next layer and are skipped).
template <bool kUpdate, typename G>
__device__ inline int find_layer(const G& g, int cta) {
  int i = 0;
  while (i + 1 < g.count && cta >= (kUpdate ? g.layer[i + 1].first_cta_b : g.layer[i + 1].first_cta_a)) ++i;
  return i;
}

// CTA (kc, s, ct): rows [kc*KT, kc*KT + KT) of P_s over columns [ct*kCols, ct*kCols + kCols).
template <typename scalar_t, typename acc_t, int KT>
__global__ void __launch_bounds__(kThreads) project_kernel(const __grid_constant__ Group<scalar_t, acc_t> g) {
  const Layer<scalar_t, acc_t>& p = g.layer[find_layer<false>(g, blockIdx.x)];
  int local = blockIdx.x - p.first_cta_a;
  const int kchunks = ceil_div(p.k, KT);
  // Chunks of k vary fastest: CTAs that read the same columns of X run side by side and share L2.
  const int kc = local % kchunks;
  local /= kchunks;
  const int s = local % p.splits;
  const int ct = local / p.splits;
  const int r0 = kc * KT;
  const int t_begin = s * p.rows_per_split;
  const int t_end = min(p.d, t_begin + p.rows_per_split);
  const int tid = static_cast<int>(threadIdx.x);
  const int col[2] = {ct * kCols + tid, ct * kCols + kThreads + tid};

  __shared__ acc_t m_tile[kRowsA][KT + 1];
  acc_t acc[KT][2];
#pragma unroll
  for (int r = 0; r < KT; ++r) acc[r][0] = acc[r][1] = acc_t(0);

  for (int t0 = t_begin; t0 < t_end; t0 += kRowsA) {
    stage_m<kRowsA, KT>(m_tile, p.M, p.sm0, p.sm1, t0, t_end, r0, p.k);
    acc_t x[kRowsA][2];
#pragma unroll
    for (int i = 0; i < kRowsA; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int t = t0 + i;
        x[i][j] = (t < t_end && col[j] < p.n) ? static_cast<acc_t>(p.X[t * p.ldx + col[j]]) : acc_t(0);
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsA; ++i) {
#pragma unroll
      for (int r = 0; r < KT; ++r) {
        const acc_t m = m_tile[i][r];
        acc[r][0] += m * x[i][0];
        acc[r][1] += m * x[i][1];
      }
    }
    __syncthreads();
  }

  acc_t* P = p.P + static_cast<int64_t>(s) * p.k * p.n;
#pragma unroll
  for (int r = 0; r < KT; ++r) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (r0 + r < p.k && col[j] < p.n) P[static_cast<int64_t>(r0 + r) * p.n + col[j]] = acc[r][j];
    }
  }
}

// CTA (rt, ct): rows [rt*RB, rt*RB + RB) of out over columns [ct*kCols, ct*kCols + kCols).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) update_kernel(const __grid_constant__ Group<scalar_t, acc_t> g) {
  constexpr int RB = rows_b<acc_t>();
  const Layer<scalar_t, acc_t>& p = g.layer[find_layer<true>(g, blockIdx.x)];
  const int local = blockIdx.x - p.first_cta_b;
  const int rtiles = ceil_div(p.d, RB);
  // Row tiles vary fastest: CTAs that read the same columns of P run side by side and share L2.
  const int t0 = (local % rtiles) * RB;
  const int ct = local / rtiles;
  const int tid = static_cast<int>(threadIdx.x);
  const int col[2] = {ct * kCols + tid, ct * kCols + kThreads + tid};
  const int64_t split_stride = static_cast<int64_t>(p.k) * p.n;

  __shared__ acc_t m_tile[RB][kChunkB + 1];
  acc_t acc[RB][2];
#pragma unroll
  for (int i = 0; i < RB; ++i) acc[i][0] = acc[i][1] = acc_t(0);

  for (int r0 = 0; r0 < p.k; r0 += kChunkB) {
    stage_m<RB, kChunkB>(m_tile, p.M, p.sm0, p.sm1, t0, p.d, r0, p.k);
    acc_t pk[kChunkB][2];
#pragma unroll
    for (int r = 0; r < kChunkB; ++r) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        acc_t v = acc_t(0);
        if (r0 + r < p.k && col[j] < p.n) {
          const acc_t* src = p.P + static_cast<int64_t>(r0 + r) * p.n + col[j];
          for (int s = 0; s < p.splits; ++s) v += src[s * split_stride];
        }
        pk[r][j] = v;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < RB; ++i) {
#pragma unroll
      for (int r = 0; r < kChunkB; ++r) {
        const acc_t m = m_tile[i][r];
        acc[i][0] += m * pk[r][0];
        acc[i][1] += m * pk[r][1];
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < RB; ++i) {
    const int t = t0 + i;
    if (t >= p.d) break;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (col[j] >= p.n) continue;
      const acc_t v = g.retain ? acc[i][j] : static_cast<acc_t>(p.X[t * p.ldx + col[j]]) - acc[i][j];
      p.out[static_cast<int64_t>(t) * p.n + col[j]] = static_cast<scalar_t>(v);
    }
  }
}

// Splits of the rows of X for project_kernel: enough CTAs for about two waves over the SMs,
// at least 64 rows per split.
int choose_splits(int d, int k_chunks, int col_tiles, int layers, int sms) {
  const int ctas = std::max(1, k_chunks * col_tiles * layers);
  const int want = std::max(1, 2 * sms / ctas);
  return std::max(1, std::min(want, ceil_div(d, 64)));
}

void check_cuda(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "project_complement: CUDA error: ", cudaGetErrorString(err));
}

cudaStream_t current_stream(c10::Device device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(device).native_handle());
}

template <typename scalar_t, int KT>
void launch(const std::vector<at::Tensor>& Xs, const std::vector<at::Tensor>& Ms, std::vector<at::Tensor>& outs,
            size_t begin, size_t end, bool retain) {
  using acc_t = at::opmath_type<scalar_t>;
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, Xs[begin].get_device()));
  const int count = static_cast<int>(end - begin);

  Group<scalar_t, acc_t> g{};
  g.count = count;
  g.retain = retain;
  std::vector<int64_t> p_offsets;
  int64_t p_size = 0;
  int64_t ctas_a = 0, ctas_b = 0;
  for (int i = 0; i < count; ++i) {
    const at::Tensor& X = Xs[begin + i];
    auto& l = g.layer[i];
    l.d = static_cast<int>(X.size(0));
    l.n = static_cast<int>(X.size(1));
    l.k = static_cast<int>(Ms[begin + i].size(1));
    l.ldx = X.stride(0);
    l.sm0 = Ms[begin + i].stride(0);
    l.sm1 = Ms[begin + i].stride(1);
    const int k_chunks = ceil_div(l.k, KT), col_tiles = ceil_div(l.n, kCols);
    l.splits = choose_splits(l.d, k_chunks, col_tiles, count, sms);
    l.rows_per_split = ceil_div(ceil_div(std::max(l.d, 1), l.splits), kRowsA) * kRowsA;
    l.splits = ceil_div(std::max(l.d, 1), l.rows_per_split);
    l.first_cta_a = static_cast<int>(ctas_a);
    l.first_cta_b = static_cast<int>(ctas_b);
    ctas_a += static_cast<int64_t>(k_chunks) * l.splits * col_tiles;
    ctas_b += static_cast<int64_t>(ceil_div(l.d, rows_b<acc_t>())) * col_tiles;
    p_offsets.push_back(p_size);
    p_size += static_cast<int64_t>(l.splits) * l.k * l.n;
  }
  TORCH_CHECK(ctas_a < INT32_MAX && ctas_b < INT32_MAX, "project_complement: matrices too large for one launch");

  const at::Tensor P = at::empty({p_size}, Xs[begin].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  for (int i = 0; i < count; ++i) {
    auto& l = g.layer[i];
    l.X = Xs[begin + i].const_data_ptr<scalar_t>();
    l.M = Ms[begin + i].const_data_ptr<scalar_t>();
    l.out = outs[begin + i].mutable_data_ptr<scalar_t>();
    l.P = P.mutable_data_ptr<acc_t>() + p_offsets[i];
  }
  const cudaStream_t stream = current_stream(Xs[begin].device());
  if (ctas_a > 0) {
    project_kernel<scalar_t, acc_t, KT><<<static_cast<unsigned>(ctas_a), kThreads, 0, stream>>>(g);
    check_cuda(cudaGetLastError());
  }
  if (ctas_b > 0) {
    update_kernel<scalar_t, acc_t><<<static_cast<unsigned>(ctas_b), kThreads, 0, stream>>>(g);
    check_cuda(cudaGetLastError());
  }
}

std::vector<at::Tensor> project(at::TensorList Xs_in, at::TensorList Ms_in, Mode mode) {
  std::vector<at::Tensor> Xs, Ms, outs;
  if (Xs_in.empty()) return outs;
  const c10::DeviceGuard guard(Xs_in[0].device());
  int64_t k_max = 0;
  for (size_t i = 0; i < Xs_in.size(); ++i) {
    const at::Tensor& X = Xs_in[i];
    TORCH_CHECK_VALUE(X.size(0) < INT32_MAX && X.size(1) < INT32_MAX && Ms_in[i].size(1) < INT32_MAX,
                      "project_complement: dimensions must be below 2^31; got X ", X.sizes(), " and M ",
                      Ms_in[i].sizes());
    // Unit column stride keeps the loads of a warp coalesced; other layouts pay one copy.
    Xs.push_back(X.stride(1) == 1 || X.size(1) <= 1 ? X : X.contiguous());
    Ms.push_back(Ms_in[i]);
    outs.push_back(at::empty({X.size(0), X.size(1)}, X.options()));
    k_max = std::max(k_max, Ms_in[i].size(1));
  }
  const bool retain = mode == Mode::kRetain;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Xs[0].scalar_type(), "project_complement_cuda", [&] {
    for (size_t begin = 0; begin < Xs.size(); begin += kMaxGroup) {
      const size_t end = std::min(Xs.size(), begin + kMaxGroup);
      // 16 rows of P per CTA fit small k (and bound fp64 registers); 32 halve the re-reads of X.
      if constexpr (std::is_same_v<scalar_t, double>) {
        launch<scalar_t, 16>(Xs, Ms, outs, begin, end, retain);
      } else if (k_max <= 16) {
        launch<scalar_t, 16>(Xs, Ms, outs, begin, end, retain);
      } else {
        launch<scalar_t, 32>(Xs, Ms, outs, begin, end, retain);
      }
    }
  });
  return outs;
}

at::Tensor project_complement_cuda(const at::Tensor& X, const at::Tensor& M, std::string_view mode) {
  const Mode m = parse_mode(mode);
  check_problem(X, M, c10::DeviceType::CUDA);
  return project({X}, {M}, m)[0];
}

std::vector<at::Tensor> project_complement_grouped_cuda(at::TensorList Xs, at::TensorList Ms, std::string_view mode) {
  const Mode m = parse_mode(mode);
  check_group(Xs, Ms, c10::DeviceType::CUDA);
  return project(Xs, Ms, m);
}

}  // namespace
}  // namespace share_kernels

TORCH_LIBRARY_IMPL(share_kernels, CUDA, m) {
  m.impl("project_complement", &share_kernels::project_complement_cuda);
  m.impl("project_complement_grouped", &share_kernels::project_complement_grouped_cuda);
}
