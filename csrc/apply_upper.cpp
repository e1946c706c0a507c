// U r and U^T y (docs/contract.md §1), one (b, c) plane per task.
//
//   apply_upper:   out_p = d_p r_p + sum_i w_{p,i} r_{p+delta_i}        (gather)
//   apply_upper_t: out_p = d_p y_p + sum_i w_{p-delta_i,i} y_{p-delta_i} (written as a scatter
//                  of w_{p,i} y_p into p+delta_i, so every inner loop is contiguous in x)
// With cross weights (coupled channels, cross.h) each plane then adds its pixelwise partners'
// terms, read from the other channels of its image: M r and M^T y.
#include "cross.h"

namespace structlik {

template <typename scalar_t, bool transposed>
static void apply_plane(const scalar_t* __restrict__ in, const scalar_t* __restrict__ s,
                        const scalar_t* __restrict__ w, int64_t w_stride, scalar_t* __restrict__ out, int64_t H,
                        int64_t W, const std::vector<Offset>& offsets) {
  const int64_t n = H * W;
  exp_row(s, out, n);
  for (int64_t p = 0; p < n; ++p) out[p] *= in[p];
  for (size_t i = 0; i < offsets.size(); ++i) {
    const Offset& o = offsets[i];
    const int64_t dy = o.dy, dx = o.dx;
    const int64_t lo = col_lo(dx), hi = col_hi(dx, W);
    const scalar_t* wi = w + i * w_stride;
    for (int64_t y = 0; y < H; ++y) {
      if (!o.reaches(y, H)) continue;
      const int64_t row = y * W, nrow = (y + dy) * W + dx;
      if (transposed) {
        for (int64_t x = lo; x < hi; ++x) out[nrow + x] += wi[row + x] * in[row + x];
      } else {
        for (int64_t x = lo; x < hi; ++x) out[row + x] += wi[row + x] * in[nrow + x];
      }
    }
  }
}

template <bool transposed>
static Tensor apply_upper_impl(const Tensor& image, const Tensor& log_diag, const Tensor& off_diag,
                               IntList flat_offsets, const std::optional<Tensor>& cross_) {
  const auto offsets = check_params(log_diag, off_diag, flat_offsets);
  check_image(image, transposed ? "y" : "r", log_diag, /*params_repeat=*/true);
  const auto cross = check_cross(cross_, log_diag);
  const auto in = planes_contiguous(image), s = planes_contiguous(log_diag), w = planes_contiguous(off_diag);
  auto out = empty(shape(in).dims, in);
  const int64_t C = in.size(1), planes = in.size(0) * C, H = in.size(2), W = in.size(3), n = H * W;
  const int64_t S = static_cast<int64_t>(offsets.size());
  dispatch_floating(in.scalar_type(), "apply_upper", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> In(in, C), Sd(s, C), Wt(w, C, S);
    const Cross<const scalar_t> X(cross, C);
    scalar_t* out_p = data<scalar_t>(out);
    parallel_cloned(planes, plane_grain(H, W), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        apply_plane<scalar_t, transposed>(In(k), Sd(k), Wt(k), Wt.weight_stride(), out_p + k * n, H, W, offsets);
        if (X.given()) {
          const int64_t b = k / C;
          add_cross_row(X, b, k % C, transposed, 0, n, [&](int64_t j) { return In(b * C + j); }, out_p + k * n);
        }
      }
    });
  });
  return out;
}

Tensor apply_upper(const Tensor& r, const Tensor& log_diag, const Tensor& off_diag, IntList offsets,
                   std::optional<Tensor> cross) {
  return apply_upper_impl<false>(r, log_diag, off_diag, offsets, cross);
}

Tensor apply_upper_t(const Tensor& y, const Tensor& log_diag, const Tensor& off_diag, IntList offsets,
                     std::optional<Tensor> cross) {
  return apply_upper_impl<true>(y, log_diag, off_diag, offsets, cross);
}

STABLE_TORCH_LIBRARY_IMPL(structlik, CPU, m) {
  m.impl("apply_upper", TORCH_BOX(&apply_upper));
  m.impl("apply_upper_t", TORCH_BOX(&apply_upper_t));
}

}  // namespace structlik
