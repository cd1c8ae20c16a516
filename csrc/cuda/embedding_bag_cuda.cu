// CUDA kernels of dtn::embedding_bag (table-batched embedding bag).
//
// No host synchronisation anywhere in the forward or the dense backward: every size is known
// on the host from the shapes, and bad input is reported through a device-side flag that the
// host reads only when asked (embedding_bag_take_cuda_error), so a training step can run ahead
// of the GPU and be captured into a CUDA graph. The row-sparse backward is the exception: its
// output has a data-dependent number of rows (docs/embedding_bag.md).
//
// Forward: one group of G lanes per bag (G = 32, a warp, for wide rows; fewer for small d so
// one warp serves several bags), each lane loading VEC consecutive elements of a row at once
// (16 bytes for fp32 at VEC = 4), fp32 accumulation for fp16 / bf16.
//
// Backward, deterministic and without atomics:
//   1. per id: its global row as an int32 sort key (padding, bad ids, ids in no bag -> the
//      sentinel R, which sorts last) and its bag; per bag: the pooling scale;
//   2. stable sort of the keys (at::sort, cub radix sort underneath);
//   3. a chunked segmented reduction over the sorted positions, in levels, so that a row
//      that occurs n times costs about L * (1 + log_L n) dependent additions, not n:
//      level 0: one lane group per chunk of L = kChunk sorted positions walks its chunk in
//        order; a run of one row that lies inside the chunk is finished there and written
//        to the gradient row; the piece of a run that ends at the chunk's last position goes
//        to tail0[chunk] (the input of level 1); the piece of a run that came from earlier
//        chunks and ends inside this one goes to head[chunk];
//      level l >= 1: the same walk over the n_l = n_{l-1} / L tails of level l-1 (key of
//        element c: the row at level-0 position (c+1) * L^l - 1); run ends that are not
//        chunk ends go to ends_l[position], chunk ends to tail_l[chunk];
//      final: one group per level-0 chunk k whose first run came from earlier chunks and ends
//        in chunk k (at e): sums head[k] (if e % L != 0) and, level by level, ends_l[e_l - 1]
//        (e_l = e / L^l) when e_l % L != 0 and that element still holds this row.
//      Every gradient row is written once: rows that no id touches by the zero fill (dense),
//      the others by level 0 or by the final pass. tests/test_embedding_bag.py compiles the
//      host-testable regions below with the host compiler and checks them against index_add_.
//   4. per-sample-weight gradient: one group per bag, a dot product per id reduced with
//      warp shuffles.
// Bad input never causes an out-of-bounds access: kernels skip it and raise the flag.
#include "embedding_bag.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>

namespace dtn {
namespace {

constexpr int kBlock = 256;
constexpr int kChunk = 32;      // L: sorted positions one lane group reduces per level
constexpr int kMaxLevels = 16;  // ceil(log_32(2^63)) = 13 levels suffice for any N
constexpr int kMaxDevices = 128;

// Kernel launch plus its error check; tests/test_embedding_bag.py defines it as a loop over
// blocks and threads to run the host-testable part on the CPU.
#define DTN_LAUNCH(kernel, grid, block, stream, ...)           \
  do {                                                         \
    kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__);     \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                            \
  } while (0)

// ------------------------------------------------------------------ the device-side error flag

// int64 fields: code, bag, pos, value, aux (BagError), then B, N and the op that reported.
constexpr int kErrFields = 8;
enum OpId : int64_t { kOpForward = 0, kOpBackward = 1, kOpBackwardSparse = 2, kOpBackwardUpdate = 3 };

const char* op_name(int64_t id) {
  switch (id) {
    case kOpBackward:
      return "dtn::embedding_bag_backward";
    case kOpBackwardSparse:
      return "dtn::embedding_bag_backward_sparse";
    case kOpBackwardUpdate:
      return "dtn::embedding_bag_backward_update";
    default:
      return "dtn::embedding_bag";
  }
}

// Where a kernel reports: the device's flag plus what the message needs from this call.
struct ErrSink {
  int64_t* flag;
  int64_t B, N, op;
};

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && (std::strcmp(v, "1") == 0 || std::strcmp(v, "true") == 0 || std::strcmp(v, "yes") == 0);
}

std::atomic<bool> g_check_every_call{env_flag("DTN_CHECK_EVERY_CALL")};
std::array<std::atomic<int64_t*>, kMaxDevices> g_flags{};  // never freed: it must outlive static destructors
std::mutex g_flags_mutex;

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// The flag of `dev`, allocated (and zeroed, synchronously) on the op's first call there.
int64_t* error_flag(c10::DeviceIndex dev, cudaStream_t stream) {
  TORCH_CHECK(dev >= 0 && dev < kMaxDevices, "dtn::embedding_bag: device index ", int(dev), " out of range");
  int64_t* p = g_flags[dev].load(std::memory_order_acquire);
  if (p != nullptr) return p;
  std::lock_guard<std::mutex> lock(g_flags_mutex);
  p = g_flags[dev].load(std::memory_order_relaxed);
  if (p != nullptr) return p;
  // cudaMalloc and the synchronising zero fill would break a capture: the first call on a
  // device must come before it (every CUDA-graph recipe warms up eagerly first)
  TORCH_CHECK(!is_capturing(stream), "dtn::embedding_bag: call the op once on cuda:", int(dev),
              " before capturing it into a CUDA graph (a warm-up run allocates its device-side error flag)");
  C10_CUDA_CHECK(cudaMalloc(&p, kErrFields * sizeof(int64_t)));
  C10_CUDA_CHECK(cudaMemsetAsync(p, 0, kErrFields * sizeof(int64_t), stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  g_flags[dev].store(p, std::memory_order_release);
  return p;
}

// Debug mode: raise now what this call (or an earlier one) flagged. Syncs; skipped in capture.
void check_now_if_asked(c10::DeviceIndex dev, cudaStream_t stream) {
  if (!g_check_every_call.load(std::memory_order_relaxed) || is_capturing(stream)) return;
  const std::string msg = embedding_bag_take_cuda_error(dev);
  TORCH_CHECK(msg.empty(), msg);
}

__device__ __forceinline__ void report_error(const ErrSink& err, int64_t code, int64_t bag, int64_t pos,
                                             int64_t value, int64_t aux) {
  // first reporter wins (across calls too, until the host takes the error); the other fields
  // are read only after the device has synchronised
  if (atomicCAS(reinterpret_cast<unsigned long long*>(err.flag), 0ull, static_cast<unsigned long long>(code)) ==
      0ull) {
    err.flag[1] = bag;
    err.flag[2] = pos;
    err.flag[3] = value;
    err.flag[4] = aux;
    err.flag[5] = err.B;
    err.flag[6] = err.N;
    err.flag[7] = err.op;
  }
}

// Checks bag k's table and bounds; on failure reports (from one lane) and returns false.
__device__ __forceinline__ bool bag_ok(const int64_t* toff, int64_t t, int64_t k, int64_t s, int64_t e, int64_t N,
                                       int64_t R, bool reporter, const ErrSink& err) {
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

// ------------------------------------------------------------------ small helpers

// host-testable: begin. tests/test_embedding_bag.py compiles the code between these marks
// for the CPU, with a loop over blocks and threads in place of a launch, and runs it.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) VecT {
  scalar_t v[VEC];
};

template <typename T, typename A, int VEC>
__device__ __forceinline__ void add_vec(A (&acc)[VEC], const T* src) {
  const VecT<T, VEC> x = *reinterpret_cast<const VecT<T, VEC>*>(src);
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] += A(x.v[v]);
}

template <typename T, typename A, int VEC>
__device__ __forceinline__ void store_vec(T* dst, const A (&acc)[VEC]) {
  VecT<T, VEC> y;
#pragma unroll
  for (int v = 0; v < VEC; ++v) y.v[v] = static_cast<T>(acc[v]);
  *reinterpret_cast<VecT<T, VEC>*>(dst) = y;
}

template <typename A, int VEC>
__device__ __forceinline__ void zero_vec(A (&acc)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = A(0);
}

// Table t of bag k = t * B + b. A 32-bit division (the host checks T * B < 2^31): a 64-bit one
// is a subroutine call, whose register saves ptxas counts as spills.
__device__ __forceinline__ int64_t bag_table(int64_t k, int64_t B) {
  return static_cast<uint32_t>(k) / static_cast<uint32_t>(B);
}

// (t, b) of bag k.
__device__ __forceinline__ void split_bag(int64_t k, int64_t B, int64_t& t, int64_t& b) {
  t = bag_table(k, B);
  b = k - t * B;
}

// Lanes per bag / chunk: a power of two covering d / VEC, at most a warp.
inline int lanes_per_bag(int64_t D, int vec) {
  int g = 1;
  while (g < 32 && int64_t(g) * vec < D) g *= 2;
  return g;
}

inline unsigned blocks_for(int64_t items, int per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

// host-testable: end

template <typename scalar_t>
bool can_vectorize(int64_t D, const void* p) {
  return D % 4 == 0 && reinterpret_cast<uintptr_t>(p) % (4 * sizeof(scalar_t)) == 0;
}

// 1 / n for a count n >= 1 (mean pooling): the hardware approximation refined by Newton steps
// (to the last bit or within one ulp). A division, or __frcp_rn, adds an out-of-line slow path
// for denormal and huge inputs, which a count never is, and that call's register saves
// are spills.
__device__ __forceinline__ float reciprocal_of_count(float n) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(n));
  return fmaf(fmaf(-n, r, 1.0f), r, r);
}
__device__ __forceinline__ double reciprocal_of_count(double n) {
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(n));
#pragma unroll
  for (int it = 0; it < 3; ++it) r = fma(fma(-n, r, 1.0), r, r);  // ~20 correct bits, doubled each step
  return r;
}


// ------------------------------------------------------------------ forward

template <typename scalar_t, typename index_t, int VEC>
__global__ void eb_forward_kernel(const scalar_t* __restrict__ W, const int64_t* __restrict__ toff,
                                  const index_t* __restrict__ idx, const index_t* __restrict__ off,
                                  const scalar_t* __restrict__ psw, int64_t T, int64_t B, int64_t D, int64_t N,
                                  int64_t R, int mode, int64_t pad, int group, scalar_t* __restrict__ out,
                                  ErrSink err) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = VecT<scalar_t, VEC>;
  const int lane = threadIdx.x % group;
  const int64_t k = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  if (k >= T * B) return;
  int64_t t, b;
  split_bag(k, B, t, b);
  const int64_t s = off[k], e = off[k + 1];
  scalar_t* o = out + b * T * D + t * D;
  const int d = static_cast<int>(D);  // int column loops: a 64-bit trip count would need a division
  if (!bag_ok(toff, t, k, s, e, N, R, lane == 0, err)) {
#pragma unroll 1
    for (int c = lane; c < d; c += group) o[c] = scalar_t(0);
    return;
  }
  const int64_t base = toff[t], rows = toff[t + 1] - base;
  int64_t bad_pos = -1, bad_id = 0;  // the bag's first bad id, reported after the loops (see below)
#pragma unroll 1
  for (int c0 = lane * VEC; c0 < d; c0 += group * VEC) {
    acc_t acc[VEC];
    zero_vec(acc);
    int64_t count = 0;
    for (int64_t i = s; i < e; ++i) {
      const int64_t id = idx[i];
      if (id == pad) continue;
      if (id < 0 || id >= rows) {
        if (bad_pos < 0) bad_pos = i, bad_id = id;
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
    const acc_t scale = (mode == int(PoolMode::Mean) && count > 0) ? reciprocal_of_count(acc_t(count)) : acc_t(1);
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] *= scale;
    store_vec<scalar_t, acc_t, VEC>(o + c0, acc);
  }
  // outside the loops: a 64-bit CAS inside them made ptxas spill registers around it
  if (lane == 0 && bad_pos >= 0) report_error(err, BagError::kBadId, k, bad_pos, bad_id, rows);
}

// ------------------------------------------------------------------ backward: entries

// Per id: sort key (global row; sentinel R for padding / bad ids) and bag; per bag: the scale.
template <typename index_t, typename acc_t>
__global__ void eb_entries_kernel(const int64_t* __restrict__ toff, const index_t* __restrict__ idx,
                                  const index_t* __restrict__ off, int64_t T, int64_t B, int64_t N, int64_t R, int mode,
                                  int64_t pad, int32_t* __restrict__ key_of, int64_t* __restrict__ bag_of,
                                  acc_t* __restrict__ scale_of, ErrSink err) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= T * B) return;
  const int64_t t = bag_table(k, B);
  const int64_t s = off[k], e = off[k + 1];
  if (!bag_ok(toff, t, k, s, e, N, R, true, err)) {
    scale_of[k] = acc_t(0);
    return;
  }
  const int64_t base = toff[t], rows = toff[t + 1] - base;
  int64_t count = 0, bad_pos = -1, bad_id = 0;
  for (int64_t i = s; i < e; ++i) {
    const int64_t id = idx[i];
    bag_of[i] = k;
    if (id == pad) continue;
    if (id < 0 || id >= rows) {
      if (bad_pos < 0) bad_pos = i, bad_id = id;
      continue;
    }
    key_of[i] = static_cast<int32_t>(base + id);
    ++count;
  }
  if (bad_pos >= 0) report_error(err, BagError::kBadId, k, bad_pos, bad_id, rows);  // outside the loop, as above
  scale_of[k] = mode == int(PoolMode::Mean) ? (count > 0 ? reciprocal_of_count(acc_t(count)) : acc_t(0)) : acc_t(1);
}

// Max pooling: the winning position in `indices` for every (bag, column), -1 if empty.
template <typename scalar_t, typename index_t>
__global__ void eb_argmax_kernel(const scalar_t* __restrict__ W, const int64_t* __restrict__ toff,
                                 const index_t* __restrict__ idx, const index_t* __restrict__ off, int64_t T, int64_t B,
                                 int64_t D, int64_t N, int64_t R, int64_t pad, int64_t* __restrict__ amax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= T * B) return;
  const int64_t t = bag_table(k, B);
  const int64_t s = off[k], e = off[k + 1];
  const int64_t base = toff[t], rows = toff[t + 1] - base;
  const bool ok = s >= 0 && e >= s && e <= N && base >= 0 && rows >= 0 && base + rows <= R;
  const int d = static_cast<int>(D);
#pragma unroll 1
  for (int c = lane; c < d; c += 32) {
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

// ------------------------------------------------------------------ backward: chunked reduction
// host-testable: begin (see above)

// What sorted position j adds to columns [c0, c0 + VEC) of its row: its id's upstream
// gradient slice, scaled (sum / mean, per-sample weight) or masked (max: only the winner).
template <typename scalar_t, typename acc_t, int VEC>
struct EntryValues {
  const scalar_t* grad;
  const int64_t* perm;
  const int64_t* bag_of;
  const acc_t* scale_of;
  const scalar_t* psw;  // may be null
  const int64_t* amax;  // max mode only
  int64_t T, B, D;
  int mode;

  __device__ __forceinline__ void add(int64_t j, int c0, acc_t (&acc)[VEC]) const {
    const int64_t i = perm[j], k = bag_of[i];
    int64_t t, b;
    split_bag(k, B, t, b);
    const VecT<scalar_t, VEC> g = *reinterpret_cast<const VecT<scalar_t, VEC>*>(grad + b * T * D + t * D + c0);
    if (mode == int(PoolMode::Max)) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += amax[k * D + c0 + v] == i ? acc_t(g.v[v]) : acc_t(0);
    } else {
      const acc_t w = psw != nullptr ? acc_t(psw[i]) * scale_of[k] : scale_of[k];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += w * acc_t(g.v[v]);
    }
  }
};

// Level 0: one lane group per chunk of kChunk sorted positions (see the file comment).
// dest_of: the output row of each sorted position (sparse: its unique-run index); null for
// dense, where it is the row itself.
// out_t: the gradient rows' dtype (the weight's; acc_t for the fused optimizers).
template <typename scalar_t, typename acc_t, int VEC, typename out_t = scalar_t>
__global__ void eb_bwd_level0_kernel(const int32_t* __restrict__ sorted, EntryValues<scalar_t, acc_t, VEC> val,
                                     const int64_t* __restrict__ dest_of, int64_t N, int64_t R, int64_t D, int group,
                                     acc_t* __restrict__ head, acc_t* __restrict__ tail, out_t* __restrict__ out) {
  const int lane = threadIdx.x % group;
  const int64_t c = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  const int64_t j0 = c * kChunk;
  if (j0 >= N) return;
  const int64_t j1 = j0 + kChunk < N ? j0 + kChunk : N;
  // does the chunk's first run come from the previous chunk?
  const bool first_started_before = j0 > 0 && sorted[j0 - 1] == sorted[j0];
#pragma unroll 1
  for (int c0 = lane * VEC; c0 < static_cast<int>(D); c0 += group * VEC) {
    acc_t acc[VEC];
    zero_vec(acc);
    bool started_before = first_started_before;
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t key = sorted[j];
      if (key < R) val.add(j, c0, acc);
      const bool last_in_chunk = j + 1 == j1;
      if (!last_in_chunk && sorted[j + 1] == key) continue;  // the run goes on inside the chunk
      const bool full_chunk_end = (j + 1) % kChunk == 0;
      const bool ends_after = full_chunk_end && j + 1 < N && sorted[j + 1] == key;
      if (full_chunk_end) store_vec<acc_t, acc_t, VEC>(tail + c * D + c0, acc);  // level 1's element c
      if (key < R && !ends_after) {
        if (!started_before) {  // the whole run is in this chunk: its gradient row is done
          const int64_t dest = dest_of != nullptr ? dest_of[j] : int64_t(key);
          store_vec<out_t, acc_t, VEC>(out + dest * D + c0, acc);
        } else if (!full_chunk_end) {  // the last piece of a run from earlier chunks
          store_vec<acc_t, acc_t, VEC>(head + c * D + c0, acc);
        }
      }
      zero_vec(acc);
      started_before = false;
    }
  }
}

// Level l >= 1: the same walk over the n = n_{l-1} / kChunk tails of level l - 1; element c's
// row is the row at level-0 position (c + 1) * stride - 1, stride = kChunk^l.
template <typename acc_t, int VEC>
__global__ void eb_bwd_level_kernel(const int32_t* __restrict__ sorted, int64_t stride, int64_t n, int64_t R, int64_t D,
                                    int group, const acc_t* __restrict__ tail_in, acc_t* __restrict__ ends,
                                    acc_t* __restrict__ tail_out) {
  const int lane = threadIdx.x % group;
  const int64_t c = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  const int64_t j0 = c * kChunk;
  if (j0 >= n) return;
  const int64_t j1 = j0 + kChunk < n ? j0 + kChunk : n;
#pragma unroll 1
  for (int c0 = lane * VEC; c0 < static_cast<int>(D); c0 += group * VEC) {
    acc_t acc[VEC];
    zero_vec(acc);
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t key = sorted[(j + 1) * stride - 1];
      if (key < R) add_vec<acc_t, acc_t, VEC>(acc, tail_in + j * D + c0);
      const bool last_in_chunk = j + 1 == j1;
      if (!last_in_chunk && sorted[(j + 2) * stride - 1] == key) continue;
      if ((j + 1) % kChunk == 0) {
        store_vec<acc_t, acc_t, VEC>(tail_out + c * D + c0, acc);  // level l+1's element c
      } else if (key < R) {
        store_vec<acc_t, acc_t, VEC>(ends + j * D + c0, acc);  // read by the final pass
      }
      zero_vec(acc);
    }
  }
}

// Where each level's run-end partials live (rows of the partial buffer), by level; [0] is head.
struct LevelOffsets {
  int64_t ends[kMaxLevels];
  int levels;
};

// Final pass: one group per level-0 chunk k >= 1 whose first run came from earlier chunks and
// ends inside chunk k; it sums that run's pieces level by level and writes its gradient row.
template <typename scalar_t, typename acc_t, int VEC, typename out_t = scalar_t>
__global__ void eb_bwd_final_kernel(const int32_t* __restrict__ sorted, const int64_t* __restrict__ dest_of, int64_t N,
                                    int64_t R, int64_t D, int group, const acc_t* __restrict__ partials,
                                    LevelOffsets lv, out_t* __restrict__ out) {
  const int lane = threadIdx.x % group;
  const int64_t k = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  const int64_t j0 = k * kChunk;
  if (k == 0 || j0 >= N) return;
  const int64_t j1 = j0 + kChunk < N ? j0 + kChunk : N;
  const int32_t key = sorted[j0];
  if (key >= R || sorted[j0 - 1] != key) return;  // chunk k's first run starts in chunk k
  if (j1 < N && sorted[j1] == key) return;        // it goes on past chunk k: a later group's
  int64_t lo = j0, hi = j1;                       // e = the end of the run, inside chunk k
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted[mid] == key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int64_t e = lo;
  const int64_t dest = dest_of != nullptr ? dest_of[j0] : int64_t(key);
#pragma unroll 1
  for (int c0 = lane * VEC; c0 < static_cast<int>(D); c0 += group * VEC) {
    acc_t acc[VEC];
    zero_vec(acc);
    if (e % kChunk != 0) add_vec<acc_t, acc_t, VEC>(acc, partials + (lv.ends[0] + k) * D + c0);  // head[k]
    int64_t stride = 1, el = e;
    for (int l = 1; l < lv.levels; ++l) {
      stride *= kChunk;
      el /= kChunk;
      if (el >= 1 && el % kChunk != 0 && sorted[el * stride - 1] == key) {
        add_vec<acc_t, acc_t, VEC>(acc, partials + (lv.ends[l] + el - 1) * D + c0);
      }
    }
    store_vec<out_t, acc_t, VEC>(out + dest * D + c0, acc);
  }
}

// Sizes and buffer layout of the reduction, from N alone (so no sync): level l has n_l
// elements (n_0 = N, n_l = n_{l-1} / kChunk) until n_l < kChunk.
struct ReductionPlan {
  int levels = 0;
  int64_t n[kMaxLevels] = {};
  int64_t tail_off[kMaxLevels] = {};  // tail_l: n_{l+1} rows, l = 0 .. levels-2
  LevelOffsets lv{};                  // head (level 0: one row per chunk) and ends_l (n_l rows)
  int64_t rows = 0;                   // rows of the partial buffer
};

ReductionPlan plan_reduction(int64_t N) {
  ReductionPlan p;
  p.n[0] = N;
  p.levels = 1;
  while (p.n[p.levels - 1] >= kChunk) {
    TORCH_INTERNAL_ASSERT(p.levels < kMaxLevels);
    p.n[p.levels] = p.n[p.levels - 1] / kChunk;
    ++p.levels;
  }
  p.lv.levels = p.levels;
  p.lv.ends[0] = 0;
  p.rows = (N + kChunk - 1) / kChunk;  // head
  for (int l = 0; l + 1 < p.levels; ++l) {
    p.tail_off[l] = p.rows;
    p.rows += p.n[l + 1];
  }
  for (int l = 1; l < p.levels; ++l) {
    p.lv.ends[l] = p.rows;
    p.rows += p.n[l];
  }
  return p;
}

// The reduction's launches, in order on one stream. `buf`: plan.rows x D partials.
template <typename scalar_t, typename acc_t, int VEC, typename out_t = scalar_t>
void launch_reduction(const int32_t* sorted, const EntryValues<scalar_t, acc_t, VEC>& val, const int64_t* dest_of,
                      int64_t N, int64_t R, int64_t D, acc_t* buf, const ReductionPlan& plan, out_t* out,
                      cudaStream_t stream) {
  const int group = lanes_per_bag(D, VEC);
  const int per_block = kBlock / group;
  const int64_t chunks0 = (N + kChunk - 1) / kChunk;
  auto* level0 = &eb_bwd_level0_kernel<scalar_t, acc_t, VEC, out_t>;
  DTN_LAUNCH(level0, blocks_for(chunks0, per_block), kBlock, stream, sorted, val, dest_of, N, R, D, group,
             buf + plan.lv.ends[0] * D, buf + plan.tail_off[0] * D, out);
  auto* level = &eb_bwd_level_kernel<acc_t, VEC>;
  int64_t stride = 1;
  for (int l = 1; l < plan.levels; ++l) {
    stride *= kChunk;
    const int64_t n = plan.n[l];
    acc_t* tail_out = l + 1 < plan.levels ? buf + plan.tail_off[l] * D : nullptr;  // only written when n >= L
    DTN_LAUNCH(level, blocks_for((n + kChunk - 1) / kChunk, per_block), kBlock, stream, sorted, stride, n, R, D,
               group, buf + plan.tail_off[l - 1] * D, buf + plan.lv.ends[l] * D, tail_out);
  }
  if (chunks0 > 1) {
    auto* final_pass = &eb_bwd_final_kernel<scalar_t, acc_t, VEC, out_t>;
    DTN_LAUNCH(final_pass, blocks_for(chunks0, per_block), kBlock, stream, sorted, dest_of, N, R, D, group, buf,
               plan.lv, out);
  }
}
// host-testable: end

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
  int64_t t, b;
  split_bag(k, B, t, b);
  const int64_t s = off[k], e = off[k + 1];
  const int64_t base = toff[t], rows = toff[t + 1] - base;
  if (s < 0 || e < s || e > N || base < 0 || rows < 0 || base + rows > R) return;
  const scalar_t* g = grad + b * T * D + t * D;
  for (int64_t i = s; i < e; ++i) {
    const int64_t id = idx[i];
    const bool valid = id != pad && id >= 0 && id < rows;
    acc_t dot = acc_t(0);
    if (valid) {
#pragma unroll 1
      for (int c = lane; c < static_cast<int>(D); c += group) dot += acc_t(g[c]) * acc_t(W[(base + id) * D + c]);
    }
    for (int width = group / 2; width > 0; width /= 2) dot += __shfl_xor_sync(mask, dot, width);
    if (lane == 0) gpsw[i] = valid ? static_cast<scalar_t>(dot * scale_of[k]) : scalar_t(0);
  }
}

// ------------------------------------------------------------------ host side

// The kernels index bags and columns with 32-bit integers (see split_bag).
void check_cuda_sizes(const char* op, const BagShape& sh) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(sh.T * sh.B < kMax && sh.D < kMax, op, ": the CUDA kernels need T*B and d below 2^31, got T*B = ",
              sh.T * sh.B, " and d = ", sh.D);
}

#define DTN_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor embedding_bag_cuda(const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
                              const at::Tensor& offsets, c10::string_view mode,
                              const std::optional<at::Tensor>& per_sample_weights, std::optional<int64_t> padding_idx,
                              bool /*sparse*/) {
  const char* op = op_name(kOpForward);
  const PoolMode pm = parse_pool_mode(mode);
  const BagShape sh = check_embedding_bag_args(op, weight, table_offsets, indices, offsets, pm, per_sample_weights);
  check_cuda_sizes(op, sh);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor W = weight.contiguous(), toff = table_offsets.contiguous();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->contiguous();
  at::Tensor out = at::empty({sh.B, sh.T * sh.D}, weight.options());
  if (sh.T * sh.B == 0 || sh.D == 0) return out.zero_();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex dev = weight.device().index();
  const ErrSink err{error_flag(dev, stream), sh.B, sh.N, kOpForward};
  const int64_t pad = padding_value(padding_idx);
  DTN_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_bag_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "dtn_embedding_bag_cuda_idx", [&] {
      const bool vec = can_vectorize<scalar_t>(sh.D, W.data_ptr());
      const int group = lanes_per_bag(sh.D, vec ? 4 : 1);
      const unsigned grid = blocks_for(sh.T * sh.B, kBlock / group);
      const scalar_t* psw_p = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
      if (vec) {
        eb_forward_kernel<scalar_t, index_t, 4><<<grid, kBlock, 0, stream>>>(
            W.data_ptr<scalar_t>(), toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
            psw_p, sh.T, sh.B, sh.D, sh.N, sh.R, int(pm), pad, group, out.data_ptr<scalar_t>(), err);
      } else {
        eb_forward_kernel<scalar_t, index_t, 1><<<grid, kBlock, 0, stream>>>(
            W.data_ptr<scalar_t>(), toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
            psw_p, sh.T, sh.B, sh.D, sh.N, sh.R, int(pm), pad, group, out.data_ptr<scalar_t>(), err);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  check_now_if_asked(dev, stream);
  return out;
}

// Each sorted position's run start: dest_of[j] = the first position of j's run of equal keys (a
// max-scan of the run starts, without a host synchronisation).
at::Tensor run_starts(const at::Tensor& sorted) {
  const int64_t n = sorted.numel();
  at::Tensor pos = at::arange(n, sorted.options().dtype(at::kLong));
  if (n == 0) return pos;
  at::Tensor start = at::ones({n}, sorted.options().dtype(at::kBool));
  if (n > 1) start.slice(0, 1).copy_(sorted.slice(0, 1) != sorted.slice(0, 0, n - 1));
  return std::get<0>(at::cummax(at::where(start, pos, at::zeros_like(pos)), 0)).contiguous();
}

// Shared by the dense and the row-sparse backward, and the fused optimizers' reduction. Returns
// (rows, row_grads or dense, grad_psw); kOpBackwardUpdate: (sorted keys int32 [N], run sums [N, D]
// in acc_t at each run's first sorted position, empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda_impl(
    OpId op_id, const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets,
    const at::Tensor& indices, const at::Tensor& offsets, c10::string_view mode,
    const std::optional<at::Tensor>& per_sample_weights, std::optional<int64_t> padding_idx, bool compute_psw_grad) {
  const char* op = op_name(op_id);
  const bool dense = op_id == kOpBackward;
  const bool fused = op_id == kOpBackwardUpdate;  // no host synchronisation, fp32 sums
  const PoolMode pm = parse_pool_mode(mode);
  const BagShape sh = check_embedding_bag_backward_args(op, grad_output, weight, table_offsets, indices, offsets, pm,
                                                        per_sample_weights);
  check_cuda_sizes(op, sh);
  // int32 sort keys halve the radix sort's passes; R itself is the padding sentinel
  TORCH_CHECK(sh.R < std::numeric_limits<int32_t>::max(), op, ": the CUDA backward sorts rows as int32; weight has ",
              sh.R, " rows (at most 2^31 - 2)");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor G = grad_output.contiguous(), W = weight.contiguous(), toff = table_offsets.contiguous();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->contiguous();
  const bool want_psw = compute_psw_grad && psw.defined();
  const int64_t pad = padding_value(padding_idx);
  const auto long_opts = weight.options().dtype(at::kLong);
  at::Tensor grad_psw = want_psw ? at::zeros({sh.N}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor rows_out, grads_out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex dev = weight.device().index();
  const ErrSink err{error_flag(dev, stream), sh.B, sh.N, op_id};
  const int64_t nbags = sh.T * sh.B;

  DTN_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_bag_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "dtn_embedding_bag_backward_cuda_idx", [&] {
      at::Tensor key_of = at::full({sh.N}, sh.R, weight.options().dtype(at::kInt));  // sentinel R: padding / no bag
      at::Tensor bag_of = at::zeros({sh.N}, long_opts);
      at::Tensor scale_of = at::empty({nbags}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      if (nbags > 0) {
        eb_entries_kernel<index_t, acc_t><<<blocks_for(nbags, kBlock), kBlock, 0, stream>>>(
            toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(), off.data_ptr<index_t>(), sh.T, sh.B, sh.N, sh.R,
            int(pm), pad, key_of.data_ptr<int32_t>(), bag_of.data_ptr<int64_t>(), scale_of.data_ptr<acc_t>(), err);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      at::Tensor amax;
      if (pm == PoolMode::Max && nbags > 0 && sh.D > 0) {
        amax = at::empty({nbags, sh.D}, long_opts);
        eb_argmax_kernel<scalar_t, index_t><<<blocks_for(nbags, kBlock / 32), kBlock, 0, stream>>>(
            W.data_ptr<scalar_t>(), toff.data_ptr<int64_t>(), idx.data_ptr<index_t>(), off.data_ptr<index_t>(),
            sh.T, sh.B, sh.D, sh.N, sh.R, pad, amax.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // stable sort: equal rows keep input order, so the sums below are deterministic
      at::Tensor sorted, perm;
      std::tie(sorted, perm) = at::sort(key_of, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      at::Tensor dest_of;  // sparse: output row (unique-run index) of every sorted position; int64, contiguous
      int64_t keep = 0;
      if (dense) {
        grads_out = at::zeros({sh.R, sh.D}, weight.options());  // rows no id touches stay zero
      } else if (fused) {
        dest_of = run_starts(sorted);
        rows_out = sorted;
        grads_out = at::empty({sh.N, sh.D}, scale_of.options());
      } else {
        // the one synchronising path: the number of distinct rows sizes the output
        at::Tensor seg_rows;
        std::tie(seg_rows, dest_of, std::ignore) = at::unique_consecutive(sorted, /*return_inverse=*/true,
                                                                          /*return_counts=*/false);
        const int64_t U = seg_rows.numel();
        keep = U > 0 && seg_rows[U - 1].item<int32_t>() == sh.R ? U - 1 : U;  // drop the sentinel's run (last)
        rows_out = seg_rows.slice(0, 0, keep).to(at::kLong);
        grads_out = at::empty({U, sh.D}, weight.options());
      }
      if (sh.N > 0 && sh.D > 0) {
        const ReductionPlan plan = plan_reduction(sh.N);
        at::Tensor partials = at::empty({plan.rows, sh.D}, scale_of.options());
        const int64_t* dest_p = dest_of.defined() ? dest_of.data_ptr<int64_t>() : nullptr;
        const scalar_t* psw_p = psw.defined() ? psw.data_ptr<scalar_t>() : nullptr;
        const int64_t* amax_p = amax.defined() ? amax.data_ptr<int64_t>() : nullptr;
        auto reduce = [&](auto vec) {  // vec: std::integral_constant<int, VEC>
          constexpr int VEC = decltype(vec)::value;
          const EntryValues<scalar_t, acc_t, VEC> val{G.data_ptr<scalar_t>(), perm.data_ptr<int64_t>(),
                                                      bag_of.data_ptr<int64_t>(), scale_of.data_ptr<acc_t>(),
                                                      psw_p, amax_p, sh.T, sh.B, sh.D, int(pm)};
          if (fused) {
            launch_reduction<scalar_t, acc_t, VEC, acc_t>(sorted.data_ptr<int32_t>(), val, dest_p, sh.N, sh.R, sh.D,
                                                          partials.data_ptr<acc_t>(), plan,
                                                          grads_out.data_ptr<acc_t>(), stream);
          } else {
            launch_reduction<scalar_t, acc_t, VEC>(sorted.data_ptr<int32_t>(), val, dest_p, sh.N, sh.R, sh.D,
                                                   partials.data_ptr<acc_t>(), plan, grads_out.data_ptr<scalar_t>(),
                                                   stream);
          }
        };
        if (can_vectorize<scalar_t>(sh.D, G.data_ptr())) {
          reduce(std::integral_constant<int, 4>{});
        } else {
          reduce(std::integral_constant<int, 1>{});
        }
      }
      if (!dense && !fused) grads_out = grads_out.slice(0, 0, keep);
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
  check_now_if_asked(dev, stream);
  return {rows_out, grads_out, grad_psw};
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx, bool compute_psw_grad) {
  auto r = backward_cuda_impl(kOpBackward, grad_output, weight, table_offsets, indices, offsets, mode,
                              per_sample_weights, padding_idx, compute_psw_grad);
  return {std::get<1>(r), std::get<2>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_sparse_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx, bool compute_psw_grad) {
  return backward_cuda_impl(kOpBackwardSparse, grad_output, weight, table_offsets, indices, offsets, mode,
                            per_sample_weights, padding_idx, compute_psw_grad);
}

}  // namespace

// ------------------------------------------------------------------ for the fused optimizers (embedding_bag.h)

std::tuple<at::Tensor, at::Tensor> embedding_bag_sorted_row_grads_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx) {
  auto r = backward_cuda_impl(kOpBackwardUpdate, grad_output, weight, table_offsets, indices, offsets, mode,
                              per_sample_weights, padding_idx, /*compute_psw_grad=*/false);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor> embedding_rows_sorted_grads_cuda(const at::Tensor& rows, const at::Tensor& row_grads,
                                                                    int64_t R) {
  const int64_t n = rows.numel(), D = row_grads.size(1);
  TORCH_CHECK(R < std::numeric_limits<int32_t>::max() && n < std::numeric_limits<int32_t>::max(),
              "dtn::embedding_rows_update: the CUDA kernels sort rows as int32; weight has ", R, " rows and ", n,
              " rows were given (each at most 2^31 - 2)");
  const c10::cuda::CUDAGuard guard(row_grads.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor G = row_grads.to(at::kFloat).contiguous();
  at::Tensor sorted, perm;
  std::tie(sorted, perm) = at::sort(rows.to(at::kInt), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor out = at::empty({n, D}, G.options());
  if (n == 0 || D == 0) return {sorted, out};
  const at::Tensor dest_of = run_starts(sorted);
  const at::Tensor bag_of = at::arange(n, rows.options().dtype(at::kLong));  // "bag" i: row_grads[i] (T = 1, B = n)
  const at::Tensor scale_of = at::ones({n}, G.options());
  const ReductionPlan plan = plan_reduction(n);
  at::Tensor partials = at::empty({plan.rows, D}, G.options());
  auto reduce = [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const EntryValues<float, float, VEC> val{G.data_ptr<float>(), perm.data_ptr<int64_t>(), bag_of.data_ptr<int64_t>(),
                                             scale_of.data_ptr<float>(), nullptr, nullptr, 1, n, D,
                                             int(PoolMode::Sum)};
    launch_reduction<float, float, VEC>(sorted.data_ptr<int32_t>(), val, dest_of.data_ptr<int64_t>(), n, R, D,
                                        partials.data_ptr<float>(), plan, out.data_ptr<float>(), stream);
  };
  if (can_vectorize<float>(D, G.data_ptr())) {
    reduce(std::integral_constant<int, 4>{});
  } else {
    reduce(std::integral_constant<int, 1>{});
  }
  return {sorted, out};
}

// ------------------------------------------------------------------ error flag: host API (embedding_bag.h)

std::string embedding_bag_take_cuda_error(int64_t device) {
  if (device < 0 || device >= kMaxDevices) return "";
  int64_t* p = g_flags[device].load(std::memory_order_acquire);
  if (p == nullptr) return "";  // the op never ran on this device
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  TORCH_CHECK(!is_capturing(c10::cuda::getCurrentCUDAStream()),
              "dtn_kernels: pending embedding-bag errors cannot be read while a CUDA graph is being captured");
  // this is the sync point: every kernel queued on the device so far, on any stream, has run
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  int64_t h[kErrFields];
  C10_CUDA_CHECK(cudaMemcpy(h, p, sizeof(h), cudaMemcpyDeviceToHost));
  if (h[0] == BagError::kOk) return "";
  C10_CUDA_CHECK(cudaMemset(p, 0, sizeof(h)));
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  BagError e;
  e.code = h[0], e.bag = h[1], e.pos = h[2], e.value = h[3], e.aux = h[4];
  return bag_error_message(op_name(h[7]), e, h[5], h[6]);
}

void embedding_bag_set_check_every_call(bool on) { g_check_every_call.store(on, std::memory_order_relaxed); }

bool embedding_bag_check_every_call() { return g_check_every_call.load(std::memory_order_relaxed); }

TORCH_LIBRARY_IMPL(dtn, CUDA, m) {
  m.impl("embedding_bag", &embedding_bag_cuda);
  m.impl("embedding_bag_backward", &embedding_bag_backward_cuda);
  m.impl("embedding_bag_backward_sparse", &embedding_bag_backward_sparse_cuda);
}

}  // namespace dtn
