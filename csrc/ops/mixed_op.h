// Input checks and memory-layout rules shared by the CPU (mixed_op.cpp) and CUDA (cuda/mixed_op.cu) kernels
// of mixed_op: out = sum_k weights[k] * xs[k].
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "ops/common.h"

namespace fastdarts {

// Every bad input of mixed_op / mixed_op_backward, with a message that names the value and what was expected.
// `grad` is undefined for the forward.
inline void check_mixed_op_inputs(const char* op, at::TensorList xs, const at::Tensor& weights,
                                  const at::Tensor& grad, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(!xs.empty(), op, ": xs is empty, expected at least one tensor");
  const at::Tensor& x0 = xs[0];
  const int64_t K = static_cast<int64_t>(xs.size());
  TORCH_CHECK(x0.device().type() == device_type, op, ": xs[0] is on ", x0.device(),
              ", this kernel runs on ", c10::DeviceTypeName(device_type, /*lower_case=*/true));
  TORCH_CHECK_TYPE(x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble ||
                       x0.scalar_type() == at::kHalf || x0.scalar_type() == at::kBFloat16,
                   op, ": xs[0] has dtype ", dtype_str(x0.scalar_type()),
                   ", expected one of float32, float64, float16, bfloat16");
  for (int64_t k = 1; k < K; ++k) {
    const at::Tensor& x = xs[k];
    TORCH_CHECK_VALUE(x.sizes() == x0.sizes(), op, ": xs[", k, "] has shape ", shape_str(x.sizes()),
                      ", expected ", shape_str(x0.sizes()), " like xs[0]");
    TORCH_CHECK_TYPE(x.scalar_type() == x0.scalar_type(), op, ": xs[", k, "] has dtype ",
                     dtype_str(x.scalar_type()), ", expected ", dtype_str(x0.scalar_type()), " like xs[0]");
    TORCH_CHECK_VALUE(x.device() == x0.device(), op, ": xs[", k, "] is on ", x.device(), ", expected ",
                      x0.device(), " like xs[0]");
  }
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == K, op, ": weights has shape ",
                    shape_str(weights.sizes()), ", expected (", K, ",) for ", K, " inputs");
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat || weights.scalar_type() == x0.scalar_type(), op,
                   ": weights has dtype ", dtype_str(weights.scalar_type()), ", expected float32",
                   x0.scalar_type() == at::kFloat ? "" : " or " + dtype_str(x0.scalar_type()), " like xs");
  TORCH_CHECK_VALUE(weights.device() == x0.device(), op, ": weights is on ", weights.device(), ", expected ",
                    x0.device(), " like xs");
  if (grad.defined()) {
    TORCH_CHECK_VALUE(grad.sizes() == x0.sizes(), op, ": grad has shape ", shape_str(grad.sizes()),
                      ", expected ", shape_str(x0.sizes()), " like xs[0]");
    TORCH_CHECK_TYPE(grad.scalar_type() == x0.scalar_type(), op, ": grad has dtype ",
                     dtype_str(grad.scalar_type()), ", expected ", dtype_str(x0.scalar_type()), " like xs");
    TORCH_CHECK_VALUE(grad.device() == x0.device(), op, ": grad is on ", grad.device(), ", expected ",
                      x0.device(), " like xs");
  }
}

// The kernels walk every tensor as one flat array. That is valid as-is when all tensors have the same strides
// over dense, non-overlapping memory (all contiguous, all channels-last...), and the outputs then get exactly
// those strides. Otherwise every tensor is made contiguous, and the outputs are contiguous.
// fastdarts/ops/mixed_op.py (_output_strides) applies the same rule in the fake kernels: keep them in sync.
struct FlatTensors {
  std::vector<at::Tensor> tensors;
  bool shared_layout;

  // An uninitialised output with the layout described above.
  at::Tensor new_output() const {
    const at::Tensor& first = tensors[0];
    return shared_layout ? at::empty_strided(first.sizes(), first.strides(), first.options())
                         : at::empty(first.sizes(), first.options());
  }
};

inline FlatTensors flat_walkable(std::vector<at::Tensor> tensors) {
  const at::Tensor& first = tensors[0];
  bool shared = first.is_non_overlapping_and_dense();
  for (size_t i = 1; shared && i < tensors.size(); ++i) {
    shared = tensors[i].strides() == first.strides();
  }
  if (!shared) {
    for (auto& t : tensors) {
      t = t.contiguous();
    }
  }
  return {std::move(tensors), shared};
}

}  // namespace fastdarts
