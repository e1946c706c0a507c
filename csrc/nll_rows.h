// Row kernels shared by the fused NLL (nll.cpp) and its learned-basis form
// (nll_basis.cpp): r = x - loc for a plane, and u = U r one row at a time.
#pragma once

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

}  // namespace structlik
