// The band of Sigma = Lambda^-1 = U^-1 U^-T (docs/kernels.md §4), one (b, c) plane per task.
//
// U is Lambda's Cholesky factor already, so the Takahashi recurrence U Sigma = U^-T gives row p
// of the band from the rows after it, in reverse raster order (b the largest flat offset):
//   Sigma_pj = -sum_i (w_{p,i}/d_p) Sigma_{p+f_i, j}            j = p+1 .. p+b
//   Sigma_pp =  1/d_p^2 - sum_i (w_{p,i}/d_p) Sigma_{p, p+f_i}
// (w/d first: what fits the dtype is computed in it, issue #39 item 2).
// Every Sigma_{a,c} read has a, c in [p+1, p+b]: a dense symmetric window of L = b+1 rows and
// columns, indexed by pixel mod L, holds them (L^2 values per plane, 0.5 MB at 128x128 radius 2
// in float64: it stays in L2), so the inner loop over j is contiguous (two pieces where it wraps).
//
// covariance_band_backward is the adjoint of that sweep, in raster order: when it reaches row p,
// every row that read an entry of row p (all before p) has added its share, so row p's adjoints
// are final; it reads Sigma from the stored band through the same kind of window, and adds the
// adjoints of the entries it reads into a second one (both orders of a pair, summed when final).
#include "stencil.h"

namespace structlik {

namespace {

struct BandShape {
  int64_t H, W, n, b, L;
};

// U's parameters as both kernels read them (computed dtype, planes in place) and the band's shape.
struct BandArgs {
  std::vector<Offset> offsets;      // first: checked before any shape is read
  Tensor s, w;
  int64_t B, C, planes, S;
  BandShape g;
  BandArgs(const Tensor& log_diag, const Tensor& off_diag, IntList flat_offsets)
      : offsets(check_params(computed(log_diag), computed(off_diag), flat_offsets)),
        s(planes_contiguous(computed(log_diag))), w(planes_contiguous(computed(off_diag))),
        B(s.size(0)), C(s.size(1)), planes(B * C),
        S(static_cast<int64_t>(offsets.size())) {
    int64_t b = 1;
    for (const auto& o : offsets) b = std::max(b, o.dy * s.size(3) + o.dx);
    g = {s.size(2), s.size(3), s.size(2) * s.size(3), b, b + 1};
  }
};

// f(t, slot) for t = 0..count-1 over the slots (start + t) mod L: two contiguous pieces.
template <typename F>
inline void ring(int64_t start, int64_t count, int64_t L, const F& f) {
  const int64_t first = std::min(count, L - start);
  f(0, first, start);
  if (count > first) f(first, count, 0);
}

// The weights of pixel p that are part of U (offset inside the image), and their flat offsets.
template <typename scalar_t>
inline int64_t row_weights(const Planes<const scalar_t>& Wt, int64_t k, const std::vector<Offset>& offsets,
                           const BandShape& g, int64_t p, scalar_t* w, int64_t* f, int64_t* idx) {
  const int64_t y = p / g.W, x = p % g.W;
  int64_t m = 0;
  for (size_t i = 0; i < offsets.size(); ++i) {
    const Offset& o = offsets[i];
    const int64_t dy = o.dy, dx = o.dx;
    if (!o.reaches(y, g.H) || x + dx < 0 || x + dx >= g.W) continue;
    w[m] = Wt.weight(k, static_cast<int64_t>(i))[p];
    f[m] = dy * g.W + dx;
    idx[m] = static_cast<int64_t>(i);
    ++m;
  }
  return m;
}

}  // namespace

// out: (B, C*L, H, W), or (B, C, H, W) with diagonal_only.
Tensor covariance_band(const Tensor& log_diag_in, const Tensor& off_diag_in, IntList flat_offsets,
                       bool diagonal_only) {
  const BandArgs args(log_diag_in, off_diag_in, flat_offsets);
  const auto& [offsets, s, wts, B, C, planes, S, g] = args;
  auto out = empty({B, C * (diagonal_only ? 1 : g.L), g.H, g.W}, s);
  dispatch_floating(s.scalar_type(), "covariance_band", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> Sd(s, C), Wt(wts, C, S);
    scalar_t* out_p = data<scalar_t>(out);
    parallel_cloned(planes, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> window(g.L * g.L), acc(g.L), w(S), tile(diagonal_only ? 0 : g.L * g.W);
      std::vector<int64_t> f(S), idx(S);
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t* sk = Sd(k);
        scalar_t* o = out_p + k * (diagonal_only ? 1 : g.L) * g.n;
        scalar_t* win = window.data();
        for (int64_t p = g.n - 1; p >= 0; --p) {
          const int64_t count = std::min(g.b, g.n - 1 - p), start = (p + 1) % g.L;
          const int64_t m = row_weights(Wt, k, offsets, g, p, w.data(), f.data(), idx.data());
          // w/d before it meets Sigma: |w/d| <= 1 for bounded weights, while w * Sigma overflows
          // float32 where d spans e^+-30 although every entry of Sigma fits (issue #39 item 2)
          const scalar_t inv = scalar_t(1) / std::exp(sk[p]);
          std::fill(acc.begin(), acc.begin() + count, scalar_t(0));
          for (int64_t i = 0; i < m; ++i) {
            const scalar_t wi = w[i] * inv;
            const scalar_t* row = win + ((p + f[i]) % g.L) * g.L;
            ring(start, count, g.L, [&](int64_t t0, int64_t t1, int64_t slot0) {
              const scalar_t* r = row + slot0 - t0;
#pragma omp simd
              for (int64_t t = t0; t < t1; ++t) acc[t] += wi * r[t];
            });
          }
          const int64_t self = p % g.L;
          scalar_t* own = win + self * g.L;
          ring(start, count, g.L, [&](int64_t t0, int64_t t1, int64_t slot0) {
            for (int64_t t = t0; t < t1; ++t) {
              const scalar_t v = -acc[t];
              own[slot0 - t0 + t] = v;
              win[(slot0 - t0 + t) * g.L + self] = v;
            }
          });
          scalar_t sum = 0;
          for (int64_t i = 0; i < m; ++i) sum += (w[i] * inv) * own[(p + f[i]) % g.L];
          const scalar_t diag = inv * inv - sum;
          own[self] = diag;
          o[p] = diag;
          if (!diagonal_only) {
            // Entry k of pixel p goes to plane k: an image row's L x W tile is staged and written out
            // row by row (stores straight to the L planes, n apart, took 41 ms against 34 at 128x128
            // radius 2, one thread; the variances alone take 11).
            const int64_t x = p % g.W;
            for (int64_t t = 0; t < count; ++t) tile[(t + 1) * g.W + x] = -acc[t];
            for (int64_t t = count; t < g.b; ++t) tile[(t + 1) * g.W + x] = 0;
            if (x == 0)
              for (int64_t t = 1; t < g.L; ++t) std::copy_n(tile.data() + t * g.W, g.W, o + t * g.n + p);
          }
        }
      }
    });
  });
  return cast_like(out, log_diag_in);
}

// grad and band: (B, C*L, H, W); returns the gradients of log_diag and off_diag.
std::tuple<Tensor, Tensor> covariance_band_backward(const Tensor& grad_in, const Tensor& log_diag_in,
                                                    const Tensor& off_diag_in, const Tensor& band_in,
                                                    IntList flat_offsets) {
  const BandArgs args(log_diag_in, off_diag_in, flat_offsets);
  const auto& [offsets, s, wts, B, C, planes, S, g] = args;
  const Tensor grad = torch::stable::contiguous(cast_like(grad_in, s));
  const Tensor band = torch::stable::contiguous(cast_like(band_in, s));
  // H and W too: the sweep reads g.n values a plane (a band a row short was read past its end)
  STD_TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B && grad.size(1) == C * g.L && grad.size(2) == g.H &&
                      grad.size(3) == g.W,
                  "grad: expected shape (B, C*L, H, W) with L=", g.L, " = (", B, ", ", C * g.L, ", ", g.H, ", ", g.W,
                  "), got ", shape(grad_in));
  STD_TORCH_CHECK(band.dim() == 4 && band.size(0) == B && band.size(1) == C * g.L && band.size(2) == g.H &&
                      band.size(3) == g.W,
                  "band: expected shape (B, C*L, H, W) with L=", g.L, " = (", B, ", ", C * g.L, ", ", g.H, ", ", g.W,
                  "), got ", shape(band_in));
  auto grad_s = empty(shape(s).dims, s), grad_w = empty({B, C * S, g.H, g.W}, s);
  dispatch_floating(s.scalar_type(), "covariance_band_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const Planes<const scalar_t> Sd(s, C), Wt(wts, C, S);
    const scalar_t *G = data<scalar_t>(grad), *Sig = data<scalar_t>(band);
    scalar_t *gs = data<scalar_t>(grad_s), *gw = data<scalar_t>(grad_w);
    parallel_cloned(planes, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> window(g.L * g.L), adjoint(g.L * g.L), abar(g.L), w(S), dw(S);
      std::vector<int64_t> f(S), idx(S);
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t* sk = Sd(k);
        const scalar_t* Gk = G + k * g.L * g.n;
        const scalar_t* Bk = Sig + k * g.L * g.n;
        scalar_t* win = window.data();
        scalar_t* adj = adjoint.data();
        std::fill(adjoint.begin(), adjoint.end(), scalar_t(0));
        std::fill(gw + k * S * g.n, gw + (k + 1) * S * g.n, scalar_t(0));
        // row q of Sigma enters the window: Sigma_{c,q} = band[q - c][c] for c in [q - b, q]
        auto enter = [&](int64_t q) {
          if (q >= g.n) return;
          const int64_t sq = q % g.L;
          for (int64_t c = std::max<int64_t>(0, q - g.b); c <= q; ++c) {
            const scalar_t v = Bk[(q - c) * g.n + c];
            win[sq * g.L + c % g.L] = v;
            win[(c % g.L) * g.L + sq] = v;
          }
        };
        for (int64_t q = 0; q < g.b; ++q) enter(q);
        for (int64_t p = 0; p < g.n; ++p) {
          enter(p + g.b);
          const int64_t count = std::min(g.b, g.n - 1 - p), start = (p + 1) % g.L, self = p % g.L;
          const int64_t m = row_weights(Wt, k, offsets, g, p, w.data(), f.data(), idx.data());
          const scalar_t inv = scalar_t(1) / std::exp(sk[p]);
          scalar_t* own = win + self * g.L;
          scalar_t* own_adj = adj + self * g.L;
          // Sigma_pp = inv (inv - sum_i w_i Sigma_{p,p+f_i}), computed last: undone first
          const scalar_t gd = own_adj[self] + Gk[p];
          const scalar_t diag = own[self];
          scalar_t ds = -gd * (diag + inv * inv);
          for (int64_t i = 0; i < m; ++i) {
            const int64_t slot = (p + f[i]) % g.L;
            dw[i] = -gd * inv * own[slot];
            own_adj[slot] -= gd * inv * w[i];
          }
          // the final adjoints of Sigma_pj, j = p+1 .. p+count
          ring(start, count, g.L, [&](int64_t t0, int64_t t1, int64_t slot0) {
            for (int64_t t = t0; t < t1; ++t) {
              const int64_t slot = slot0 - t0 + t;
              abar[t] = own_adj[slot] + adj[slot * g.L + self] + Gk[(t + 1) * g.n + p];
              ds -= abar[t] * own[slot];                  // d Sigma_pj / d s_p = -Sigma_pj
            }
          });
          for (int64_t i = 0; i < m; ++i) {
            const scalar_t scale = -inv * w[i];
            const scalar_t* row = win + ((p + f[i]) % g.L) * g.L;
            scalar_t* row_adj = adj + ((p + f[i]) % g.L) * g.L;
            scalar_t acc = 0;
            ring(start, count, g.L, [&](int64_t t0, int64_t t1, int64_t slot0) {
              const scalar_t* r = row + slot0 - t0;
              scalar_t* ra = row_adj + slot0 - t0;
#pragma omp simd reduction(+ : acc)
              for (int64_t t = t0; t < t1; ++t) {
                acc += abar[t] * r[t];
                ra[t] += scale * abar[t];
              }
            });
            dw[i] -= inv * acc;
            gw[(k * S + idx[i]) * g.n + p] = dw[i];
          }
          gs[k * g.n + p] = ds;
          // slot p is free for row p + L: clear its adjoints (row and column)
          for (int64_t c = 0; c < g.L; ++c) own_adj[c] = adj[c * g.L + self] = 0;
        }
      }
    });
  });
  return std::make_tuple(cast_like(grad_s, log_diag_in), cast_like(grad_w, off_diag_in));
}

STABLE_TORCH_LIBRARY_IMPL(structlik, CPU, m) {
  m.impl("covariance_band", TORCH_BOX(&covariance_band));
  m.impl("covariance_band_backward", TORCH_BOX(&covariance_band_backward));
}

}  // namespace structlik
