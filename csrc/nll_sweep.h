// The NLL's sweep (nll.cpp), for every weight source: where a row's S weights come from,
// a template parameter (PlainWeights: off_diag's planes; BasisWeights: a learned basis
// times coefficients; BoundedWeights: raw weights bounded on the fly) with
//   int64_t buffer_size(S, W)      scratch values a task needs for one row of weights
//   const scalar_t* row(k, y, buf) row y of plane k's weights, offset i at + i * row_stride()
//   int64_t row_stride()
//   scalar_t* scale(buf)           nullptr, or a row g of per-pixel factors (in row()'s buf): every weight
//                                  of the row is its raw weight times f = g d, which the sweep forms
//                                  in place once d = exp(s) is known (one exp per pixel, not two)
//   void take_weight_grad(k, y, gw, buf)  the row's d/dw (S rows of W at gw; buf: row()'s buffer)
// Coupled channels and 3-D volumes (docs/kernels.md §3) are further sources and offsets of
// this sweep, not copies of it.
//
// Forward:  nll_b = sum_c [ 0.5 ||U r||^2 - sum_p s_p ] + (C H W / 2) log 2 pi,  r = x - loc;
// with u_out, each row of u = U r is also written there (the training forward, store_u).
// Backward, for upstream g_b, with u read from the forward's u_in, or recomputed row by row:
//   d/dloc = -g U^T u      (d/dx is its negative, formed by the caller only when x needs a
//                           gradient, which data never does: no extra pass on the common path)
//   d/ds_p = g (u_p r_p d_p - 1)
//   d/dw_{p,i} = g u_p r_{p+delta_i}    (handed to the weight source, one row at a time)
// Each task keeps one plane-sized buffer (r = x - loc) and rows of u, d and d/dw.
//
// Coupled channels (cross.h): u = M r adds, at each row, sum_{j>c} xi_{kappa(c,j)} r_j (the other
// channels' residuals, read from x and loc); the backward adds sum_{c'<c} xi_{kappa(c',c)} u_{c'} to
// M^T u (u of the other planes, so the backward reads the stored u: its caller forms it first when
// the forward did not store it) and writes d/dxi_{kappa(c,j)} = g u_c r_j, j > c, from plane c's task.
#pragma once

#include <cmath>
#include <vector>

#include "cross.h"

namespace structlik {

// Row y of u = U r, given the whole plane of r (rows below y are read). The
// weights of offset i for this row are at w_row + i * w_stride: the off_diag
// plane's row (stride H*W), or a row formed from a learned basis (stride W).
// f: nullptr, or the source's scale row g (raw weights bounded on the fly): multiplied by d in
// place, it is every weight's factor f (w_{p,i} = a_{p,i} f_p), and u = d r + f sum_i a_i r_{p+delta_i},
// no row of w formed.
template <typename scalar_t>
inline void u_row(const scalar_t* __restrict__ r, const scalar_t* __restrict__ s, const scalar_t* __restrict__ w_row,
                  int64_t w_stride, int64_t y, int64_t H, int64_t W, const std::vector<Offset>& offsets,
                  scalar_t* __restrict__ d, scalar_t* __restrict__ u, scalar_t* __restrict__ f = nullptr) {
  exp_row(s + y * W, d, W);
  if (f) {
    for (int64_t x = 0; x < W; ++x) f[x] *= d[x];
  }
  const scalar_t* __restrict__ rrow = r + y * W;
  if (f) {
    std::fill(u, u + W, scalar_t(0));
  } else {
    for (int64_t x = 0; x < W; ++x) u[x] = d[x] * rrow[x];
  }
  const RowPlace at = row_place(y, offsets);
  for (size_t i = 0; i < offsets.size(); ++i) {
    const Offset& o = offsets[i];
    const int64_t dy = o.dy, dx = o.dx;
    if (!o.reaches_at(y, at.z, at.ys, H)) continue;
    const scalar_t* __restrict__ wrow = w_row + i * w_stride;
    const scalar_t* __restrict__ rn = r + (y + dy) * W + dx;
    for (int64_t x = col_lo(dx), hi = col_hi(dx, W); x < hi; ++x) u[x] += wrow[x] * rn[x];
  }
  if (f) {
    for (int64_t x = 0; x < W; ++x) u[x] = d[x] * rrow[x] + f[x] * u[x];
  }
}

// u[x] += sum_{j>c} xi_{kappa(c,j)} (x_j - loc_j) over row y of image b's channels after c.
template <typename scalar_t>
inline void add_cross_residual_row(const Cross<const scalar_t>& Xc, const Planes<const scalar_t>& X,
                                   const Planes<const scalar_t>& L, int64_t b, int64_t c, int64_t y, int64_t W,
                                   scalar_t* __restrict__ u) {
  const int64_t C = Xc.C;
  for (int64_t j = c + 1; j < C; ++j) {
    const scalar_t* __restrict__ xi = Xc(b, c, j) + y * W;
    const scalar_t* __restrict__ xj = X(b * C + j) + y * W;
    const scalar_t* __restrict__ lj = L(b * C + j) + y * W;
    for (int64_t x = 0; x < W; ++x) u[x] += xi[x] * (xj[x] - lj[x]);
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

// Per plane k: 0.5 ||u||^2 - sum s, then out[b] (finish_nll).
template <typename scalar_t, typename Source>
void nll_forward_sweep(const Planes<const scalar_t>& X, const Planes<const scalar_t>& L,
                       const Planes<const scalar_t>& Sd, const Source& source, const Cross<const scalar_t>& Xc,
                       const std::vector<Offset>& offsets, int64_t B, int64_t C, int64_t H, int64_t W,
                       scalar_t* out, scalar_t* u_out) {
  using acc_t = double;   // double for float and double
  const int64_t n = H * W, S = static_cast<int64_t>(offsets.size());
  std::vector<acc_t> per_plane(B * C);
  parallel_cloned(B * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
    // Rows outer, offsets inner: the rows of r that one row of u reads stay in L1.
    std::vector<scalar_t> r(n), u(W), d(W), wbuf(source.buffer_size(S, W));
    for (int64_t k = begin; k < end; ++k) {
      const scalar_t* sk = Sd(k);
      residual(X(k), L(k), r.data(), n);
      acc_t quad = 0, logdet = 0;
      for (int64_t y = 0; y < H; ++y) {
        const scalar_t* wk = source.row(k, y, wbuf.data());
        u_row(r.data(), sk, wk, source.row_stride(), y, H, W, offsets, d.data(), u.data(), source.scale(wbuf.data()));
        if (Xc.given()) add_cross_residual_row(Xc, X, L, k / C, k % C, y, W, u.data());
        reduce_row(u.data(), sk + y * W, W, quad, logdet);
        if (u_out) std::copy(u.begin(), u.end(), u_out + k * n + y * W);
      }
      per_plane[k] = 0.5 * quad - logdet;
    }
  });
  finish_nll(per_plane, B, C, n, out);
}

// d/dloc and d/ds written through GL and GS (contiguous tensors, or slices of one head's
// gradient); d/dw handed to the source row by row. u_in: the forward's u (B*C planes,
// contiguous), or nullptr to compute each row here (S multiply-adds per pixel more).
template <typename scalar_t, typename Source>
void nll_backward_sweep(const scalar_t* g_p, const Planes<const scalar_t>& X, const Planes<const scalar_t>& L,
                        const Planes<const scalar_t>& Sd, Source& source, const Cross<const scalar_t>& Xc,
                        const std::vector<Offset>& offsets, const scalar_t* u_in, const Planes<scalar_t>& GL,
                        const Planes<scalar_t>& GS, const Cross<scalar_t>& GX, int64_t B, int64_t C, int64_t H,
                        int64_t W) {
  const int64_t n = H * W, S = static_cast<int64_t>(offsets.size());
  parallel_cloned(B * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
    // One sweep over the rows: row y of u gives row y of d/ds and d/dw, and scatters
    // w_{p,i} u_p into rows y + dy_i of U^T u; row y of d/dloc is complete once row y is done.
    std::vector<scalar_t> r(n), u(W), d(W), wbuf(source.buffer_size(S, W)), gwbuf(S * W), fu(W);
    for (int64_t k = begin; k < end; ++k) {
      const scalar_t g = g_p[k / C];
      const scalar_t* sk = Sd(k);
      scalar_t* gx = GL(k);
      scalar_t* gs = GS(k);
      residual(X(k), L(k), r.data(), n);
      std::fill(gx, gx + n, scalar_t(0));
      for (int64_t y = 0; y < H; ++y) {
        const scalar_t* wk = source.row(k, y, wbuf.data());
        const int64_t ws = source.row_stride();
        scalar_t* f = source.scale(wbuf.data());
        const scalar_t* __restrict__ uy = u.data();
        if (u_in) {
          exp_row(sk + y * W, d.data(), W);
          if (f) {
            for (int64_t x = 0; x < W; ++x) f[x] *= d[x];   // g d = f, as u_row does
          }
          uy = u_in + k * n + y * W;
        } else {
          u_row(r.data(), sk, wk, ws, y, H, W, offsets, d.data(), u.data(), f);
        }
        const scalar_t* __restrict__ rrow = r.data() + y * W;
        scalar_t* __restrict__ gsrow = gs + y * W;
        scalar_t* __restrict__ gxrow = gx + y * W;
        for (int64_t x = 0; x < W; ++x) {
          gsrow[x] = g * (uy[x] * rrow[x] * d[x] - scalar_t(1));
          gxrow[x] += d[x] * uy[x];
        }
        if (Xc.given()) {   // (X^T u) at row y, and d/dxi of this plane's pairs (c, j > c)
          const int64_t b = k / C, c = k % C;
          add_cross_row(Xc, b, c, /*transposed=*/true, y * W, W, [&](int64_t j) { return u_in + (b * C + j) * n; },
                        gxrow);
          for (int64_t j = c + 1; j < C; ++j) {
            scalar_t* __restrict__ gxi = GX(b, c, j) + y * W;
            const scalar_t* __restrict__ xj = X(b * C + j) + y * W;
            const scalar_t* __restrict__ lj = L(b * C + j) + y * W;
            for (int64_t x = 0; x < W; ++x) gxi[x] = g * uy[x] * (xj[x] - lj[x]);
          }
        }
        // U^T u scatters w_{p,i} u_p = a_{p,i} (f_p u_p) for scaled weights: f u formed once per row
        const scalar_t* __restrict__ uw = uy;
        if (f) {
          for (int64_t x = 0; x < W; ++x) fu[x] = f[x] * uy[x];
          uw = fu.data();
        }
        const RowPlace at = row_place(y, offsets);
        for (int64_t i = 0; i < S; ++i) {
          const Offset& o = offsets[i];
          const int64_t dy = o.dy, dx = o.dx;
          const int64_t lo = col_lo(dx), hi = col_hi(dx, W);
          scalar_t* __restrict__ gwrow = gwbuf.data() + i * W;   // formed in L1, then handed on
          std::fill(gwrow, gwrow + W, scalar_t(0));
          if (o.reaches_at(y, at.z, at.ys, H) && lo < hi) {
            const scalar_t* __restrict__ wrow = wk + i * ws;
            const scalar_t* __restrict__ rn = r.data() + (y + dy) * W + dx;
            scalar_t* __restrict__ gxn = gx + (y + dy) * W + dx;
            for (int64_t x = lo; x < hi; ++x) {
              gwrow[x] = g * uy[x] * rn[x];
              gxn[x] += wrow[x] * uw[x];   // (U^T u)_{p+delta_i} += w_{p,i} u_p
            }
          }
        }
        source.take_weight_grad(k, y, gwbuf.data(), wbuf.data());
        for (int64_t x = 0; x < W; ++x) gxrow[x] *= -g;   // row y of U^T u is complete: d/dloc
      }
    }
    stream_fence();   // the streaming stores are visible before the task ends
  });
}

}  // namespace structlik
