// The fused NLL with a learned basis (paper section 4.3): the S weights of each
// pixel are w_{p,i} = sum_j basis[i, j] coeffs_j(p), formed one row at a time in
// a buffer of S x W values; the (B, C*S, H, W) off_diag never exists.
//
// The sweep is nll_sweep.h's, with BasisWeights as the weight source. Backward, for
// upstream g_b, from the row of gw_{p,i} = g u_p r_{p+delta_i} the sweep hands over:
//   d/dcoeffs_j(p) = sum_i basis[i, j] gw_{p,i},   d/dbasis[i, j] = sum_p gw_{p,i} coeffs_j(p).
// The basis gradient is reduced per plane in float64, then over planes in order, so it is
// deterministic.
#include <cmath>

#include "nll_sweep.h"

namespace structlik {

// wbuf[i*W + x] = sum_j basis[i, j] coeffs_j(y, x) for one row.
template <typename scalar_t>
static void basis_rows(const scalar_t* basis, const scalar_t* ck, int64_t S, int64_t nb, int64_t y, int64_t W,
                       int64_t c_stride, scalar_t* __restrict__ wbuf) {
  for (int64_t i = 0; i < S; ++i) {
    scalar_t* __restrict__ row = wbuf + i * W;
    std::fill(row, row + W, scalar_t(0));
    for (int64_t j = 0; j < nb; ++j) {
      const scalar_t b = basis[i * nb + j];
      const scalar_t* __restrict__ c = ck + j * c_stride + y * W;
      for (int64_t x = 0; x < W; ++x) row[x] += b * c[x];
    }
  }
}

static void check_basis(const Tensor& coeffs, const Tensor& basis, const Tensor& log_diag, int64_t S) {
  STD_TORCH_CHECK(basis.dim() == 2 && basis.size(0) == S, "basis: expected shape (S, n_b) with S=", S, ", got ",
              shape(basis));
  STD_TORCH_CHECK(basis.scalar_type() == log_diag.scalar_type() && basis.is_cpu(),
              "basis: expected a CPU tensor of log_diag's dtype");
  const int64_t nb = basis.size(1);
  STD_TORCH_CHECK(coeffs.dim() == 4 && coeffs.size(0) == log_diag.size(0) && coeffs.size(1) == log_diag.size(1) * nb &&
                  coeffs.size(2) == log_diag.size(2) && coeffs.size(3) == log_diag.size(3),
              "coeffs: expected shape (B, C*n_b, H, W) with n_b=", nb, ", got ", shape(coeffs));
  STD_TORCH_CHECK(coeffs.scalar_type() == log_diag.scalar_type() && coeffs.is_cpu(),
              "coeffs: expected a CPU tensor of log_diag's dtype");
}

static std::vector<Offset> check_inputs(const Tensor& x, const Tensor& loc, const Tensor& log_diag,
                                        const Tensor& coeffs, const Tensor& basis, IntList flat_offsets) {
  auto offsets = parse_offsets(flat_offsets);
  STD_TORCH_CHECK(log_diag.dim() == 4 && log_diag.is_cpu() &&
                  (log_diag.scalar_type() == ScalarType::Float || log_diag.scalar_type() == ScalarType::Double),
              "log_diag: expected a float32 or float64 CPU tensor of shape (B, C, H, W)");
  check_image(x, "x", log_diag);
  check_image(loc, "loc", log_diag);
  check_basis(coeffs, basis, log_diag, static_cast<int64_t>(offsets.size()));
  return offsets;
}

// The weights of a row formed from the basis in a buffer of S x W values.
template <typename scalar_t>
struct BasisWeights {
  Planes<const scalar_t> coeffs;
  const scalar_t* basis;
  int64_t S, nb, W;
  const Planes<scalar_t>* grad_c = nullptr;   // backward only
  double* basis_acc = nullptr;                // backward: S x nb sums per plane

  int64_t buffer_size(int64_t S_, int64_t W_) const { return S_ * W_; }
  const scalar_t* row(int64_t k, int64_t y, scalar_t* buf) const {
    basis_rows(basis, coeffs(k), S, nb, y, W, coeffs.weight_stride(), buf);
    return buf;
  }
  int64_t row_stride() const { return W; }
  void take_weight_grad(int64_t k, int64_t y, const scalar_t* gw) const {
    const scalar_t* ck = coeffs(k);
    double* bacc = basis_acc + k * S * nb;
    for (int64_t j = 0; j < nb; ++j) {
      const scalar_t* __restrict__ crow = ck + j * coeffs.weight_stride() + y * W;
      scalar_t* __restrict__ gcrow = grad_c->weight(k, j) + y * W;
      std::fill(gcrow, gcrow + W, scalar_t(0));
      for (int64_t i = 0; i < S; ++i) {
        const scalar_t b = basis[i * nb + j];
        const scalar_t* __restrict__ gwi = gw + i * W;
        double dot = 0;
        _Pragma("omp simd reduction(+ : dot)")
        for (int64_t x = 0; x < W; ++x) {
          gcrow[x] += b * gwi[x];
          dot += double(gwi[x]) * double(crow[x]);
        }
        bacc[i * nb + j] += dot;
      }
    }
  }
};

Tensor nll_basis(const Tensor& x, const Tensor& loc, const Tensor& log_diag, const Tensor& coeffs,
                     const Tensor& basis, IntList flat_offsets) {
  const auto offsets = check_inputs(x, loc, log_diag, coeffs, basis, flat_offsets);
  const int64_t S = static_cast<int64_t>(offsets.size());
  const auto xc = planes_contiguous(x), lc = planes_contiguous(loc), s = planes_contiguous(log_diag),
             cc = planes_contiguous(coeffs), bc = torch::stable::contiguous(basis);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), nb = basis.size(1);
  auto out = empty({B}, x);
  dispatch_floating(x.scalar_type(), "nll_basis", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> X(xc, C), L(lc, C), Sd(s, C);
    const BasisWeights<scalar_t> source{Planes<const scalar_t>(cc, C, nb), data<scalar_t>(bc), S, nb, W};
    nll_forward_sweep(X, L, Sd, source, offsets, B, C, H, W, data<scalar_t>(out));
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> nll_basis_backward(
    const Tensor& grad, const Tensor& x, const Tensor& loc, const Tensor& log_diag,
    const Tensor& coeffs, const Tensor& basis, IntList flat_offsets) {
  const auto offsets = check_inputs(x, loc, log_diag, coeffs, basis, flat_offsets);
  const int64_t S = static_cast<int64_t>(offsets.size());
  STD_TORCH_CHECK(grad.dim() == 1 && grad.size(0) == x.size(0), "grad: expected shape (B,), got ", shape(grad));
  const auto xc = planes_contiguous(x), lc = planes_contiguous(loc), s = planes_contiguous(log_diag),
             cc = planes_contiguous(coeffs), bc = torch::stable::contiguous(basis),
             gc = torch::stable::contiguous(torch::stable::to(grad, x.scalar_type()));
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), nb = basis.size(1);
  auto grad_loc = empty(shape(x).dims, x), grad_s = empty(shape(log_diag).dims, x),
       grad_c = empty(shape(coeffs).dims, x);
  auto grad_b = new_empty_like(bc);
  dispatch_floating(x.scalar_type(), "nll_basis_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    std::vector<double> basis_acc(B * C * S * nb, 0.0);   // per plane, reduced in order below
    const Planes<const scalar_t> X(xc, C), L(lc, C), Sd(s, C);
    const Planes<scalar_t> GL(grad_loc, C), GS(grad_s, C), GC(grad_c, C, nb);
    BasisWeights<scalar_t> source{Planes<const scalar_t>(cc, C, nb), data<scalar_t>(bc), S, nb, W, &GC,
                                  basis_acc.data()};
    nll_backward_sweep(data<scalar_t>(gc), X, L, Sd, source, offsets, GL, GS, B, C, H, W);
    scalar_t* gb_p = data<scalar_t>(grad_b);
    for (int64_t e = 0; e < S * nb; ++e) {
      double total = 0;
      for (int64_t k = 0; k < B * C; ++k) total += basis_acc[k * S * nb + e];
      gb_p[e] = static_cast<scalar_t>(total);
    }
  });
  return std::make_tuple(grad_loc, grad_s, grad_c, grad_b);
}

STABLE_TORCH_LIBRARY_IMPL(structlik, CPU, m) {
  m.impl("nll_basis", TORCH_BOX(&nll_basis));
  m.impl("nll_basis_backward", TORCH_BOX(&nll_basis_backward));
}

}  // namespace structlik
