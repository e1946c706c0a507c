// Row kernels shared by the fused NLL (nll.cpp) and its learned-basis form
// (nll_basis.cpp): r = x - loc for a plane, and u = U r one row at a time.
#pragma once

#include <cmath>

#include "stencil.h"

namespace structlik {

// Row y of u = U r, given the whole plane of r (rows below y are read). The
// weights of offset i for this row are at w_row + i * w_stride: the off_diag
// plane's row (stride H*W), or a row formed from a learned basis (stride W).
template <typename scalar_t>
inline void u_row(const scalar_t* __restrict__ r, const scalar_t* __restrict__ s, const scalar_t* __restrict__ w_row,
                  int64_t w_stride, int64_t y, int64_t H, int64_t W, const std::vector<Offset>& offsets,
                  scalar_t* __restrict__ d, scalar_t* __restrict__ u) {
  exp_row(s + y * W, d, W);
  const scalar_t* __restrict__ rrow = r + y * W;
  for (int64_t x = 0; x < W; ++x) u[x] = d[x] * rrow[x];
  for (size_t i = 0; i < offsets.size(); ++i) {
    const auto [dy, dx] = offsets[i];
    if (y + dy >= H) continue;
    const scalar_t* __restrict__ wrow = w_row + i * w_stride;
    const scalar_t* __restrict__ rn = r + (y + dy) * W + dx;
    for (int64_t x = col_lo(dx), hi = col_hi(dx, W); x < hi; ++x) u[x] += wrow[x] * rn[x];
  }
}

template <typename scalar_t>
inline void residual(const scalar_t* __restrict__ x, const scalar_t* __restrict__ loc, scalar_t* __restrict__ r,
                            int64_t n) {
  for (int64_t p = 0; p < n; ++p) r[p] = x[p] - loc[p];
}

// quad += sum u^2 and logdet += sum s over one row, in acc_t. The simd
// reduction lets the compiler keep several partial sums (plain C++ may not reassociate).
template <typename scalar_t, typename acc_t>
inline void reduce_row(const scalar_t* __restrict__ u, const scalar_t* __restrict__ srow, int64_t W, acc_t& quad,
                       acc_t& logdet) {
  acc_t q = 0, l = 0;
  _Pragma("omp simd reduction(+ : q, l)")
  for (int64_t x = 0; x < W; ++x) {
    q += acc_t(u[x]) * acc_t(u[x]);
    l += acc_t(srow[x]);
  }
  quad += q;
  logdet += l;
}

// out[b] = sum_c per_plane[b*C + c] + (C n / 2) log 2 pi, summed in a fixed order.
template <typename scalar_t, typename acc_t>
inline void finish_nll(const std::vector<acc_t>& per_plane, int64_t B, int64_t C, int64_t n, scalar_t* out) {
  const acc_t normaliser = 0.5 * acc_t(C * n) * std::log(2.0 * M_PI);
  for (int64_t b = 0; b < B; ++b) {
    acc_t total = normaliser;
    for (int64_t c = 0; c < C; ++c) total += per_plane[b * C + c];
    out[b] = static_cast<scalar_t>(total);
  }
}

}  // namespace structlik
