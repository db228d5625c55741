// CPU kernel of PS-LoRA's stability loss (share_kernels::_stability_loss_cpu, called by the Python
// ops stability_loss / stability_loss_backward / stability_loss_and_grad on CPU):
//
//   L = Σ w D²,  w = 1 - tanh(αD) tanh(αP),  D = B A            A (r, d_in), B (d_out, r), P (d_out, d_in)
//   G = s (2 w D - α tanh(αP) (1 - tanh²(αD)) D²),  dA = Bᵀ G,  dB = G Aᵀ   (s: the upstream gradient)
//
// D and G are never formed whole. The rows of D are cut into chunks of a fixed size (a function of
// the shape only), one chunk per task of at::parallel_for; inside a chunk the columns go in tiles
// of kTile, and per (row, tile) one pass builds D's tile in an L1 buffer (r axpys from A's rows),
// one fused loop turns it into the loss partial and G in place, and r dots / r axpys add G's share
// to dB's row and to the chunk's dA partial. The chunks' loss partials (double) and dA partials
// are summed in chunk order at the end, so the result is the same bits for every thread count.
// Everything is fp32 (fp16 / bf16 inputs are upcast: A and B once, P per chunk); fp64 inputs stay
// on the Python reference.
//
// tanh is our own branch-free float implementation (tanh_sech2 below) so that the fused loop
// vectorizes; x86-64 Linux builds with GCC carry AVX-512 and AVX2+FMA (x86-64-v3) clones of the loops,
// picked at load time (the clones' reduction orders differ: results are bitwise reproducible per machine).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define SK_TARGET_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define SK_TARGET_CLONES
#endif
#define SK_INLINE inline __attribute__((always_inline))

namespace share_kernels {
namespace {

// Columns per tile: D's tile and the tiles of A and of the dA partial (r rows each) stay in L1/L2.
constexpr int64_t kTile = 256;
// Elements of D per chunk (the unit of parallel work and of one dA partial).
constexpr int64_t kChunkElements = int64_t{1} << 16;

// Below this |x| tanh is an odd polynomial, above it 1 - 2 / (1 + e^{2|x|}).
constexpr float kPolyLimit = 0.5f;
// tanh(x) = x + x s q(s), s = x², |x| < 0.5: q fitted (iteratively reweighted least squares on the
// relative error, numpy, 2e4 points) to (tanh(x) - x) / x³; its own error is 4e-9 relative.
constexpr float kT0 = -0.333333283662796f, kT1 = 0.13332964479923248f, kT2 = -0.05389920249581337f,
                kT3 = 0.021298058331012726f, kT4 = -0.0066476077772676945f;
// e^f = 1 + f + f² p(f), |f| <= ln2 / 2: p fitted the same way to (e^f - 1 - f) / f², 3e-9 relative.
constexpr float kE0 = 0.4999999403953552f, kE1 = 0.1666652113199234f, kE2 = 0.04166838899254799f,
                kE3 = 0.008368701674044132f, kE4 = 0.0013814562698826194f;
constexpr float kLog2e = 1.44269504088896341f;
// ln 2 split in two: n * kLn2Hi is exact for the n <= 127 that occur (kLn2Hi has 16 significant bits).
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
// 2|x| is clamped here: e^88 * e^(ln2 / 2) < FLT_MAX, and 1 - tanh² = 4 e^-88 is already below FLT_MIN.
constexpr float kExpArgMax = 88.0f;

SK_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// t = tanh(x) and c = 1 - tanh²(x), each to ~2e-7 relative for every float x (c: while it is a normal
// float, |x| < 43.5; beyond, c < 1e-37); NaN gives NaN.
// Both branches are computed and one selected, so a loop over this vectorizes. c comes from
// (1 - t)(1 + t) with 1 - t = 2 / (1 + e^{2|x|}) exact-ish, not from 1 - t² (which cancels).
SK_INLINE void tanh_sech2(float x, float& t, float& c) {
  const float ax = std::fabs(x);
  // polynomial branch
  const float s = ax * ax;
  const float q = kT0 + s * (kT1 + s * (kT2 + s * (kT3 + s * kT4)));
  const float t_poly = ax + ax * (s * q);
  // exponential branch: y = 2|x| = n ln2 + f, e^y = 2^n e^f
  float y = 2.0f * ax;
  y = y < kExpArgMax ? y : kExpArgMax;  // also maps NaN to a finite value: NaN is restored below
  const float n = (y * kLog2e + 12582912.0f) - 12582912.0f;  // round to nearest (|y log2e| < 2^22)
  const float f = (y - n * kLn2Hi) - n * kLn2Lo;
  const float ef = 1.0f + f + (f * f) * (kE0 + f * (kE1 + f * (kE2 + f * (kE3 + f * kE4))));
  const float e = ef * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  const float u = 2.0f / (1.0f + e);  // 1 - tanh|x|
  const bool poly = ax < kPolyLimit;
  const float ta = poly ? t_poly : 1.0f - u;
  const float ca = poly ? 1.0f - t_poly * t_poly : u * (2.0f - u);
  const bool nan = x != x;
  t = nan ? x : std::copysign(ta, x);
  c = nan ? x : ca;
}

struct Problem {
  const float* A;  // (r, d_in) contiguous
  const float* B;  // (d_out, r) contiguous
  int64_t r, d_in;
  float alpha, scale;  // scale: the upstream gradient
};

// One chunk of rows [i0, i0 + rows): P points at the chunk's first row (row stride ldp). Adds the
// chunk's loss to *loss; with dB (chunk's rows, (rows, r) contiguous) and dA (the chunk's own
// (r, d_in) partial, zeroed) also writes the gradients. buf: kTile floats.
SK_TARGET_CLONES
void chunk_kernel(const Problem& pb, int64_t i0, int64_t rows, const float* P, int64_t ldp, double* loss, float* dA,
                  float* dB, float* buf) {
  const int64_t r = pb.r, d_in = pb.d_in;
  const float alpha = pb.alpha, scale = pb.scale;
  double total = 0.0;
  for (int64_t j0 = 0; j0 < d_in; j0 += kTile) {
    const int64_t nj = std::min(kTile, d_in - j0);
    const float* A = pb.A + j0;
    for (int64_t i = 0; i < rows; ++i) {
      const float* b = pb.B + (i0 + i) * r;
      const float* p = P + i * ldp + j0;
      float* d = buf;
      for (int64_t j = 0; j < nj; ++j) d[j] = 0.0f;
      for (int64_t k = 0; k < r; ++k) {
        const float bk = b[k];
        const float* a = A + k * d_in;
        for (int64_t j = 0; j < nj; ++j) d[j] += bk * a[j];
      }
      float part = 0.0f;
      if (dA == nullptr) {
#pragma omp simd reduction(+ : part)
        for (int64_t j = 0; j < nj; ++j) {
          float td, cd, tp, cp;
          tanh_sech2(alpha * d[j], td, cd);
          tanh_sech2(alpha * p[j], tp, cp);
          part += (1.0f - td * tp) * (d[j] * d[j]);
        }
        total += part;
        continue;
      }
#pragma omp simd reduction(+ : part)
      for (int64_t j = 0; j < nj; ++j) {
        float td, cd, tp, cp;
        const float dj = d[j];
        tanh_sech2(alpha * dj, td, cd);
        tanh_sech2(alpha * p[j], tp, cp);
        const float w = 1.0f - td * tp;
        const float d2 = dj * dj;
        part += w * d2;
        d[j] = scale * (2.0f * w * dj - alpha * tp * cd * d2);
      }
      total += part;
      float* db = dB + i * r;
      for (int64_t k = 0; k < r; ++k) {
        const float* a = A + k * d_in;
        float* da = dA + k * d_in + j0;
        const float bk = b[k];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < nj; ++j) {
          dot += d[j] * a[j];
          da[j] += bk * d[j];
        }
        db[k] += dot;
      }
    }
  }
  *loss += total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stability_loss_cpu(const at::Tensor& A_in, const at::Tensor& B_in,
                                                                  const at::Tensor& P_in, double alpha,
                                                                  const std::optional<at::Tensor>& grad_out) {
  TORCH_CHECK_VALUE(A_in.dim() == 2 && B_in.dim() == 2 && P_in.dim() == 2 && B_in.size(1) == A_in.size(0) &&
                        P_in.size(0) == B_in.size(0) && P_in.size(1) == A_in.size(1),
                    "_stability_loss_cpu: expected A (r, d_in), B (d_out, r), prev_delta (d_out, d_in); got A ",
                    A_in.sizes(), ", B ", B_in.sizes(), ", prev_delta ", P_in.sizes());
  for (const at::Tensor* t : {&A_in, &B_in, &P_in}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf ||
                         t->scalar_type() == at::kBFloat16,
                     "_stability_loss_cpu: dtype ", t->scalar_type(), " is not supported (float32, float16, bfloat16)");
    TORCH_CHECK_VALUE(t->device().is_cpu(), "_stability_loss_cpu: expected CPU tensors; got ", t->device());
  }
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0, "_stability_loss_cpu: alpha must be finite and >= 0; got ",
                    alpha);
  at::NoGradGuard no_grad;
  const int64_t r = A_in.size(0), d_in = A_in.size(1), d_out = B_in.size(0);
  const at::Tensor A = A_in.to(at::kFloat).contiguous();
  const at::Tensor B = B_in.to(at::kFloat).contiguous();
  const bool with_grad = grad_out.has_value();
  const float scale = with_grad ? grad_out->item<float>() : 1.0f;
  // P is read in place when its rows are fp32 and contiguous, else converted one chunk at a time.
  const bool direct = P_in.scalar_type() == at::kFloat && (P_in.stride(1) == 1 || d_in <= 1);
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(d_in, 1));
  const int64_t chunks = d_out == 0 ? 0 : (d_out + chunk_rows - 1) / chunk_rows;

  std::vector<double> losses(chunks, 0.0);
  at::Tensor dA_parts = with_grad ? at::zeros({std::max<int64_t>(chunks, 1), r, d_in}, A.options()) : at::Tensor();
  at::Tensor dB = with_grad ? at::zeros({d_out, r}, A.options()) : at::Tensor();
  const Problem pb{A.data_ptr<float>(), B.data_ptr<float>(), r, d_in, static_cast<float>(alpha), scale};

  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<float> buf(kTile);
    at::Tensor p_buf;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t i0 = c * chunk_rows, rows = std::min(chunk_rows, d_out - i0);
      const float* P;
      int64_t ldp;
      if (direct) {
        P = P_in.data_ptr<float>() + i0 * P_in.stride(0);
        ldp = P_in.stride(0);
      } else {
        if (!p_buf.defined()) p_buf = at::empty({chunk_rows, d_in}, A.options());
        at::Tensor blk = p_buf.narrow(0, 0, rows);
        blk.copy_(P_in.narrow(0, i0, rows));
        P = blk.data_ptr<float>();
        ldp = d_in;
      }
      chunk_kernel(pb, i0, rows, P, ldp, &losses[c], with_grad ? dA_parts[c].data_ptr<float>() : nullptr,
                   with_grad ? dB.data_ptr<float>() + i0 * r : nullptr, buf.data());
    }
  });

  double total = 0.0;
  for (double l : losses) total += l;  // chunk order: the same sum for every thread count
  at::Tensor loss = at::scalar_tensor(total, A.options());
  if (!with_grad) return {loss, at::Tensor(), at::Tensor()};
  at::Tensor dA = dA_parts[0];
  for (int64_t c = 1; c < chunks; ++c) dA.add_(dA_parts[c]);
  return {loss, dA.to(A_in.scalar_type()), dB.to(B_in.scalar_type())};
}

// tanh(x) and 1 - tanh²(x) of an fp32 tensor by the kernel's own tanh_sech2 (for the tests).
SK_TARGET_CLONES
void tanh_loop(const float* x, float* t, float* c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) tanh_sech2(x[i], t[i], c[i]);
}

std::tuple<at::Tensor, at::Tensor> tanh_cpu(const at::Tensor& x_in) {
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat, "_tanh_cpu: x must be float32; got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  at::Tensor t = at::empty_like(x), c = at::empty_like(x);
  tanh_loop(x.data_ptr<float>(), t.data_ptr<float>(), c.data_ptr<float>(), x.numel());
  return {t, c};
}

}  // namespace
}  // namespace share_kernels

TORCH_LIBRARY_IMPL(share_kernels, CPU, m) {
  m.impl("_stability_loss_cpu", &share_kernels::stability_loss_cpu);
  m.impl("_tanh_cpu", &share_kernels::tanh_cpu);
}
