// The triangular solves, one (b, c) plane per task.
//
// solve_upper (eps = U^-1 z), back-substitution in reverse raster order, row by row:
//   1. eps_row = z_row - sum_{i: dy_i > 0} w_{.,i} * eps[row + dy_i]   (rows below are final;
//      contiguous in x, so it vectorises)
//   2. right to left: eps_x = (eps_x - sum_{i: dy_i = 0} w_{x,i} eps_{x+dx_i}) / d_x
//      (as a product with 1/d_x, computed vectorised beforehand: a division on this
//      dependency chain made the solve ~2x slower at radius 1)
// solve_upper_t (v = U^-T g), forward substitution in raster order, mirrors it:
//   1. v_row = g_row - sum_{i: dy_i > 0} w_{row - dy_i, . - dx_i} v[row - dy_i, . - dx_i]
//   2. left to right: v_x = (v_x - sum_{i: dy_i = 0} w_{x-dx_i,i} v_{x-dx_i}) / d_x
// Only step 2 is sequential, and it touches just the in-row offsets (k of them
// per dilation).
// With cross weights (coupled channels, cross.h) one task solves one image, channel by channel:
//   M^-1 z:  r_c = U_c^-1 (z_c - sum_{j>c} xi_{kappa(c,j)} r_j), the last channel first;
//   M^-T g:  r_j = U_j^-T (g_j - sum_{c<j} xi_{kappa(c,j)} r_c), the first channel first.
// (The same arithmetic as pixel by pixel with each pixel's channels in order: every cross term is
// at one pixel.) The right-hand side with the partners' terms is formed in one plane buffer.
#include <cmath>

#include "cross.h"

namespace structlik {

// The offsets (0, dx) and their weight planes: the only ones on the sequential path.
template <typename scalar_t>
static std::vector<std::pair<int64_t, const scalar_t*>> in_row_offsets(const scalar_t* w, int64_t w_stride,
                                                                       const std::vector<Offset>& offsets) {
  std::vector<std::pair<int64_t, const scalar_t*>> out;
  for (size_t i = 0; i < offsets.size(); ++i)
    if (offsets[i].in_row()) out.emplace_back(offsets[i].dx, w + i * w_stride);
  return out;
}

// Row y of the output starts as the right-hand side; inv_d = 1 / d for that row,
// computed vectorised so that no division sits on the sequential in-row path.
template <typename scalar_t>
static scalar_t* start_row(const scalar_t* rhs, const scalar_t* s, int64_t y, int64_t W, scalar_t* out,
                           scalar_t* inv_d) {
  scalar_t* row = out + y * W;
  std::copy(rhs + y * W, rhs + (y + 1) * W, row);
  exp_row(s + y * W, inv_d, W);
  for (int64_t x = 0; x < W; ++x) inv_d[x] = scalar_t(1) / inv_d[x];
  return row;
}

template <typename scalar_t>
static void solve_plane(const scalar_t* rhs, const scalar_t* s, const scalar_t* w, int64_t w_stride, scalar_t* out, int64_t H, int64_t W,
                        const std::vector<Offset>& offsets, scalar_t* inv_d) {
  const int64_t n = H * W;
  const auto in_row = in_row_offsets(w, w_stride, offsets);
  for (int64_t y = H - 1; y >= 0; --y) {
    scalar_t* row = start_row(rhs, s, y, W, out, inv_d);
    for (size_t i = 0; i < offsets.size(); ++i) {
      const Offset& o = offsets[i];
      const int64_t dy = o.dy, dx = o.dx;
      if (dy == 0 || !o.reaches(y, H)) continue;
      const int64_t lo = col_lo(dx), hi = col_hi(dx, W);
      const scalar_t* wrow = w + i * w_stride + y * W;
      const scalar_t* below = out + (y + dy) * W + dx;
      for (int64_t x = lo; x < hi; ++x) row[x] -= wrow[x] * below[x];
    }
    for (int64_t x = W - 1; x >= 0; --x) {
      scalar_t v = row[x];
      for (const auto& [dx, wi] : in_row)
        if (x + dx < W) v -= wi[y * W + x] * row[x + dx];
      row[x] = v * inv_d[x];
    }
  }
}

template <typename scalar_t>
static void solve_t_plane(const scalar_t* rhs, const scalar_t* s, const scalar_t* w, int64_t w_stride, scalar_t* out, int64_t H,
                          int64_t W, const std::vector<Offset>& offsets, scalar_t* inv_d) {
  const int64_t n = H * W;
  const auto in_row = in_row_offsets(w, w_stride, offsets);
  for (int64_t y = 0; y < H; ++y) {
    scalar_t* row = start_row(rhs, s, y, W, out, inv_d);
    for (size_t i = 0; i < offsets.size(); ++i) {
      const Offset& o = offsets[i];
      const int64_t dy = o.dy, dx = o.dx;
      if (dy == 0 || y - dy < 0 || y - dy >= H || !o.reaches(y - dy, H)) continue;   // row y - dy reads row y
      // x - dx must lie in [0, W): x in [dx, W + dx)
      const int64_t lo = std::max<int64_t>(0, dx), hi = std::min<int64_t>(W, W + dx);
      const scalar_t* wrow = w + i * w_stride + (y - dy) * W - dx;
      const scalar_t* above = out + (y - dy) * W - dx;
      for (int64_t x = lo; x < hi; ++x) row[x] -= wrow[x] * above[x];
    }
    for (int64_t x = 0; x < W; ++x) {
      scalar_t v = row[x];
      for (const auto& [dx, wi] : in_row)
        if (x - dx >= 0) v -= wi[y * W + x - dx] * row[x - dx];
      row[x] = v * inv_d[x];
    }
  }
}

template <bool transposed>
static Tensor solve_impl(const Tensor& rhs, const Tensor& log_diag, const Tensor& off_diag,
                         IntList flat_offsets, const std::optional<Tensor>& cross_) {
  const auto offsets = check_params(log_diag, off_diag, flat_offsets);
  // Samples of one distribution: z may hold several images per set of parameters.
  check_image(rhs, transposed ? "g" : "z", log_diag, /*params_repeat=*/true);
  const auto cross = check_cross(cross_, log_diag);
  const auto b = planes_contiguous(rhs), s = planes_contiguous(log_diag), w = planes_contiguous(off_diag);
  auto out = empty(shape(b).dims, b);
  const int64_t C = b.size(1), planes = b.size(0) * C, H = b.size(2), W = b.size(3), n = H * W;
  const int64_t S = static_cast<int64_t>(offsets.size());
  dispatch_floating(b.scalar_type(), "solve_upper", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> Rhs(b, C), Sd(s, C), Wt(w, C, S);
    const Cross<const scalar_t> X(cross, C);
    const int64_t ws = Wt.weight_stride();
    scalar_t* out_p = data<scalar_t>(out);
    const auto solve_one = [&](int64_t k, const scalar_t* rhs_k, scalar_t* inv_d) {
      if (transposed)
        solve_t_plane(rhs_k, Sd(k), Wt(k), ws, out_p + k * n, H, W, offsets, inv_d);
      else
        solve_plane(rhs_k, Sd(k), Wt(k), ws, out_p + k * n, H, W, offsets, inv_d);
    };
    if (!X.given()) {
      parallel_cloned(planes, plane_grain(H, W), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> inv_d(W);   // one row of exp(-log_diag)
        for (int64_t k = begin; k < end; ++k) solve_one(k, Rhs(k), inv_d.data());
      });
      return;
    }
    parallel_cloned(b.size(0), std::max<int64_t>(1, plane_grain(H, W) / C), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> inv_d(W), rhs_buf(n);
      for (int64_t image = begin; image < end; ++image) {
        for (int64_t step = 0; step < C; ++step) {
          const int64_t c = transposed ? step : C - 1 - step, k = image * C + c;
          std::copy(Rhs(k), Rhs(k) + n, rhs_buf.begin());
          add_cross_row(X, image, c, transposed, 0, n, [&](int64_t j) { return out_p + (image * C + j) * n; },
                        rhs_buf.data(), scalar_t(-1));
          solve_one(k, rhs_buf.data(), inv_d.data());
        }
      }
    });
  });
  return out;
}

Tensor solve_upper(const Tensor& z, const Tensor& log_diag, const Tensor& off_diag, IntList offsets,
                   std::optional<Tensor> cross) {
  return solve_impl<false>(z, log_diag, off_diag, offsets, cross);
}

Tensor solve_upper_t(const Tensor& g, const Tensor& log_diag, const Tensor& off_diag, IntList offsets,
                     std::optional<Tensor> cross) {
  return solve_impl<true>(g, log_diag, off_diag, offsets, cross);
}

STABLE_TORCH_LIBRARY_IMPL(structlik, CPU, m) {
  m.impl("solve_upper", TORCH_BOX(&solve_upper));
  m.impl("solve_upper_t", TORCH_BOX(&solve_upper_t));
}

}  // namespace structlik
