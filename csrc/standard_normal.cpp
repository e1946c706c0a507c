// Standard normal draws for sampling on the CPU (StructuredNormal.rsample's z).
//
// ATen's float64 normal_ on a CPU is scalar code: 0.90 ms for the 65,536 values
// of a B16 64x64 sample on the 2-core benchmark machine, more than the solve
// that uses them (0.35 ms). Here every step vectorises: a counter-based
// generator (SplitMix64 of seed + k * golden ratio, which passes BigCrush), a
// uniform from 52 mantissa bits in (0, 1], and the Box-Muller transform with
// polynomial log, sin and cos accurate to a few units in the last place of a
// double. The seed is drawn from torch's generator by the caller, so
// torch.manual_seed reproduces the samples.
#include <cstring>

#include "stencil.h"

namespace structlik {

static inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// (0, 1] from the top 52 bits: 2 - [1, 2), so the log below never sees 0.
static inline double unit_interval(uint64_t bits) {
  return 2.0 - __builtin_bit_cast(double, (bits >> 12) | 0x3ff0000000000000ULL);
}

// log(u) for u in (0, 1]: u = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^23 (remainder below 1e-17).
static inline double log_unit(double u) {
  const uint64_t bits = __builtin_bit_cast(uint64_t, u);
  // the exponent as a double without an int64 -> double conversion (AVX2 has none): 2^52 + k - 2^52
  double e = __builtin_bit_cast(double, ((bits >> 52) & 0x7ff) | 0x4330000000000000ULL) - 4503599627370496.0 - 1023.0;
  double m = __builtin_bit_cast(double, (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);
  const bool high = m > 1.4142135623730951;
  m = high ? 0.5 * m : m;
  e = high ? e + 1.0 : e;
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  double p = 1.0 / 23;
  p = p * s2 + 1.0 / 21;
  p = p * s2 + 1.0 / 19;
  p = p * s2 + 1.0 / 17;
  p = p * s2 + 1.0 / 15;
  p = p * s2 + 1.0 / 13;
  p = p * s2 + 1.0 / 11;
  p = p * s2 + 1.0 / 9;
  p = p * s2 + 1.0 / 7;
  p = p * s2 + 1.0 / 5;
  p = p * s2 + 1.0 / 3;
  p = p * s2 + 1.0;
  return 2.0 * s * p + e * 0.69314718055994530942;
}

// cos and sin of 2 pi (q + f) / 4 for random bits: the quadrant q from the top 2 bits, the
// fraction f in [0, 1) from the next 50 (no float -> int conversion, so the loop vectorises), then
// an angle in [0, pi/4] by symmetry and Taylor series to x^16 / x^17 (remainder below 5e-17).
static inline void cos_sin_turn(uint64_t bits, double& c, double& s) {
  const double q = __builtin_bit_cast(double, (bits >> 62) | 0x4330000000000000ULL) - 4503599627370496.0;
  double f = __builtin_bit_cast(double, ((bits << 2) >> 12) | 0x3ff0000000000000ULL) - 1.0;
  const bool upper = f > 0.5;
  f = upper ? 1.0 - f : f;
  const double x = f * 1.5707963267948966, x2 = x * x;
  double sp = -1.0 / 355687428096000.0;                  // -1/17!
  sp = sp * x2 + 1.0 / 1307674368000.0;
  sp = sp * x2 - 1.0 / 6227020800.0;
  sp = sp * x2 + 1.0 / 39916800.0;
  sp = sp * x2 - 1.0 / 362880.0;
  sp = sp * x2 + 1.0 / 5040.0;
  sp = sp * x2 - 1.0 / 120.0;
  sp = sp * x2 + 1.0 / 6.0;
  const double sin_x = x - x * x2 * sp;
  double cp = 1.0 / 20922789888000.0;                    // 1/16!
  cp = cp * x2 - 1.0 / 87178291200.0;
  cp = cp * x2 + 1.0 / 479001600.0;
  cp = cp * x2 - 1.0 / 3628800.0;
  cp = cp * x2 + 1.0 / 40320.0;
  cp = cp * x2 - 1.0 / 720.0;
  cp = cp * x2 + 1.0 / 24.0;
  cp = cp * x2 - 0.5;
  const double cos_x = 1.0 + x2 * cp;
  const double c0 = upper ? sin_x : cos_x, s0 = upper ? cos_x : sin_x;   // the angle in the quadrant
  // rotate by q quarter turns: (c, s) -> (-s, c) each
  c = q == 0.0 ? c0 : q == 1.0 ? -s0 : q == 2.0 ? -c0 : s0;
  s = q == 0.0 ? s0 : q == 1.0 ? c0 : q == 2.0 ? -s0 : -c0;
}

template <typename scalar_t>
static void fill_pairs(scalar_t* __restrict__ a, scalar_t* __restrict__ b, int64_t begin, int64_t end,
                       uint64_t seed) {
  constexpr uint64_t golden = 0x9e3779b97f4a7c15ULL;
#pragma omp simd
  for (int64_t k = begin; k < end; ++k) {
    const uint64_t counter = seed + uint64_t(2 * k + 1) * golden;
    const double u1 = unit_interval(splitmix64(counter));
    const double r = std::sqrt(-2.0 * log_unit(u1));
    double c, s;
    cos_sin_turn(splitmix64(counter + golden), c, s);     // the angle, uniform on the circle
    a[k] = static_cast<scalar_t>(r * c);
    b[k] = static_cast<scalar_t>(r * s);
  }
}

Tensor standard_normal(IntList size, int64_t seed, ScalarType dtype) {
  STD_TORCH_CHECK(is_float_or_double(dtype), "standard_normal: float32 or float64, got ", dtype);
  int64_t n = 1;
  for (const int64_t d : size) {
    STD_TORCH_CHECK(d >= 0, "standard_normal: size must be non-negative, got ", Shape{size});
    n *= d;
  }
  // Pairs fill the two halves of an even-length buffer; an odd n drops the last pair's second value.
  const int64_t half = (n + 1) / 2;
  auto buffer = torch::stable::empty({2 * half}, dtype);
  dispatch_floating(dtype, "standard_normal", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    scalar_t* p = data<scalar_t>(buffer);
    parallel_cloned(half, 4096, [&](int64_t begin, int64_t end) {
      fill_pairs(p, p + half, begin, end, static_cast<uint64_t>(seed));
    });
  });
  return torch::stable::view(narrow(buffer, 0, 0, n), size);
}

STABLE_TORCH_LIBRARY_IMPL(structlik, CompositeExplicitAutograd, m) {
  m.impl("standard_normal", TORCH_BOX(&standard_normal));
}

}  // namespace structlik
