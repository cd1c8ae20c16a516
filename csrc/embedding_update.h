// Fused sparse embedding optimizers (dtn::embedding_bag_backward_update, dtn::embedding_rows_update):
// declarations and the host-side pieces the CPU and CUDA kernels share (optimizer names, state
// checks, the constants of the update). The math is documented by the pure-PyTorch twins in
// dtn_kernels/reference/pt_embedding_update.py; the kernels follow it operation by operation.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

namespace dtn {

enum class EmbOptimizer : int { Sgd = 0, RowwiseAdagrad = 1, LazyAdam = 2 };

inline const char* optimizer_name(EmbOptimizer o) {
  switch (o) {
    case EmbOptimizer::RowwiseAdagrad:
      return "rowwise_adagrad";
    case EmbOptimizer::LazyAdam:
      return "lazy_adam";
    default:
      return "sgd";
  }
}

inline EmbOptimizer parse_optimizer(const char* op, c10::string_view name) {
  if (name == "sgd") return EmbOptimizer::Sgd;
  if (name == "rowwise_adagrad") return EmbOptimizer::RowwiseAdagrad;
  if (name == "lazy_adam") return EmbOptimizer::LazyAdam;
  TORCH_CHECK(false, op, ": optimizer must be one of ['sgd', 'rowwise_adagrad', 'lazy_adam'], got '", std::string(name),
              "'");
}

// The update's constants in float32, rounded from the double arguments exactly as the twin's
// tensor arithmetic rounds its Python floats (a float tensor times a Python float computes in
// float32 with the scalar rounded to float32; (1 - beta1), lr / bc1 and sqrt(bc2) are computed
// in double first, as in Python).
struct UpdateParams {
  float lr, eps, weight_decay, grad_scale;
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float lr_over_bc1, sqrt_bc2;  // lazy_adam's bias corrections
};

inline UpdateParams make_update_params(EmbOptimizer o, double lr, double beta1, double beta2, double eps,
                                       double weight_decay, int64_t step, double grad_scale) {
  UpdateParams p{};
  p.lr = float(lr), p.eps = float(eps), p.weight_decay = float(weight_decay), p.grad_scale = float(grad_scale);
  p.beta1 = float(beta1), p.one_minus_beta1 = float(1.0 - beta1);
  p.beta2 = float(beta2), p.one_minus_beta2 = float(1.0 - beta2);
  if (o == EmbOptimizer::LazyAdam) {
    const double bc1 = 1.0 - std::pow(beta1, double(step)), bc2 = 1.0 - std::pow(beta2, double(step));
    p.lr_over_bc1 = float(lr / bc1);
    p.sqrt_bc2 = float(std::sqrt(bc2));
  }
  return p;
}

// Shapes, dtype (float32), device and layout of the optimizer state, and weight's layout.
inline void check_update_state(const char* op, EmbOptimizer o, const at::Tensor& weight, const at::Tensor& state1,
                               const at::Tensor& state2, int64_t step) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [rows, dim], got shape ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous (it is updated in place)");
  const int64_t R = weight.size(0), D = weight.size(1);
  std::vector<int64_t> want1, want2;
  if (o == EmbOptimizer::Sgd) {
    want1 = {0}, want2 = {0};
  } else if (o == EmbOptimizer::RowwiseAdagrad) {
    want1 = {R}, want2 = {0};
  } else {
    want1 = {R, D}, want2 = {R, D};
  }
  const at::Tensor* states[2] = {&state1, &state2};
  const std::vector<int64_t>* wants[2] = {&want1, &want2};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& st = *states[i];
    const bool ok = st.sizes() == c10::IntArrayRef(*wants[i]) && (st.numel() == 0 || st.scalar_type() == at::kFloat) &&
                    st.device() == weight.device();
    TORCH_CHECK(ok, op, ": ", optimizer_name(o), " needs state", i + 1, " of shape ", c10::IntArrayRef(*wants[i]),
                " float32 on ", weight.device(), ", got ", st.sizes(), " ", st.scalar_type(), " on ", st.device());
    TORCH_CHECK(st.numel() == 0 || st.is_contiguous(), op, ": state", i + 1,
                " must be contiguous (it is updated in place)");
  }
  TORCH_CHECK(o != EmbOptimizer::LazyAdam || step >= 1, op, ": lazy_adam needs step >= 1 (the first step is 1), got ",
              step);
}

// ---- CPU kernels (csrc/cpu/embedding_update_cpu.cpp)
void embedding_bag_backward_update_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                       const at::Tensor& table_offsets, const at::Tensor& indices,
                                       const at::Tensor& offsets, c10::string_view mode,
                                       const std::optional<at::Tensor>& per_sample_weights,
                                       std::optional<int64_t> padding_idx, c10::string_view optimizer,
                                       const at::Tensor& state1, const at::Tensor& state2, double lr, double beta1,
                                       double beta2, double eps, double weight_decay, int64_t step, double grad_scale);
void embedding_rows_update_cpu(const at::Tensor& weight, const at::Tensor& state1, const at::Tensor& state2,
                               const at::Tensor& rows, const at::Tensor& row_grads, c10::string_view optimizer,
                               double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                               double grad_scale);

}  // namespace dtn
