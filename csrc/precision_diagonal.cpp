// diag(U^T U)_p = d_p^2 + sum_i w_{p-delta_i,i}^2, written as a scatter of
// w_{p,i}^2 into p+delta_i so the inner loop is contiguous in x.
// With cross weights, channel j adds sum_{c<j} xi_{kappa(c,j),p}^2 (the column of M^T M's diagonal).
#include "cross.h"

namespace structlik {

Tensor precision_diagonal(const Tensor& log_diag, const Tensor& off_diag, IntList flat_offsets,
                          std::optional<Tensor> cross_) {
  const auto offsets = check_params(log_diag, off_diag, flat_offsets);
  const auto cross = check_cross(cross_, log_diag);
  const auto s = planes_contiguous(log_diag), w = planes_contiguous(off_diag);
  auto out = empty(shape(s).dims, s);
  const int64_t C = s.size(1), planes = s.size(0) * C, H = s.size(2), W = s.size(3), n = H * W;
  const int64_t S = static_cast<int64_t>(offsets.size());
  dispatch_floating(s.scalar_type(), "precision_diagonal", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> Sd(s, C), Wt(w, C, S);
    const Cross<const scalar_t> X(cross, C);
    scalar_t* out_p = data<scalar_t>(out);
    parallel_cloned(planes, plane_grain(H, W), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t* sk = Sd(k);
        scalar_t* o = out_p + k * n;
        exp_row(sk, o, n);
        for (int64_t p = 0; p < n; ++p) o[p] *= o[p];
        for (int64_t i = 0; i < S; ++i) {
          const Offset& of = offsets[i];
          const int64_t dy = of.dy, dx = of.dx;
          const int64_t lo = col_lo(dx), hi = col_hi(dx, W);
          const scalar_t* wi = Wt.weight(k, i);
          for (int64_t y = 0; y < H; ++y) {
            if (!of.reaches(y, H)) continue;
            const scalar_t* wrow = wi + y * W;
            scalar_t* orow = o + (y + dy) * W + dx;
            for (int64_t x = lo; x < hi; ++x) orow[x] += wrow[x] * wrow[x];
          }
        }
        for (int64_t c = 0, j = k % C; X.given() && c < j; ++c) {
          const scalar_t* __restrict__ xi = X(k / C, c, j);
          for (int64_t p = 0; p < n; ++p) o[p] += xi[p] * xi[p];
        }
      }
    });
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(structlik, CPU, m) {
  m.impl("precision_diagonal", TORCH_BOX(&precision_diagonal));
}

}  // namespace structlik
