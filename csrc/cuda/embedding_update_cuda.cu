// CUDA kernels of the fused sparse embedding optimizers (dtn::embedding_bag_backward_update,
// dtn::embedding_rows_update).
//
// 1. The embedding bag's own backward machinery (csrc/cuda/embedding_bag_cuda.cu) gives every id's
//    global row, sorts the rows stably (at::sort, a cub radix sort underneath) and sums each run of
//    one row in input order with its chunked reduction, in fp32: a row hit by every id costs about
//    L * (1 + log_L n) dependent additions, not n, and the sums do not depend on the schedule.
//    Bad ids and offsets are skipped and reported through the device-side error flag (named
//    dtn::embedding_bag_backward_update), as the backward does; no host synchronisation.
// 2. One lane group per sorted position that starts a run: the optimizer's update of that row
//    (each row has exactly one owner, so no atomics), the twin's operations in order
//    (dtn_kernels/reference/pt_embedding_update.py). rowwise_adagrad's mean of g*g is a fixed
//    tree of warp shuffles, so it is deterministic too.
// embedding_rows_update checks its rows on the host (one synchronisation) and uses the same path.
#include "embedding_bag.h"
#include "embedding_update.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace dtn {
namespace {

constexpr int kUpdateBlock = 256;

inline int update_lanes(int64_t D) {  // a power of two covering d, at most a warp
  int g = 1;
  while (g < 32 && g < D) g *= 2;
  return g;
}

// One group of `group` lanes per sorted position j; the group whose j starts a run of row
// r = sorted[j] (< R) updates row r from run_grads[j].
template <int kOpt, typename scalar_t, typename acc_t>
__global__ void emb_update_kernel(const int32_t* __restrict__ sorted, const acc_t* __restrict__ run_grads, int64_t N,
                                  int64_t R, int64_t D, int group, scalar_t* __restrict__ W, float* __restrict__ S1,
                                  float* __restrict__ S2, UpdateParams p) {
  const int lane = threadIdx.x % group;
  const int64_t j = int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  if (j >= N) return;
  const int32_t key = sorted[j];
  if (key >= R || (j > 0 && sorted[j - 1] == key)) return;  // padding / bad id, or not the run's start
  const int64_t r = key;
  const acc_t* __restrict__ g_in = run_grads + j * D;
  scalar_t* __restrict__ w = W + r * D;
  const int d = static_cast<int>(D);
  if (kOpt == int(EmbOptimizer::RowwiseAdagrad)) {
    const unsigned lane_in_warp = threadIdx.x % 32;
    const unsigned mask = group == 32 ? 0xffffffffu : (((1u << group) - 1u) << (lane_in_warp / group * group));
    float sq = 0.f;
#pragma unroll 1
    for (int c = lane; c < d; c += group) {
      float g = __fmul_rn(float(g_in[c]), p.grad_scale);
      if (p.weight_decay != 0.f) g = __fadd_rn(g, __fmul_rn(p.weight_decay, float(w[c])));
      sq = __fadd_rn(sq, __fmul_rn(g, g));
    }
    for (int width = group / 2; width > 0; width /= 2) sq += __shfl_xor_sync(mask, sq, width);
    const float s = __fadd_rn(S1[r], __fdiv_rn(sq, float(d)));
    const float den = __fadd_rn(__fsqrt_rn(s), p.eps);
#pragma unroll 1
    for (int c = lane; c < d; c += group) {
      float g = __fmul_rn(float(g_in[c]), p.grad_scale);
      const float wf = float(w[c]);
      if (p.weight_decay != 0.f) g = __fadd_rn(g, __fmul_rn(p.weight_decay, wf));
      w[c] = static_cast<scalar_t>(__fsub_rn(wf, __fdiv_rn(__fmul_rn(p.lr, g), den)));
    }
    __syncwarp(mask);
    if (lane == 0) S1[r] = s;
    return;
  }
#pragma unroll 1
  for (int c = lane; c < d; c += group) {
    float g = __fmul_rn(float(g_in[c]), p.grad_scale);
    const float wf = float(w[c]);
    if (p.weight_decay != 0.f) g = __fadd_rn(g, __fmul_rn(p.weight_decay, wf));
    if (kOpt == int(EmbOptimizer::Sgd)) {
      w[c] = static_cast<scalar_t>(__fsub_rn(wf, __fmul_rn(p.lr, g)));
    } else {
      const int64_t e = r * D + c;
      const float m = __fadd_rn(__fmul_rn(p.beta1, S1[e]), __fmul_rn(p.one_minus_beta1, g));
      const float v = __fadd_rn(__fmul_rn(p.beta2, S2[e]), __fmul_rn(__fmul_rn(p.one_minus_beta2, g), g));
      S1[e] = m;
      S2[e] = v;
      const float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), p.sqrt_bc2), p.eps);
      w[c] = static_cast<scalar_t>(__fsub_rn(wf, __fdiv_rn(__fmul_rn(p.lr_over_bc1, m), den)));
    }
  }
}

template <typename scalar_t, typename acc_t>
void launch_update(EmbOptimizer opt, const at::Tensor& sorted, const at::Tensor& run_grads, int64_t R, int64_t D,
                   const at::Tensor& weight, const at::Tensor& state1, const at::Tensor& state2,
                   const UpdateParams& p) {
  const int64_t N = sorted.numel();
  if (N == 0 || D == 0) return;
  const int group = update_lanes(D);
  const int per_block = kUpdateBlock / group;
  const unsigned grid = static_cast<unsigned>((N + per_block - 1) / per_block);
  auto stream = c10::cuda::getCurrentCUDAStream();
  float* S1 = state1.numel() ? state1.data_ptr<float>() : nullptr;
  float* S2 = state2.numel() ? state2.data_ptr<float>() : nullptr;
  const int32_t* s = sorted.data_ptr<int32_t>();
  const acc_t* g = run_grads.data_ptr<acc_t>();
  scalar_t* W = weight.data_ptr<scalar_t>();
  switch (opt) {
    case EmbOptimizer::Sgd:
      emb_update_kernel<int(EmbOptimizer::Sgd), scalar_t, acc_t>
          <<<grid, kUpdateBlock, 0, stream>>>(s, g, N, R, D, group, W, S1, S2, p);
      break;
    case EmbOptimizer::RowwiseAdagrad:
      emb_update_kernel<int(EmbOptimizer::RowwiseAdagrad), scalar_t, acc_t>
          <<<grid, kUpdateBlock, 0, stream>>>(s, g, N, R, D, group, W, S1, S2, p);
      break;
    default:
      emb_update_kernel<int(EmbOptimizer::LazyAdam), scalar_t, acc_t>
          <<<grid, kUpdateBlock, 0, stream>>>(s, g, N, R, D, group, W, S1, S2, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define DTN_UPDATE_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

void embedding_bag_backward_update_cuda(const at::Tensor& grad_output, const at::Tensor& weight,
                                        const at::Tensor& table_offsets, const at::Tensor& indices,
                                        const at::Tensor& offsets, c10::string_view mode,
                                        const std::optional<at::Tensor>& per_sample_weights,
                                        std::optional<int64_t> padding_idx, c10::string_view optimizer,
                                        const at::Tensor& state1, const at::Tensor& state2, double lr, double beta1,
                                        double beta2, double eps, double weight_decay, int64_t step,
                                        double grad_scale) {
  const char* op = "dtn::embedding_bag_backward_update";
  const EmbOptimizer opt = parse_optimizer(op, optimizer);
  const BagShape sh = check_embedding_bag_backward_args(op, grad_output, weight, table_offsets, indices, offsets,
                                                        parse_pool_mode(mode), per_sample_weights);
  check_update_state(op, opt, weight, state1, state2, step);
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor sorted, run_grads;
  std::tie(sorted, run_grads) = embedding_bag_sorted_row_grads_cuda(grad_output, weight, table_offsets, indices,
                                                                    offsets, mode, per_sample_weights, padding_idx);
  const UpdateParams p = make_update_params(opt, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  DTN_UPDATE_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_bag_backward_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_update<scalar_t, acc_t>(opt, sorted, run_grads, sh.R, sh.D, weight, state1, state2, p);
  });
}

void embedding_rows_update_cuda(const at::Tensor& weight, const at::Tensor& state1, const at::Tensor& state2,
                                const at::Tensor& rows, const at::Tensor& row_grads, c10::string_view optimizer,
                                double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                                double grad_scale) {
  const char* op = "dtn::embedding_rows_update";
  const EmbOptimizer opt = parse_optimizer(op, optimizer);
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op, ": weight must be floating point, got ",
              weight.scalar_type());
  check_update_state(op, opt, weight, state1, state2, step);
  const int64_t R = weight.size(0), D = weight.size(1);
  TORCH_CHECK(rows.dim() == 1 && row_grads.dim() == 2 && row_grads.size(0) == rows.size(0) && row_grads.size(1) == D,
              op, ": rows must be [n] and row_grads [n, ", D, "], got ", rows.sizes(), " and ", row_grads.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt, op,
              ": rows must be int64 or int32, got ", rows.scalar_type());
  TORCH_CHECK(at::isFloatingType(row_grads.scalar_type()), op, ": row_grads must be floating point, got ",
              row_grads.scalar_type());
  TORCH_CHECK(rows.device() == weight.device() && row_grads.device() == weight.device(), op,
              ": rows and row_grads must be on ", weight.device(), ", got ", rows.device(), " and ",
              row_grads.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  if (rows.numel() > 0) {  // the one host synchronisation: a bad row is named at once
    const at::Tensor bad = (rows < 0).logical_or_(rows >= R);
    if (bad.any().item<bool>()) {
      const int64_t first = rows.masked_select(bad)[0].item<int64_t>();
      TORCH_CHECK(false, op, ": row ", first, " is outside weight's rows [0, ", R, ")");
    }
  }
  at::Tensor sorted, run_grads;
  std::tie(sorted, run_grads) = embedding_rows_sorted_grads_cuda(rows, row_grads, R);
  const UpdateParams p = make_update_params(opt, lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  DTN_UPDATE_DISPATCH_FLOATS(weight.scalar_type(), "dtn_embedding_rows_update_cuda", [&] {
    launch_update<scalar_t, float>(opt, sorted, run_grads, R, D, weight, state1, state2, p);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dtn, CUDA, m) {
  m.impl("embedding_bag_backward_update", &embedding_bag_backward_update_cuda);
  m.impl("embedding_rows_update", &embedding_rows_update_cuda);
}

}  // namespace dtn
