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
constexpr int64_t kRowsAhead = 12;  // touched rows prefetched ahead in the update pass

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

// A touched row: its reduced fp32 gradient is ready (`grad`, the dense-table path), or it is the
// sum over the sorted entries [e0, e1) of table t.
struct Touched {
  int64_t row;
  const float* grad;
  const Entry* e0;
  const Entry* e1;
  int64_t t;
};

// What pass 1 leaves per table.
struct TableWork {
  std::vector<float> acc;       // dense path: rows x D
  std::vector<Entry> entries;   // sort path, sorted by local id
  std::vector<Touched> touched;
  bool one_id = false;          // every bag holds one id: the bag of position i is i - p0
  int64_t p0 = 0;
};

// ------------------------------------------------------------------ the update of one row

// g_in: the row's reduced fp32 gradient; g: scratch of D floats. The twin's operations, in order.
template <EmbOptimizer kOpt, int kD, typename scalar_t>
inline void update_row(scalar_t* __restrict__ w, float* __restrict__ s1, float* __restrict__ s2,
                       const float* __restrict__ g_in, float* __restrict__ g, const UpdateParams& p, int64_t D_) {
  const int64_t D = kD > 0 ? kD : D_;
  if (p.weight_decay != 0.f) {
    for (int64_t c = 0; c < D; ++c) g[c] = g_in[c] * p.grad_scale + p.weight_decay * float(w[c]);
  } else {
    for (int64_t c = 0; c < D; ++c) g[c] = g_in[c] * p.grad_scale;
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

// Pass 3: the touched rows of every list (one per table), in one parallel loop. For each row,
// grad_of(x, acc) returns its reduced gradient (accumulating into acc when it must), then the
// update; prefetch_of(x) is called kRowsAhead rows earlier. Each row has one owner thread.
template <EmbOptimizer kOpt, int kD, typename scalar_t, typename GradOf, typename PrefetchOf>
void update_touched(const std::vector<const std::vector<Touched>*>& lists, scalar_t* W, float* S1, float* S2,
                    const UpdateParams& p, int64_t D, GradOf grad_of, PrefetchOf prefetch_of) {
  std::vector<int64_t> start(lists.size() + 1, 0);  // first global index of each list
  for (size_t l = 0; l < lists.size(); ++l) start[l + 1] = start[l] + static_cast<int64_t>(lists[l]->size());
  const int64_t U = start.back();
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  at::parallel_for(0, U, std::max<int64_t>(1, 2048 / std::max<int64_t>(D, 1)), [&](int64_t u0, int64_t u1) {
    BagAcc<float, kD> abuf(D), gbuf(D);
    float* __restrict__ acc = abuf.data();
    float* __restrict__ g = gbuf.data();
    // (list, index) of u0 and of u0 + kRowsAhead, walked forward together
    size_t l = size_t(std::upper_bound(start.begin(), start.end(), u0) - start.begin() - 1);
    size_t la = size_t(std::upper_bound(start.begin(), start.end(), std::min(u0 + kRowsAhead, U)) - start.begin() - 1);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t ua = u + kRowsAhead;
      if (ua < u1) {
        while (ua >= start[la + 1]) ++la;
        const Touched& y = (*lists[la])[size_t(ua - start[la])];
        prefetch_row(W, y.row, row_bytes);
        if (kOpt == EmbOptimizer::LazyAdam) {
          prefetch_row(S1, y.row, D * 4);
          prefetch_row(S2, y.row, D * 4);
        }
        prefetch_of(y);
      }
      while (u >= start[l + 1]) ++l;
      const Touched& x = (*lists[l])[size_t(u - start[l])];
      const float* gr = grad_of(x, acc);
      float* s1 = kOpt == EmbOptimizer::RowwiseAdagrad ? S1 + x.row : kOpt == EmbOptimizer::LazyAdam ? S1 + x.row * D
                                                                                                      : nullptr;
      float* s2 = kOpt == EmbOptimizer::LazyAdam ? S2 + x.row * D : nullptr;
      update_row<kOpt, kD>(W + x.row * D, s1, s2, gr, g, p, D);
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
  const int64_t base = a.toff[t], rows = a.toff[t + 1] - base, pad = a.pad;
  for (int64_t k = k0; k < k0 + B; ++k) {
    BagError err;
    if (!bag_bounds_ok(k, off[k], off[k + 1], N, err)) {
      errors.offer(err);
      return;
    }
  }
  if (B == 0) return;
  const int64_t p0 = off[k0], n = int64_t(off[k0 + B]) - p0;
  if (n == 0) return;
  w.p0 = p0;
  w.one_id = single_id_run(off, k0, B, N);
  // the scale of bag k's ids: psw[i] (/ count for mean), 1 / count for mean, else 1
  auto bag_count = [&](int64_t s, int64_t e) {
    int64_t c = e - s;
    if (pad != kNoPadding) {
      for (int64_t i = s; i < e; ++i) c -= int64_t(idx[i]) == pad;
    }
    return c;
  };
  const bool mean = a.mode == PoolMode::Mean, max = a.mode == PoolMode::Max;
  const bool dense = rows * D * int64_t(sizeof(float)) <= kDenseTableBytes && rows <= kDenseRowsPerId * n;
  if (dense) {
    w.acc.assign(size_t(rows * D), 0.f);
    std::vector<uint8_t> hit(size_t(rows), 0);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t k = k0 + b, s = off[k], e = off[k + 1];
      const scalar_t* __restrict__ g = G + b * TD + t * D;
      // this table's slices lie T*d apart, across pages, where hardware prefetchers stop
      if (b + kSampleAhead < B) __builtin_prefetch(g + kSampleAhead * TD, 0, 3);
      const int64_t count = mean ? std::max<int64_t>(bag_count(s, e), 1) : 1;
      const float inv = 1.f / float(count);
      for (int64_t i = s; i < e; ++i) {
        const int64_t id = idx[i];
        if (id == pad) continue;
        if (id < 0 || id >= rows) {
          errors.offer(bad_id(k, i, id, rows));
          return;
        }
        float* __restrict__ r = w.acc.data() + id * D;
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
    for (int64_t id = 0; id < rows; ++id) {
      if (hit[size_t(id)]) w.touched.push_back({base + id, w.acc.data() + id * D, nullptr, nullptr, t});
    }
    return;
  }
  w.entries.reserve(size_t(n));
  if (w.one_id) {  // every categorical field: one id per bag, no scale (mean of one id is the id)
    for (int64_t i = p0; i < p0 + n; ++i) {
      const int64_t id = idx[i];
      if (id == pad) continue;
      if (id < 0 || id >= rows) {
        errors.offer(bad_id(k0 + (i - p0), i, id, rows));
        return;
      }
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
        if (id < 0 || id >= rows) {
          errors.offer(bad_id(k, i, id, rows));
          return;
        }
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
  const Entry* e = w.entries.data();
  const int64_t m = static_cast<int64_t>(w.entries.size());
  for (int64_t j = 0; j < m;) {
    int64_t j1 = j + 1;
    while (j1 < m && e[j1].key == e[j].key) ++j1;
    w.touched.push_back({base + e[j].key, nullptr, e + j, e + j1, t});
    j = j1;
  }
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
  std::vector<const std::vector<Touched>*> lists;
  for (const TableWork& w : work) lists.push_back(&w.touched);
  const bool max = a.mode == PoolMode::Max, need_scale = a.need_scale;
  const int32_t* bb = bag_b.get();
  const float* sc = scale_of.get();
  dispatch_optimizer(opt, [&](auto o) {
    auto slice_of = [&](const Touched& x, int64_t i) {  // grad_output's slice of the id at position i
      const TableWork& w = work[size_t(x.t)];
      return G + (w.one_id ? i - w.p0 : int64_t(bb[i])) * TD + x.t * D;
    };
    auto prefetch_of = [&](const Touched& x) {
      if (x.grad == nullptr) __builtin_prefetch(slice_of(x, x.e0->pos), 0, 3);
    };
    update_touched<decltype(o)::value, kD>(lists, W, S1, S2, p, D, [&](const Touched& x, float* acc) -> const float* {
      if (x.grad != nullptr) return x.grad;
      const TableWork& w = work[size_t(x.t)];
      const scalar_t* Gt = G + x.t * D;
      for (int64_t c = 0; c < D; ++c) acc[c] = 0.f;
      for (const Entry* e = x.e0; e < x.e1; ++e) {
        const int64_t i = e->pos, b = w.one_id ? i - w.p0 : int64_t(bb[i]);
        const scalar_t* __restrict__ g = Gt + b * TD;
        if (e + 2 < x.e1) {  // the slices of the next ids (a row's ids come from scattered samples)
          const int64_t i2 = e[2].pos;
          __builtin_prefetch(Gt + (w.one_id ? i2 - w.p0 : int64_t(bb[i2])) * TD, 0, 3);
        }
        if (max) {
          const int64_t* a_k = am + (x.t * B + b) * D;
          for (int64_t c = 0; c < D; ++c) acc[c] += a_k[c] == i ? float(g[c]) : 0.f;
        } else if (need_scale) {
          row_axpy<kD>(acc, g, sc[i], D);
        } else {
          row_add<kD>(acc, g, D);
        }
      }
      return acc;
    }, prefetch_of);
  });
}

// ------------------------------------------------------------------ embedding_rows_update

template <typename scalar_t>
void rows_kernel(EmbOptimizer opt, const UpdateParams& p, const int64_t* rows, int64_t n, const float* RG, int64_t R,
                 int64_t D, scalar_t* W, float* S1, float* S2) {
  std::vector<Entry> entries(static_cast<size_t>(n)), tmp;
  for (int64_t i = 0; i < n; ++i) entries[size_t(i)] = {rows[i], i};
  radix_sort(entries, tmp, bit_width(uint64_t(std::max<int64_t>(R - 1, 0))));
  std::vector<Touched> all;
  const Entry* e = entries.data();
  for (int64_t j = 0; j < n;) {
    int64_t j1 = j + 1;
    while (j1 < n && e[j1].key == e[j].key) ++j1;
    all.push_back({e[j].key, nullptr, e + j, e + j1, 0});
    j = j1;
  }
  const std::vector<const std::vector<Touched>*> lists{&all};
  dispatch_dim(D, [&](auto kd) {
    constexpr int kD = decltype(kd)::value;
    dispatch_optimizer(opt, [&](auto o) {
      update_touched<decltype(o)::value, kD>(
          lists, W, S1, S2, p, D,
          [&](const Touched& x, float* acc) -> const float* {
            for (int64_t c = 0; c < D; ++c) acc[c] = 0.f;
            for (const Entry* q = x.e0; q < x.e1; ++q) row_add<kD>(acc, RG + q->pos * D, D);
            return acc;
          },
          [&](const Touched& x) { __builtin_prefetch(RG + x.e0->pos * D, 0, 3); });
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
