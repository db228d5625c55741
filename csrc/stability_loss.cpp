// CPU kernel of PS-LoRA's stability loss (share_kernels::_stability_loss_cpu, called by the Python
// ops stability_loss / stability_loss_backward / stability_loss_and_grad on CPU):
//
//   L = Σ w D²,  w = 1 - tanh(αD) tanh(αP),  D = B A            A (r, d_in), B (d_out, r), P (d_out, d_in)
//   G = s (2 w D - α tanh(αP) (1 - tanh²(αD)) D²),  dA = Bᵀ G,  dB = G Aᵀ   (s: the upstream gradient)
//
// D and G are never formed whole. The rows of D are cut into chunks of about kChunkElements
// elements, and the chunks into at most kMaxSlots contiguous runs ("slots", the tasks of
// at::parallel_for), both a function of the shape only. A slot runs its chunks in order into its
// own loss (double) and dA partial; inside a chunk the columns go in tiles of kTile, and per block
// of kRows rows and tile one pass builds D's tile in an L1 buffer from A's rows, one fused loop
// turns it into the loss and G in place, and one pass per rank adds G's share to the dA partial and
// to dB's dots. The slots' partials are summed in slot order at the end, so the result is the same
// bits for every thread count; the partials cost at most kMaxSlots x r x d_in floats.
// Everything is fp32 (fp16 / bf16 inputs are upcast: A and B once, P per chunk); fp64 inputs stay
// on the Python reference.
//
// tanh is our own branch-free float implementation (tanh_pair below) so that the fused loop
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
// Elements of D per chunk, and at most this many rows (bounds the chunk's dB scratch and, for
// fp16 / bf16 or strided P, its fp32 copy of P).
constexpr int64_t kChunkElements = int64_t{1} << 16;
constexpr int64_t kMaxChunkRows = 256;
// Most units of parallel work, each with its own (r, d_in) fp32 dA partial.
constexpr int64_t kMaxSlots = 16;

// e^f = 1 + f + f² p(f), |f| <= ln2 / 2: p fitted (iteratively reweighted least squares on the
// relative error of e^f, numpy, 2e4 points) to (e^f - 1 - f) / f²; its own error is 3e-9 relative.
constexpr float kE0 = 0.4999999403953552f, kE1 = 0.1666652113199234f, kE2 = 0.04166838899254799f,
                kE3 = 0.008368701674044132f, kE4 = 0.0013814562698826194f;
constexpr float kLog2e = 1.44269504088896341f;
// ln 2 split in two: n * kLn2Hi is exact for the |n| <= 127 that occur (kLn2Hi has 16 significant bits).
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
// |x| is clamped here: e^-87 is still a normal float, and 1 - tanh² = 4 e^-87 < 1e-37 beyond.
constexpr float kAbsMax = 43.5f;

SK_INLINE float bits_to_float(uint32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

SK_INLINE uint32_t float_to_bits(float f) {
  uint32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// 1.5 * 2^23: adding it to a float of magnitude < 2^22 rounds that to an integer n, held in the
// sum's low mantissa bits (bits(kRound + n) = bits(kRound) + n).
constexpr float kRound = 12582912.0f;

constexpr uint32_t kSignBit = 0x80000000u, kAbsMask = 0x7fffffffu, kInfBits = 0x7f800000u, kNaNBits = 0x7fc00000u;

// For |x| given by its bits (sign cleared): m = e^y - 1 (expm1, to ~1e-7 relative for every y, tiny
// ones included) and e = e^y, y = -2|x|. |x| is clamped to kAbsMax by an integer min on its bits
// (inf and NaN included: the caller restores NaN). y = n ln2 + f with |f| <= ln2 / 2,
// e^y = 2^n (1 + q), q = f + f² p(f), and m = 2^n q + (2^n - 1): for n = 0 that is q itself (no
// cancellation near 0), for n < 0 the result is below -0.29 and the sum loses nothing. 2^n is built
// from n's bits in the rounded float. Only arithmetic and an integer min (no float compare whose
// select GCC could turn into a branch): a loop over it vectorizes on every x86 level.
SK_INLINE void expm1_neg(uint32_t abs_bits, float& m, float& e) {
  const float ax = bits_to_float(std::min(abs_bits, float_to_bits(kAbsMax)));
  const float y = -2.0f * ax;
  const float rounded = y * kLog2e + kRound;
  const float n = rounded - kRound;
  const float f = (y - n * kLn2Hi) - n * kLn2Lo;
  const float q = f + (f * f) * (kE0 + f * (kE1 + f * (kE2 + f * (kE3 + f * kE4))));
  const float s = bits_to_float((float_to_bits(rounded) - float_to_bits(kRound) + 127u) << 23);  // 2^n
  m = s * q + (s - 1.0f);
  e = s + s * q;
}

// A quiet NaN's bits if |x| (given by its bits) is NaN, else 0. Sign arithmetic rather than a
// compare: with a compare GCC threads the NaN case through expm1_neg's clamp into a branch, and the
// loop no longer vectorizes for AVX2.
SK_INLINE uint32_t nan_bits(uint32_t abs_bits) {
  return static_cast<uint32_t>(static_cast<int32_t>(kInfBits - abs_bits) >> 31) & kNaNBits;
}

// Two tanh at once, sharing one division: td = tanh(xd), cd = 1 - tanh²(xd), tp = tanh(xp), each
// to ~3e-7 relative for every float (cd: while |xd| < 43.5; beyond, cd < 1e-37); NaN gives NaN
// (in that output only). With m = e^{-2|x|} - 1 and v = 1 / (2 + m):  tanh|x| = -m v,
// 1 - tanh² = 4 e^{-2|x|} v²  ((1 - t)(1 + t) written without cancellation). 2 + m lies in [1, 2],
// so the one reciprocal of (2 + m_d)(2 + m_p) gives both v. Signs and NaN go in as bits.
SK_INLINE void tanh_pair(float xd, float xp, float& td, float& cd, float& tp) {
  const uint32_t bd = float_to_bits(xd), bp = float_to_bits(xp);
  const uint32_t ad = bd & kAbsMask, ap = bp & kAbsMask;
  const uint32_t nan_d = nan_bits(ad), nan_p = nan_bits(ap);
  float md, ed, mp, ep;
  expm1_neg(ad, md, ed);
  expm1_neg(ap, mp, ep);
  const float wd = 2.0f + md, wp = 2.0f + mp;
  const float inv = 1.0f / (wd * wp);
  const float vd = inv * wp;
  td = bits_to_float((float_to_bits(md * vd) & kAbsMask) | (bd & kSignBit) | nan_d);
  tp = bits_to_float((float_to_bits(mp * (inv * wd)) & kAbsMask) | (bp & kSignBit) | nan_p);
  cd = bits_to_float(float_to_bits(4.0f * ed * (vd * vd)) | nan_d);
}

// Rows of D per register block: their D tiles share the loads of A, their dA updates one
// load / store of the dA tile.
constexpr int64_t kRows = 4;
// Lanes of the register-blocked loops (one AVX-512 register, two AVX2 ones).
constexpr int64_t kLanes = 16;

struct Problem {
  const float* A;  // (r, lda), columns d_in..lda zero
  const float* B;  // (d_out, r) contiguous
  int64_t r, d_in, lda;
  float alpha, scale;  // scale: the upstream gradient
  bool grad;           // whether to compute dA and dB
};

// One chunk of rows [i0, i0 + rows): P points at the chunk's first row (row stride ldp). Adds the
// chunk's loss to *loss. With gradients (pb.grad): adds to dA, the (r, lda) partial of the chunk's
// run; writes dB, the chunk's rows of dB ((rows, r) contiguous); lanes (rows, r, kLanes) is zeroed
// scratch for dB's dots (their lanes are summed once per chunk, not once per tile).
// buf: kRows x kTile floats.
SK_TARGET_CLONES
void chunk_kernel(const Problem& pb, int64_t i0, int64_t rows, const float* P, int64_t ldp, double* loss,
                  float* __restrict dA, float* __restrict dB, float* __restrict lanes, float* __restrict buf) {
  const int64_t r = pb.r, d_in = pb.d_in, lda = pb.lda;
  const float alpha = pb.alpha, scale = pb.scale;
  const bool grad = pb.grad;
  double total = 0.0;
  for (int64_t j0 = 0; j0 < d_in; j0 += kTile) {
    const int64_t nj = std::min(kTile, d_in - j0);
    const int64_t njp = (nj + kLanes - 1) / kLanes * kLanes;  // A's zero columns pad the last tile
    const float* A = pb.A + j0;
    for (int64_t ib = 0; ib < rows; ib += kRows) {
      const int64_t nr = std::min(kRows, rows - ib);
      // B's rows of the block; rows past the chunk's end are zero (their D and G are zero).
      float b[kRows][64];
      for (int64_t k0 = 0; k0 < r; k0 += 64) {
        // r > 64 runs in slices of 64 ranks; D accumulates over the slices in buf.
        const int64_t kn = std::min<int64_t>(64, r - k0);
        for (int64_t ii = 0; ii < kRows; ++ii)
          for (int64_t k = 0; k < kn; ++k) b[ii][k] = ii < nr ? pb.B[(i0 + ib + ii) * r + k0 + k] : 0.0f;
        for (int64_t jb = 0; jb < njp; jb += kLanes) {
          float acc[kRows][kLanes];
          for (int64_t ii = 0; ii < kRows; ++ii)
            for (int64_t l = 0; l < kLanes; ++l) acc[ii][l] = k0 == 0 ? 0.0f : buf[ii * kTile + jb + l];
          for (int64_t k = 0; k < kn; ++k) {
            const float* a = A + (k0 + k) * lda + jb;
            for (int64_t ii = 0; ii < kRows; ++ii) {
              const float bk = b[ii][k];
#pragma omp simd
              for (int64_t l = 0; l < kLanes; ++l) acc[ii][l] += bk * a[l];
            }
          }
          for (int64_t ii = 0; ii < kRows; ++ii)
            for (int64_t l = 0; l < kLanes; ++l) buf[ii * kTile + jb + l] = acc[ii][l];
        }
      }
      // The fused elementwise pass: loss, and G in place of D.
      for (int64_t ii = 0; ii < nr; ++ii) {
        float* d = buf + ii * kTile;
        const float* p = P + (ib + ii) * ldp + j0;
        float part = 0.0f;
        if (!grad) {
#pragma omp simd reduction(+ : part)
          for (int64_t j = 0; j < nj; ++j) {
            float td, cd, tp;
            tanh_pair(alpha * d[j], alpha * p[j], td, cd, tp);
            part += (1.0f - td * tp) * (d[j] * d[j]);
          }
        } else {
#pragma omp simd reduction(+ : part)
          for (int64_t j = 0; j < nj; ++j) {
            float td, cd, tp;
            const float dj = d[j];
            tanh_pair(alpha * dj, alpha * p[j], td, cd, tp);
            const float w = 1.0f - td * tp;
            const float d2 = dj * dj;
            part += w * d2;
            d[j] = scale * (2.0f * w * dj - alpha * tp * cd * d2);
          }
          for (int64_t j = nj; j < njp; ++j) d[j] = 0.0f;
        }
        total += part;
      }
      if (!grad) continue;
      for (int64_t ii = nr; ii < kRows; ++ii)
        for (int64_t j = 0; j < njp; ++j) buf[ii * kTile + j] = 0.0f;
      // dA += Bᵀ G and dB's dots G Aᵀ, per rank: one pass over the tile of A and of dA.
      for (int64_t k = 0; k < r; ++k) {
        const float* a = A + k * lda;
        float* da = dA + k * lda + j0;
        float bk[kRows];
        for (int64_t ii = 0; ii < kRows; ++ii) bk[ii] = ii < nr ? pb.B[(i0 + ib + ii) * r + k] : 0.0f;
        float dot[kRows][kLanes] = {};
        for (int64_t jb = 0; jb < njp; jb += kLanes) {
          float upd[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) upd[l] = da[jb + l];
          for (int64_t ii = 0; ii < kRows; ++ii) {
            const float* g = buf + ii * kTile + jb;
            const float bi = bk[ii];
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) {
              dot[ii][l] += g[l] * a[jb + l];
              upd[l] += bi * g[l];
            }
          }
          for (int64_t l = 0; l < kLanes; ++l) da[jb + l] = upd[l];
        }
        for (int64_t ii = 0; ii < nr; ++ii) {
          float* ln = lanes + ((ib + ii) * r + k) * kLanes;
          for (int64_t l = 0; l < kLanes; ++l) ln[l] += dot[ii][l];
        }
      }
    }
  }
  *loss += total;
  if (!grad) return;
  for (int64_t q = 0; q < rows * r; ++q) {
    const float* ln = lanes + q * kLanes;
    float s = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) s += ln[l];
    dB[q] = s;
  }
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
  const int64_t lda = (d_in + kLanes - 1) / kLanes * kLanes;
  const auto f32 = A_in.options().dtype(at::kFloat);
  at::Tensor A = at::zeros({r, lda}, f32);
  A.narrow(1, 0, d_in).copy_(A_in);
  const at::Tensor B = B_in.to(at::kFloat).contiguous();
  const bool with_grad = grad_out.has_value();
  const float scale = with_grad ? grad_out->item<float>() : 1.0f;
  // P is read in place when its rows are fp32 and contiguous, else converted one chunk at a time.
  const bool direct = P_in.scalar_type() == at::kFloat && (P_in.stride(1) == 1 || d_in <= 1);
  const int64_t chunk_rows = std::clamp<int64_t>(kChunkElements / std::max<int64_t>(d_in, 1), 1, kMaxChunkRows);
  const int64_t chunks = d_out == 0 ? 0 : (d_out + chunk_rows - 1) / chunk_rows;

  const int64_t slots = std::min(chunks, kMaxSlots);  // slot s runs chunks [s chunks / slots, (s + 1) chunks / slots)

  std::vector<double> losses(slots, 0.0);
  at::Tensor dA_parts = with_grad ? at::zeros({std::max<int64_t>(slots, 1), r, lda}, f32) : at::Tensor();
  at::Tensor dB = with_grad ? at::empty({d_out, r}, f32) : at::Tensor();
  const Problem pb{A.data_ptr<float>(), B.data_ptr<float>(), r, d_in, lda, static_cast<float>(alpha), scale, with_grad};

  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<float> buf(kRows * kTile);
    std::vector<float> lanes;
    at::Tensor p_buf;
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t c = slot * chunks / slots; c < (slot + 1) * chunks / slots; ++c) {
        const int64_t i0 = c * chunk_rows, rows = std::min(chunk_rows, d_out - i0);
        const float* P;
        int64_t ldp;
        if (direct) {
          P = P_in.data_ptr<float>() + i0 * P_in.stride(0);
          ldp = P_in.stride(0);
        } else {
          if (!p_buf.defined()) p_buf = at::empty({chunk_rows, d_in}, f32);
          at::Tensor blk = p_buf.narrow(0, 0, rows);
          blk.copy_(P_in.narrow(0, i0, rows));
          P = blk.data_ptr<float>();
          ldp = d_in;
        }
        if (with_grad) lanes.assign(rows * r * kLanes, 0.0f);
        chunk_kernel(pb, i0, rows, P, ldp, &losses[slot], with_grad ? dA_parts[slot].data_ptr<float>() : nullptr,
                     with_grad ? dB.data_ptr<float>() + i0 * r : nullptr, lanes.data(), buf.data());
      }
    }
  });

  double total = 0.0;
  for (double l : losses) total += l;  // slot order: the same sum for every thread count
  at::Tensor loss = at::scalar_tensor(total, f32);
  if (!with_grad) return {loss, at::Tensor(), at::Tensor()};
  at::Tensor dA = dA_parts[0];
  for (int64_t c = 1; c < slots; ++c) dA.add_(dA_parts[c]);
  return {loss, dA.narrow(1, 0, d_in).to(A_in.scalar_type(), /*non_blocking=*/false, /*copy=*/true).contiguous(),
          dB.to(B_in.scalar_type())};
}

// The kernel's tanh_pair over two fp32 tensors of one shape (for the tests): (tanh x, 1 - tanh² x, tanh y).
SK_TARGET_CLONES
void tanh_loop(const float* x, const float* y, float* t, float* c, float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) tanh_pair(x[i], y[i], t[i], c[i], u[i]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tanh_cpu(const at::Tensor& x_in, const at::Tensor& y_in) {
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat && y_in.scalar_type() == at::kFloat,
                   "_tanh_cpu: x and y must be float32; got ", x_in.scalar_type(), " and ", y_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.sizes() == y_in.sizes(), "_tanh_cpu: x and y must have one shape; got ", x_in.sizes(),
                    " and ", y_in.sizes());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  at::Tensor t = at::empty_like(x), c = at::empty_like(x), u = at::empty_like(x);
  tanh_loop(x.data_ptr<float>(), y.data_ptr<float>(), t.data_ptr<float>(), c.data_ptr<float>(), u.data_ptr<float>(),
            x.numel());
  return {t, c, u};
}

}  // namespace
}  // namespace share_kernels

TORCH_LIBRARY_IMPL(share_kernels, CPU, m) {
  m.impl("_stability_loss_cpu", &share_kernels::stability_loss_cpu);
  m.impl("_tanh_cpu", &share_kernels::tanh_cpu);
}
