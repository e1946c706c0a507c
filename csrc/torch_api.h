// The few pieces of torch the kernels use, all from torch's stable ABI (torch/csrc/stable,
// torch/headeronly; torch >= 2.10): the library imports no C++ symbol of c10, ATen or torch,
// only the C shim, so one build loads on every torch from 2.10 on (setup.py builds it
// against TORCH_TARGET_VERSION = 2.10).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <optional>
#include <ostream>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>    // madvise: huge pages for large outputs
#endif

namespace structlik {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using IntList = std::vector<int64_t>;   // what an int[] argument arrives as

// A tensor's shape, printable in error messages: "[2, 3, 4, 5]".
struct Shape {
  std::vector<int64_t> dims;
};

inline Shape shape(const Tensor& t) {
  Shape s;
  for (int64_t d = 0; d < t.dim(); ++d) s.dims.push_back(t.size(d));
  return s;
}

inline std::ostream& operator<<(std::ostream& os, const Shape& s) {
  os << "[";
  for (size_t i = 0; i < s.dims.size(); ++i) os << (i ? ", " : "") << s.dims[i];
  return os << "]";
}


inline bool is_float_or_double(ScalarType t) { return t == ScalarType::Float || t == ScalarType::Double; }

// The compute dtype (structlik/_dtypes.py, the one rule): float32 and float64 compute in their
// own dtype, float16 and bfloat16 in float32. computed(t): t itself, or its float32 copy.
inline Tensor computed(const Tensor& t) {
  const auto type = t.scalar_type();
  return type == ScalarType::Half || type == ScalarType::BFloat16 ? torch::stable::to(t, ScalarType::Float) : t;
}

// A result computed in the compute dtype, in like's dtype (a half input's gradient).
inline Tensor cast_like(const Tensor& t, const Tensor& like) {
  return t.scalar_type() == like.scalar_type() ? t : torch::stable::to(t, like.scalar_type());
}

// f(float{}) or f(double{}) by the compute dtype: the kernels' float32 and float64 instantiations.
template <typename F>
inline void dispatch_floating(ScalarType t, const char* name, const F& f) {
  if (t == ScalarType::Float) {
    f(float{});
  } else if (t == ScalarType::Double) {
    f(double{});
  } else {
    STD_TORCH_CHECK(false, name, ": expected float32 or float64, got ", t);
  }
}

// STRUCTLIK_POISON_EMPTY=1 (the tests set it): every output the kernels allocate starts as NaN,
// so an element a kernel forgets to write shows in a result. Read once, when the library loads.
inline bool poison_empty() {
  static const bool poison = [] {
    const char* v = std::getenv("STRUCTLIK_POISON_EMPTY");
    return v != nullptr && std::string(v) == "1";
  }();
  return poison;
}

// Large CPU outputs are asked for transparent huge pages before the kernels first touch them. With
// 4 KiB pages every 4 KiB of a new output is a page fault: at B32 C2 128x128 radius 4 the head's
// gradient (176 MB) took 64 ms to allocate and fill against 7 ms to fill, more than the fused
// backward itself; in 2 MiB pages, 10 ms (2-core AMD EPYC, THP mode "madvise", Debian's and
// Ubuntu's default; benchmarks/results/cross-cpu.md has the NLL before and after). It is what torch's THP_MEM_ALLOC_ENABLE=1 does for
// every allocation, here for the kernels' outputs alone; a hint (no effect where THP is off).
inline void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t{2} << 20;
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (bytes < 4 * huge || !t.is_cpu()) return;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t start = (p + huge - 1) & ~(huge - 1), end = (p + bytes) & ~(huge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#endif
}

// A new contiguous tensor of these sizes with like's dtype and device (NaN under poison_empty).
inline Tensor empty(const IntList& sizes, const Tensor& like) {
  auto out = torch::stable::empty(sizes, like.scalar_type(), std::nullopt, like.device());
  advise_huge_pages(out);
  if (poison_empty()) torch::stable::fill_(out, std::nan(""));
  return out;
}

// A new contiguous tensor of like's shape, dtype and device.
inline Tensor new_empty_like(const Tensor& like) { return empty(shape(like).dims, like); }

// t.narrow(dim, start, length), a view (torch::stable::narrow takes a mutable reference).
inline Tensor narrow(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  Tensor view = t;
  return torch::stable::narrow(view, dim, start, length);
}

template <typename T>
inline T* data(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

}  // namespace structlik
