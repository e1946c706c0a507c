// The fused NLL and its backward, one (b, c) plane per task.
//
// Forward:  nll_b = sum_c [ 0.5 ||U r||^2 - sum_p s_p ] + (C H W / 2) log 2 pi,  r = x - loc.
// Backward, for upstream g_b, with u = U r recomputed (never stored between passes):
//   d/dloc = -g U^T u      (returned; d/dx is its negative, formed by the caller only when x
//                           needs a gradient, which data never does: no extra pass on the common path)
//   d/ds_p = g (u_p r_p d_p - 1)
//   d/dw_{p,i} = g u_p r_{p+delta_i}
// Each task keeps one plane-sized buffer (r = x - loc) and rows of u and d; no
// tensor of S values per pixel exists besides the off_diag gradient itself.
// Inputs are read in place (Planes: split-head views are not copied); the
// gradients are written contiguous.
#include <array>
#include <cmath>

#include "nll_rows.h"

namespace structlik {

Tensor nll(const Tensor& x, const Tensor& loc, const Tensor& log_diag, const Tensor& off_diag,
               IntList flat_offsets) {
  const auto offsets = check_params(log_diag, off_diag, flat_offsets);
  check_image(x, "x", log_diag);
  check_image(loc, "loc", log_diag);
  const auto xc = planes_contiguous(x), lc = planes_contiguous(loc), s = planes_contiguous(log_diag),
             w = planes_contiguous(off_diag);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), n = H * W;
  const int64_t S = static_cast<int64_t>(offsets.size());
  auto out = empty({B}, x);
  dispatch_floating(x.scalar_type(), "nll", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    using acc_t = double;   // double for float and double
    std::vector<acc_t> per_plane(B * C);
    const Planes<const scalar_t> X(xc, C), L(lc, C), Sd(s, C), Wt(w, C, S);
    parallel_cloned(B * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
      // Rows outer, offsets inner: the rows of r that one row of u reads stay in L1.
      std::vector<scalar_t> r(n), u(W), d(W);
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t* sk = Sd(k);
        residual(X(k), L(k), r.data(), n);
        acc_t quad = 0, logdet = 0;
        for (int64_t y = 0; y < H; ++y) {
          u_row(r.data(), sk, Wt(k) + y * W, Wt.weight_stride(), y, H, W, offsets, d.data(), u.data());
          reduce_row(u.data(), sk + y * W, W, quad, logdet);
        }
        per_plane[k] = 0.5 * quad - logdet;
      }
    });
    finish_nll(per_plane, B, C, n, data<scalar_t>(out));
  });
  return out;
}

// The backward, writing d/dloc, d/dlog_diag and d/doff_diag through the outputs' strides:
// contiguous tensors, or the slices of one head-shaped gradient (nll_head_backward).
static void nll_backward_into(const Tensor& grad, const Tensor& x, const Tensor& loc,
                              const Tensor& log_diag, const Tensor& off_diag, IntList flat_offsets,
                              const Tensor& grad_loc, const Tensor& grad_s, const Tensor& grad_w) {
  const auto offsets = check_params(log_diag, off_diag, flat_offsets);
  check_image(x, "x", log_diag);
  check_image(loc, "loc", log_diag);
  STD_TORCH_CHECK(grad.dim() == 1 && grad.size(0) == x.size(0), "grad: expected shape (B,), got ", shape(grad));
  const auto xc = planes_contiguous(x), lc = planes_contiguous(loc), s = planes_contiguous(log_diag),
             w = planes_contiguous(off_diag);
  const auto gc = torch::stable::contiguous(torch::stable::to(grad, x.scalar_type()));
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), n = H * W;
  const int64_t S = static_cast<int64_t>(offsets.size());
  dispatch_floating(x.scalar_type(), "nll_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> X(xc, C), L(lc, C), Sd(s, C), Wt(w, C, S);
    const Planes<scalar_t> GL(grad_loc, C), GS(grad_s, C), GW(grad_w, C, S);
    const scalar_t* g_p = data<scalar_t>(gc);
    parallel_cloned(B * C, plane_grain(H, W), [&](int64_t begin, int64_t end) {
      // One sweep over the rows: row y of u gives row y of d/ds and d/dw, and scatters
      // w_{p,i} u_p into rows y + dy_i of U^T u; row y of d/dloc is complete once row y is done.
      std::vector<scalar_t> r(n), u(W), d(W), gw_row(W);
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t g = g_p[k / C];
        const scalar_t* sk = Sd(k);
        const scalar_t* wk = Wt(k);
        const int64_t ws = Wt.weight_stride();
        scalar_t* gx = GL(k);
        scalar_t* gs = GS(k);
        residual(X(k), L(k), r.data(), n);
        std::fill(gx, gx + n, scalar_t(0));
        for (int64_t y = 0; y < H; ++y) {
          u_row(r.data(), sk, wk + y * W, ws, y, H, W, offsets, d.data(), u.data());
          const scalar_t* __restrict__ rrow = r.data() + y * W;
          scalar_t* __restrict__ gsrow = gs + y * W;
          scalar_t* __restrict__ gxrow = gx + y * W;
          for (int64_t x = 0; x < W; ++x) {
            gsrow[x] = g * (u[x] * rrow[x] * d[x] - scalar_t(1));
            gxrow[x] += d[x] * u[x];
          }
          for (int64_t i = 0; i < S; ++i) {
            const auto [dy, dx] = offsets[i];
            const int64_t lo = col_lo(dx), hi = col_hi(dx, W);
            scalar_t* __restrict__ gwrow = gw_row.data();   // formed in L1, then streamed out
            std::fill(gwrow, gwrow + W, scalar_t(0));
            if (y + dy < H && lo < hi) {
              const scalar_t* __restrict__ wrow = wk + i * ws + y * W;
              const scalar_t* __restrict__ rn = r.data() + (y + dy) * W + dx;
              scalar_t* __restrict__ gxn = gx + (y + dy) * W + dx;
              for (int64_t x = lo; x < hi; ++x) {
                gwrow[x] = g * u[x] * rn[x];
                gxn[x] += wrow[x] * u[x];   // (U^T u)_{p+delta_i} += w_{p,i} u_p
              }
            }
            stream_row(GW.weight(k, i) + y * W, gwrow, W);
          }
          for (int64_t x = 0; x < W; ++x) gxrow[x] *= -g;   // row y of U^T u is complete: d/dloc
        }
      }
      stream_fence();   // the streaming stores are visible before the task ends
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> nll_backward(const Tensor& grad, const Tensor& x,
                                                            const Tensor& loc, const Tensor& log_diag,
                                                            const Tensor& off_diag, IntList flat_offsets) {
  // The gradients are contiguous whatever the inputs' strides.
  auto grad_loc = empty(shape(x).dims, x), grad_s = empty(shape(log_diag).dims, x),
       grad_w = empty(shape(off_diag).dims, x);
  nll_backward_into(grad, x, loc, log_diag, off_diag, flat_offsets, grad_loc, grad_s, grad_w);
  return std::make_tuple(grad_loc, grad_s, grad_w);
}

// loc, log_diag and off_diag as channels [c0, c0 + C), [c0 + C, c0 + 2C) and
// [c0 + 2C, c0 + (2 + S)C) of one decoder head (B, K, H, W): what head.split gives.
static std::array<Tensor, 3> head_slices(const Tensor& head, int64_t c0, int64_t C, int64_t S) {
  STD_TORCH_CHECK(head.dim() == 4 && c0 >= 0 && c0 + (2 + S) * C <= head.size(1), "head: expected shape (B, K, H, W) "
              "with K >= c0 + (2 + S) C = ", c0 + (2 + S) * C, ", got ", shape(head));
  return {narrow(head, 1, c0, C), narrow(head, 1, c0 + C, C), narrow(head, 1, c0 + 2 * C, S * C)};
}

Tensor nll_head(const Tensor& x, const Tensor& head, int64_t c0, IntList flat_offsets) {
  const auto [loc, log_diag, off_diag] = head_slices(head, c0, x.size(1), flat_offsets.size() / 2);
  return nll(x, loc, log_diag, off_diag, flat_offsets);
}

// The head's whole gradient in one tensor: the kernel writes the three slices in
// place, the head's other channels are zero. Autograd's backward of head.split
// (a cat of three gradients, one more pass over all of them) never runs.
Tensor nll_head_backward(const Tensor& grad, const Tensor& x, const Tensor& head, int64_t c0,
                             IntList flat_offsets) {
  const int64_t C = x.size(1), S = static_cast<int64_t>(flat_offsets.size() / 2), used = (2 + S) * C;
  const auto [loc, log_diag, off_diag] = head_slices(head, c0, C, S);
  auto grad_head = empty(shape(head).dims, head);
  auto before = narrow(grad_head, 1, 0, c0), after = narrow(grad_head, 1, c0 + used,
                                                                                         head.size(1) - c0 - used);
  torch::stable::zero_(before);
  torch::stable::zero_(after);
  const auto [gl, gs, gw] = head_slices(grad_head, c0, C, S);
  nll_backward_into(grad, x, loc, log_diag, off_diag, flat_offsets, gl, gs, gw);
  return grad_head;
}

STABLE_TORCH_LIBRARY_IMPL(structlik, CPU, m) {
  m.impl("nll", TORCH_BOX(&nll));
  m.impl("nll_backward", TORCH_BOX(&nll_backward));
  m.impl("nll_head", TORCH_BOX(&nll_head));
  m.impl("nll_head_backward", TORCH_BOX(&nll_head_backward));
}

}  // namespace structlik
