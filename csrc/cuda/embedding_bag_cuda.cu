// CUDA kernels of dtn::embedding_bag (table-batched embedding bag).
//
// Forward: one group of G lanes per bag (G = 32, a warp, for wide rows; fewer for small
// d so one warp serves several bags), each lane loading VEC consecutive elements of a
// row at once (16 bytes for fp32 at VEC = 4), fp32 accumulation for fp16 / bf16.
// Backward, deterministic and without atomics:
//   1. per id: its global row (padding -> sentinel R) and its bag;
//   2. stable sort by row (at::sort, cub radix sort underneath), so one row's ids stay in
//      input order;
//   3. one group per run of equal rows sums its ids' scaled grad_output slices and
//      writes the row once (dense: into a zeroed [R, d]; sparse: into [U, d]);
//   4. per-sample-weight gradient: one group per bag, a dot product per id reduced with
//      warp shuffles.
// Bad input never causes an out-of-bounds access: kernels skip it and raise a device-side
// flag (code, bag, position, value, aux) that the host reads after the kernel and turns
// into the same error message as the CPU kernel.
#include "embedding_bag.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>

namespace dtn {
namespace {

constexpr int kBlock = 256;
constexpr int kErrFields = 5;  // code, bag, pos, value, aux (BagError)

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) VecT {
  scalar_t v[VEC];
};

__device__ __forceinline__ void report_error(int64_t* err, int64_t code, int64_t bag, int64_t pos, int64_t value,
                                             int64_t aux) {
  // first reporter wins; the fields are read on the host after the kernel completes
  if (atomicCAS(reinterpret_cast<unsigned long long*>(err), 0ull, static_cast<unsigned long long>(code)) == 0ull) {
    err[1] = bag;
    err[2] = pos;
    err[3] = value;
    err[4] = aux;
  }
}

// Checks bag k's table and bounds; on failure reports (from one lane) and returns false.
__device__ __forceinline__ bool bag_ok(const int64_t* toff, int64_t t, int64_t k, int64_t s, int64_t e, int64_t N,
                                       int64_t R, bool reporter, int64_t* err) {
  const int64_t lo = toff[t], hi = toff[t + 1];
  if ((t == 0 && lo != 0) || lo < 0 || hi < lo || hi > R) {
    if (reporter) report_error(err, BagError::kBadTable, t, -1, lo, hi);
    return false;
  }
  if (s < 0) {
    if (reporter) report_error(err, BagError::kNegativeStart, k, -1, s, 0);
    return false;
  }
  if (e < s) {
    if (reporter) report_error(err, BagError::kDecreasing, k, -1, e, s);
    return false;
  }
  if (e > N) {
    if (reporter) report_error(err, BagError::kPastEnd, k, -1, e, 0);
    return false;
  }
  return true;
}

// Lanes per bag: a power of two covering d / VEC, at most a warp.
inline int lanes_per_bag(int64_t D, int vec) {
  int g = 1;
  while (g < 32 && int64_t(g) * vec < D) g *= 2;
  return g;
}

// ------------------------------------------------------------------ forward

template <typename scalar_t, typename index_t, int VEC>
__global__ void eb_forward_kernel(const scalar_t* __restrict__ W, const int64_t* __restrict__ toff,
                                  const index_t* __restrict__ idx, const index_t* __restrict__ off,
                                  const scalar_t* __restrict__ psw, int64_t T, int64_t B, int64_t D, int64_t N,
                                  int64_t R, int mode, int64_t pad, int group, scalar_t* __restrict__ out,
                                  int64_t* __restrict__ err) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = VecT<scalar_t, VEC>;
  const int lane = threadIdx.x % group;
  const int64_t k = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  if (k >= T * B) return;
  const int64_t t = k / B, b = k - t * B;
  const int64_t s = off[k], e = off[k + 1];
  scalar_t* o = out + b * T * D + t * D;
  if (!bag_ok(toff, t, k, s, e, N, R, lane == 0, err)) {
    for (int64_t c = lane; c < D; c += group) o[c] = scalar_t(0);
    return;
  }
  const int64_t base = toff[t], rows = toff[t + 1] - base;
  for (int64_t c0 = int64_t(lane) * VEC; c0 < D; c0 += int64_t(group) * VEC) {
    acc_t acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = acc_t(0);
    int64_t count = 0;
    for (int64_t i = s; i < e; ++i) {
      const int64_t id = idx[i];
      if (id == pad) continue;
      if (id < 0 || id >= rows) {
        if (lane == 0 && c0 == 0) report_error(err, BagError::kBadId, k, i, id, rows);
        continue;
      }
      const V x = *reinterpret_cast<const V*>(W + (base + id) * D + c0);
      if (mode == int(PoolMode::Max)) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc_t y = acc_t(x.v[v]);
          acc[v] = (count == 0 || y > acc[v]) ? y : acc[v];
        }
      } else {
        const acc_t w = psw != nullptr ? acc_t(psw[i]) : acc_t(1);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += w * acc_t(x.v[v]);
      }
      ++count;
    }
    const acc_t scale = (mode == int(PoolMode::Mean) && count > 0) ? acc_t(1) / acc_t(count) : acc_t(1);
    V y;
#pragma unroll
    for (int v = 0; v < VEC; ++v) y.v[v] = static_cast<scalar_t>(acc[v] * scale);
    *reinterpret_cast<V*>(o + c0) = y;
  }
}

// ------------------------------------------------------------------ backward pieces

// Per id: global row (sentinel R for padding / bad ids) and bag; per bag: the pooling scale.
template <typename index_t, typename acc_t>
__global__ void eb_entries_kernel(const int64_t* __restrict__ toff, const index_t* __restrict__ idx,
                                  const index_t* __restrict__ off, int64_t T, int64_t B, int64_t N, int64_t R,
                                  int mode, int64_t pad, int64_t* __restrict__ row_of, int64_t* __restrict__ bag_of,
                                  acc_t* __restrict__ scale_of, int64_t* __restrict__ err) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= T * B) return;
  const int64_t t = k / B;
  const int64_t s = off[k], e = off[k + 1];
  if (!bag_ok(toff, t, k, s, e, N, R, true, err)) {
    scale_of[k] = acc_t(0);
    return;
  }
  const int64_t base = toff[t], rows = toff[t + 1] - base;
  int64_t count = 0;
  for (int64_t i = s; i < e; ++i) {
    const int64_t id = idx[i];
    bag_of[i] = k;
    if (id == pad) continue;
    if (id < 0 || id >= rows) {
      report_error(err, BagError::kBadId, k, i, id, rows);
      continue;
    }
    row_of[i] = base + id;
    ++count;
  }
  scale_of[k] = mode == int(PoolMode::Mean) ? (count > 0 ? acc_t(1) / acc_t(count) : acc_t(0)) : acc_t(1);
}

// Max pooling: the winning position in `indices` for every (bag, column), -1 if empty.
template <typename scalar_t, typename index_t>
__global__ void eb_argmax_kernel(const scalar_t* __restrict__ W, const int64_t* __restrict__ toff,
                                 const index_t* __restrict__ idx, const index_t* __restrict__ off, int64_t T,
                                 int64_t B, int64_t D, int64_t N, int64_t R, int64_t pad,
                                 int64_t* __restrict__ amax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= T * B) return;
  const int64_t t = k / B;
  int64_t s = off[k], e = off[k + 1];
  const int64_t base = toff[t], rows = toff[t + 1] - base;
  const bool ok = s >= 0 && e >= s && e <= N && base >= 0 && rows >= 0 && base + rows <= R;
  for (int64_t c = lane; c < D; c += 32) {
    acc_t best = acc_t(0);
    int64_t arg = -1;
    for (int64_t i = ok ? s : 0; i < (ok ? e : 0); ++i) {
      const int64_t id = idx[i];
      if (id == pad || id < 0 || id >= rows) continue;
      const acc_t y = acc_t(W[(base + id) * D + c]);
      if (arg < 0 || y > best) {
        best = y;
        arg = i;
      }
    }
    amax[k * D + c] = arg;
  }
}

// One group per run of equal rows in the sorted ids: writes that row's gradient once.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void eb_segment_reduce_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ seg_rows,
                                         const int64_t* __restrict__ seg_ends, const int64_t* __restrict__ perm,
                                         const int64_t* __restrict__ bag_of, const acc_t* __restrict__ scale_of,
                                         const scalar_t* __restrict__ psw, const int64_t* __restrict__ amax,
                                         int64_t U, int64_t T, int64_t B, int64_t D, int64_t R, int mode, int group,
                                         bool dense, scalar_t* __restrict__ out) {
  using V = VecT<scalar_t, VEC>;
  const int lane = threadIdx.x % group;
  const int64_t u = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  if (u >= U) return;
  const int64_t row = seg_rows[u];
  if (row < 0 || row >= R) return;  // the padding sentinel's run
  const int64_t j0 = u == 0 ? 0 : seg_ends[u - 1], j1 = seg_ends[u];
  scalar_t* dst = out + (dense ? row : u) * D;
  for (int64_t c0 = int64_t(lane) * VEC; c0 < D; c0 += int64_t(group) * VEC) {
    acc_t acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = acc_t(0);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i = perm[j], k = bag_of[i];
      const int64_t t = k / B, b = k - t * B;
      const V g = *reinterpret_cast<const V*>(grad + b * T * D + t * D + c0);
      if (mode == int(PoolMode::Max)) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += amax[k * D + c0 + v] == i ? acc_t(g.v[v]) : acc_t(0);
      } else {
        const acc_t w = psw != nullptr ? acc_t(psw[i]) * scale_of[k] : scale_of[k];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += w * acc_t(g.v[v]);
      }
    }
    V y;
#pragma unroll
    for (int v = 0; v < VEC; ++v) y.v[v] = static_cast<scalar_t>(acc[v]);
    *reinterpret_cast<V*>(dst + c0) = y;
  }
}

// d out / d w_i = scale * <grad_output slice, weight row>: one group per bag.
template <typename scalar_t, typename index_t>
__global__ void eb_psw_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ W,
                                   const int64_t* __restrict__ toff, const index_t* __restrict__ idx,
                                   const index_t* __restrict__ off,
                                   const at::opmath_type<scalar_t>* __restrict__ scale_of, int64_t T, int64_t B,
                                   int64_t D, int64_t N, int64_t R, int64_t pad, int group,
                                   scalar_t* __restrict__ gpsw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % group;
  const int64_t k = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  if (k >= T * B) return;
  // shuffles stay inside this bag's lanes
  const unsigned lane_in_warp = threadIdx.x % 32;
  const unsigned mask = group == 32 ? 0xffffffffu : (((1u << group) - 1u) << (lane_in_warp / group * group));
  const int64_t t = k / B, b = k - t * B;
  const int64_t s = off[k], e = off[k + 1];
  const int64_t base = toff[t], rows = toff[t + 1] - base;
  if (s < 0 || e < s || e > N || base < 0 || rows < 0 || base + rows > R) return;
  const scalar_t* g = grad + b * T * D + t * D;
  for (int64_t i = s; i < e; ++i) {
    const int64_t id = idx[i];
    const bool valid = id != pad && id >= 0 && id < rows;
    acc_t dot = acc_t(0);
    if (valid) {
      for (int64_t c = lane; c < D; c += group) dot += acc_t(g[c]) * acc_t(W[(base + id) * D + c]);
    }
    for (int width = group / 2; width > 0; width /= 2) dot += __shfl_xor_sync(mask, dot, width);
    if (lane == 0) gpsw[i] = valid ? static_cast<scalar_t>(dot * scale_of[k]) : scalar_t(0);
  }
}

// ------------------------------------------------------------------ host side

void raise_if_flagged(const char* op, const at::Tensor& err, const BagShape& sh) {
  const at::Tensor h = err.cpu();  // synchronises with the kernels
  const int64_t* p = h.data_ptr<int64_t>();
  if (p[0] == BagError::kOk) return;
  BagError e;
  e.code = p[0], e.bag = p[1], e.pos = p[2], e.value = p[3], e.aux = p[4];
  TORCH_CHECK(false, bag_error_message(op, e, sh.B, sh.N));
}

inline unsigned blocks_for(int64_t items, int per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

template <typename scalar_t>
bool can_vectorize(int64_t D, const void* p) {
  return D % 4 == 0 && reinterpret_cast<uintptr_t>(p) % (4 * sizeof(scalar_t)) == 0;
}

#define DTN_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor embedding_bag_cuda(const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
                              const at::Tensor& offsets, c10::string_view mode,
                              const std::optional<at::Tensor>& per_sample_weights, std::optional<int64_t> padding_idx,
                              bool /*sparse*/) {
  const char* op = "dtn::embedding_bag";
  const PoolMode pm = parse_pool_mode(mode);
  const BagShape sh = check_embedding_bag_args(op, weight, table_offsets, indices, offsets, pm, per_sample_weights);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor W = weight.contiguous(), toff = table_offsets.contiguous();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->contiguous();
  at::Tensor out = at::empty({sh.B, sh.T * sh.D}, weight.options());
  if (sh.T * sh.B == 0 || sh.D == 0) return out.zero_();
  at::Tensor err = at::zeros({kErrFields}, weight.options().dtype(at::kLong));
  const int64_t pad = padding_value(padding_idx);
  auto stream = c10::cuda::getCurrentCUDAStream();
  DTN_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_bag_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "dtn_embedding_bag_cuda_idx", [&] {
      const bool vec = can_vectorize<scalar_t>(sh.D, W.data_ptr());
      const int group = lanes_per_bag(sh.D, vec ? 4 : 1);
      const unsigned grid = blocks_for(sh.T * sh.B, kBlock / group);
      const scalar_t* psw_p = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
      if (vec) {
        eb_forward_kernel<scalar_t, index_t, 4><<<grid, kBlock, 0, stream>>>(
            W.data_ptr<scalar_t>(), toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
            psw_p, sh.T, sh.B, sh.D, sh.N, sh.R, int(pm), pad, group, out.data_ptr<scalar_t>(),
            err.data_ptr<int64_t>());
      } else {
        eb_forward_kernel<scalar_t, index_t, 1><<<grid, kBlock, 0, stream>>>(
            W.data_ptr<scalar_t>(), toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
            psw_p, sh.T, sh.B, sh.D, sh.N, sh.R, int(pm), pad, group, out.data_ptr<scalar_t>(),
            err.data_ptr<int64_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  raise_if_flagged(op, err, sh);
  return out;
}

// Shared by the dense and the row-sparse backward. Returns (rows, row_grads or dense, grad_psw).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda_impl(
    const char* op, bool dense, const at::Tensor& grad_output, const at::Tensor& weight,
    const at::Tensor& table_offsets, const at::Tensor& indices, const at::Tensor& offsets, c10::string_view mode,
    const std::optional<at::Tensor>& per_sample_weights, std::optional<int64_t> padding_idx, bool compute_psw_grad) {
  const PoolMode pm = parse_pool_mode(mode);
  const BagShape sh = check_embedding_bag_backward_args(op, grad_output, weight, table_offsets, indices, offsets, pm,
                                                        per_sample_weights);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor G = grad_output.contiguous(), W = weight.contiguous(), toff = table_offsets.contiguous();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->contiguous();
  const bool want_psw = compute_psw_grad && psw.defined();
  const int64_t pad = padding_value(padding_idx);
  const auto long_opts = weight.options().dtype(at::kLong);
  at::Tensor grad_psw = want_psw ? at::zeros({sh.N}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor err = at::zeros({kErrFields}, long_opts);
  at::Tensor rows_out, grads_out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t nbags = sh.T * sh.B;

  DTN_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_bag_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "dtn_embedding_bag_backward_cuda_idx", [&] {
      at::Tensor row_of = at::full({sh.N}, sh.R, long_opts);  // sentinel R: padding / not in a bag
      at::Tensor bag_of = at::zeros({sh.N}, long_opts);
      at::Tensor scale_of = at::empty({nbags}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      if (nbags > 0) {
        eb_entries_kernel<index_t, acc_t><<<blocks_for(nbags, kBlock), kBlock, 0, stream>>>(
            toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(), off.data_ptr<index_t>(), sh.T, sh.B, sh.N, sh.R,
            int(pm), pad, row_of.data_ptr<int64_t>(), bag_of.data_ptr<int64_t>(), scale_of.data_ptr<acc_t>(),
            err.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      raise_if_flagged(op, err, sh);
      at::Tensor amax;
      if (pm == PoolMode::Max && nbags > 0 && sh.D > 0) {
        amax = at::empty({nbags, sh.D}, long_opts);
        eb_argmax_kernel<scalar_t, index_t><<<blocks_for(nbags, kBlock / 32), kBlock, 0, stream>>>(
            W.data_ptr<scalar_t>(), toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
            sh.T, sh.B, sh.D, sh.N, sh.R, pad, amax.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // stable sort: equal rows keep input order -> deterministic sums
      at::Tensor sorted, perm;
      std::tie(sorted, perm) = at::sort(row_of, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      at::Tensor seg_rows, counts;
      std::tie(seg_rows, std::ignore, counts) = at::unique_consecutive(sorted, false, true);
      const at::Tensor seg_ends = counts.cumsum(0);
      const int64_t U = seg_rows.numel();
      grads_out = dense ? at::zeros({sh.R, sh.D}, weight.options()) : at::empty({U, sh.D}, weight.options());
      if (U > 0 && sh.D > 0) {
        const bool vec = can_vectorize<scalar_t>(sh.D, G.data_ptr());
        const int group = lanes_per_bag(sh.D, vec ? 4 : 1);
        const unsigned grid = blocks_for(U, kBlock / group);
        const scalar_t* psw_p = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
        const int64_t* amax_p = amax.defined() ? amax.data_ptr<int64_t>() : nullptr;
        if (vec) {
          eb_segment_reduce_kernel<scalar_t, acc_t, 4><<<grid, kBlock, 0, stream>>>(
              G.data_ptr<scalar_t>(), seg_rows.data_ptr<int64_t>(), seg_ends.data_ptr<int64_t>(),
              perm.data_ptr<int64_t>(), bag_of.data_ptr<int64_t>(), scale_of.data_ptr<acc_t>(), psw_p, amax_p, U,
              sh.T, sh.B, sh.D, sh.R, int(pm), group, dense, grads_out.data_ptr<scalar_t>());
        } else {
          eb_segment_reduce_kernel<scalar_t, acc_t, 1><<<grid, kBlock, 0, stream>>>(
              G.data_ptr<scalar_t>(), seg_rows.data_ptr<int64_t>(), seg_ends.data_ptr<int64_t>(),
              perm.data_ptr<int64_t>(), bag_of.data_ptr<int64_t>(), scale_of.data_ptr<acc_t>(), psw_p, amax_p, U,
              sh.T, sh.B, sh.D, sh.R, int(pm), group, dense, grads_out.data_ptr<scalar_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (!dense) {
        // drop the sentinel run (padding ids), which sorts last
        const int64_t keep = U > 0 && seg_rows[U - 1].item<int64_t>() == sh.R ? U - 1 : U;
        rows_out = seg_rows.slice(0, 0, keep);
        grads_out = grads_out.slice(0, 0, keep);
      }
      if (want_psw && nbags > 0) {
        const int group = lanes_per_bag(sh.D, 1);
        eb_psw_grad_kernel<scalar_t, index_t><<<blocks_for(nbags, kBlock / group), kBlock, 0, stream>>>(
            G.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(),
            off.data_ptr<index_t>(), scale_of.data_ptr<acc_t>(), sh.T, sh.B, sh.D, sh.N, sh.R, pad, group,
            grad_psw.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {rows_out, grads_out, grad_psw};
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx, bool compute_psw_grad) {
  auto r = backward_cuda_impl("dtn::embedding_bag_backward", true, grad_output, weight, table_offsets, indices,
                              offsets, mode, per_sample_weights, padding_idx, compute_psw_grad);
  return {std::get<1>(r), std::get<2>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_sparse_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx, bool compute_psw_grad) {
  return backward_cuda_impl("dtn::embedding_bag_backward_sparse", false, grad_output, weight, table_offsets, indices,
                            offsets, mode, per_sample_weights, padding_idx, compute_psw_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(dtn, CUDA, m) {
  m.impl("embedding_bag", &embedding_bag_cuda);
  m.impl("embedding_bag_backward", &embedding_bag_backward_cuda);
  m.impl("embedding_bag_backward_sparse", &embedding_bag_backward_sparse_cuda);
}

}  // namespace dtn
