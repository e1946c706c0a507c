// weight_grad(a, b)[c*S+i, p] = a_p * b_{p+delta_i} (zero where p+delta_i is outside):
// the gradient of a^T U b with respect to off_diag. The backward passes of
// apply_upper, apply_upper_t and both solves are built from it.
#include "stencil.h"

namespace structlik {

Tensor weight_grad(const Tensor& a, const Tensor& b, IntList flat_offsets) {
  const auto offsets = parse_offsets(flat_offsets);
  STD_TORCH_CHECK(a.is_cpu() && a.dim() == 4, "a: expected a CPU tensor of shape (B, C, H, W), got ", shape(a));
  STD_TORCH_CHECK(is_float_or_double(a.scalar_type()), "a: expected float32 or float64");
  check_image(b, "b", a);
  const auto ac = planes_contiguous(a), bc = planes_contiguous(b);
  const int64_t B = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), n = H * W;
  const int64_t S = static_cast<int64_t>(offsets.size());
  auto out = empty({B, C * S, H, W}, a);
  dispatch_floating(a.scalar_type(), "weight_grad", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> A(ac, C), Bp(bc, C);
    scalar_t* out_p = data<scalar_t>(out);
    parallel_cloned(B * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t* ak = A(k);
        const scalar_t* bk = Bp(k);
        for (int64_t i = 0; i < S; ++i) {
          const Offset& of = offsets[i];
          const int64_t dy = of.dy, dx = of.dx;
          const int64_t lo = col_lo(dx), hi = col_hi(dx, W);
          scalar_t* o = out_p + (k * S + i) * n;
          for (int64_t y = 0; y < H; ++y) {
            scalar_t* orow = o + y * W;
            if (!of.reaches(y, H) || lo >= hi) {  // the neighbour is outside for the whole row
              std::fill(orow, orow + W, scalar_t(0));
              continue;
            }
            const scalar_t* arow = ak + y * W;
            const scalar_t* brow = bk + (y + dy) * W + dx;
            std::fill(orow, orow + lo, scalar_t(0));
            for (int64_t x = lo; x < hi; ++x) orow[x] = arow[x] * brow[x];
            std::fill(orow + hi, orow + W, scalar_t(0));
          }
        }
      }
    });
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(structlik, CPU, m) {
  m.impl("weight_grad", TORCH_BOX(&weight_grad));
}

}  // namespace structlik
