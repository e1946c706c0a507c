// The fused NLL and its backward, one (b, c) plane per task: the sweep of nll_sweep.h
// with the weights read from off_diag. Inputs are read in place (Planes: split-head
// views are not copied); the gradients are written contiguous, or into the slices of one
// head's gradient (nll_head_backward).
#include <array>
#include <cmath>

#include "nll_sweep.h"

namespace structlik {

// The weights of offset i for row y: off_diag's plane, read in place; d/dw streamed out.
template <typename scalar_t>
struct PlainWeights {
  Planes<const scalar_t> weights;
  int64_t W;
  const Planes<scalar_t>* grad = nullptr;   // backward only
  int64_t S = 0;

  int64_t buffer_size(int64_t, int64_t) const { return 0; }
  const scalar_t* row(int64_t k, int64_t y, scalar_t*) const { return weights(k) + y * W; }
  int64_t row_stride() const { return weights.weight_stride(); }
  void take_weight_grad(int64_t k, int64_t y, const scalar_t* gw) const {
    for (int64_t i = 0; i < S; ++i) stream_row(grad->weight(k, i) + y * W, gw + i * W, W);
  }
};

Tensor nll(const Tensor& x, const Tensor& loc, const Tensor& log_diag, const Tensor& off_diag,
               IntList flat_offsets) {
  const auto offsets = check_params(log_diag, off_diag, flat_offsets);
  check_image(x, "x", log_diag);
  check_image(loc, "loc", log_diag);
  const auto xc = planes_contiguous(x), lc = planes_contiguous(loc), s = planes_contiguous(log_diag),
             w = planes_contiguous(off_diag);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t S = static_cast<int64_t>(offsets.size());
  auto out = empty({B}, x);
  dispatch_floating(x.scalar_type(), "nll", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> X(xc, C), L(lc, C), Sd(s, C);
    const PlainWeights<scalar_t> source{Planes<const scalar_t>(w, C, S), W};
    nll_forward_sweep(X, L, Sd, source, offsets, B, C, H, W, data<scalar_t>(out));
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
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t S = static_cast<int64_t>(offsets.size());
  dispatch_floating(x.scalar_type(), "nll_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> X(xc, C), L(lc, C), Sd(s, C);
    const Planes<scalar_t> GL(grad_loc, C), GS(grad_s, C), GW(grad_w, C, S);
    PlainWeights<scalar_t> source{Planes<const scalar_t>(w, C, S), W, &GW, S};
    nll_backward_sweep(data<scalar_t>(gc), X, L, Sd, source, offsets, GL, GS, B, C, H, W);
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
