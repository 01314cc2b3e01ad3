// CPU kernels of depthwise_conv, the per-channel convolution of DARTS' separable and dilated candidates:
//   forward:  out[b, c, oh, ow] = sum_{i, j} weight[c, 0, i, j] * x[b, c, oh * s - p + i * d, ow * s - p + j * d]
//   backward: grad_x gathers, for each input pixel, the output gradients of the taps that read it;
//             grad_weight[c, 0, i, j] = sum_b sum_{oh, ow} grad[b, c, oh, ow] * x[b, c, oh * s - p + i * d, ...]
// (zero padding). At DARTS' sizes (8 to 64 channels of 2x2 to 32x32) oneDNN spends most of its time per call,
// not per element; these loops have no set-up beyond one parallel_for over the planes (stacked per channel when
// small, 16 samples side by side on vector lanes when tiny), and each kernel tap is one contiguous loop over a padded
// copy of the planes (see Geometry). Accumulation is in at::opmath_type (fp32,
// fp64 for fp64). grad_weight is summed per stack of planes, then over the stacks in a fixed order: bitwise the same
// for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "ops/common.h"
#include "ops/depthwise_conv.h"

namespace fastdarts {
namespace {

using depthwise::backward_kernel;
using depthwise::check_inputs;
using depthwise::forward_kernel;
using depthwise::Geometry;

at::Tensor depthwise_conv_cpu(const at::Tensor& x_in, const at::Tensor& weight, int64_t stride, int64_t padding,
                              int64_t dilation) {
  const Geometry g = check_inputs("depthwise_conv", x_in, weight, stride, padding, dilation);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor w = as_contiguous(weight, at::toOpMathType(x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv_cpu", [&] {
    forward_kernel<scalar_t>(g, x.const_data_ptr<scalar_t>(), w.const_data_ptr<at::opmath_type<scalar_t>>(),
                             out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                               const at::Tensor& weight, int64_t stride,
                                                               int64_t padding, int64_t dilation,
                                                               std::array<bool, 2> output_mask) {
  const Geometry g = check_inputs("depthwise_conv_backward", x_in, weight, stride, padding, dilation);
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({g.B, g.C, g.Ho, g.Wo}), "depthwise_conv_backward: grad ",
                    "has shape ", shape_str(grad_in.sizes()), ", expected (", g.B, ", ", g.C, ", ", g.Ho, ", ", g.Wo,
                    ") like the output");
  TORCH_CHECK_TYPE(grad_in.scalar_type() == x_in.scalar_type(), "depthwise_conv_backward: grad has dtype ",
                   dtype_str(grad_in.scalar_type()), ", expected ", dtype_str(x_in.scalar_type()), " like x");
  TORCH_CHECK_VALUE(grad_in.device() == x_in.device(), "depthwise_conv_backward: grad is on ", grad_in.device(),
                    ", expected ", x_in.device(), " like x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::ScalarType acc_dtype = at::toOpMathType(x.scalar_type());
  // an output left out by output_mask is an empty tensor (as the fake kernel's)
  at::Tensor grad_x = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_weight =
      output_mask[1] ? at::empty({g.C, 1, g.k, g.k}, x.options().dtype(acc_dtype)) : at::empty({0}, x.options());
  const at::Tensor w = as_contiguous(weight, acc_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t>(g, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<acc_t>(), output_mask[0] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                              output_mask[1] ? grad_weight.mutable_data_ptr<acc_t>() : nullptr);
  });
  if (output_mask[1]) {
    grad_weight = as_dtype(grad_weight, weight.scalar_type());
  }
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts_C, CPU, m) {
  m.impl("depthwise_conv", &depthwise_conv_cpu);
  m.impl("depthwise_conv_backward", &depthwise_conv_backward_cpu);
}

}  // namespace fastdarts
