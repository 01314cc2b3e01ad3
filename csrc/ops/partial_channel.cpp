// CPU kernels of partial_channel, PC-DARTS' partial-channel edge in one pass over memory:
//   out = channel_shuffle(cat([sum_k weights[k] * xs[k], bypass(x[:, c:])]), groups),  c = C / groups,
// bypass = identity (stride 1) or a 2x2 max pool with stride 2 (the first maximum of the window in row-major
// order wins, NaN winning, as ATen's). Output channel o = i * groups + g takes concatenated channel g * c + i:
// the mixed sum of channel i when g == 0, else the bypass of x channel g * c + i. Each output plane is written
// once, straight to its shuffled place: no split, cat or shuffle copies.
// Backward: grad_xs[k][b, i] = weights[k] * grad[b, i * groups], grad_weights[k] = <grad[:, ::groups], xs[k]>,
// grad_x = the bypass's gradient in channels >= c and zero in channels < c (those reach x through xs).
// Accumulation in at::opmath_type; grad_weights sums per-plane partial dot products in a fixed order, so it is
// bitwise the same for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "ops/common.h"
#include "ops/mixed_op.h"

namespace fastdarts {
namespace {

constexpr int64_t kBlock = 256;           // accumulators per inner block of the weighted sum
constexpr int64_t kGrainElements = 8192;  // output elements per parallel task, at least
constexpr int64_t kLanes = 16;            // independent partial sums per dot product: the reduction vectorises

struct Geometry {
  int64_t B, C, H, W, groups, stride, c, Ho, Wo;
  int64_t P() const { return Ho * Wo; }  // an output plane
  int64_t Pin() const { return H * W; }  // an input plane
  int64_t grain() const { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, P())); }
};

// Every bad input, with a message that names the value and what was expected. `grad` is undefined for the forward.
Geometry check_inputs(const char* op, at::TensorList xs, const at::Tensor& weights, const at::Tensor& x,
                      int64_t groups, int64_t stride, const at::Tensor& grad) {
  check_mixed_op_inputs(op, xs, weights, at::Tensor(), c10::DeviceType::CPU);
  check_image(op, x);
  TORCH_CHECK_TYPE(x.scalar_type() == xs[0].scalar_type(), op, ": x has dtype ", dtype_str(x.scalar_type()),
                   ", expected ", dtype_str(xs[0].scalar_type()), " like xs");
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, op, ": stride is ", stride, ", expected 1 or 2");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(groups >= 1 && C % groups == 0, op, ": groups is ", groups, ", expected a divisor of the ",
                    C, " channels of x");
  TORCH_CHECK_VALUE(stride == 1 || (H % 2 == 0 && W % 2 == 0), op, ": x has shape ", shape_str(x.sizes()),
                    ", expected even H and W for stride 2 (the bypass is a 2x2 max pool)");
  const Geometry g{B, C, H, W, groups, stride, C / groups, H / stride, W / stride};
  const std::vector<int64_t> expected{B, g.c, g.Ho, g.Wo};
  TORCH_CHECK_VALUE(xs[0].sizes() == c10::IntArrayRef(expected), op, ": xs[0] has shape ",
                    shape_str(xs[0].sizes()), ", expected ", shape_str(expected), " (the first C / groups = ",
                    g.c, " channels of x at stride ", stride, ")");
  if (grad.defined()) {
    const std::vector<int64_t> out{B, C, g.Ho, g.Wo};
    TORCH_CHECK_VALUE(grad.sizes() == c10::IntArrayRef(out), op, ": grad has shape ", shape_str(grad.sizes()),
                      ", expected ", shape_str(out), " like the output");
    TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": grad has dtype ",
                     dtype_str(grad.scalar_type()), ", expected ", dtype_str(x.scalar_type()), " like x");
    TORCH_CHECK_VALUE(grad.device() == x.device(), op, ": grad is on ", grad.device(), ", expected ", x.device());
  }
  return g;
}

std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) {
    out.push_back(t.contiguous());
  }
  return out;
}

// Offset of the winning pixel of the 2x2 window at (2 oh, 2 ow), relative to its top left pixel.
template <typename T>
inline int64_t window_argmax(const T* in, int64_t W) {
  using acc_t = at::opmath_type<T>;
  const int64_t taps[4] = {0, 1, W, W + 1};
  int64_t best = 0;
  acc_t m = static_cast<acc_t>(in[0]);
  for (int t = 1; t < 4; ++t) {
    const acc_t v = static_cast<acc_t>(in[taps[t]]);
    if (v > m || v != v) {
      m = v;
      best = taps[t];
    }
  }
  return best;
}

template <typename scalar_t>
void forward_kernel(const Geometry& g, const std::vector<const scalar_t*>& xs, const at::opmath_type<scalar_t>* w,
                    const scalar_t* x, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = static_cast<int64_t>(xs.size()), P = g.P();
  parallel_for(0, g.B * g.C, g.grain(), [&](int64_t begin, int64_t end) {
    acc_t acc[kBlock];
    for (int64_t bo = begin; bo < end; ++bo) {
      const int64_t b = bo / g.C, o = bo % g.C, grp = o % g.groups, i = o / g.groups;
      scalar_t* __restrict__ dst = out + bo * P;
      if (grp == 0) {  // the mixed channel i
        const int64_t src = (b * g.c + i) * P;
        for (int64_t j0 = 0; j0 < P; j0 += kBlock) {
          const int64_t len = std::min(kBlock, P - j0);
          const scalar_t* __restrict__ x0 = xs[0] + src + j0;
          for (int64_t j = 0; j < len; ++j) {
            acc[j] = w[0] * static_cast<acc_t>(x0[j]);
          }
          for (int64_t k = 1; k < K; ++k) {
            const scalar_t* __restrict__ xk = xs[k] + src + j0;
            const acc_t wk = w[k];
            for (int64_t j = 0; j < len; ++j) {
              acc[j] += wk * static_cast<acc_t>(xk[j]);
            }
          }
          for (int64_t j = 0; j < len; ++j) {
            dst[j0 + j] = static_cast<scalar_t>(acc[j]);
          }
        }
        continue;
      }
      const scalar_t* __restrict__ in = x + (b * g.C + grp * g.c + i) * g.Pin();
      if (g.stride == 1) {
        std::copy_n(in, P, dst);
        continue;
      }
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const scalar_t* win = in + 2 * oh * g.W + 2 * ow;
          dst[oh * g.Wo + ow] = win[window_argmax(win, g.W)];
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* grad, const std::vector<const scalar_t*>& xs,
                     const at::opmath_type<scalar_t>* w, const scalar_t* x, const std::vector<scalar_t*>& grad_xs,
                     at::opmath_type<scalar_t>* grad_w, scalar_t* grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = static_cast<int64_t>(xs.size()), P = g.P(), Pin = g.Pin();
  std::vector<acc_t> partial(g.B * g.c * K);  // [B * c, K] dot products of each mixed plane
  parallel_for(0, g.B * g.C, g.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t bo = begin; bo < end; ++bo) {
      const int64_t b = bo / g.C, o = bo % g.C, grp = o % g.groups, i = o / g.groups;
      const scalar_t* __restrict__ gout = grad + bo * P;
      if (grp == 0) {  // the mixed channel i: its candidates' gradients; input channel i gets none from here
        const int64_t plane = b * g.c + i;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* __restrict__ xk = xs[k] + plane * P;
          scalar_t* __restrict__ gx = grad_xs[k] + plane * P;
          const acc_t wk = w[k];
          acc_t s[kLanes] = {};
          const int64_t full = P / kLanes * kLanes;
          for (int64_t j = 0; j < full; j += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) {
              const acc_t gv = static_cast<acc_t>(gout[j + l]);
              gx[j + l] = static_cast<scalar_t>(wk * gv);
              s[l] += gv * static_cast<acc_t>(xk[j + l]);
            }
          }
          for (int64_t j = full; j < P; ++j) {
            const acc_t gv = static_cast<acc_t>(gout[j]);
            gx[j] = static_cast<scalar_t>(wk * gv);
            s[j - full] += gv * static_cast<acc_t>(xk[j]);
          }
          acc_t sum = 0;
          for (int64_t l = 0; l < kLanes; ++l) {
            sum += s[l];
          }
          partial[plane * K + k] = sum;
        }
        std::fill_n(grad_x + (b * g.C + i) * Pin, Pin, scalar_t(0));
        continue;
      }
      const int64_t src = (b * g.C + grp * g.c + i) * Pin;
      scalar_t* __restrict__ gin = grad_x + src;
      if (g.stride == 1) {
        std::copy_n(gout, P, gin);
        continue;
      }
      std::fill_n(gin, Pin, scalar_t(0));
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const int64_t top_left = 2 * oh * g.W + 2 * ow;
          gin[top_left + window_argmax(x + src + top_left, g.W)] = gout[oh * g.Wo + ow];
        }
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    acc_t sum = 0;
    for (int64_t plane = 0; plane < g.B * g.c; ++plane) {
      sum += partial[plane * K + k];
    }
    grad_w[k] = sum;
  }
}

at::Tensor partial_channel_cpu(at::TensorList xs, const at::Tensor& weights, const at::Tensor& x, int64_t groups,
                               int64_t stride) {
  const Geometry g = check_inputs("partial_channel", xs, weights, x, groups, stride, at::Tensor());
  const std::vector<at::Tensor> xs_c = contiguous(xs);
  const at::Tensor x_c = x.contiguous();
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor w = as_contiguous(weights, at::toOpMathType(x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "partial_channel_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& t : xs_c) {
      ptrs.push_back(t.const_data_ptr<scalar_t>());
    }
    forward_kernel<scalar_t>(g, ptrs, w.const_data_ptr<at::opmath_type<scalar_t>>(), x_c.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> partial_channel_backward_cpu(
    const at::Tensor& grad, at::TensorList xs, const at::Tensor& weights, const at::Tensor& x, int64_t groups,
    int64_t stride) {
  const Geometry g = check_inputs("partial_channel_backward", xs, weights, x, groups, stride, grad);
  const int64_t K = static_cast<int64_t>(xs.size());
  const std::vector<at::Tensor> xs_c = contiguous(xs);
  const at::Tensor x_c = x.contiguous(), grad_c = grad.contiguous();
  std::vector<at::Tensor> grad_xs;
  for (int64_t k = 0; k < K; ++k) {
    grad_xs.push_back(at::empty(xs[0].sizes(), x.options()));
  }
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const at::ScalarType acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor grad_w = at::zeros({K}, weights.options().dtype(acc_dtype));
  if (grad.numel() == 0) {
    return {grad_xs, as_dtype(grad_w, weights.scalar_type()), grad_x.zero_()};
  }
  const at::Tensor w = as_contiguous(weights, acc_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "partial_channel_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> x_ptrs;
    std::vector<scalar_t*> gx_ptrs;
    for (int64_t k = 0; k < K; ++k) {
      x_ptrs.push_back(xs_c[k].const_data_ptr<scalar_t>());
      gx_ptrs.push_back(grad_xs[k].mutable_data_ptr<scalar_t>());
    }
    backward_kernel<scalar_t>(g, grad_c.const_data_ptr<scalar_t>(), x_ptrs, w.const_data_ptr<acc_t>(),
                              x_c.const_data_ptr<scalar_t>(), gx_ptrs, grad_w.mutable_data_ptr<acc_t>(),
                              grad_x.mutable_data_ptr<scalar_t>());
  });
  return {grad_xs, as_dtype(grad_w, weights.scalar_type()), grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts_C, CPU, m) {
  m.impl("partial_channel", &partial_channel_cpu);
  m.impl("partial_channel_backward", &partial_channel_backward_cpu);
}

}  // namespace fastdarts
