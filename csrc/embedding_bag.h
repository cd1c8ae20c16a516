// Table-batched embedding bag (dtn::embedding_bag): declarations and the host-side
// argument checks / error messages shared by the CPU and CUDA kernels.
//
// Layout (see dtn_kernels/ops/embedding_bag.py for the worked example):
//   weight         [R, D]     all tables stacked; table t owns rows
//                             [table_offsets[t], table_offsets[t+1])
//   table_offsets  [T + 1]    int64, non-decreasing, table_offsets[0] == 0, last <= R
//   indices        [N]        int32 or int64 ids, LOCAL to their table
//   offsets        [T*B + 1]  same dtype as indices; bag k = t*B + b (table-major) is
//                             indices[offsets[k] : offsets[k+1]]
//   output         [B, T*D]   out[b, t*D:(t+1)*D] = pooled bag (t, b)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

namespace dtn {

enum class PoolMode : int { Sum = 0, Mean = 1, Max = 2 };

// No padding id: a value no real id can take (ids are checked against [0, rows)).
constexpr int64_t kNoPadding = std::numeric_limits<int64_t>::min();

inline PoolMode parse_pool_mode(c10::string_view mode) {
  if (mode == "sum") return PoolMode::Sum;
  if (mode == "mean") return PoolMode::Mean;
  if (mode == "max") return PoolMode::Max;
  TORCH_CHECK(false, "dtn::embedding_bag: mode must be 'sum', 'mean' or 'max', got '", std::string(mode), "'");
}

// The first problem found in the jagged input, in bag order (smallest bag, then the
// smallest position inside it). code == kOk means none.
struct BagError {
  enum Code : int64_t { kOk = 0, kNegativeStart = 1, kDecreasing = 2, kPastEnd = 3, kBadId = 4, kBadTable = 5 };
  int64_t code = kOk;
  int64_t bag = std::numeric_limits<int64_t>::max();  // k = t*B + b (kBadTable: the table t)
  int64_t pos = std::numeric_limits<int64_t>::max();  // index into indices (kBadId) / offsets
  int64_t value = 0;  // the bad id / offset
  int64_t aux = 0;    // rows of the table (kBadId), the previous offset (kDecreasing)

  bool ok() const { return code == kOk; }
  bool before(const BagError& o) const { return bag < o.bag || (bag == o.bag && pos < o.pos); }
};

inline std::string bag_error_message(const char* op, const BagError& e, int64_t B, int64_t N) {
  std::ostringstream s;
  s << op << ": ";
  if (e.code == BagError::kBadTable) {
    s << "table " << e.bag << ": table_offsets must be non-decreasing, start at 0 and end at most at weight.size(0); got table_offsets["
      << e.bag << "]=" << e.value << ", table_offsets[" << e.bag + 1 << "]=" << e.aux;
    return s.str();
  }
  const int64_t t = B > 0 ? e.bag / B : 0;
  const int64_t b = B > 0 ? e.bag % B : 0;
  s << "table " << t << ": ";
  switch (e.code) {
    case BagError::kNegativeStart:
      s << "offsets[" << e.bag << "]=" << e.value << " (bag " << b << ") is negative";
      break;
    case BagError::kDecreasing:
      s << "offsets decrease at bag " << b << ": offsets[" << e.bag << "]=" << e.aux << " > offsets[" << e.bag + 1
        << "]=" << e.value;
      break;
    case BagError::kPastEnd:
      s << "offsets[" << e.bag + 1 << "]=" << e.value << " (bag " << b << ") runs past the end of indices (numel " << N
        << ")";
      break;
    case BagError::kBadId:
      s << "id " << e.value << " at indices[" << e.pos << "] (bag " << b << ") is outside the table's rows [0, " << e.aux
        << ")";
      break;
    default:
      s << "unknown error code " << e.code;
  }
  return s.str();
}

struct BagShape {
  int64_t T;  // tables
  int64_t B;  // batch
  int64_t D;  // embedding dim
  int64_t N;  // indices.numel()
  int64_t R;  // weight rows
};

// Checks dtypes, devices and shapes (not values: the kernels check those while they read).
inline BagShape check_embedding_bag_args(const char* op, const at::Tensor& weight, const at::Tensor& table_offsets,
                                         const at::Tensor& indices, const at::Tensor& offsets, PoolMode mode,
                                         const std::optional<at::Tensor>& per_sample_weights) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [rows, dim], got shape ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op, ": weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK(table_offsets.dim() == 1 && table_offsets.numel() >= 2, op,
              ": table_offsets must be 1-D with T+1 >= 2 entries, got shape ", table_offsets.sizes());
  TORCH_CHECK(table_offsets.scalar_type() == at::kLong, op, ": table_offsets must be int64, got ",
              table_offsets.scalar_type());
  TORCH_CHECK(indices.dim() == 1, op, ": indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, op, ": offsets must be 1-D with T*B+1 entries, got shape ",
              offsets.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(offsets.scalar_type() == indices.scalar_type(), op, ": offsets must have the dtype of indices (",
              indices.scalar_type(), "), got ", offsets.scalar_type());
  const auto dev = weight.device();
  TORCH_CHECK(table_offsets.device() == dev && indices.device() == dev && offsets.device() == dev, op,
              ": weight, table_offsets, indices and offsets must be on one device, got ", dev, ", ",
              table_offsets.device(), ", ", indices.device(), ", ", offsets.device());
  const int64_t T = table_offsets.numel() - 1;
  const int64_t nb = offsets.numel() - 1;
  TORCH_CHECK(nb % T == 0, op, ": offsets must have T*B+1 entries (T=", T, " tables), got ", offsets.numel());
  if (per_sample_weights.has_value()) {
    const auto& w = *per_sample_weights;
    TORCH_CHECK(mode != PoolMode::Max, op, ": per_sample_weights are only supported with mode 'sum' or 'mean'");
    TORCH_CHECK(w.dim() == 1 && w.numel() == indices.numel(), op,
                ": per_sample_weights must be 1-D with one weight per index (", indices.numel(), "), got shape ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == weight.scalar_type(), op, ": per_sample_weights must have the dtype of weight (",
                weight.scalar_type(), "), got ", w.scalar_type());
    TORCH_CHECK(w.device() == dev, op, ": per_sample_weights must be on ", dev, ", got ", w.device());
  }
  return BagShape{T, nb / T, weight.size(1), indices.numel(), weight.size(0)};
}

// The forward's checks plus those on grad_output (shared by the CPU and CUDA backward).
inline BagShape check_embedding_bag_backward_args(const char* op, const at::Tensor& grad_output,
                                                  const at::Tensor& weight, const at::Tensor& table_offsets,
                                                  const at::Tensor& indices, const at::Tensor& offsets, PoolMode mode,
                                                  const std::optional<at::Tensor>& per_sample_weights) {
  const BagShape sh = check_embedding_bag_args(op, weight, table_offsets, indices, offsets, mode, per_sample_weights);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == sh.B && grad_output.size(1) == sh.T * sh.D, op,
              ": grad_output must be [", sh.B, ", ", sh.T * sh.D, "], got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == weight.scalar_type() && grad_output.device() == weight.device(), op,
              ": grad_output must match weight's dtype and device");
  return sh;
}

inline int64_t padding_value(const std::optional<int64_t>& padding_idx) {
  return padding_idx.has_value() ? *padding_idx : kNoPadding;
}

// ---- CPU kernels (csrc/cpu/embedding_bag_cpu.cpp) ----
at::Tensor embedding_bag_cpu(const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
                             const at::Tensor& offsets, c10::string_view mode,
                             const std::optional<at::Tensor>& per_sample_weights, std::optional<int64_t> padding_idx,
                             bool sparse);
std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx, bool compute_psw_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_bag_backward_sparse_cpu(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx, bool compute_psw_grad);

// ---- CUDA: the sorted, chunked reduction, for the fused optimizers (csrc/cuda/embedding_bag_cuda.cu,
// used by csrc/cuda/embedding_update_cuda.cu). No host synchronisation.
// embedding_bag_sorted_row_grads_cuda: (sorted [N] int32: every id's global row, sorted stably, R
// for padding and bad ids, which go to the error flag as dtn::embedding_bag_backward_update;
// run_grads [N, D] float32 (float64 for double weights): the gradient of each run of one row,
// summed in input order, at the run's first sorted position; other positions unspecified).
std::tuple<at::Tensor, at::Tensor> embedding_bag_sorted_row_grads_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& table_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, c10::string_view mode, const std::optional<at::Tensor>& per_sample_weights,
    std::optional<int64_t> padding_idx);
// The same for row gradients: rows [n] (checked in [0, R)), row_grads [n, D] -> (sorted rows int32,
// run sums [n, D] float32 at each run's first sorted position).
std::tuple<at::Tensor, at::Tensor> embedding_rows_sorted_grads_cuda(const at::Tensor& rows, const at::Tensor& row_grads,
                                                                    int64_t R);

// ---- CUDA: deferred error reporting (csrc/cuda/embedding_bag_cuda.cu) ----
// The CUDA kernels never make the host wait on them: they write the first problem they meet
// (BagError's fields, B, N and the op) into a small per-device flag and skip the bad entry.
// The host reads the flag only when asked, at a point that synchronises anyway.
//
// embedding_bag_take_cuda_error: waits for the device, reads and clears its flag; returns the
// same message the CPU kernel raises, or "" when nothing is pending (or the op never ran there).
std::string embedding_bag_take_cuda_error(int64_t device);
// Debug mode (also DTN_CHECK_EVERY_CALL=1 at load): every CUDA call synchronises and raises at
// once, except while its stream is being captured into a CUDA graph.
void embedding_bag_set_check_every_call(bool on);
bool embedding_bag_check_every_call();

}  // namespace dtn
