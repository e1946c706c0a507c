// Shared helpers for the CPU kernels: argument checks, the stencil's offsets,
// and the per-row valid range of an offset.
//
// Layout (docs/contract.md §3): images and log_diag are (B, C, H, W), off_diag is
// (B, C*S, H, W) with channel c / offset i at c*S + i. Every kernel works on
// one (b, c) plane at a time: the plane's S weight maps are then the S
// consecutive (H, W) slices starting at off_diag[b, c*S].
#pragma once

#include "torch_api.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace structlik {

// One offset of the stencil as the kernels see it: (dy, dx) in the plane they index. An image's
// plane is H x W. A volume (B, C, D, h, W) reaches the kernels as its tall view (B, C, D*h, W) (the
// same memory), its offsets as (dz, dy, dx) with the slice height h; in the tall plane the offset
// moves dz*h + dy rows, and it lands inside the volume only where the row's slice and row in it
// allow (reaches): a tall neighbour across a slice boundary is not one.
struct Offset {
  int64_t dy, dx;           // rows and columns moved in the plane the kernels index
  int64_t dz = 0, dys = 0;  // a volume's: slices moved, rows moved inside a slice
  int64_t hs = 0;           // a volume's slice height; 0 for an image

  // row y (of H rows) reads row y + dy inside the image or volume: for the whole row
  bool reaches(int64_t y, int64_t H) const {
    if (hs == 0) return y + dy >= 0 && y + dy < H;
    const int64_t ys = y % hs;
    return ys + dys >= 0 && ys + dys < hs && y / hs + dz < H / hs;
  }
  // reaches(y, H) with row y's slice z and row ys in it given (a row-outer loop finds them once a
  // row: the division in reaches cost ~7% of a 32-wide volume's NLL backward)
  bool reaches_at(int64_t y, int64_t z, int64_t ys, int64_t H) const {
    if (hs == 0) return y + dy >= 0 && y + dy < H;
    return ys + dys >= 0 && ys + dys < hs && z + dz < H / hs;
  }
  // Whether any row of any plane of this geometry reaches: a volume's |dy| >= h never does (its
  // weights are never part of U; the kernels skip it and its gradient is 0).
  bool reachable() const { return hs == 0 || (dys < hs && dys > -hs); }
  // a neighbour in the same row (the solves' right-to-left part)
  bool in_row() const { return dy == 0 && reachable(); }
};

// Row y's slice and row in it, for reaches_at: (0, y) for images (hs = 0).
struct RowPlace {
  int64_t z, ys;
};
inline RowPlace row_place(int64_t y, const std::vector<Offset>& offsets) {
  const int64_t hs = offsets.empty() ? 0 : offsets[0].hs;
  return hs ? RowPlace{y / hs, y % hs} : RowPlace{0, y};
}

// The ops' offsets: [dy0, dx0, dy1, dx1, ...] for images; for a volume's tall view
// [-h, dz0, dy0, dx0, dz1, ...] (docs/contract.md §3), each pointing forward in raster order.
inline std::vector<Offset> parse_offsets(IntList flat) {
  std::vector<Offset> out;
  if (flat.size() > 0 && flat[0] < 0) {
    const int64_t hs = -flat[0];
    STD_TORCH_CHECK((flat.size() - 1) % 3 == 0, "offsets: a volume's are [-H, dz0, dy0, dx0, ...], got ",
                    flat.size(), " values");
    for (size_t i = 1; i < flat.size(); i += 3) {
      const int64_t dz = flat[i], dy = flat[i + 1], dx = flat[i + 2];
      STD_TORCH_CHECK(dz > 0 || (dz == 0 && (dy > 0 || (dy == 0 && dx > 0))), "offsets: (", dz, ", ", dy, ", ",
                      dx, ") does not point forward in raster order");
      out.push_back({dz * hs + dy, dx, dz, dy, hs});
    }
    return out;
  }
  STD_TORCH_CHECK(flat.size() % 2 == 0, "offsets: expected [dy0, dx0, dy1, dx1, ...], got ", flat.size(), " values");
  for (size_t i = 0; i < flat.size(); i += 2) {
    const int64_t dy = flat[i], dx = flat[i + 1];
    STD_TORCH_CHECK(dy > 0 || (dy == 0 && dx > 0), "offsets: (", dy, ", ", dx,
                ") does not point forward in raster order");
    out.push_back({dy, dx, 0, dy, 0});
  }
  return out;
}

// An operand's H x W planes, read in place. Each plane must be contiguous (row
// stride W, element stride 1); the batch and channel strides are free, so views
// of one decoder head (head.split(...) along channels) and channel slices are
// not copied. Plane k of the image (b = k / C, c = k % C) reads the operand's
// batch b % batch: parameters with fewer images than the image operand repeat
// over it (the solves use this to sample many times from one set of
// parameters); a batch stride of 0 (an expanded tensor) also works.
// per_channel is S for off_diag (channel c, offset i at c*S + i), 1 otherwise.
// T is const for inputs; outputs written through strides (slices of one
// head-shaped gradient) use a mutable T.
template <typename T>
struct Planes {
  T* data;
  int64_t batch, sb, sc, C, per_channel;
  Planes(const Tensor& t, int64_t C_, int64_t per_channel_ = 1)
      : data(static_cast<T*>(t.data_ptr())), batch(t.size(0)), sb(t.stride(0)), sc(t.stride(1)), C(C_),
        per_channel(per_channel_) {}
  T* operator()(int64_t k) const { return data + ((k / C) % batch) * sb + (k % C) * per_channel * sc; }
  // offset i's weight plane of image plane k (off_diag only)
  T* weight(int64_t k, int64_t i) const { return (*this)(k) + i * sc; }
  int64_t weight_stride() const { return sc; }
};

// t itself when its planes are contiguous (see Planes), else one contiguous copy.
inline Tensor planes_contiguous(const Tensor& t) {
  const bool rows_ok = t.size(2) <= 1 || t.stride(2) == t.size(3);
  const bool cols_ok = t.size(3) <= 1 || t.stride(3) == 1;
  return rows_ok && cols_ok ? t : torch::stable::contiguous(t);
}

// An image operand: (N, C, H, W) of log_diag's dtype, with log_diag's (C, H, W);
// its batch N equals log_diag's, or is a multiple of it where params_repeat.
inline void check_image(const Tensor& t, const char* name, const Tensor& log_diag,
                        bool params_repeat = false) {
  STD_TORCH_CHECK(t.is_cpu(), name, ": expected a CPU tensor");
  STD_TORCH_CHECK(t.dim() == 4, name, ": expected shape (B, C, H, W), got ", shape(t));
  // (an empty log_diag batch takes only an empty image batch: no % 0)
  const bool batch_ok = params_repeat && log_diag.size(0) > 0 ? t.size(0) % log_diag.size(0) == 0
                                                              : t.size(0) == log_diag.size(0);
  const bool rest_ok = t.size(1) == log_diag.size(1) && t.size(2) == log_diag.size(2) &&
                       t.size(3) == log_diag.size(3);
  STD_TORCH_CHECK(batch_ok && rest_ok, name, ": expected shape (B, C, H, W) = ",
              shape(log_diag), params_repeat ? " (or a multiple of its B)" : "", ", got ", shape(t));
  STD_TORCH_CHECK(t.scalar_type() == log_diag.scalar_type(), name, ": dtype ", t.scalar_type(),
              " does not match log_diag's ", log_diag.scalar_type());
}

// Checks log_diag (B, C, H, W) and off_diag (B, C*S, H, W); returns the offsets.
inline std::vector<Offset> check_params(const Tensor& log_diag, const Tensor& off_diag,
                                        IntList flat_offsets) {
  auto offsets = parse_offsets(flat_offsets);
  STD_TORCH_CHECK(log_diag.is_cpu() && off_diag.is_cpu(), "log_diag, off_diag: expected CPU tensors");
  STD_TORCH_CHECK(log_diag.dim() == 4, "log_diag: expected shape (B, C, H, W), got ", shape(log_diag));
  STD_TORCH_CHECK(log_diag.scalar_type() == ScalarType::Float || log_diag.scalar_type() == ScalarType::Double,
              "log_diag: expected float32 or float64, got ", log_diag.scalar_type());
  const int64_t S = static_cast<int64_t>(offsets.size());
  STD_TORCH_CHECK(S == 0 || offsets[0].hs == 0 || log_diag.size(2) % offsets[0].hs == 0,
                  "offsets: a volume's tall view has D*H rows, a multiple of its slice height H = ", offsets[0].hs,
                  ", got ", log_diag.size(2), " rows");
  STD_TORCH_CHECK(off_diag.dim() == 4 && off_diag.size(0) == log_diag.size(0) &&
                  off_diag.size(1) == log_diag.size(1) * S && off_diag.size(2) == log_diag.size(2) &&
                  off_diag.size(3) == log_diag.size(3),
              "off_diag: expected shape (B, C*S, H, W) = (", log_diag.size(0), ", ", log_diag.size(1) * S, ", ",
              log_diag.size(2), ", ", log_diag.size(3), "), got ", shape(off_diag));
  STD_TORCH_CHECK(off_diag.scalar_type() == log_diag.scalar_type(), "off_diag: dtype ", off_diag.scalar_type(),
              " does not match log_diag's ", log_diag.scalar_type());
  return offsets;
}

// Columns x with 0 <= x + dx < W: [lo, hi).
inline int64_t col_lo(int64_t dx) { return std::max<int64_t>(0, -dx); }
inline int64_t col_hi(int64_t dx, int64_t W) { return std::min<int64_t>(W, W - dx); }

// exp for float32 that the compiler can vectorise (std::exp is a scalar libm call
// and was ~60% of the NLL forward at B=64, 64x64, radius 1). Cephes' expf:
// x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial, times 2^n
// built from the exponent bits in two halves so that n = 128 (x just below the
// overflow threshold) is still exact. Accurate to ~1 ulp for x in [-87, 88.7];
// exp_row() sends rows with any x outside that range to std::exp instead.
inline float exp_poly(float x) {
  // round to nearest by adding and subtracting 1.5 * 2^23 (std::floor would not vectorise
  // without -fno-trapping-math); exact for |x * log2 e| < 2^22
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t half = static_cast<int32_t>(n) >> 1;
  // __builtin_bit_cast, not memcpy: GCC's vectoriser gives up on the memcpy form.
  const float lo = __builtin_bit_cast(float, (half + 127) << 23);
  const float hi = __builtin_bit_cast(float, (static_cast<int32_t>(n) - half + 127) << 23);
  return e * lo * hi;
}

// out[j] = exp(s[j]) for j < len.
inline void exp_row(const float* __restrict__ s, float* __restrict__ out, int64_t len) {
  int32_t out_of_range = 0;   // an int count, not a bool, so that the loop vectorises
#pragma omp simd reduction(+ : out_of_range)
  for (int64_t j = 0; j < len; ++j) out_of_range += (s[j] < -87.0f) | (s[j] > 88.5f) | (s[j] != s[j]);  // or NaN
  if (out_of_range) {
    for (int64_t j = 0; j < len; ++j) out[j] = std::exp(s[j]);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) out[j] = exp_poly(s[j]);
}

// exp for float64 that vectorises, as exp_poly for float32 (std::exp, a scalar libm call, was about
// half of a float64 solve of B4 32^3 radius 1 on one core): Cephes' exp, x = n ln2 + r with
// |r| <= ln2/2, exp(r) = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)), times 2^n from the exponent bits.
// Accurate to ~1 ulp for x in [-708, 709] (2^n a normal number); exp_row sends rows with any x
// outside that range, or NaN, to std::exp.
inline double exp_poly(double x) {
  const double magic = 6755399441055744.0;   // 1.5 * 2^52: adding it rounds to an integer
  const double t = x * 1.4426950408889634 + magic;
  const double n = t - magic;
  const int64_t ni = __builtin_bit_cast(int64_t, t) - __builtin_bit_cast(int64_t, magic);
  const double r = (x - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
  const double rr = r * r;
  const double p = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1);
  const double q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr +
                   2.00000000000000000009e0;
  const double e = 1.0 + 2.0 * p / (q - p);
  return e * __builtin_bit_cast(double, (ni + 1023) << 52);
}

inline void exp_row(const double* __restrict__ s, double* __restrict__ out, int64_t len) {
  int64_t out_of_range = 0;
#pragma omp simd reduction(+ : out_of_range)
  for (int64_t j = 0; j < len; ++j) out_of_range += (s[j] < -708.0) | (s[j] > 709.0) | (s[j] != s[j]);
  if (out_of_range) {
    for (int64_t j = 0; j < len; ++j) out[j] = std::exp(s[j]);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) out[j] = exp_poly(s[j]);
}

// Run-time instruction sets. The extension is built for the baseline x86-64
// (a wheel built on one machine runs on any other); the kernels' loops are
// compiled again for AVX2 (x86-64-v3) and AVX-512 (x86-64-v4), and the loader
// picks the best each CPU has (GCC function multi-versioning: an ifunc
// resolved once, when the library loads). STRUCTLIK_CPU_ARCH=native builds for
// the build machine only, without the clones (setup.py).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(STRUCTLIK_NO_CLONES)
#define STRUCTLIK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define STRUCTLIK_CLONES
#endif

// f(begin, end) with everything it calls inlined (flatten) into one clone per
// instruction set, so the loops of the row helpers vectorise for each.
template <typename F>
STRUCTLIK_CLONES void run_cloned(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}

// torch::stable::parallel_for over [0, n) whose chunks run the best clone of body for this CPU.
template <typename F>
inline void parallel_cloned(int64_t n, int64_t grain, const F& body) {
  torch::stable::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { run_cloned(body, begin, end); });
}

#if defined(__x86_64__) && defined(__GNUC__)
inline bool cpu_has_avx() {
  static const bool has = __builtin_cpu_supports("avx");
  return has;
}

__attribute__((target("avx"))) inline int64_t stream_avx(float* dst, const float* src, int64_t W) {
  int64_t x = 0;
  for (; x < W && (reinterpret_cast<uintptr_t>(dst + x) & 31); ++x) dst[x] = src[x];
  for (; x + 8 <= W; x += 8) _mm256_stream_ps(dst + x, _mm256_loadu_ps(src + x));
  return x;
}

__attribute__((target("avx"))) inline int64_t stream_avx(double* dst, const double* src, int64_t W) {
  int64_t x = 0;
  for (; x < W && (reinterpret_cast<uintptr_t>(dst + x) & 31); ++x) dst[x] = src[x];
  for (; x + 4 <= W; x += 4) _mm256_stream_pd(dst + x, _mm256_loadu_pd(src + x));
  return x;
}
#endif

// dst[0:W) = src[0:W) with streaming (non-temporal) stores where the CPU has AVX:
// for outputs written once and not read again soon (the off_diag gradient), this
// skips reading each destination cache line from memory before writing it.
// Callers finish a kernel with stream_fence().
template <typename T>
inline void stream_row(T* dst, const T* src, int64_t W) {
  int64_t x = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx()) x = stream_avx(dst, src, W);
#endif
  for (; x < W; ++x) dst[x] = src[x];
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Grain for parallel_cloned over planes: about 16K pixels of work per task.
inline int64_t plane_grain(int64_t H, int64_t W) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W)); }

}  // namespace structlik
