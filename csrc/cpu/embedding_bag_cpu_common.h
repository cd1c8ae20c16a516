// CPU pieces shared by the embedding bag's kernels (embedding_bag_cpu.cpp) and the fused
// sparse optimizers (embedding_update_cpu.cpp): error collection and the jagged-input checks,
// the compile-time-d dispatch, row kernels, prefetch, one-id runs, mean scales and the
// max-pooling argmax.
#pragma once

#include "embedding_bag.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace dtn {
namespace cpu {

// Keeps the first error (in bag order) reported by any thread.
class ErrorSlot {
 public:
  void offer(const BagError& e) {
    std::lock_guard<std::mutex> guard(mu_);
    if (e.before(first_)) first_ = e;
  }
  void raise_if_any(const char* op, const BagShape& sh) const {
    TORCH_CHECK(first_.ok(), bag_error_message(op, first_, sh.B, sh.N));
  }

 private:
  std::mutex mu_;
  BagError first_;
};

inline void check_table_offsets(const char* op, const int64_t* toff, const BagShape& sh) {
  for (int64_t t = 0; t < sh.T; ++t) {
    const int64_t lo = toff[t], hi = toff[t + 1];
    if ((t == 0 && lo != 0) || hi < lo || hi > sh.R) {
      BagError e;
      e.code = BagError::kBadTable;
      e.bag = t;
      e.value = lo;
      e.aux = hi;
      TORCH_CHECK(false, bag_error_message(op, e, sh.B, sh.N));
    }
  }
}

inline bool bag_bounds_ok(int64_t k, int64_t s, int64_t e, int64_t N, BagError& err) {
  if (s < 0) {
    err.code = BagError::kNegativeStart, err.bag = k, err.pos = -1, err.value = s;
    return false;
  }
  if (e < s) {
    err.code = BagError::kDecreasing, err.bag = k, err.pos = -1, err.value = e, err.aux = s;
    return false;
  }
  if (e > N) {
    err.code = BagError::kPastEnd, err.bag = k, err.pos = -1, err.value = e;
    return false;
  }
  return true;
}

inline BagError bad_id(int64_t k, int64_t i, int64_t id, int64_t rows) {
  BagError err;
  err.code = BagError::kBadId, err.bag = k, err.pos = i, err.value = id, err.aux = rows;
  return err;
}

// Bags per parallel task: enough rows of work to amortise the task.
inline int64_t bag_grain(int64_t D) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)); }

// Calls f(std::integral_constant<int, kD>) with kD = D for common dims, 0 (runtime) otherwise.
template <typename F>
inline void dispatch_dim(int64_t D, F&& f) {
  switch (D) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// Accumulator for one bag: on the stack when D is a compile-time constant.
template <typename acc_t, int kD>
struct BagAcc {
  explicit BagAcc(int64_t D) : heap(kD > 0 ? 0 : D) {}
  acc_t* data() { return kD > 0 ? stack : heap.data(); }
  acc_t stack[kD > 0 ? kD : 1];
  std::vector<acc_t> heap;
};

// Software prefetch of an embedding row that will be needed soon. The address may be
// bogus (an unchecked id): prefetches never fault, and no pointer is formed from it.
inline void prefetch_row(const void* base, int64_t row, int64_t row_bytes, bool write = true) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(row * row_bytes);
  if (write) {
    __builtin_prefetch(reinterpret_cast<const void*>(p), 1, 3);
  } else {
    __builtin_prefetch(reinterpret_cast<const void*>(p), 0, 3);
  }
}
// Tables (or gradient tables) above this many bytes get software prefetch of their rows;
// smaller ones stay in L1/L2.
constexpr int64_t kPrefetchMinTableBytes = 256 * 1024;
// Rows of such a table this many ids ahead, across bags (a table's ids are contiguous): they
// come from memory when the caches are cold, so the prefetch must run far ahead.
constexpr int64_t kIdsAhead = 64;  // forward: weight rows
constexpr int64_t kGradIdsAhead = 32;  // backward: gradient rows (in L2 after their zeroing)
constexpr int64_t kPrefetchAhead = 4;  // backward, weighted / mean / max bags: ids ahead inside a bag
// Generic paths: a table's grad_output slice this many samples ahead (one table's slices
// lie T*d apart, across pages, where hardware prefetchers stop).
constexpr int64_t kSampleAhead = 8;

// Row kernels. With a compile-time d (kD, a multiple of 4) and fp32 rows they work on
// 4-float vectors (GCC vector extension; memcpy loads/stores are unaligned movups): gcc
// fully unrolls the plain loops before vectorising and then cannot prove y and x apart, so
// the plain form would stay scalar. Other dtypes and run-time d use the plain loops.
typedef float f32x4 __attribute__((vector_size(16)));

template <int kD, typename acc_t, typename scalar_t>
constexpr bool kVec4 = kD > 0 && kD % 4 == 0 && std::is_same<acc_t, float>::value &&
                       std::is_same<scalar_t, float>::value;

inline f32x4 load4(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store4(float* p, f32x4 v) { std::memcpy(p, &v, sizeof(v)); }

template <int kD, typename acc_t, typename scalar_t>
inline void row_add(acc_t* __restrict__ y, const scalar_t* __restrict__ x, int64_t D) {
  if constexpr (kVec4<kD, acc_t, scalar_t>) {
    for (int c = 0; c < kD; c += 4) store4(y + c, load4(y + c) + load4(x + c));
  } else {
    const int64_t n = kD > 0 ? kD : D;
    for (int64_t c = 0; c < n; ++c) y[c] += acc_t(x[c]);
  }
}
template <int kD, typename scalar_t>
inline void row_copy(scalar_t* __restrict__ y, const scalar_t* __restrict__ x, int64_t D) {
  std::memcpy(y, x, size_t(kD > 0 ? kD : D) * sizeof(scalar_t));
}
template <int kD, typename acc_t, typename scalar_t>
inline void row_axpy(acc_t* __restrict__ y, const scalar_t* __restrict__ x, acc_t w, int64_t D) {
  if constexpr (kVec4<kD, acc_t, scalar_t>) {
    for (int c = 0; c < kD; c += 4) store4(y + c, load4(y + c) + w * load4(x + c));
  } else {
    const int64_t n = kD > 0 ? kD : D;
    for (int64_t c = 0; c < n; ++c) y[c] += w * acc_t(x[c]);
  }
}
template <int kD, typename acc_t, typename scalar_t>
inline void row_max(acc_t* __restrict__ y, const scalar_t* __restrict__ x, bool first, int64_t D) {
  const int64_t n = kD > 0 ? kD : D;
  if (first) {
    for (int64_t c = 0; c < n; ++c) y[c] = acc_t(x[c]);
  } else {
    for (int64_t c = 0; c < n; ++c) y[c] = acc_t(x[c]) > y[c] ? acc_t(x[c]) : y[c];
  }
}
template <int kD, typename acc_t, typename scalar_t>
inline void row_scale(acc_t* __restrict__ y, const scalar_t* __restrict__ x, acc_t w, int64_t D) {
  if constexpr (kVec4<kD, acc_t, scalar_t>) {
    for (int c = 0; c < kD; c += 4) store4(y + c, w * load4(x + c));
  } else {
    const int64_t n = kD > 0 ? kD : D;
    for (int64_t c = 0; c < n; ++c) y[c] = w * acc_t(x[c]);
  }
}
template <int kD, typename acc_t, typename scalar_t>
inline acc_t row_dot(const acc_t* __restrict__ a, const scalar_t* __restrict__ x, int64_t D) {
  const int64_t n = kD > 0 ? kD : D;
  acc_t dot = 0;
  for (int64_t c = 0; c < n; ++c) dot += a[c] * acc_t(x[c]);
  return dot;
}

// Pools bag [s, e) of a table into acc (zeroed here); returns the position of the first

// True when bags [k0, k0 + n) each hold exactly one id and lie inside indices: then the
// run's ids are idx[off[k0] + j], one per bag, with no per-bag bounds checks needed.
template <typename index_t>
inline bool single_id_run(const index_t* __restrict__ off, int64_t k0, int64_t n, int64_t N) {
  const int64_t s0 = off[k0];
  if (s0 < 0 || int64_t(off[k0 + n]) != s0 + n || s0 + n > N) return false;
  uint64_t diff = 0;  // OR of (length - 1) over the bags: zero iff every length is 1 (vectorises)
  for (int64_t j = 0; j < n; ++j) diff |= uint64_t(int64_t(off[k0 + j + 1]) - int64_t(off[k0 + j]) - 1);
  return diff == 0;
}

// One id per bag: out slice j (at o + j*TD) = row ids[j] of the table, zeros for padding.
// Returns the first j whose id is outside [0, rows) (the slices before it are written), or -1.

// 1 / (number of non-padding ids) of bag [s, e) for mean pooling, 1 otherwise.
template <typename acc_t, typename index_t>
inline acc_t bag_scale(PoolMode mode, const index_t* idx, int64_t s, int64_t e, int64_t pad) {
  if (mode != PoolMode::Mean) return acc_t(1);
  int64_t n = e - s;
  if (pad != kNoPadding) {
    for (int64_t i = s; i < e; ++i) n -= (int64_t(idx[i]) == pad);
  }
  return n > 0 ? acc_t(1) / acc_t(n) : acc_t(0);
}

// Max pooling: for every (bag, column) the position in `indices` that won (first
// occurrence of the maximum, as in the forward), or -1 for an empty bag.
template <typename scalar_t, typename index_t>
void argmax_kernel(const scalar_t* W, const int64_t* toff, const index_t* idx, const index_t* off, const BagShape& sh,
                   int64_t pad, int64_t* amax) {
  const int64_t D = sh.D;
  at::parallel_for(0, sh.T * sh.B, bag_grain(D), [&](int64_t k0, int64_t k1) {
    std::vector<scalar_t> best(D);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t t = k / sh.B, base = toff[t], rows = toff[t + 1] - base;
      int64_t* am = amax + k * D;
      std::fill(am, am + D, int64_t(-1));
      BagError err;
      if (!bag_bounds_ok(k, off[k], off[k + 1], sh.N, err)) continue;  // reported by the caller's pass
      for (int64_t i = off[k]; i < off[k + 1]; ++i) {
        const int64_t id = idx[i];
        if (id == pad || id < 0 || id >= rows) continue;
        const scalar_t* row = W + (base + id) * D;
        for (int64_t c = 0; c < D; ++c) {
          if (am[c] < 0 || row[c] > best[c]) {
            best[c] = row[c];
            am[c] = i;
          }
        }
      }
    }
  });
}


#define DTN_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)


}  // namespace cpu
}  // namespace dtn
