// The NLL family (structlik/ops/_nll.py): the ops nll, nll_backward, nll_head and
// nll_head_backward, one (b, c) plane per task, all through the sweep of nll_sweep.h. The
// weights come from one of two sources: off_diag's planes (PlainWeights), or a learned basis
// (paper section 4.3: w_{p,i} = sum_j basis[i, j] coeffs_j(p), formed one row at a time in a
// buffer of S x W values, BasisWeights), so the (B, C*S, H, W) weights never exist.
//
// Inputs are read in place (Planes: split-head views are not copied); the gradients are
// written contiguous, or into the slices of one head's gradient (nll_head_backward).
// float16/bfloat16 inputs are read through float32 copies and their gradients cast back
// (computed, torch_api.h). store_u: the forward also writes u = U (x - loc), which the
// backward then reads instead of forming each row again.
//
// With a basis, for upstream g_b and the row of gw_{p,i} = g u_p r_{p+delta_i} the sweep hands over:
//   d/dcoeffs_j(p) = sum_i basis[i, j] gw_{p,i},   d/dbasis[i, j] = sum_p gw_{p,i} coeffs_j(p),
// the basis gradient reduced per plane in float64, then over planes in order (deterministic).
#include <array>
#include <cmath>
#include <optional>

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
  scalar_t* scale(scalar_t*) const { return nullptr; }
  void take_weight_grad(int64_t k, int64_t y, const scalar_t* gw, const scalar_t*) const {
    for (int64_t i = 0; i < S; ++i) stream_row(grad->weight(k, i) + y * W, gw + i * W, W);
  }
};

// Raw weights a bounded on the fly (head.py's bound_weights, the quick start's default):
//   w_{p,i} = a_{p,i} f_p,  f_p = bound d_p / A_p,  A_p = 1 + sum_i |a_{p,i}|:
// the sweep reads the raw rows in place and scales by f (scale(): u = d r + f sum a r, and U^T u
// scatters a (f u)), so neither the bounded (B, C*S, H, W) tensor nor a row of it exists. From the
// sweep's gw_i = d/dw_i:  d/da_i = f (gw_i - sign(a_i) T / A),  T = sum_j a_j gw_j;  d/ds += f T
// (w is proportional to d). The buffer holds the row's g = bound / A (f once the sweep has d), 1/A and T.
// Measured on a 2-core EPYC, one thread, from_head's loss forward+backward: the PyTorch bound took
// 2.3-3.2x the unbounded call (B64 64x64 r1/r3, B8 C3 128x128 r2).
template <typename scalar_t>
struct BoundedWeights {
  Planes<const scalar_t> raw;
  scalar_t bound;
  int64_t S, W;
  const Planes<scalar_t>* grad = nullptr;     // backward only: d/da
  const Planes<scalar_t>* grad_s = nullptr;   // backward only: d/dlog_diag, which gets f T

  int64_t buffer_size(int64_t, int64_t W_) const { return 3 * W_; }   // g (then f), 1/A, T
  const scalar_t* row(int64_t k, int64_t y, scalar_t* buf) const {
    scalar_t* __restrict__ g = buf;
    scalar_t* __restrict__ inv = g + W;
    std::fill(inv, inv + W, scalar_t(1));
    for (int64_t i = 0; i < S; ++i) {
      const scalar_t* __restrict__ a = raw.weight(k, i) + y * W;
      for (int64_t x = 0; x < W; ++x) inv[x] += std::abs(a[x]);
    }
    for (int64_t x = 0; x < W; ++x) {
      inv[x] = scalar_t(1) / inv[x];
      g[x] = bound * inv[x];     // the sweep multiplies by d: f = bound d / A
    }
    return raw(k) + y * W;
  }
  scalar_t* scale(scalar_t* buf) const { return buf; }
  int64_t row_stride() const { return raw.weight_stride(); }
  // gw (the sweep's row buffer) becomes d/da in place, then streams out as PlainWeights' rows do
  // (no read of the destination): 16.6 ms against 12.3 unbounded at B64 64x64 r3 with plain
  // stores from a stack chunk, before.
  void take_weight_grad(int64_t k, int64_t y, scalar_t* gw, scalar_t* buf) const {
    const scalar_t* __restrict__ f = buf;
    const scalar_t* __restrict__ inv = f + W;
    scalar_t* __restrict__ t = buf + 2 * W;
    scalar_t* __restrict__ gs = (*grad_s)(k) + y * W;
    std::fill(t, t + W, scalar_t(0));
    for (int64_t j = 0; j < S; ++j) {
      const scalar_t* __restrict__ a = raw.weight(k, j) + y * W;
      const scalar_t* __restrict__ g = gw + j * W;
      for (int64_t x = 0; x < W; ++x) t[x] += a[x] * g[x];
    }
    for (int64_t x = 0; x < W; ++x) {
      gs[x] += f[x] * t[x];
      t[x] *= inv[x];
    }
    for (int64_t i = 0; i < S; ++i) {
      const scalar_t* __restrict__ a = raw.weight(k, i) + y * W;
      scalar_t* __restrict__ g = gw + i * W;
      for (int64_t x = 0; x < W; ++x) {
        const scalar_t sign = scalar_t(a[x] > 0) - scalar_t(a[x] < 0);
        g[x] = f[x] * (g[x] - sign * t[x]);
      }
      stream_row(grad->weight(k, i) + y * W, g, W);
    }
  }
};

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
  scalar_t* scale(scalar_t*) const { return nullptr; }
  void take_weight_grad(int64_t k, int64_t y, const scalar_t* gw, const scalar_t*) const {
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

// The operands in the compute dtype, checked: x, loc, log_diag (B, C, H, W); off_diag
// (B, C*S, H, W), or with a basis (S, n_b) its coefficients (B, C*n_b, H, W).
// cross: the cross weights of coupled channels (B, C(C-1)/2, H, W), or nullopt.
struct NllInputs {
  Tensor x, loc, log_diag, weights;
  std::optional<Tensor> basis, cross;
  std::vector<Offset> offsets;
  int64_t B, C, H, W, S, nb;
  double bound;   // > 0: the weights are raw, bounded on the fly (BoundedWeights); 0: as given

  NllInputs(const Tensor& x_, const Tensor& loc_, const Tensor& log_diag_, const Tensor& weights_,
            const std::optional<Tensor>& basis_, IntList flat_offsets, const std::optional<Tensor>& cross_,
            double bound_ = 0.0)
      : x(computed(x_)), loc(computed(loc_)), log_diag(computed(log_diag_)), weights(computed(weights_)),
        bound(bound_) {
    STD_TORCH_CHECK(bound == 0.0 || (bound > 0.0 && bound < 1.0), "bound: expected 0 (weights as given) or a "
                    "weight bound in (0, 1), got ", bound);
    STD_TORCH_CHECK(bound == 0.0 || (!basis_ && !(cross_ && cross_->numel())), "bound: the weights are bounded "
                    "inside the kernel only without a basis and without cross weights; bound them first "
                    "(structlik.bound_coupled_weights) and pass bound=0");
    if (basis_) basis = torch::stable::contiguous(computed(*basis_));
    offsets = basis ? parse_offsets(flat_offsets) : check_params(log_diag, weights, flat_offsets);
    S = static_cast<int64_t>(offsets.size());
    if (basis) check_basis();
    check_image(x, "x", log_diag);
    check_image(loc, "loc", log_diag);
    B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    nb = basis ? basis->size(1) : 1;
    x = planes_contiguous(x), loc = planes_contiguous(loc), log_diag = planes_contiguous(log_diag);
    weights = planes_contiguous(weights);
    if (cross_ && C > 1) cross = check_cross(computed(*cross_), log_diag);
  }

  template <typename scalar_t>
  Cross<const scalar_t> cross_planes() const { return Cross<const scalar_t>(cross, C); }

  void check_basis() const {
    STD_TORCH_CHECK(log_diag.dim() == 4 && log_diag.is_cpu(), "log_diag: expected a CPU tensor of shape (B, C, H, W)");
    STD_TORCH_CHECK(basis->dim() == 2 && basis->size(0) == S, "basis: expected shape (S, n_b) with S=", S, ", got ",
                    shape(*basis));
    STD_TORCH_CHECK(basis->scalar_type() == log_diag.scalar_type() && basis->is_cpu(),
                    "basis: expected a CPU tensor of log_diag's dtype");
    const int64_t n_b = basis->size(1);
    STD_TORCH_CHECK(weights.dim() == 4 && weights.size(0) == log_diag.size(0) &&
                        weights.size(1) == log_diag.size(1) * n_b && weights.size(2) == log_diag.size(2) &&
                        weights.size(3) == log_diag.size(3),
                    "coeffs: expected shape (B, C*n_b, H, W) with n_b=", n_b, ", got ", shape(weights));
    STD_TORCH_CHECK(weights.scalar_type() == log_diag.scalar_type() && weights.is_cpu(),
                    "coeffs: expected a CPU tensor of log_diag's dtype");
  }

  // u from the forward (store_u), or nullptr when it was not stored (an empty tensor).
  template <typename scalar_t>
  const scalar_t* stored_u(const Tensor& u) const {
    if (u.numel() == 0) return nullptr;
    STD_TORCH_CHECK(u.dim() == 4 && u.size(0) == B && u.size(1) == C && u.size(2) == H && u.size(3) == W &&
                        u.scalar_type() == x.scalar_type() && u.is_contiguous(),
                    "u: expected the forward's contiguous (B, C, H, W) = ", shape(x), " of dtype ", x.scalar_type(),
                    ", got ", shape(u));
    return data<scalar_t>(u);
  }
};

// The forward sweep: out[b] and, where u is not empty, u = M (x - loc).
static void nll_forward_into(const NllInputs& in, const Tensor& out, const Tensor& u) {
  dispatch_floating(in.x.scalar_type(), "nll", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> X(in.x, in.C), L(in.loc, in.C), Sd(in.log_diag, in.C);
    const auto Xc = in.cross_planes<scalar_t>();
    scalar_t* u_out = u.numel() ? data<scalar_t>(u) : nullptr;
    if (in.basis) {
      const BasisWeights<scalar_t> source{Planes<const scalar_t>(in.weights, in.C, in.nb), data<scalar_t>(*in.basis),
                                          in.S, in.nb, in.W};
      nll_forward_sweep(X, L, Sd, source, Xc, in.offsets, in.B, in.C, in.H, in.W, data<scalar_t>(out), u_out);
    } else if (in.bound > 0) {
      const BoundedWeights<scalar_t> source{Planes<const scalar_t>(in.weights, in.C, in.S),
                                            static_cast<scalar_t>(in.bound), in.S, in.W};
      nll_forward_sweep(X, L, Sd, source, Xc, in.offsets, in.B, in.C, in.H, in.W, data<scalar_t>(out), u_out);
    } else {
      const PlainWeights<scalar_t> source{Planes<const scalar_t>(in.weights, in.C, in.S), in.W};
      nll_forward_sweep(X, L, Sd, source, Xc, in.offsets, in.B, in.C, in.H, in.W, data<scalar_t>(out), u_out);
    }
  });
}

std::tuple<Tensor, Tensor> nll(const Tensor& x, const Tensor& loc, const Tensor& log_diag, const Tensor& off_diag,
                               std::optional<Tensor> basis, IntList flat_offsets, bool store_u,
                               std::optional<Tensor> cross, double bound) {
  const NllInputs in(x, loc, log_diag, off_diag, basis, flat_offsets, cross, bound);
  auto out = empty({in.B}, in.x);
  auto u = store_u ? empty(shape(in.x).dims, in.x) : empty({0}, in.x);
  nll_forward_into(in, out, u);
  return std::make_tuple(out, u);
}

// The backward, writing d/dloc, d/dlog_diag and d/doff_diag (or d/dcoeffs, and d/dbasis into
// grad_b; d/dcross into grad_x with cross weights) through the outputs' strides: contiguous
// tensors, or the slices of one head-shaped gradient (nll_head_backward). The outputs are in the
// compute dtype.
static void nll_backward_into(const Tensor& grad, const NllInputs& in, const Tensor& u_given, const Tensor& grad_loc,
                              const Tensor& grad_s, const Tensor& grad_w, const Tensor* grad_b,
                              const std::optional<Tensor>& grad_x) {
  STD_TORCH_CHECK(grad.dim() == 1 && grad.size(0) == in.B, "grad: expected shape (B,), got ", shape(grad));
  const auto gc = torch::stable::contiguous(torch::stable::to(grad, in.x.scalar_type()));
  Tensor u = u_given;
  if (in.cross && u.numel() == 0 && in.x.numel()) {   // M^T u reads u of the other channels: form it first
    u = empty(shape(in.x).dims, in.x);
    nll_forward_into(in, empty({in.B}, in.x), u);
  }
  dispatch_floating(in.x.scalar_type(), "nll_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> X(in.x, in.C), L(in.loc, in.C), Sd(in.log_diag, in.C);
    const Planes<scalar_t> GL(grad_loc, in.C), GS(grad_s, in.C), GW(grad_w, in.C, in.basis ? in.nb : in.S);
    const auto Xc = in.cross_planes<scalar_t>();
    const Cross<scalar_t> GX(in.cross ? grad_x : std::nullopt, in.C);
    const scalar_t* u_in = in.stored_u<scalar_t>(u);
    if (in.basis) {
      const int64_t S = in.S, nb = in.nb;
      std::vector<double> basis_acc(in.B * in.C * S * nb, 0.0);   // per plane, reduced in order below
      BasisWeights<scalar_t> source{Planes<const scalar_t>(in.weights, in.C, nb), data<scalar_t>(*in.basis), S, nb,
                                    in.W, &GW, basis_acc.data()};
      nll_backward_sweep(data<scalar_t>(gc), X, L, Sd, source, Xc, in.offsets, u_in, GL, GS, GX, in.B, in.C, in.H,
                         in.W);
      scalar_t* gb_p = data<scalar_t>(*grad_b);
      for (int64_t e = 0; e < S * nb; ++e) {
        double total = 0;
        for (int64_t k = 0; k < in.B * in.C; ++k) total += basis_acc[k * S * nb + e];
        gb_p[e] = static_cast<scalar_t>(total);
      }
    } else if (in.bound > 0) {
      BoundedWeights<scalar_t> source{Planes<const scalar_t>(in.weights, in.C, in.S),
                                      static_cast<scalar_t>(in.bound), in.S, in.W, &GW, &GS};
      nll_backward_sweep(data<scalar_t>(gc), X, L, Sd, source, Xc, in.offsets, u_in, GL, GS, GX, in.B, in.C, in.H,
                         in.W);
    } else {
      PlainWeights<scalar_t> source{Planes<const scalar_t>(in.weights, in.C, in.S), in.W, &GW, in.S};
      nll_backward_sweep(data<scalar_t>(gc), X, L, Sd, source, Xc, in.offsets, u_in, GL, GS, GX, in.B, in.C, in.H,
                         in.W);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> nll_backward(
    const Tensor& grad, const Tensor& x, const Tensor& loc, const Tensor& log_diag, const Tensor& off_diag,
    std::optional<Tensor> basis, const Tensor& u, IntList flat_offsets, std::optional<Tensor> cross, double bound) {
  const NllInputs in(x, loc, log_diag, off_diag, basis, flat_offsets, cross, bound);
  // The gradients are contiguous whatever the inputs' strides, in their inputs' dtypes.
  auto grad_loc = empty(shape(in.x).dims, in.x), grad_s = empty(shape(in.x).dims, in.x),
       grad_w = empty(shape(in.weights).dims, in.x);
  auto grad_b = in.basis ? new_empty_like(*in.basis) : empty({0}, off_diag);
  // d/dcross: an empty (0,) tensor without cross weights; zeros for one channel's (B, 0, H, W)
  auto grad_x = cross ? empty(shape(*cross).dims, in.x) : empty({0}, x);
  nll_backward_into(grad, in, u, grad_loc, grad_s, grad_w, in.basis ? &grad_b : nullptr,
                    cross ? std::optional<Tensor>(grad_x) : std::nullopt);
  return std::make_tuple(cast_like(grad_loc, loc), cast_like(grad_s, log_diag), cast_like(grad_w, off_diag),
                         basis ? cast_like(grad_b, *basis) : grad_b, cross ? cast_like(grad_x, *cross) : grad_x);
}

// loc, log_diag and off_diag as channels [c0, c0 + C), [c0 + C, c0 + 2C) and
// [c0 + 2C, c0 + (2 + S)C) of one decoder head (B, K, H, W): what head.split gives; with cross
// weights, those are the C(C-1)/2 channels after them.
static int64_t head_used(int64_t C, int64_t S, bool cross) { return (2 + S) * C + (cross ? C * (C - 1) / 2 : 0); }

static std::array<std::optional<Tensor>, 4> head_slices(const Tensor& head, int64_t c0, int64_t C, int64_t S,
                                                         bool cross) {
  const int64_t used = head_used(C, S, cross);
  STD_TORCH_CHECK(head.dim() == 4 && c0 >= 0 && c0 + used <= head.size(1), "head: expected shape (B, K, H, W) "
                  "with K >= c0 + ", used, ", got ", shape(head));
  return {narrow(head, 1, c0, C), narrow(head, 1, c0 + C, C), narrow(head, 1, c0 + 2 * C, S * C),
          cross ? std::optional<Tensor>(narrow(head, 1, c0 + (2 + S) * C, C * (C - 1) / 2)) : std::nullopt};
}

std::tuple<Tensor, Tensor> nll_head(const Tensor& x, const Tensor& head, int64_t c0, IntList flat_offsets,
                                    bool store_u, bool cross, double bound) {
  const auto [loc, log_diag, off_diag, xi] = head_slices(head, c0, x.size(1), static_cast<int64_t>(parse_offsets(flat_offsets).size()), cross);
  return nll(x, *loc, *log_diag, *off_diag, std::nullopt, flat_offsets, store_u, xi, bound);
}

// The head's whole gradient in one tensor: the kernel writes the three slices in
// place, the head's other channels are zero. Autograd's backward of head.split
// (a cat of three gradients, one more pass over all of them) never runs.
Tensor nll_head_backward(const Tensor& grad, const Tensor& x, const Tensor& head, int64_t c0, const Tensor& u,
                         IntList flat_offsets, bool cross, double bound) {
  const int64_t C = x.size(1), S = static_cast<int64_t>(parse_offsets(flat_offsets).size()), used = head_used(C, S, cross);
  const auto head_c = computed(head);
  const auto [loc, log_diag, off_diag, xi] = head_slices(head_c, c0, C, S, cross);
  const NllInputs in(x, *loc, *log_diag, *off_diag, std::nullopt, flat_offsets, xi, bound);
  auto grad_head = empty(shape(head_c).dims, head_c);
  auto before = narrow(grad_head, 1, 0, c0), after = narrow(grad_head, 1, c0 + used, head.size(1) - c0 - used);
  torch::stable::zero_(before);
  torch::stable::zero_(after);
  const auto [gl, gs, gw, gx] = head_slices(grad_head, c0, C, S, cross);
  nll_backward_into(grad, in, u, *gl, *gs, *gw, nullptr, gx);
  return cast_like(grad_head, head);
}

STABLE_TORCH_LIBRARY_IMPL(structlik, CPU, m) {
  m.impl("nll", TORCH_BOX(&nll));
  m.impl("nll_backward", TORCH_BOX(&nll_backward));
  m.impl("nll_head", TORCH_BOX(&nll_head));
  m.impl("nll_head_backward", TORCH_BOX(&nll_head_backward));
}

}  // namespace structlik
