// CPU kernels of the fused sparse embedding optimizers: dtn::embedding_bag_backward_update (the
// embedding bag's backward with the optimizer applied to the rows the batch touched) and
// dtn::embedding_rows_update (the update alone, from row gradients). No [R, d] gradient is built.
//
// embedding_bag_backward_update, in three passes:
//   1. per table (parallel over tables; tables own disjoint rows): check the table's bags and
//      ids (the named errors of the embedding bag's backward) and group its ids by row:
//      - a small table (its fp32 rows fit kDenseTableBytes and it has at most kDenseRowsPerId
//        rows per id of the batch) is scanned in input order into a dense fp32 accumulator of
//        its rows: no sort at all;
//      - a large table's ids are sorted by row with a stable LSD radix sort (11-bit digits,
//        as many passes as the table's row count needs: 2 for 100k rows), so the ids of one
//        row keep their input order;
//   2. nothing is written before every table has been checked: the first bad id or offset (in
//      bag order) raises, and weight and state are untouched;
//   3. per touched row (parallel over rows; one thread owns a row): its gradient, summed in
//      input order in fp32 (the dense accumulator's row, or the row's sorted ids), then the
//      optimizer's update, written back in the weight's dtype. Weight rows ahead are prefetched.
// Every sum runs in input order whatever the thread count: the result is bitwise deterministic,
// and follows the pure-PyTorch twin (dtn_kernels/reference/pt_embedding_update.py) operation by
// operation: sgd matches it to the last bit, lazy_adam's moments too; its weights differ by an
// ulp where torch's CPU sqrt is not correctly rounded (std::sqrt is), and rowwise_adagrad's
// state where torch sums a row's g*g in another order.
#include "embedding_update.h"

#include "cpu/embedding_bag_cpu_common.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <vector>

namespace dtn {
namespace {

using namespace cpu;

constexpr const char* kFusedName = "dtn::embedding_bag_backward_update";
constexpr const char* kRowsName = "dtn::embedding_rows_update";

constexpr int64_t kDenseTableBytes = 1 << 20;
constexpr int64_t kDenseRowsPerId = 4;
// Pass 3: the weight row, state and gradient slice of the touched row this many rows ahead
// are prefetched, every cache line of them (rows are scattered: each is a miss, often a TLB
// miss, and a single-line prefetch leaves the row's other lines to stall the update).
constexpr int64_t kRowsAhead = 16;
// Pass 1, dense path: a table's grad_output slice this many samples ahead (a table's slices
// lie T*d apart; a few samples ahead does not cover the latency of the L3 or of memory).
constexpr int64_t kGradSamplesAhead = 64;

// Prefetch of every cache line of [p, p + bytes) (kWrite: for writing). Never faults. GCC
// counts a prefetch as no side effect, so a loop of nothing but prefetches may be deleted
// as dead (it was, here, once inlined into a lambda): the empty volatile asm keeps it.
template <int kWrite>
inline void prefetch_lines(const void* p, int64_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t l = a & ~uintptr_t(63); l < a + uintptr_t(bytes); l += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(l), kWrite, 3);
    __asm__ __volatile__("" : : "r"(l));
  }
}

// One id: its key (local id, or global row) and its position in indices (in row_grads).
struct Entry {
  int64_t key;
  int64_t pos;
};

inline int bit_width(uint64_t x) {
  int b = 0;
  while (x != 0) ++b, x >>= 1;
  return b;
}

// Stable LSD radix sort of `a` by key (keys in [0, 2^bits)); `tmp` is scratch. Ties keep
// their order, so equal keys stay in input order.
void radix_sort(std::vector<Entry>& a, std::vector<Entry>& tmp, int bits) {
  const int64_t n = static_cast<int64_t>(a.size());
  if (n <= 1 || bits <= 0) return;
  const int passes = (bits + 10) / 11;
  const int digit = (bits + passes - 1) / passes;
  const uint64_t mask = (uint64_t(1) << digit) - 1;
  std::vector<int64_t> count(size_t(mask) + 1);
  tmp.resize(size_t(n));
  for (int p = 0; p < passes; ++p) {
    const int shift = p * digit;
    std::fill(count.begin(), count.end(), 0);
    for (const Entry& e : a) ++count[(uint64_t(e.key) >> shift) & mask];
    if (count[(uint64_t(a[0].key) >> shift) & mask] == n) continue;  // one digit value: already in order
    int64_t sum = 0;
    for (int64_t& c : count) {
      const int64_t x = c;
      c = sum;
      sum += x;
    }
    for (const Entry& e : a) tmp[size_t(count[(uint64_t(e.key) >> shift) & mask]++)] = e;
    a.swap(tmp);
  }
}

// A touched row of a table: its local id and, on the sort path, its first sorted entry (the
// row's entries run to the next run's first, or to the end).
struct Run {
  int64_t id;
  int64_t e0;
};

// The runs of equal keys of entries sorted by key, appended to runs.
inline void append_runs(const std::vector<Entry>& entries, std::vector<Run>& runs) {
  const int64_t m = static_cast<int64_t>(entries.size());
  runs.reserve(runs.size() + size_t(m));
  for (int64_t j = 0; j < m; ++j) {
    if (j == 0 || entries[size_t(j)].key != entries[size_t(j) - 1].key) runs.push_back({entries[size_t(j)].key, j});
  }
}

// One past the last sorted entry of run j (of n_entries entries).
inline int64_t run_end(const std::vector<Run>& runs, int64_t j, int64_t n_entries) {
  return j + 1 < int64_t(runs.size()) ? runs[size_t(j) + 1].e0 : n_entries;
}

// What pass 1 leaves per table.
struct TableWork {
  bool dense = false;           // dense path (a small table): acc holds the reduced gradients
  bool one_id = false;          // every bag holds one id: the bag of position i is i - p0
  int64_t p0 = 0;
  int64_t base = 0;             // the table's first global row
  std::vector<float> acc;       // dense path: rows x D
  std::vector<Entry> entries;   // sort path, sorted by local id
  std::vector<Run> runs;        // the touched rows, one run each
};

// ------------------------------------------------------------------ the update of one row

// g_in: the row's reduced fp32 gradient; g: scratch of D floats. The twin's operations, in order.
// g_in may be a slice of grad_output itself (a row with one id): "+ 0.f" turns its -0 into the +0
// that the twin's sum into zeros gives (and changes nothing else).
template <EmbOptimizer kOpt, int kD, typename scalar_t>
inline void update_row(scalar_t* __restrict__ w, float* __restrict__ s1, float* __restrict__ s2,
                       const float* __restrict__ g_in, float* __restrict__ g, const UpdateParams& p, int64_t D_) {
  if constexpr (kOpt != EmbOptimizer::LazyAdam && kVec4<kD, float, scalar_t>) {
    // fp32 rows of a compile-time d: the same operations on each element, 4 lanes at a time;
    // rowwise_adagrad's sum of g*g runs in 4 vector partial sums (a fixed order: deterministic)
    f32x4 sq[4] = {};
    for (int c = 0; c < kD; c += 4) {
      f32x4 x = (load4(g_in + c) + 0.f) * p.grad_scale;
      if (p.weight_decay != 0.f) x = x + p.weight_decay * load4(w + c);
      if constexpr (kOpt == EmbOptimizer::Sgd) {
        store4(w + c, load4(w + c) - p.lr * x);
      } else {
        store4(g + c, x);
        sq[(c / 4) % 4] += x * x;
      }
    }
    if constexpr (kOpt == EmbOptimizer::RowwiseAdagrad) {
      const f32x4 q = (sq[0] + sq[1]) + (sq[2] + sq[3]);
      const float s = s1[0] + ((q[0] + q[1]) + (q[2] + q[3])) / float(kD);
      s1[0] = s;
      const float den = std::sqrt(s) + p.eps;
      for (int c = 0; c < kD; c += 4) store4(w + c, load4(w + c) - (p.lr * load4(g + c)) / den);
    }
    return;
  }
  const int64_t D = kD > 0 ? kD : D_;
  if (p.weight_decay != 0.f) {
    for (int64_t c = 0; c < D; ++c) g[c] = (g_in[c] + 0.f) * p.grad_scale + p.weight_decay * float(w[c]);
  } else {
    for (int64_t c = 0; c < D; ++c) g[c] = (g_in[c] + 0.f) * p.grad_scale;
  }
  if constexpr (kOpt == EmbOptimizer::Sgd) {
    for (int64_t c = 0; c < D; ++c) w[c] = static_cast<scalar_t>(float(w[c]) - p.lr * g[c]);
  } else if constexpr (kOpt == EmbOptimizer::RowwiseAdagrad) {
    float sq = 0.f;
    for (int64_t c = 0; c < D; ++c) sq += g[c] * g[c];
    const float s = s1[0] + (D > 0 ? sq / float(D) : 0.f);
    s1[0] = s;
    const float den = std::sqrt(s) + p.eps;
    for (int64_t c = 0; c < D; ++c) w[c] = static_cast<scalar_t>(float(w[c]) - (p.lr * g[c]) / den);
  } else {
    for (int64_t c = 0; c < D; ++c) {
      const float m = p.beta1 * s1[c] + p.one_minus_beta1 * g[c];
      const float v = p.beta2 * s2[c] + (p.one_minus_beta2 * g[c]) * g[c];
      s1[c] = m;
      s2[c] = v;
      w[c] = static_cast<scalar_t>(float(w[c]) - (p.lr_over_bc1 * m) / (std::sqrt(v) / p.sqrt_bc2 + p.eps));
    }
  }
}

// Pass 3: the touched rows of every list (one per table), in one parallel loop over their
// global index u (list l holds [start[l], start[l + 1])). For the row (l, j): row_of(l, j) is
// its global row, grad_of(l, j, acc) its reduced gradient (accumulated into acc when it must
// be), then the update. kRowsAhead rows earlier, its weight row and state are prefetched and
// prefetch_grad(l, j) is called. Each row has one owner thread.
template <EmbOptimizer kOpt, int kD, typename scalar_t, typename RowOf, typename GradOf, typename PrefetchGrad>
void update_runs(const std::vector<int64_t>& start, scalar_t* W, float* S1, float* S2, const UpdateParams& p,
                 int64_t D, RowOf row_of, GradOf grad_of, PrefetchGrad prefetch_grad) {
  const int64_t U = start.back();
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  auto list_of = [&](int64_t u) {
    return size_t(std::upper_bound(start.begin(), start.end(), u) - start.begin() - 1);
  };
  at::parallel_for(0, U, std::max<int64_t>(1, 2048 / std::max<int64_t>(D, 1)), [&](int64_t u0, int64_t u1) {
    BagAcc<float, kD> abuf(D), gbuf(D);
    float* __restrict__ acc = abuf.data();
    float* __restrict__ g = gbuf.data();
    // the lists of u and of u + kRowsAhead, walked forward together
    size_t l = list_of(u0), la = list_of(std::min(u0 + kRowsAhead, U));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t ua = u + kRowsAhead;
      if (ua < u1) {
        while (ua >= start[la + 1]) ++la;
        const int64_t ja = ua - start[la], ra = row_of(la, ja);
        prefetch_lines<1>(W + ra * D, row_bytes);
        if constexpr (kOpt == EmbOptimizer::RowwiseAdagrad) __builtin_prefetch(S1 + ra, 1, 3);
        if constexpr (kOpt == EmbOptimizer::LazyAdam) {
          prefetch_lines<1>(S1 + ra * D, D * 4);
          prefetch_lines<1>(S2 + ra * D, D * 4);
        }
        prefetch_grad(la, ja);
      }
      while (u >= start[l + 1]) ++l;
      const int64_t j = u - start[l], r = row_of(l, j);
      const float* gr = grad_of(l, j, acc);
      float* s1 = kOpt == EmbOptimizer::RowwiseAdagrad ? S1 + r : kOpt == EmbOptimizer::LazyAdam ? S1 + r * D : nullptr;
      float* s2 = kOpt == EmbOptimizer::LazyAdam ? S2 + r * D : nullptr;
      update_row<kOpt, kD>(W + r * D, s1, s2, gr, g, p, D);
    }
  });
}

template <typename F>
void dispatch_optimizer(EmbOptimizer o, F&& f) {
  switch (o) {
    case EmbOptimizer::Sgd: f(std::integral_constant<EmbOptimizer, EmbOptimizer::Sgd>{}); break;
    case EmbOptimizer::RowwiseAdagrad: f(std::integral_constant<EmbOptimizer, EmbOptimizer::RowwiseAdagrad>{}); break;
    default: f(std::integral_constant<EmbOptimizer, EmbOptimizer::LazyAdam>{});
  }
}


// ------------------------------------------------------------------ embedding_bag_backward_update

struct FusedArgs {
  const int64_t* toff;
  BagShape sh;
  PoolMode mode;
  int64_t pad;
  bool need_scale;  // per-id weights: per_sample_weights and / or mean over bags of several ids
};

// Pass 1 for table t (see the file comment). On a bad bag or id: offers it and leaves the table.
template <int kD, typename scalar_t, typename index_t>
void gather_table(int64_t t, const FusedArgs& a, const scalar_t* __restrict__ G, const index_t* __restrict__ idx,
                  const index_t* __restrict__ off, const scalar_t* __restrict__ psw, const int64_t* amax,
                  int32_t* __restrict__ bag_b, float* __restrict__ scale_of, TableWork& w, ErrorSlot& errors) {
  const BagShape& sh = a.sh;
  const int64_t B = sh.B, N = sh.N, D = kD > 0 ? kD : sh.D, TD = sh.T * D, k0 = t * B;
  const int64_t rows = a.toff[t + 1] - a.toff[t], pad = a.pad;
  w.base = a.toff[t];
  if (B == 0) return;
  // one id per bag (every categorical field): bags in range, no per-bag checks needed
  w.one_id = single_id_run(off, k0, B, N);
  if (!w.one_id) {
    for (int64_t k = k0; k < k0 + B; ++k) {
      BagError err;
      if (!bag_bounds_ok(k, off[k], off[k + 1], N, err)) {
        errors.offer(err);
        return;
      }
    }
  }
  const int64_t p0 = off[k0], n = int64_t(off[k0 + B]) - p0;
  if (n == 0) return;
  w.p0 = p0;
  // the scale of bag k's ids: psw[i] (/ count for mean), 1 / count for mean, else 1
  auto bag_count = [&](int64_t s, int64_t e) {
    int64_t c = e - s;
    if (pad != kNoPadding) {
      for (int64_t i = s; i < e; ++i) c -= int64_t(idx[i]) == pad;
    }
    return c;
  };
  // whether id (position i, bag k) is a row of this table; if not, the error is offered (the caller leaves)
  auto in_table = [&](int64_t id, int64_t k, int64_t i) {
    if (id >= 0 && id < rows) return true;
    errors.offer(bad_id(k, i, id, rows));
    return false;
  };
  const bool mean = a.mode == PoolMode::Mean, max = a.mode == PoolMode::Max;
  w.dense = rows * D * int64_t(sizeof(float)) <= kDenseTableBytes && rows <= kDenseRowsPerId * n;
  if (w.dense) {
    w.acc.assign(size_t(rows * D), 0.f);
    std::vector<uint8_t> hit(size_t(rows), 0);
    float* __restrict__ acc = w.acc.data();
    const scalar_t* __restrict__ Gt = G + t * D;
    // grad_output's slice of sample b, kGradSamplesAhead samples on prefetched (no pointer is
    // formed past the end)
    const uintptr_t step = uintptr_t(TD * int64_t(sizeof(scalar_t)));
    const uintptr_t ahead = uintptr_t(Gt) + uintptr_t(kGradSamplesAhead) * step;
    if (w.one_id && !max) {  // the slice of sample b goes to row idx[p0 + b], times psw (mean of one id: 1)
      for (int64_t b = 0; b < B; ++b) {
        __builtin_prefetch(reinterpret_cast<const void*>(ahead + uintptr_t(b) * step), 0, 3);
        const int64_t i = p0 + b, id = idx[i];
        if (id == pad) continue;
        if (!in_table(id, k0 + b, i)) return;
        hit[size_t(id)] = 1;
        if (psw != nullptr) {
          row_axpy<kD>(acc + id * D, Gt + b * TD, float(psw[i]), D);
        } else {
          row_add<kD>(acc + id * D, Gt + b * TD, D);
        }
      }
    } else {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t k = k0 + b, s = off[k], e = off[k + 1];
        const scalar_t* __restrict__ g = Gt + b * TD;
        __builtin_prefetch(reinterpret_cast<const void*>(ahead + uintptr_t(b) * step), 0, 3);
        const int64_t count = mean ? std::max<int64_t>(bag_count(s, e), 1) : 1;
        const float inv = 1.f / float(count);
        for (int64_t i = s; i < e; ++i) {
          const int64_t id = idx[i];
          if (id == pad) continue;
          if (!in_table(id, k, i)) return;
          float* __restrict__ r = acc + id * D;
          hit[size_t(id)] = 1;
          if (max) {
            const int64_t* am = amax + k * D;
            for (int64_t c = 0; c < D; ++c) r[c] += am[c] == i ? float(g[c]) : 0.f;
          } else if (psw != nullptr) {
            row_axpy<kD>(r, g, mean ? float(psw[i]) / float(count) : float(psw[i]), D);
          } else if (a.need_scale) {
            row_axpy<kD>(r, g, inv, D);
          } else {
            row_add<kD>(r, g, D);
          }
        }
      }
    }
    for (int64_t id = 0; id < rows; ++id) {
      if (hit[size_t(id)]) w.runs.push_back({id, -1});
    }
    return;
  }
  w.entries.reserve(size_t(n));
  if (w.one_id) {  // no scale but psw (mean of one id is the id)
    for (int64_t i = p0; i < p0 + n; ++i) {
      const int64_t id = idx[i];
      if (id == pad) continue;
      if (!in_table(id, k0 + (i - p0), i)) return;
      w.entries.push_back({id, i});
      if (a.need_scale) scale_of[i] = psw != nullptr ? float(psw[i]) : 1.f;
    }
  } else {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t k = k0 + b, s = off[k], e = off[k + 1];
      const int64_t count = mean && a.need_scale ? std::max<int64_t>(bag_count(s, e), 1) : 1;
      for (int64_t i = s; i < e; ++i) {
        const int64_t id = idx[i];
        if (id == pad) continue;
        if (!in_table(id, k, i)) return;
        w.entries.push_back({id, i});
        bag_b[i] = static_cast<int32_t>(b);
        if (a.need_scale) {
          const float x = psw != nullptr ? float(psw[i]) : 1.f;
          scale_of[i] = mean ? x / float(count) : x;
        }
      }
    }
  }
  std::vector<Entry> tmp;
  radix_sort(w.entries, tmp, bit_width(uint64_t(std::max<int64_t>(rows - 1, 0))));
  append_runs(w.entries, w.runs);
}

template <typename scalar_t, typename index_t, int kD>
void fused_kernel(EmbOptimizer opt, const UpdateParams& p, const FusedArgs& a, const scalar_t* G, scalar_t* W,
                  const index_t* idx, const index_t* off, const scalar_t* psw, float* S1, float* S2) {
  const BagShape& sh = a.sh;
  const int64_t T = sh.T, B = sh.B, N = sh.N, D = kD > 0 ? kD : sh.D, TD = T * D;
  at::Tensor amax;
  if (a.mode == PoolMode::Max && T * B > 0) {  // skips bad ids; pass 1 reports them
    amax = at::empty({T * B, D}, at::kLong);
    argmax_kernel<scalar_t, index_t>(W, a.toff, idx, off, sh, a.pad, amax.data_ptr<int64_t>());
  }
  const int64_t* am = amax.defined() ? amax.data_ptr<int64_t>() : nullptr;
  std::unique_ptr<int32_t[]> bag_b(new int32_t[size_t(std::max<int64_t>(N, 1))]);
  std::unique_ptr<float[]> scale_of(a.need_scale ? new float[size_t(std::max<int64_t>(N, 1))] : nullptr);
  std::vector<TableWork> work(static_cast<size_t>(T));
  ErrorSlot errors;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      gather_table<kD>(t, a, G, idx, off, psw, am, bag_b.get(), scale_of.get(), work[size_t(t)], errors);
    }
  });
  errors.raise_if_any(kFusedName, sh);  // before anything is written
  std::vector<int64_t> start(size_t(T) + 1, 0);
  for (int64_t t = 0; t < T; ++t) start[size_t(t) + 1] = start[size_t(t)] + int64_t(work[size_t(t)].runs.size());
  const bool max = a.mode == PoolMode::Max, need_scale = a.need_scale;
  const int32_t* bb = bag_b.get();
  const float* sc = scale_of.get();
  const int64_t slice_bytes = D * int64_t(sizeof(scalar_t));
  auto slice_of = [&](const TableWork& w, int64_t t, int64_t i) {  // grad_output's slice of the id at position i
    return G + (w.one_id ? i - w.p0 : int64_t(bb[i])) * TD + t * D;
  };
  auto row_of = [&](size_t l, int64_t j) { return work[l].base + work[l].runs[size_t(j)].id; };
  auto prefetch_grad = [&](size_t l, int64_t j) {
    const TableWork& w = work[l];
    if (!w.dense) prefetch_lines<0>(slice_of(w, int64_t(l), w.entries[size_t(w.runs[size_t(j)].e0)].pos), slice_bytes);
  };
  auto grad_of = [&](size_t l, int64_t j, float* acc) -> const float* {
    const TableWork& w = work[l];
    const Run& run = w.runs[size_t(j)];
    if (w.dense) return w.acc.data() + run.id * D;
    const Entry* e0 = w.entries.data() + run.e0;
    const Entry* e1 = w.entries.data() + run_end(w.runs, j, int64_t(w.entries.size()));
    if constexpr (std::is_same<scalar_t, float>::value) {  // one plain id: its slice is the gradient
      if (e1 == e0 + 1 && !max && !need_scale) return slice_of(w, int64_t(l), e0->pos);
    }
    const int64_t t = int64_t(l);
    for (int64_t c = 0; c < D; ++c) acc[c] = 0.f;
    for (const Entry* e = e0; e < e1; ++e) {
      const int64_t i = e->pos;
      const scalar_t* __restrict__ g = slice_of(w, t, i);
      if (e + 2 < e1) prefetch_lines<0>(slice_of(w, t, e[2].pos), slice_bytes);  // a row's ids: scattered samples
      if (max) {
        const int64_t b = w.one_id ? i - w.p0 : int64_t(bb[i]);
        const int64_t* a_k = am + (t * B + b) * D;
        for (int64_t c = 0; c < D; ++c) acc[c] += a_k[c] == i ? float(g[c]) : 0.f;
      } else if (need_scale) {
        row_axpy<kD>(acc, g, sc[i], D);
      } else {
        row_add<kD>(acc, g, D);
      }
    }
    return acc;
  };
  dispatch_optimizer(opt, [&](auto o) {
    update_runs<decltype(o)::value, kD>(start, W, S1, S2, p, D, row_of, grad_of, prefetch_grad);
  });
}

// ------------------------------------------------------------------ embedding_rows_update

template <typename scalar_t>
void rows_kernel(EmbOptimizer opt, const UpdateParams& p, const int64_t* rows, int64_t n, const float* RG, int64_t R,
                 int64_t D, scalar_t* W, float* S1, float* S2) {
  std::vector<Entry> entries(static_cast<size_t>(n)), tmp;
  for (int64_t i = 0; i < n; ++i) entries[size_t(i)] = {rows[i], i};
  radix_sort(entries, tmp, bit_width(uint64_t(std::max<int64_t>(R - 1, 0))));
  std::vector<Run> runs;
  append_runs(entries, runs);
  const Entry* e = entries.data();
  const int64_t U = static_cast<int64_t>(runs.size());
  const std::vector<int64_t> start{0, U};
  dispatch_dim(D, [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    dispatch_optimizer(opt, [&](auto o) {
      update_runs<decltype(o)::value, kD>(
          start, W, S1, S2, p, D, [&](size_t, int64_t j) { return runs[size_t(j)].id; },
          [&](size_t, int64_t j, float* acc) -> const float* {
            const int64_t q0 = runs[size_t(j)].e0, q1 = run_end(runs, j, n);
            for (int64_t c = 0; c < D; ++c) acc[c] = 0.f;
            for (int64_t q = q0; q < q1; ++q) row_add<kD>(acc, RG + e[q].pos * D, D);
            return acc;
          },
          [&](size_t, int64_t j) { prefetch_lines<0>(RG + e[runs[size_t(j)].e0].pos * D, D * 4); });
    });
  });
}

}  // namespace

// ------------------------------------------------------------------ entry points

void embedding_bag_backward_update_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                       const at::Tensor& table_offsets, const at::Tensor& indices,
                                       const at::Tensor& offsets, c10::string_view mode,
                                       const std::optional<at::Tensor>& per_sample_weights,
                                       std::optional<int64_t> padding_idx, c10::string_view optimizer,
                                       const at::Tensor& state1, const at::Tensor& state2, double lr, double beta1,
                                       double beta2, double eps, double weight_decay, int64_t step,
                                       double grad_scale) {
  const EmbOptimizer opt = parse_optimizer(kFusedName, optimizer);
  const PoolMode pm = parse_pool_mode(mode);
  const BagShape sh = check_embedding_bag_backward_args(kFusedName, grad_output, weight, table_offsets, indices,
                                                        offsets, pm, per_sample_weights);
  check_update_state(kFusedName, opt, weight, state1, state2, step);
  TORCH_CHECK(sh.B < std::numeric_limits<int32_t>::max(), kFusedName, ": batch size must be below 2^31, got ", sh.B);
  const at::Tensor G = grad_output.contiguous(), toff = table_offsets.contiguous();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->contiguous();
  check_table_offsets(kFusedName, toff.data_ptr<int64_t>(), sh);
  const FusedArgs a{toff.data_ptr<int64_t>(), sh, pm, padding_value(padding_idx),
                    psw.defined() || pm == PoolMode::Mean};
  const UpdateParams p = make_update_params(opt, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  float* S1 = state1.numel() ? state1.data_ptr<float>() : nullptr;
  float* S2 = state2.numel() ? state2.data_ptr<float>() : nullptr;
  DTN_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_bag_backward_update_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "dtn_embedding_bag_backward_update_cpu_idx", [&] {
      dispatch_dim(sh.D, [&](auto kd) {
        fused_kernel<scalar_t, index_t, decltype(kd)::value>(
            opt, p, a, G.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), idx.data_ptr<index_t>(),
            off.data_ptr<index_t>(), psw.defined() ? psw.data_ptr<scalar_t>() : nullptr, S1, S2);
      });
    });
  });
}

void embedding_rows_update_cpu(const at::Tensor& weight, const at::Tensor& state1, const at::Tensor& state2,
                               const at::Tensor& rows, const at::Tensor& row_grads, c10::string_view optimizer,
                               double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                               double grad_scale) {
  const EmbOptimizer opt = parse_optimizer(kRowsName, optimizer);
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), kRowsName, ": weight must be floating point, got ",
              weight.scalar_type());
  check_update_state(kRowsName, opt, weight, state1, state2, step);
  const int64_t R = weight.size(0), D = weight.size(1);
  TORCH_CHECK(rows.dim() == 1 && row_grads.dim() == 2 && row_grads.size(0) == rows.size(0) && row_grads.size(1) == D,
              kRowsName, ": rows must be [n] and row_grads [n, ", D, "], got ", rows.sizes(), " and ",
              row_grads.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt, kRowsName,
              ": rows must be int64 or int32, got ", rows.scalar_type());
  TORCH_CHECK(at::isFloatingType(row_grads.scalar_type()), kRowsName, ": row_grads must be floating point, got ",
              row_grads.scalar_type());
  TORCH_CHECK(rows.device() == weight.device() && row_grads.device() == weight.device(), kRowsName,
              ": rows and row_grads must be on ", weight.device(), ", got ", rows.device(), " and ",
              row_grads.device());
  const at::Tensor r = rows.to(at::kLong).contiguous();
  const at::Tensor rg = row_grads.to(at::kFloat).contiguous();
  const int64_t n = r.numel();
  const int64_t* rp = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < R, kRowsName, ": row ", rp[i], " is outside weight's rows [0, ", R, ")");
  }
  const UpdateParams p = make_update_params(opt, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  float* S1 = state1.numel() ? state1.data_ptr<float>() : nullptr;
  float* S2 = state2.numel() ? state2.data_ptr<float>() : nullptr;
  DTN_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_rows_update_cpu", [&] {
    rows_kernel<scalar_t>(opt, p, rp, n, rg.data_ptr<float>(), R, D, weight.data_ptr<scalar_t>(), S1, S2);
  });
}

TORCH_LIBRARY_IMPL(dtn, CPU, m) {
  m.impl("embedding_bag_backward_update", &embedding_bag_backward_update_cpu);
  m.impl("embedding_rows_update", &embedding_rows_update_cpu);
}

}  // namespace dtn
