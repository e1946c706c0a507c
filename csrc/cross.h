// Coupled channels (docs/contract.md §1): the cross weights xi, (B, C(C-1)/2, H, W), plane
// kappa(c, j) = c(2C-c-1)/2 + j-c-1 for the pair c < j. M = U + X with
//   (X r)_{c,p}   = sum_{j>c} xi_{kappa(c,j),p} r_{j,p}     (channel c's row reads channels after it)
//   (X^T y)_{j,p} = sum_{c<j} xi_{kappa(c,j),p} y_{c,p}
// Every term is at one pixel: the kernels add them row by row to what U gives, reading the other
// channels' planes of the same image; the solves go channel by channel inside each image task.
#pragma once

#include <optional>

#include "stencil.h"

namespace structlik {

inline int64_t kappa(int64_t c, int64_t j, int64_t C) { return c * (2 * C - c - 1) / 2 + j - c - 1; }

// The cross weights' planes, read in place through their batch and channel strides (each plane
// contiguous); image b reads the weights of b % batch (the solves' samples, as Planes). Empty
// (given() false) without cross weights. T is mutable for a gradient written through strides.
template <typename T>
struct Cross {
  T* data = nullptr;
  int64_t batch = 1, sb = 0, sc = 0, C = 1;
  Cross() = default;
  Cross(const std::optional<Tensor>& t, int64_t C_) : C(C_) {
    if (!t) return;
    data = static_cast<T*>(t->data_ptr());
    batch = std::max<int64_t>(1, t->size(0)), sb = t->stride(0), sc = t->stride(1);
  }
  bool given() const { return data != nullptr && C > 1; }
  T* operator()(int64_t b, int64_t c, int64_t j) const { return data + (b % batch) * sb + kappa(c, j, C) * sc; }
};

// Checks the cross weights against log_diag (B, C, H, W): (B, C(C-1)/2, H, W), its dtype, CPU;
// returns them with contiguous planes (or nullopt).
inline std::optional<Tensor> check_cross(const std::optional<Tensor>& cross, const Tensor& log_diag) {
  if (!cross) return std::nullopt;
  const int64_t C = log_diag.size(1);
  STD_TORCH_CHECK(cross->is_cpu(), "cross: expected a CPU tensor");
  STD_TORCH_CHECK(cross->dim() == 4 && cross->size(0) == log_diag.size(0) && cross->size(1) == C * (C - 1) / 2 &&
                      cross->size(2) == log_diag.size(2) && cross->size(3) == log_diag.size(3),
                  "cross: expected shape (B, C(C-1)/2, H, W) = (", log_diag.size(0), ", ", C * (C - 1) / 2, ", ",
                  log_diag.size(2), ", ", log_diag.size(3), "), got ", shape(*cross));
  STD_TORCH_CHECK(cross->scalar_type() == log_diag.scalar_type(), "cross: dtype ", cross->scalar_type(),
                  " does not match log_diag's ", log_diag.scalar_type());
  return planes_contiguous(*cross);
}

// out[x] += sign * sum over the partners of plane k = b*C + c, for one row of W values at offset `at`:
//   forward (M): sum_{j>c} xi_{kappa(c,j)} in_j;   transposed (M^T): sum_{j<c} xi_{kappa(j,c)} in_j.
// in(j) gives channel j's plane of the image b.
template <typename scalar_t, typename In>
inline void add_cross_row(const Cross<const scalar_t>& X, int64_t b, int64_t c, bool transposed, int64_t at,
                          int64_t W, const In& in, scalar_t* __restrict__ out, scalar_t sign = 1) {
  const int64_t C = X.C;
  for (int64_t j = transposed ? 0 : c + 1, end = transposed ? c : C; j < end; ++j) {
    const scalar_t* __restrict__ xi = (transposed ? X(b, j, c) : X(b, c, j)) + at;
    const scalar_t* __restrict__ v = in(j) + at;
    for (int64_t x = 0; x < W; ++x) out[x] += sign * xi[x] * v[x];
  }
}

}  // namespace structlik
