// CPU kernels of dtn::embedding_bag (table-batched embedding bag).
//
// Forward: parallel over bags, fp32 (fp64 for double) accumulation, ids and offsets
// checked while they are read.
// Dense backward: rows are split into one contiguous range per thread, sized by work;
// each thread scans only the tables overlapping its range and accumulates the rows it
// owns, bag by bag in input order. Every row is therefore summed in the same order
// whatever the thread count: bitwise deterministic, no atomics, no sort, and each
// gradient row is written exactly once (zeroed inside its owner, no separate fill pass).
// The per-sample-weight gradient is fused into the same pass.
// Row-sparse backward: stable sort of the touched rows, one segment reduction per row.
#include "embedding_bag.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace dtn {
namespace {

constexpr const char* kFwdName = "dtn::embedding_bag";
constexpr const char* kBwdName = "dtn::embedding_bag_backward";

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

void check_table_offsets(const char* op, const int64_t* toff, const BagShape& sh) {
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
void dispatch_dim(int64_t D, F&& f) {
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
inline void prefetch_row(const void* base, int64_t row, int64_t row_bytes) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(row * row_bytes);
  __builtin_prefetch(reinterpret_cast<const void*>(p), 1, 3);
}
constexpr int64_t kPrefetchAhead = 4;  // ids ahead, inside a bag
constexpr int64_t kPrefetchBags = 8;   // ids ahead from a bag's start, across bags
#ifndef DTN_SAMPLE_AHEAD
#define DTN_SAMPLE_AHEAD 8
#endif
constexpr int64_t kSampleAhead = DTN_SAMPLE_AHEAD;  // samples ahead for a table's output / grad_output slice
// Tables (or gradient tables) above this many bytes get software prefetch; smaller ones stay in L1/L2.
constexpr int64_t kPrefetchMinTableBytes = 256 * 1024;

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
// bad id, or -1. kKind: 0 plain sum, 1 weighted sum, 2 max.
template <int kKind, int kD, typename scalar_t, typename index_t, typename acc_t>
inline int64_t pool_bag(const scalar_t* __restrict__ W, const index_t* __restrict__ idx,
                        const scalar_t* __restrict__ psw, int64_t s, int64_t e, int64_t base, int64_t rows,
                        int64_t pad, int64_t D, acc_t* __restrict__ acc, int64_t& count) {
  const int64_t n = kD > 0 ? kD : D;
  for (int64_t c = 0; c < n; ++c) acc[c] = acc_t(0);
  count = 0;
  for (int64_t i = s; i < e; ++i) {
    if (i + kPrefetchAhead < e) prefetch_row(W, base + int64_t(idx[i + kPrefetchAhead]), n * int64_t(sizeof(scalar_t)));
    const int64_t id = idx[i];
    if (id == pad) continue;
    if (id < 0 || id >= rows) return i;
    const scalar_t* __restrict__ row = W + (base + id) * n;
    if (kKind == 0) {
      row_add<kD>(acc, row, n);
    } else if (kKind == 1) {
      row_axpy<kD>(acc, row, acc_t(psw[i]), n);
    } else {
      row_max<kD>(acc, row, count == 0, n);
    }
    ++count;
  }
  return -1;
}

// ------------------------------------------------------------------ forward

// Samples are processed in tiles of kSampleTile: inside a tile the loop runs table by
// table, so each table's offsets and ids are read sequentially, while the tile's output
// rows (kSampleTile * T * d values) stay in cache. (Pure sample-major order reads 2T
// streams of offsets/ids at once and misses the cache on them; pure table-major order
// writes the output with a stride of T*d.)
constexpr int64_t kSampleTile = 64;

template <int kKind, typename scalar_t, typename index_t, int kD>
void forward_kernel(const scalar_t* __restrict__ W, const int64_t* toff, const index_t* __restrict__ idx,
                    const index_t* __restrict__ off, const scalar_t* __restrict__ psw, const BagShape& sh,
                    bool mean, int64_t pad, scalar_t* __restrict__ out, ErrorSlot& errors) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = kD > 0 ? kD : sh.D;
  const int64_t T = sh.T, B = sh.B, N = sh.N, TD = T * D;
  const int64_t tiles = (B + kSampleTile - 1) / kSampleTile;
  const int64_t grain = std::max<int64_t>(1, bag_grain(D) / std::max<int64_t>(T * kSampleTile, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t tile0, int64_t tile1) {
    BagAcc<acc_t, kD> buf(D);
    acc_t* __restrict__ acc = buf.data();
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t b0 = tile * kSampleTile, b1 = std::min(B, b0 + kSampleTile);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t base = toff[t], rows = toff[t + 1] - base;
        const bool prefetch = rows * D * int64_t(sizeof(scalar_t)) > kPrefetchMinTableBytes;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t k = t * B + b;
          const int64_t s = off[k], e = off[k + 1];
          BagError err;
          if (!bag_bounds_ok(k, s, e, N, err)) {
            errors.offer(err);
            continue;
          }
          // rows a few ids ahead (ids of a table are contiguous, so this runs into the next bags)
          if (prefetch && s + kPrefetchBags < N) prefetch_row(W, base + int64_t(idx[s + kPrefetchBags]), D * int64_t(sizeof(scalar_t)));
          scalar_t* __restrict__ o = out + b * TD + t * D;
          // this table's output slice kSampleAhead samples on: slices of one table lie T*d apart,
          // so a table's pass over a tile strides across pages, where hardware prefetchers stop
          if (b + kSampleAhead < B) __builtin_prefetch(o + kSampleAhead * TD, 1, 3);
          if (kKind == 0 && e == s + 1) {  // one id (every categorical field): copy its row
            const int64_t id = idx[s];
            if (id != pad) {
              if (id < 0 || id >= rows) {
                errors.offer(bad_id(k, s, id, rows));
                continue;
              }
              row_copy<kD>(o, W + (base + id) * D, D);
              continue;
            }
          }
          int64_t count = 0;
          const int64_t bad = pool_bag<kKind, kD>(W, idx, psw, s, e, base, rows, pad, D, acc, count);
          if (bad >= 0) {
            errors.offer(bad_id(k, bad, idx[bad], rows));
            continue;
          }
          if (mean) {
            const acc_t scale = count > 0 ? acc_t(1) / acc_t(count) : acc_t(1);
            for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c] * scale);
          } else {
            for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------ shared backward pieces

// Full check of the jagged input (the backward op can be called on its own).
template <typename index_t>
void validate_kernel(const char* op, const int64_t* toff, const index_t* idx, const index_t* off, const BagShape& sh,
                     int64_t pad) {
  check_table_offsets(op, toff, sh);
  ErrorSlot errors;
  at::parallel_for(0, sh.T * sh.B, 4096, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t t = k / sh.B;
      const int64_t rows = toff[t + 1] - toff[t];
      const int64_t s = off[k], e = off[k + 1];
      BagError err;
      if (!bag_bounds_ok(k, s, e, sh.N, err)) {
        errors.offer(err);
        return;
      }
      for (int64_t i = s; i < e; ++i) {
        const int64_t id = idx[i];
        if (id != pad && (id < 0 || id >= rows)) {
          errors.offer(bad_id(k, i, id, rows));
          return;
        }
      }
    }
  });
  errors.raise_if_any(op, sh);
}

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

// Per-sample-weight gradient: d out / d w_i = scale * <grad_out slice, weight row>.
template <typename scalar_t, typename index_t>
void psw_grad_kernel(const scalar_t* G, const scalar_t* W, const int64_t* toff, const index_t* idx,
                     const index_t* off, const BagShape& sh, PoolMode mode, int64_t pad, scalar_t* gpsw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = sh.D, B = sh.B, TD = sh.T * D;
  at::parallel_for(0, sh.T * B, bag_grain(D), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t t = k / B, b = k - t * B, base = toff[t];
      const int64_t s = off[k], e = off[k + 1];
      const acc_t scale = bag_scale<acc_t>(mode, idx, s, e, pad);
      const scalar_t* g = G + b * TD + t * D;
      for (int64_t i = s; i < e; ++i) {
        const int64_t id = idx[i];
        if (id == pad) continue;
        const scalar_t* row = W + (base + id) * D;
        acc_t dot = 0;
        for (int64_t c = 0; c < D; ++c) dot += acc_t(g[c]) * acc_t(row[c]);
        gpsw[i] = static_cast<scalar_t>(dot * scale);
      }
    }
  });
}

// ------------------------------------------------------------------ dense backward

// Splits rows [0, R) into `parts` contiguous ranges of about equal work, where a table's
// work (its ids plus its rows) is spread evenly over its rows.
std::vector<int64_t> split_rows_by_work(const int64_t* toff, const int64_t* table_ids, const BagShape& sh,
                                        int64_t parts) {
  const int64_t T = sh.T;
  std::vector<double> cum(T + 2, 0.0);  // work before table t; entry T+1 covers rows past the last table
  for (int64_t t = 0; t < T; ++t) {
    const int64_t rows = toff[t + 1] - toff[t];
    cum[t + 1] = cum[t] + (rows > 0 ? double(table_ids[t] + rows) : 0.0);
  }
  cum[T + 1] = cum[T] + double(sh.R - toff[T]);
  std::vector<int64_t> bounds(parts + 1, 0);
  bounds[parts] = sh.R;
  if (!(cum[T + 1] > 0)) {  // no work at all: any split will do
    for (int64_t p = 1; p < parts; ++p) bounds[p] = sh.R * p / parts;
    return bounds;
  }
  int64_t t = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const double target = cum[T + 1] * double(p) / double(parts);
    while (t < T + 1 && cum[t + 1] <= target) ++t;
    const int64_t lo = t < T ? toff[t] : toff[T];
    const int64_t hi = t < T ? toff[t + 1] : sh.R;
    const double span = cum[t + 1] - cum[t];
    int64_t row = span > 0 ? lo + int64_t(double(hi - lo) * (target - cum[t]) / span) : lo;
    row = std::min(std::max(row, bounds[p - 1]), sh.R);
    bounds[p] = row;
  }
  return bounds;
}

// Checks the bags of tables with no rows (no part visits them): only padding ids allowed.
template <typename index_t>
void check_empty_tables(const int64_t* toff, const index_t* idx, const index_t* off, const BagShape& sh, int64_t pad,
                        ErrorSlot& errors) {
  for (int64_t t = 0; t < sh.T; ++t) {
    if (toff[t + 1] != toff[t]) continue;
    for (int64_t k = t * sh.B; k < (t + 1) * sh.B; ++k) {
      BagError err;
      if (!bag_bounds_ok(k, off[k], off[k + 1], sh.N, err)) {
        errors.offer(err);
        break;
      }
      for (int64_t i = off[k]; i < off[k + 1]; ++i) {
        if (int64_t(idx[i]) != pad) {
          errors.offer(bad_id(k, i, idx[i], 0));
          break;
        }
      }
    }
  }
}

// A table overlapping a backward part's row range, with the local ids [id_lo, id_hi) it owns.
struct Owned {
  int64_t t, base, rows, id_lo, id_hi;
};

// Plain-sum backward of one table for samples [b0, b1): every id in bag b adds grad_output's
// slice of (b, table) to its row. The hot loop of the common case (categorical fields and
// unweighted multi-valued fields), with no per-bag mode tests.
template <int kD, bool kPrefetch, typename scalar_t, typename index_t>
inline void sum_grad_tile(const scalar_t* __restrict__ Gt, const index_t* __restrict__ idx,
                          const index_t* __restrict__ offt, int64_t b0, int64_t b1, const Owned& o, int64_t pad,
                          int64_t N, int64_t TD, int64_t D, scalar_t* __restrict__ acc_table, ErrorSlot& errors,
                          int64_t B) {
  const uint64_t span = uint64_t(o.id_hi - o.id_lo);
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = offt[b], e = offt[b + 1];
    if (s < 0 || e < s || e > N) {
      BagError err;
      bag_bounds_ok(o.t * B + b, s, e, N, err);
      errors.offer(err);
      continue;
    }
    const scalar_t* __restrict__ g = Gt + b * TD;
    if (b + kSampleAhead < B) __builtin_prefetch(g + kSampleAhead * TD, 0, 3);  // see forward_kernel
    for (int64_t i = s; i < e; ++i) {
      if (kPrefetch && i + kPrefetchAhead < N) prefetch_row(acc_table, int64_t(idx[i + kPrefetchAhead]), row_bytes);
      const int64_t id = idx[i];
      if (uint64_t(id - o.id_lo) >= span) {  // another part's row, padding, or a bad id
        if (id != pad && (id < 0 || id >= o.rows)) errors.offer(bad_id(o.t * B + b, i, id, o.rows));
        continue;
      }
      row_add<kD>(acc_table + id * D, g, D);
    }
  }
}

template <typename scalar_t, typename index_t, int kD>
void backward_dense_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ W, const int64_t* toff,
                           const index_t* __restrict__ idx, const index_t* __restrict__ off,
                           const scalar_t* __restrict__ psw, const BagShape& sh, PoolMode mode, int64_t pad,
                           const int64_t* amax, scalar_t* __restrict__ gw, scalar_t* __restrict__ gpsw,
                           ErrorSlot& errors) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kInPlace = std::is_same<acc_t, scalar_t>::value;
  const int64_t D = kD > 0 ? kD : sh.D;
  const int64_t T = sh.T, B = sh.B, N = sh.N, TD = T * D;

  // (a padding id >= 0 could fall inside a table, which the fast loop does not test for)
  const bool plain_sum = mode == PoolMode::Sum && psw == nullptr && gpsw == nullptr && pad < 0;
  std::vector<int64_t> table_ids(T);
  for (int64_t t = 0; t < T; ++t) table_ids[t] = std::max<int64_t>(0, int64_t(off[(t + 1) * B]) - int64_t(off[t * B]));
  const int64_t work = N + sh.R;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / 4096));
  const std::vector<int64_t> bounds = split_rows_by_work(toff, table_ids.data(), sh, parts);

  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    BagAcc<acc_t, kD> gbuf(D);
    acc_t* __restrict__ gl = gbuf.data();  // this bag's grad_output slice, in acc_t
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t lo = bounds[p], hi = bounds[p + 1];
      if (hi <= lo) continue;
      std::vector<acc_t> tmp(kInPlace ? 0 : (hi - lo) * D, acc_t(0));
      acc_t* __restrict__ acc = kInPlace ? reinterpret_cast<acc_t*>(gw + lo * D) : tmp.data();
      if (kInPlace) std::fill(acc, acc + (hi - lo) * D, acc_t(0));
      // tables overlapping [lo, hi), with the local ids this part owns in each
      std::vector<Owned> owned;
      int64_t t = std::upper_bound(toff, toff + T + 1, lo) - toff - 1;
      for (t = std::max<int64_t>(t, 0); t < T && toff[t] < hi; ++t) {
        const int64_t base = toff[t], rows = toff[t + 1] - base;
        const int64_t id_lo = std::max(lo, base) - base, id_hi = std::min(hi, toff[t + 1]) - base;
        if (id_hi > id_lo) owned.push_back({t, base, rows, id_lo, id_hi});
      }
      // sample-major, so grad_output is streamed row by row
      const int64_t row_bytes = D * int64_t(sizeof(acc_t));
      // tiles of samples, table by table inside a tile (see forward_kernel)
      for (int64_t b0 = 0; b0 < B; b0 += kSampleTile) {
       const int64_t b1 = std::min(B, b0 + kSampleTile);
       for (const Owned& o : owned) {
        if constexpr (kInPlace) {
          if (plain_sum) {
            acc_t* acc_table = acc + (o.base - lo) * D;  // row 0 of table t (rows < id_lo are not touched)
            if (o.rows * row_bytes > kPrefetchMinTableBytes) {
              sum_grad_tile<kD, true>(G + o.t * D, idx, off + o.t * B, b0, b1, o, pad, N, TD, D, acc_table, errors, B);
            } else {
              sum_grad_tile<kD, false>(G + o.t * D, idx, off + o.t * B, b0, b1, o, pad, N, TD, D, acc_table, errors, B);
            }
            continue;
          }
        }
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t k = o.t * B + b;
          const int64_t s = off[k], e = off[k + 1];
          if (e < N) prefetch_row(acc, o.base - lo + int64_t(idx[e]), row_bytes);  // next bag's first row
          BagError err;
          if (!bag_bounds_ok(k, s, e, N, err)) {
            errors.offer(err);
            continue;
          }
          if (s == e) continue;
          const scalar_t* __restrict__ g = G + b * TD + o.t * D;
          if (b + kSampleAhead < B) __builtin_prefetch(g + kSampleAhead * TD, 0, 3);  // see forward_kernel
                acc_t* __restrict__ acc_table = acc + (o.base - lo + o.id_lo) * D;  // row id_lo of table t
          if (mode == PoolMode::Max) {
            const int64_t* am = amax + k * D;
            for (int64_t c = 0; c < D; ++c) {
              if (am[c] < 0) continue;
              const int64_t id = idx[am[c]];
              if (id >= o.id_lo && id < o.id_hi) acc_table[(id - o.id_lo) * D + c] += acc_t(g[c]);
            }
            for (int64_t i = s; i < e; ++i) {  // argmax skipped bad ids: report them
              const int64_t id = idx[i];
              if (id != pad && (id < 0 || id >= o.rows)) errors.offer(bad_id(k, i, id, o.rows));
            }
            continue;
          }
          const acc_t scale = bag_scale<acc_t>(mode, idx, s, e, pad);
          row_scale<kD>(gl, g, scale, D);
          for (int64_t i = s; i < e; ++i) {
            if (i + kPrefetchAhead < e) prefetch_row(acc, o.base - lo + int64_t(idx[i + kPrefetchAhead]), row_bytes);
            const int64_t id = idx[i];
            if (id < o.id_lo || id >= o.id_hi || id == pad) {
              if (id != pad && (id < 0 || id >= o.rows)) errors.offer(bad_id(k, i, id, o.rows));
              continue;
            }
            acc_t* a = acc_table + (id - o.id_lo) * D;
            if (psw != nullptr) {
              row_axpy<kD>(a, gl, acc_t(psw[i]), D);
            } else {
              row_add<kD>(a, gl, D);
            }
            if (gpsw != nullptr) gpsw[i] = static_cast<scalar_t>(row_dot<kD>(gl, W + (o.base + id) * D, D));
          }
        }
       }
      }
      if (!kInPlace) {
        scalar_t* dst = gw + lo * D;
        for (int64_t j = 0; j < (hi - lo) * D; ++j) dst[j] = static_cast<scalar_t>(tmp[j]);
      }
    }
  });
}

// ------------------------------------------------------------------ row-sparse backward

template <typename scalar_t, typename index_t>
std::tuple<at::Tensor, at::Tensor> backward_sparse_rows(const at::Tensor& grad, const at::Tensor& weight,
                                                         const int64_t* toff, const index_t* idx, const index_t* off,
                                                         const scalar_t* psw, const BagShape& sh, PoolMode mode,
                                                         int64_t pad, const int64_t* amax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = sh.D, B = sh.B, T = sh.T, TD = T * D;
  const auto long_opts = weight.options().dtype(at::kLong);
  at::Tensor row_of = at::full({sh.N}, -1, long_opts);  // global row of each id, -1 = padding / unused
  at::Tensor bag_of = at::empty({sh.N}, long_opts);
  at::Tensor scale_of = at::empty({T * B}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  int64_t* row_p = row_of.data_ptr<int64_t>();
  int64_t* bag_p = bag_of.data_ptr<int64_t>();
  acc_t* scale_p = scale_of.data_ptr<acc_t>();
  at::parallel_for(0, T * B, 4096, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t base = toff[k / B], s = off[k], e = off[k + 1];
      scale_p[k] = bag_scale<acc_t>(mode, idx, s, e, pad);
      for (int64_t i = s; i < e; ++i) {
        const int64_t id = idx[i];
        if (id == pad) continue;
        row_p[i] = base + id;
        bag_p[i] = k;
      }
    }
  });
  // stable: ids of one row stay in input order, so each row's sum is deterministic
  at::Tensor sorted, perm;
  std::tie(sorted, perm) = at::sort(row_of, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int64_t skip = (row_of < 0).sum().item<int64_t>();
  sorted = sorted.slice(0, skip);
  perm = perm.slice(0, skip);
  at::Tensor rows, counts;
  std::tie(rows, std::ignore, counts) = at::unique_consecutive(sorted, false, true);
  const at::Tensor ends = counts.cumsum(0);
  const int64_t U = rows.numel();
  at::Tensor row_grads = at::empty({U, D}, weight.options());
  const int64_t* end_p = ends.data_ptr<int64_t>();
  const int64_t* perm_p = perm.data_ptr<int64_t>();
  const scalar_t* G = grad.data_ptr<scalar_t>();
  scalar_t* out = row_grads.data_ptr<scalar_t>();
  at::parallel_for(0, U, 256, [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> acc(D);
    for (int64_t u = u0; u < u1; ++u) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = u == 0 ? 0 : end_p[u - 1]; j < end_p[u]; ++j) {
        const int64_t i = perm_p[j], k = bag_p[i];
        const int64_t t = k / B, b = k - t * B;
        const scalar_t* g = G + b * TD + t * D;
        if (mode == PoolMode::Max) {
          const int64_t* am = amax + k * D;
          for (int64_t c = 0; c < D; ++c) acc[c] += am[c] == i ? acc_t(g[c]) : acc_t(0);
        } else {
          const acc_t w = psw != nullptr ? acc_t(psw[i]) * scale_p[k] : scale_p[k];
          for (int64_t c = 0; c < D; ++c) acc[c] += w * acc_t(g[c]);
        }
      }
      for (int64_t c = 0; c < D; ++c) out[u * D + c] = static_cast<scalar_t>(acc[c]);
    }
  });
  return {rows, row_grads};
}

struct BackwardInputs {
  at::Tensor grad, weight, toff, indices, offsets;
  std::optional<at::Tensor> psw;
  BagShape sh;
  PoolMode mode;
  int64_t pad;
};

BackwardInputs prepare_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& weight,
                                const at::Tensor& table_offsets, const at::Tensor& indices, const at::Tensor& offsets,
                                c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
                                std::optional<int64_t> padding_idx, bool full_validation) {
  const PoolMode pm = parse_pool_mode(mode);
  const BagShape sh = check_embedding_bag_backward_args(op, grad_output, weight, table_offsets, indices, offsets, pm,
                                                        per_sample_weights);
  BackwardInputs in{grad_output.contiguous(), weight.contiguous(), table_offsets.contiguous(), indices.contiguous(),
                    offsets.contiguous(), std::nullopt, sh, pm, padding_value(padding_idx)};
  if (per_sample_weights.has_value()) in.psw = per_sample_weights->contiguous();
  if (full_validation) {
    AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "dtn_embedding_bag_validate", [&] {
      validate_kernel<index_t>(op, in.toff.data_ptr<int64_t>(), in.indices.data_ptr<index_t>(),
                               in.offsets.data_ptr<index_t>(), sh, in.pad);
    });
  } else {
    check_table_offsets(op, in.toff.data_ptr<int64_t>(), sh);
  }
  return in;
}

#define DTN_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

// ------------------------------------------------------------------ entry points

at::Tensor embedding_bag_cpu(const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
                             const at::Tensor& offsets, c10::string_view mode,
                             const std::optional<at::Tensor>& per_sample_weights, std::optional<int64_t> padding_idx,
                             bool /*sparse: only changes the backward*/) {
  const PoolMode pm = parse_pool_mode(mode);
  const BagShape sh = check_embedding_bag_args(kFwdName, weight, table_offsets, indices, offsets, pm, per_sample_weights);
  const at::Tensor W = weight.contiguous(), toff = table_offsets.contiguous();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  check_table_offsets(kFwdName, toff.data_ptr<int64_t>(), sh);
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->contiguous();
  at::Tensor out = at::empty({sh.B, sh.T * sh.D}, weight.options());
  ErrorSlot errors;
  const int64_t pad = padding_value(padding_idx);
  DTN_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_bag_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "dtn_embedding_bag_cpu_idx", [&] {
      dispatch_dim(sh.D, [&](auto kd) {
        constexpr int kD = decltype(kd)::value;
        const scalar_t* Wp = W.data_ptr<scalar_t>();
        const int64_t* tp = toff.data_ptr<int64_t>();
        const index_t* ip = idx.data_ptr<index_t>();
        const index_t* op = off.data_ptr<index_t>();
        scalar_t* outp = out.data_ptr<scalar_t>();
        const bool mean = pm == PoolMode::Mean;
        if (pm == PoolMode::Max) {
          forward_kernel<2, scalar_t, index_t, kD>(Wp, tp, ip, op, nullptr, sh, false, pad, outp, errors);
        } else if (psw.defined()) {
          forward_kernel<1, scalar_t, index_t, kD>(Wp, tp, ip, op, psw.data_ptr<scalar_t>(), sh, mean, pad, outp,
                                                   errors);
        } else {
          forward_kernel<0, scalar_t, index_t, kD>(Wp, tp, ip, op, nullptr, sh, mean, pad, outp, errors);
        }
      });
    });
  });
  errors.raise_if_any(kFwdName, sh);
  return out;
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx, bool compute_psw_grad) {
  // the dense pass checks ids and offsets while it reads them (no separate validation pass)
  BackwardInputs in = prepare_backward(kBwdName, grad_output, weight, table_offsets, indices, offsets, mode,
                                       per_sample_weights, padding_idx, /*full_validation=*/false);
  ErrorSlot errors;
  const BagShape& sh = in.sh;
  at::Tensor grad_weight = at::empty({sh.R, sh.D}, weight.options());
  const bool want_psw = compute_psw_grad && in.psw.has_value();
  at::Tensor grad_psw = want_psw ? at::zeros({sh.N}, weight.options()) : at::empty({0}, weight.options());
  DTN_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_bag_backward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "dtn_embedding_bag_backward_cpu_idx", [&] {
      const int64_t* toff = in.toff.data_ptr<int64_t>();
      const index_t* idx = in.indices.data_ptr<index_t>();
      const index_t* off = in.offsets.data_ptr<index_t>();
      at::Tensor amax;
      if (in.mode == PoolMode::Max) {
        amax = at::empty({sh.T * sh.B, sh.D}, weight.options().dtype(at::kLong));
        argmax_kernel<scalar_t, index_t>(in.weight.data_ptr<scalar_t>(), toff, idx, off, sh, in.pad,
                                         amax.data_ptr<int64_t>());
      }
      dispatch_dim(sh.D, [&](auto kd) {
        backward_dense_kernel<scalar_t, index_t, decltype(kd)::value>(
            in.grad.data_ptr<scalar_t>(), in.weight.data_ptr<scalar_t>(), toff, idx, off,
            in.psw.has_value() ? in.psw->data_ptr<scalar_t>() : nullptr, sh, in.mode, in.pad,
            amax.defined() ? amax.data_ptr<int64_t>() : nullptr, grad_weight.data_ptr<scalar_t>(),
            want_psw ? grad_psw.data_ptr<scalar_t>() : nullptr, errors);
      });
      check_empty_tables<index_t>(toff, idx, off, sh, in.pad, errors);
    });
  });
  errors.raise_if_any(kBwdName, sh);
  return {grad_weight, grad_psw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_sparse_cpu(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx, bool compute_psw_grad) {
  BackwardInputs in = prepare_backward("dtn::embedding_bag_backward_sparse", grad_output, weight, table_offsets,
                                       indices, offsets, mode, per_sample_weights, padding_idx,
                                       /*full_validation=*/true);
  const BagShape& sh = in.sh;
  const bool want_psw = compute_psw_grad && in.psw.has_value();
  at::Tensor grad_psw = want_psw ? at::zeros({sh.N}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor rows, row_grads;
  DTN_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_bag_backward_sparse_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), "dtn_embedding_bag_backward_sparse_cpu_idx", [&] {
      const int64_t* toff = in.toff.data_ptr<int64_t>();
      const index_t* idx = in.indices.data_ptr<index_t>();
      const index_t* off = in.offsets.data_ptr<index_t>();
      const scalar_t* W = in.weight.data_ptr<scalar_t>();
      const scalar_t* psw = in.psw.has_value() ? in.psw->data_ptr<scalar_t>() : nullptr;
      at::Tensor amax;
      if (in.mode == PoolMode::Max) {
        amax = at::empty({sh.T * sh.B, sh.D}, weight.options().dtype(at::kLong));
        argmax_kernel<scalar_t, index_t>(W, toff, idx, off, sh, in.pad, amax.data_ptr<int64_t>());
      }
      std::tie(rows, row_grads) = backward_sparse_rows<scalar_t, index_t>(
          in.grad, in.weight, toff, idx, off, psw, sh, in.mode, in.pad,
          amax.defined() ? amax.data_ptr<int64_t>() : nullptr);
      if (want_psw) {
        psw_grad_kernel<scalar_t, index_t>(in.grad.data_ptr<scalar_t>(), W, toff, idx, off, sh, in.mode, in.pad,
                                           grad_psw.data_ptr<scalar_t>());
      }
    });
  });
  return {rows, row_grads, grad_psw};
}

TORCH_LIBRARY_IMPL(dtn, CPU, m) {
  m.impl("embedding_bag", &embedding_bag_cpu);
  m.impl("embedding_bag_backward", &embedding_bag_backward_cpu);
  m.impl("embedding_bag_backward_sparse", &embedding_bag_backward_sparse_cpu);
}

}  // namespace dtn
