// weight_grad(a, b, batch)[j, c*S+i, p] = sum over images k = j (mod batch) of a_kp * b_k,p+delta_i
// (zero where p+delta_i is outside): the gradient of sum_k a_k^T U b_k with respect to off_diag,
// image k using parameters k % batch (the samples of a distribution, the columns of a low-rank
// factor). The backward passes of apply_upper, apply_upper_t and both solves are built from it.
// Summing the repeats here, row by row in L1, instead of writing k*S planes and summing them in
// PyTorch: the low-rank log_prob's backward (352 images over 32 parameter sets, B32 64x64 r2)
// spent 64% of its time in that write on a 2-core AMD EPYC; summed here, the whole call went from
// 28.8 to 16.5 ms on a 2-core Xeon (benchmarks/bench_low_rank.py).
#include "stencil.h"

namespace structlik {

Tensor weight_grad(const Tensor& a, const Tensor& b, IntList flat_offsets, int64_t batch) {
  const auto offsets = parse_offsets(flat_offsets);
  STD_TORCH_CHECK(a.is_cpu() && a.dim() == 4, "a: expected a CPU tensor of shape (B, C, H, W), got ", shape(a));
  STD_TORCH_CHECK(is_float_or_double(a.scalar_type()), "a: expected float32 or float64");
  check_image(b, "b", a);
  STD_TORCH_CHECK(batch > 0 ? a.size(0) % batch == 0 : a.size(0) == 0 && batch == 0,
                  "batch: expected a divisor of a's batch ", a.size(0), ", got ", batch);
  const auto ac = planes_contiguous(a), bc = planes_contiguous(b);
  const int64_t C = a.size(1), H = a.size(2), W = a.size(3), n = H * W;
  const int64_t S = static_cast<int64_t>(offsets.size()), repeats = batch > 0 ? a.size(0) / batch : 0;
  auto out = empty({batch, C * S, H, W}, a);
  dispatch_floating(a.scalar_type(), "weight_grad", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> A(ac, C), Bp(bc, C);
    scalar_t* out_p = data<scalar_t>(out);
    // task k: output plane k (image k / C of the batch, channel k % C), from input planes k + t*batch*C
    const int64_t grain = std::max<int64_t>(1, plane_grain(H, W) / std::max<int64_t>(repeats, 1));
    parallel_cloned(batch * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
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
            std::fill(orow, orow + lo, scalar_t(0));
            for (int64_t t = 0; t < repeats; ++t) {
              const scalar_t* arow = A(k + t * batch * C) + y * W;
              const scalar_t* brow = Bp(k + t * batch * C) + (y + dy) * W + dx;
              if (t == 0) {
                for (int64_t x = lo; x < hi; ++x) orow[x] = arow[x] * brow[x];
              } else {
                for (int64_t x = lo; x < hi; ++x) orow[x] += arow[x] * brow[x];
              }
            }
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
