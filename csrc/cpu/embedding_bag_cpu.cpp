// CPU kernels of dtn::embedding_bag (table-batched embedding bag), and its CPU autograd.
//
// Forward: one parallel region over tiles of samples; inside a tile, table by table. A
// table whose bags in the tile hold one id each (every categorical field) is a row copy
// per sample with no per-bag checks; other bags are pooled in fp32 (fp64 for double). Ids
// and offsets are checked while they are read. A large output is written with streaming
// (non-temporal) stores, the next tile's offsets and ids are prefetched, and rows of large
// tables are prefetched far ahead: the step is bound by memory, not arithmetic.
// Dense backward: rows are split into one contiguous range per thread, sized by work;
// each thread scans only the tables overlapping its range and accumulates the rows it
// owns, bag by bag in input order. Every row is therefore summed in the same order
// whatever the thread count: bitwise deterministic, no atomics, no sort, and each
// gradient row is written exactly once (zeroed inside its owner, no separate fill pass).
// One-id bags take a loop of their own; the per-sample-weight gradient is fused into the
// same pass.
// Row-sparse backward: stable sort of the touched rows, one segment reduction per row.
#include "embedding_bag.h"
#include "cpu/embedding_bag_cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace dtn {
namespace {

constexpr const char* kFwdName = "dtn::embedding_bag";
constexpr const char* kBwdName = "dtn::embedding_bag_backward";

using namespace cpu;  // the pieces shared with the fused optimizers (embedding_bag_cpu_common.h)

// bad id, or -1. kKind: 0 plain sum, 1 weighted sum, 2 max.
template <int kKind, int kD, typename scalar_t, typename index_t, typename acc_t>
inline int64_t pool_bag(const scalar_t* __restrict__ W, const index_t* __restrict__ idx,
                        const scalar_t* __restrict__ psw, int64_t s, int64_t e, int64_t base, int64_t rows,
                        int64_t pad, int64_t D, acc_t* __restrict__ acc, int64_t& count, int64_t pf_ahead,
                        int64_t N) {
  const int64_t n = kD > 0 ? kD : D;
  for (int64_t c = 0; c < n; ++c) acc[c] = acc_t(0);
  count = 0;
  for (int64_t i = s; i < e; ++i) {
    // the row pf_ahead ids on, across bags: a table's ids are contiguous (an id of the next
    // table gives a useless prefetch, never a fault)
    if (pf_ahead > 0 && i + pf_ahead < N) prefetch_row(W, base + int64_t(idx[i + pf_ahead]), n * int64_t(sizeof(scalar_t)), false);
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
// table, so each table's offsets and ids are read as one run, and the next tile's run of
// the same table is prefetched meanwhile (a run is only a few cache lines: too short for
// the hardware prefetchers to pick up, and there are 2T of them per tile).
constexpr int64_t kSampleTile = 64;
// One-id runs of a large table: its rows this many ids ahead inside the run (a run is a tile).
constexpr int64_t kOneIdRowsAhead = 16;

// Non-temporal (streaming) stores of whole cache lines: the output is written once and
// read by the next layer, so it skips the read-for-ownership of every line and does not
// evict the tables, ids and offsets from the caches.
#if defined(__SSE2__)
inline void nt_line(void* dst, const void* src) {  // dst 64-byte aligned
  const __m128i* s = reinterpret_cast<const __m128i*>(src);
  __m128i* d = reinterpret_cast<__m128i*>(dst);
  const __m128i x0 = _mm_loadu_si128(s), x1 = _mm_loadu_si128(s + 1), x2 = _mm_loadu_si128(s + 2),
                x3 = _mm_loadu_si128(s + 3);
  _mm_stream_si128(d, x0);
  _mm_stream_si128(d + 1, x1);
  _mm_stream_si128(d + 2, x2);
  _mm_stream_si128(d + 3, x3);
}
inline void nt_fence() { _mm_sfence(); }  // streaming stores are weakly ordered
constexpr bool kHaveStreamingStores = true;
#else
inline void nt_line(void* dst, const void* src) { std::memcpy(dst, src, 64); }
inline void nt_fence() {}
constexpr bool kHaveStreamingStores = false;
#endif

// Output slices (d values) that are whole cache lines can be streamed one slice at a time.
template <int kD, typename scalar_t>
constexpr bool kLineSlices = kD > 0 && (int64_t(kD) * int64_t(sizeof(scalar_t))) % 64 == 0;
// Outputs smaller than this stay cached (the next layer reads them at once).
constexpr int64_t kStreamMinOutputBytes = 1 << 20;

// Writes one output slice from src (d values of scalar_t), streamed when `stream`.
template <int kD, typename scalar_t>
inline void put_slice(scalar_t* __restrict__ o, const scalar_t* __restrict__ src, bool stream, int64_t D) {
  if constexpr (kLineSlices<kD, scalar_t>) {
    if (stream) {
      for (int64_t j = 0; j < int64_t(kD * sizeof(scalar_t)); j += 64)
        nt_line(reinterpret_cast<char*>(o) + j, reinterpret_cast<const char*>(src) + j);
      return;
    }
  }
  row_copy<kD>(o, src, D);
}

// Prefetches the next tile's run of offsets and ids of one table, a line of each per
// sample of this tile, so the prefetches are spread out rather than issued in a burst.
struct RunPrefetch {
  const char* p[2] = {nullptr, nullptr};
  const char* end[2] = {nullptr, nullptr};
  template <typename index_t>
  RunPrefetch(const index_t* off, const index_t* idx, int64_t k0, int64_t k1, int64_t n_next, int64_t N) {
    // bags [k1, k1 + n_next) of this table come next; their ids start where this tile's end
    // and take about as many as this tile's did
    if (n_next <= 0) return;
    p[0] = reinterpret_cast<const char*>(off + k1);
    end[0] = reinterpret_cast<const char*>(off + k1 + n_next + 1);
    const int64_t s = off[k1], span = int64_t(off[k1]) - int64_t(off[k0]);
    if (s >= 0 && s < N && span > 0) {
      p[1] = reinterpret_cast<const char*>(idx + s);
      end[1] = reinterpret_cast<const char*>(idx + std::min(N, s + span));
    }
  }
  inline void burst() {  // all at once (a short run)
    for (const char* q = p[0]; q < end[0]; q += 64) __builtin_prefetch(q, 0, 3);
    for (const char* q = p[1]; q < end[1]; q += 64) __builtin_prefetch(q, 0, 3);
  }
  inline void step() {
    if (p[0] < end[0]) __builtin_prefetch(p[0], 0, 3), p[0] += 64;
    if (p[1] < end[1]) __builtin_prefetch(p[1], 0, 3), p[1] += 64;
  }
};

// A function of its own with every argument by value, so the loop keeps them in registers.
// pf_ahead > 0 (a large table): the row pf_ahead ids on is prefetched, and past the run's end the
// first rows of the next run (nxt_n ids at nxt_ids of the table at nxt_Wt), so the next run does
// not start cold. No pointer is formed: an id may be bad, which gives a useless prefetch, never a
// fault.
template <int kD, bool kStream, typename scalar_t, typename index_t>
inline int64_t copy_rows(scalar_t* __restrict__ o, int64_t TD, const index_t* __restrict__ ids, int64_t n,
                         const scalar_t* __restrict__ Wt, int64_t rows, int64_t pad,
                         const scalar_t* __restrict__ zero, int64_t D, int64_t pf_ahead,
                         const index_t* __restrict__ nxt_ids, const scalar_t* __restrict__ nxt_Wt, int64_t nxt_n) {
  const bool pad_is_row = uint64_t(pad) < uint64_t(rows);
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  for (int64_t j = 0; j < std::min(pf_ahead, n); ++j) prefetch_row(Wt, int64_t(ids[j]), row_bytes, false);
  for (int64_t j = 0; j < n; ++j, o += TD) {
    if (j + pf_ahead < n) {
      prefetch_row(Wt, int64_t(ids[j + pf_ahead]), row_bytes, false);
    } else if (j + pf_ahead - n < nxt_n) {
      prefetch_row(nxt_Wt, int64_t(nxt_ids[j + pf_ahead - n]), row_bytes, false);
    }
    const int64_t id = ids[j];
    const scalar_t* src = Wt + id * D;
    if (uint64_t(id) >= uint64_t(rows) || (pad_is_row && id == pad)) {
      if (id != pad) return j;
      src = zero;
    }
    put_slice<kD>(o, src, kStream, D);
  }
  return -1;
}

template <int kKind, typename scalar_t, typename index_t, int kD>
void forward_kernel(const scalar_t* __restrict__ W, const int64_t* toff, const index_t* __restrict__ idx,
                    const index_t* __restrict__ off, const scalar_t* __restrict__ psw, const BagShape& sh,
                    bool mean, int64_t pad, scalar_t* __restrict__ out, ErrorSlot& errors) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = kD > 0 ? kD : sh.D;
  const int64_t T = sh.T, B = sh.B, N = sh.N, TD = T * D;
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  const bool stream = kHaveStreamingStores && kLineSlices<kD, scalar_t> && reinterpret_cast<uintptr_t>(out) % 64 == 0 &&
                      B * TD * int64_t(sizeof(scalar_t)) >= kStreamMinOutputBytes;
  const int64_t tiles = (B + kSampleTile - 1) / kSampleTile;
  const int64_t grain = std::max<int64_t>(1, bag_grain(D) / std::max<int64_t>(T * kSampleTile, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t tile0, int64_t tile1) {
    BagAcc<acc_t, kD> buf(D);
    acc_t* __restrict__ acc = buf.data();
    BagAcc<scalar_t, kD> zbuf(D);  // a zero slice (padding in a one-id bag)
    scalar_t* __restrict__ zero = zbuf.data();
    std::fill(zero, zero + D, scalar_t(0));
    BagAcc<scalar_t, kD> sbuf(D);  // a pooled slice, converted to scalar_t
    scalar_t* __restrict__ slice = sbuf.data();
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t b0 = tile * kSampleTile, b1 = std::min(B, b0 + kSampleTile), n = b1 - b0;
      const int64_t n_next = std::min(B, b1 + kSampleTile) - b1;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t base = toff[t], rows = toff[t + 1] - base;
        const scalar_t* __restrict__ Wt = W + base * D;
        const int64_t k0 = t * B + b0;
        scalar_t* __restrict__ ot = out + b0 * TD + t * D;
        RunPrefetch ahead(off, idx, k0, k0 + n, n_next, N);
        // One id per bag (every categorical field): the pooled slice is the row itself for
        // sum, mean and max, and zeros for padding.
        if (kKind != 1 && single_id_run(off, k0, n, N)) {
          ahead.burst();
          const int64_t s0 = off[k0];
          const int64_t pf = rows * row_bytes > kPrefetchMinTableBytes ? kOneIdRowsAhead : 0;
          // the next table's run in this tile: its first ids, when they lie inside indices
          const int64_t nxt_s0 = t + 1 < T ? int64_t(off[k0 + B]) : -1;
          const int64_t nxt_n = pf > 0 && nxt_s0 >= 0 ? std::min<int64_t>(pf, std::max<int64_t>(N - nxt_s0, 0)) : 0;
          const index_t* nxt_ids = idx + (nxt_n > 0 ? nxt_s0 : 0);
          const scalar_t* nxt_Wt = W + (t + 1 < T ? toff[t + 1] : 0) * D;
          const int64_t bad =
              stream ? copy_rows<kD, true>(ot, TD, idx + s0, n, Wt, rows, pad, zero, D, pf, nxt_ids, nxt_Wt, nxt_n)
                     : copy_rows<kD, false>(ot, TD, idx + s0, n, Wt, rows, pad, zero, D, pf, nxt_ids, nxt_Wt, nxt_n);
          if (bad >= 0) errors.offer(bad_id(k0 + bad, s0 + bad, idx[s0 + bad], rows));
          continue;
        }
        // Rows of a large table are prefetched kIdsAhead ids on (they come from memory, not
        // from L1/L2); the run's first ones here, the others inside pool_bag.
        const int64_t pf_ahead = rows * row_bytes > kPrefetchMinTableBytes ? kIdsAhead : 0;
        if (pf_ahead > 0 && off[k0] >= 0) {
          for (int64_t i = off[k0]; i < std::min<int64_t>(N, int64_t(off[k0]) + pf_ahead); ++i)
            prefetch_row(W, base + int64_t(idx[i]), row_bytes, false);
        }
        for (int64_t j = 0; j < n; ++j) {
          ahead.step();
          const int64_t k = k0 + j;
          const int64_t s = off[k], e = off[k + 1];
          BagError err;
          if (!bag_bounds_ok(k, s, e, N, err)) {
            errors.offer(err);
            continue;
          }
          scalar_t* __restrict__ o = ot + j * TD;
          if (kKind == 0 && e == s + 1) {  // one id: copy its row
            const int64_t id = idx[s];
            if (id != pad) {
              if (id < 0 || id >= rows) {
                errors.offer(bad_id(k, s, id, rows));
                continue;
              }
              put_slice<kD>(o, Wt + id * D, stream, D);
              continue;
            }
          }
          int64_t count = 0;
          const int64_t bad = pool_bag<kKind, kD>(W, idx, psw, s, e, base, rows, pad, D, acc, count, pf_ahead, N);
          if (bad >= 0) {
            errors.offer(bad_id(k, bad, idx[bad], rows));
            continue;
          }
          if (mean) {
            const acc_t scale = count > 0 ? acc_t(1) / acc_t(count) : acc_t(1);
            for (int64_t c = 0; c < D; ++c) slice[c] = static_cast<scalar_t>(acc[c] * scale);
          } else {
            for (int64_t c = 0; c < D; ++c) slice[c] = static_cast<scalar_t>(acc[c]);
          }
          put_slice<kD>(o, slice, stream, D);
        }
      }
    }
    if (stream) nt_fence();
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

// One id per bag, sum (or mean: a one-id bag's scale is exactly 1), no per-sample weights:
// adds grad_output slice j (at g + j*TD) to row ids[j] of the table (acc_table = its row
// 0) when this part owns it and it is not padding. Returns the first j whose id is outside
// [0, rows) and not padding, or -1. Every argument by value (see copy_rows).
template <int kD, typename acc_t, typename scalar_t, typename index_t>
inline int64_t add_rows(acc_t* __restrict__ acc_table, const scalar_t* __restrict__ g, int64_t TD,
                        const index_t* __restrict__ ids, int64_t n, int64_t id_lo, int64_t id_hi, int64_t rows,
                        int64_t pad, int64_t D) {
  const uint64_t span = uint64_t(id_hi - id_lo);
  const bool pad_owned = uint64_t(pad - id_lo) < span;
  // This table's slice one tile on: prefetched a whole tile (T runs like this one) before
  // its use, so the latency of memory is covered; a few samples ahead is not enough when
  // grad_output comes from memory. No pointer is formed (it may be past the end).
  const uintptr_t ahead = uintptr_t(g) + uintptr_t(kSampleTile * TD * int64_t(sizeof(scalar_t)));
  const uintptr_t step = uintptr_t(TD * int64_t(sizeof(scalar_t)));
  for (int64_t j = 0; j < n; ++j, g += TD) {
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + uintptr_t(j) * step), 0, 3);
    const int64_t id = ids[j];
    if (uint64_t(id - id_lo) < span && !(pad_owned && id == pad)) {
      row_add<kD>(acc_table + id * D, g, D);
    } else if (id != pad && uint64_t(id) >= uint64_t(rows)) {
      return j;
    }
  }
  return -1;
}

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
    if (b + kSampleAhead < B) __builtin_prefetch(g + kSampleAhead * TD, 0, 3);
    for (int64_t i = s; i < e; ++i) {
      if (kPrefetch && i + kGradIdsAhead < N) prefetch_row(acc_table, int64_t(idx[i + kGradIdsAhead]), row_bytes);
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
  // one id per bag: add the slice to the row (see add_rows)
  const bool one_id_sum = (mode == PoolMode::Sum || mode == PoolMode::Mean) && psw == nullptr && gpsw == nullptr;
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
        acc_t* row0 = acc + (o.base - lo) * D;  // row 0 of table t (rows < id_lo are not touched)
        if (one_id_sum) {
          const int64_t k0 = o.t * B + b0, n = b1 - b0;
          if (single_id_run(off, k0, n, N)) {
            RunPrefetch(off, idx, k0, k0 + n, std::min(B, b1 + kSampleTile) - b1, N).burst();
            const int64_t s0 = off[k0];
            const int64_t bad =
                add_rows<kD>(row0, G + b0 * TD + o.t * D, TD, idx + s0, n, o.id_lo, o.id_hi, o.rows, pad, D);
            if (bad >= 0) errors.offer(bad_id(k0 + bad, s0 + bad, idx[s0 + bad], o.rows));
            continue;
          }
        }
        if constexpr (kInPlace) {
          if (plain_sum) {
            if (o.rows * row_bytes > kPrefetchMinTableBytes) {
              sum_grad_tile<kD, true>(G + o.t * D, idx, off + o.t * B, b0, b1, o, pad, N, TD, D, row0, errors, B);
            } else {
              sum_grad_tile<kD, false>(G + o.t * D, idx, off + o.t * B, b0, b1, o, pad, N, TD, D, row0, errors, B);
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
          if (b + kSampleAhead < B) __builtin_prefetch(g + kSampleAhead * TD, 0, 3);
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

// ------------------------------------------------------------------ autograd (CPU)
//
// The same formula as dtn_kernels/ops/embedding_bag.py's register_autograd (which serves
// every other device), in C++ for CPU tensors: the Python autograd.Function path costs
// tens of microseconds a step, and several times that when the caches are cold.
// Registered for AutogradCPU, which takes precedence over the Python kernel registered
// for the Autograd alias key. The ops are called through the dispatcher, so tracing
// (fake tensors, torch.compile) sees them as before.

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class EmbeddingBagCpuFunction : public torch::autograd::Function<EmbeddingBagCpuFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& table_offsets,
                            const at::Tensor& indices, const at::Tensor& offsets, c10::string_view mode,
                            const std::optional<at::Tensor>& per_sample_weights, std::optional<int64_t> padding_idx,
                            bool sparse) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("dtn::embedding_bag", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, c10::string_view, const std::optional<at::Tensor>&,
                                                 std::optional<int64_t>, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = op.call(weight, table_offsets, indices, offsets, mode, per_sample_weights, padding_idx, sparse);
    const bool has_psw = per_sample_weights.has_value() && per_sample_weights->defined();
    ctx->save_for_backward({weight, table_offsets, indices, offsets, has_psw ? *per_sample_weights : at::Tensor()});
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["padding_idx"] = padding_idx.has_value() ? c10::IValue(*padding_idx) : c10::IValue();
    ctx->saved_data["sparse"] = sparse;
    ctx->saved_data["has_psw"] = has_psw;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using BwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&, c10::string_view,
                                                      const std::optional<at::Tensor>&, std::optional<int64_t>, bool);
    using SparseSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        c10::string_view, const std::optional<at::Tensor>&, std::optional<int64_t>, bool);
    static const auto bwd =
        c10::Dispatcher::singleton().findSchemaOrThrow("dtn::embedding_bag_backward", "").typed<BwdSig>();
    static const auto bwd_sparse =
        c10::Dispatcher::singleton().findSchemaOrThrow("dtn::embedding_bag_backward_sparse", "").typed<SparseSig>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const bool has_psw = ctx->saved_data["has_psw"].toBool();
    const std::optional<at::Tensor> psw = has_psw ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const c10::IValue& pad_iv = ctx->saved_data["padding_idx"];
    const std::optional<int64_t> padding_idx = pad_iv.isNone() ? std::nullopt : std::optional<int64_t>(pad_iv.toInt());
    // edges: weight, table_offsets, indices, offsets, then per_sample_weights when given
    const bool want_weight = ctx->needs_input_grad(0);
    const bool want_psw = has_psw && ctx->needs_input_grad(4);
    // The backward ops have no autograd formula. Outside create_graph, skip the autograd
    // fallback (it boxes every argument); with create_graph, keep it, as the Python
    // formula does.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    at::Tensor grad_weight, grad_psw;
    if (ctx->saved_data["sparse"].toBool()) {
      at::Tensor rows, row_grads;
      std::tie(rows, row_grads, grad_psw) = bwd_sparse.call(grads[0], weight, saved[1], saved[2], saved[3], mode, psw,
                                                            padding_idx, want_psw);
      grad_weight = at::_sparse_coo_tensor_unsafe_symint(rows.unsqueeze(0), row_grads, weight.sym_sizes(),
                                                         row_grads.options().layout(at::kSparse), /*is_coalesced=*/true);
    } else {
      std::tie(grad_weight, grad_psw) =
          bwd.call(grads[0], weight, saved[1], saved[2], saved[3], mode, psw, padding_idx, want_psw);
    }
    return {want_weight ? grad_weight : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            want_psw ? grad_psw : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor embedding_bag_autograd_cpu(const at::Tensor& weight, const at::Tensor& table_offsets,
                                      const at::Tensor& indices, const at::Tensor& offsets, c10::string_view mode,
                                      const std::optional<at::Tensor>& per_sample_weights,
                                      std::optional<int64_t> padding_idx, bool sparse) {
  return EmbeddingBagCpuFunction::apply(weight, table_offsets, indices, offsets, mode, per_sample_weights, padding_idx,
                                        sparse);
}

}  // namespace

TORCH_LIBRARY_IMPL(dtn, AutogradCPU, m) { m.impl("embedding_bag", &embedding_bag_autograd_cpu); }

}  // namespace dtn
