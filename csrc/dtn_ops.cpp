// Operator schemas of the dtn library (torch.ops.dtn.*) and the Python import stub.
//
// Kernels are registered next to their code (csrc/cpu/*.cpp: CPU, csrc/cuda/*.cu: CUDA);
// fake (meta) implementations and autograd formulas are registered in Python
// (dtn_kernels/ops/<op>.py), where torch.library does it in a few lines.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/caching_allocator.h"
#include "embedding_bag.h"

TORCH_LIBRARY(dtn, m) {
  // ---- table-batched embedding bag (csrc/embedding_bag.h documents the layout)
  m.def(
      "embedding_bag(Tensor weight, Tensor table_offsets, Tensor indices, Tensor offsets, str mode=\"sum\", "
      "Tensor? per_sample_weights=None, int? padding_idx=None, bool sparse=False) -> Tensor");
  // Dense gradient of weight [R, D] and of per_sample_weights ([N], or [0] when not asked for).
  m.def(
      "embedding_bag_backward(Tensor grad_output, Tensor weight, Tensor table_offsets, Tensor indices, "
      "Tensor offsets, str mode, Tensor? per_sample_weights, int? padding_idx, bool compute_psw_grad) "
      "-> (Tensor, Tensor)");
  // Row-sparse gradient: (rows [U] int64 sorted unique, row_grads [U, D], grad per_sample_weights).
  m.def(
      "embedding_bag_backward_sparse(Tensor grad_output, Tensor weight, Tensor table_offsets, Tensor indices, "
      "Tensor offsets, str mode, Tensor? per_sample_weights, int? padding_idx, bool compute_psw_grad) "
      "-> (Tensor, Tensor, Tensor)");
  // ---- fused sparse embedding optimizers (csrc/embedding_update.h; the math:
  // dtn_kernels/reference/pt_embedding_update.py). Update weight and state in place. (The pooling
  // mode is named `pooling`, not `mode`: torch's auto-functionalization of mutating ops, which
  // torch.compile and opcheck run, takes a keyword argument `mode` of its own.)
  m.def(
      "embedding_bag_backward_update(Tensor grad_output, Tensor(a!) weight, Tensor table_offsets, Tensor indices, "
      "Tensor offsets, str pooling, Tensor? per_sample_weights, int? padding_idx, str optimizer, Tensor(b!) state1, "
      "Tensor(c!) state2, float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
      "float grad_scale) -> ()");
  m.def(
      "embedding_rows_update(Tensor(a!) weight, Tensor(b!) state1, Tensor(c!) state2, Tensor rows, Tensor row_grads, "
      "str optimizer, float lr, float beta1, float beta2, float eps, float weight_decay, int step, "
      "float grad_scale) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dtn-kernels compiled ops; importing this module registers torch.ops.dtn.*";
  // The caching CPU allocator (csrc/cpu/caching_allocator.cpp); dtn_kernels.cpu_allocator wraps it.
  m.def("_cpu_allocator_enable", &dtn::caching_allocator_enable);
  m.def("_cpu_allocator_disable", &dtn::caching_allocator_disable);
  m.def("_cpu_allocator_enabled", &dtn::caching_allocator_enabled);
  m.def("_cpu_allocator_empty_cache", &dtn::caching_allocator_empty_cache);
  m.def("_cpu_allocator_reset_peak", &dtn::caching_allocator_reset_peak);
  m.def("_cpu_allocator_check", &dtn::caching_allocator_check);
  m.def("_cpu_allocator_stats", [] {
    const dtn::CachingAllocatorStats s = dtn::caching_allocator_stats();
    py::dict d;
    d["allocated"] = s.allocated;
    d["peak_allocated"] = s.peak_allocated;
    d["mapped"] = s.mapped;
    d["free"] = s.free;
    d["largest_free"] = s.largest_free;
    d["segments"] = s.segments;
    d["pool_allocs"] = s.pool_allocs;
    d["system_allocs"] = s.system_allocs;
    return d;
  });
#ifdef DTN_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  // Host utilities of the CUDA embedding bag's device-side error flag (csrc/embedding_bag.h);
  // dtn_kernels.ops.embedding_bag wraps them (raise_pending_errors, set_check_every_call).
  m.def("_embedding_bag_take_error", &dtn::embedding_bag_take_cuda_error, py::arg("device"),
        "Synchronise cuda:device, read and clear its embedding-bag error flag; the error message or ''.");
  m.def("_embedding_bag_set_check_every_call", &dtn::embedding_bag_set_check_every_call, py::arg("on"));
  m.def("_embedding_bag_check_every_call", &dtn::embedding_bag_check_every_call);
#else
  m.attr("WITH_CUDA") = false;
#endif
}
