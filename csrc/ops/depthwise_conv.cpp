// CPU kernels of depthwise_conv, the per-channel convolution of DARTS' separable and dilated candidates:
//   forward:  out[b, c, oh, ow] = sum_{i, j} weight[c, 0, i, j] * x[b, c, oh * s - p + i * d, ow * s - p + j * d]
//   backward: grad_x by scattering each output gradient back through the same taps; grad_weight[c, 0, i, j] =
//             sum_b sum_{oh, ow} grad[b, c, oh, ow] * x[b, c, oh * s - p + i * d, ow * s - p + j * d]
// (zero padding). At DARTS' sizes (8 to 64 channels of 2x2 to 32x32) oneDNN spends most of its time per call,
// not per element; these loops have no set-up beyond one parallel_for over the B x C planes, and each kernel tap is
// one contiguous loop over a padded copy of the plane (see Geometry). Accumulation is in at::opmath_type (fp32,
// fp64 for fp64). grad_weight is summed per plane, then over the batch in a fixed order: bitwise the same for any
// thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <tuple>
#include <vector>

#include "ops/common.h"

namespace fastdarts {
namespace {

// The geometry of one call: input plane H x W, output plane Ho x Wo, a k x k kernel with stride s, padding p,
// dilation d. Each input plane is copied, zero-padded, into s x s phase planes of Hq x Wq (phase (a, b) holds
// padded[r * s + a][c * s + b]), so that every kernel tap (i, j) reads phase ((i d) % s, (j d) % s) at the
// constant offset ((i d) / s) * Wq + (j d) / s from the output position: out[oh * Wq + ow] is then one contiguous
// multiply-add loop per tap over the "grid" of Ho rows of Wq >= Wo columns (the columns past Wo are computed
// and thrown away). No bounds checks, no strided access: vectorisable for every stride and dilation. The grid is
// walked in blocks of kBlock elements whose partial sums stay in registers across all taps.
constexpr int64_t kBlock = 16;

struct Geometry {
  int64_t B, C, H, W, k, stride, padding, dilation, Ho, Wo;
  int64_t Hq = 0, Wq = 0;  // one phase plane
  int64_t phase_size = 0;  // Hq * Wq plus slack for the last row's and the last block's overhang
  int64_t grid = 0;        // Ho * Wq rounded up to whole blocks: the elements each tap's loop runs over
  std::vector<int64_t> taps;  // [k * k]: where tap (i, j) starts reading in the phase buffer

  void finish() {
    Hq = (H + 2 * padding + stride - 1) / stride;
    Wq = (W + 2 * padding + stride - 1) / stride;
    grid = (Ho * Wq + kBlock - 1) / kBlock * kBlock;
    phase_size = Hq * Wq + dilation * (k - 1) / stride + kBlock;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        taps.push_back(tap_offset(i, j));
      }
    }
  }
  // Where tap (i, j) starts reading in the phase buffer [s * s, phase_size].
  int64_t tap_offset(int64_t i, int64_t j) const {
    const int64_t ri = i * dilation, cj = j * dilation;
    return ((ri % stride) * stride + cj % stride) * phase_size + (ri / stride) * Wq + cj / stride;
  }
  // Calls f(phase_offset, x_offset, len) for each run of len input elements x[x_offset + t * s], t < len, that
  // lands at phase[phase_offset + t] (the zero padding is in no run).
  template <typename F>
  void for_each_run(F f) const {
    for (int64_t a = 0; a < stride; ++a) {
      for (int64_t b = 0; b < stride; ++b) {
        // input column c * s + b - p in [0, W)  <=>  c in [c_lo, c_hi)
        const int64_t c_lo = std::max<int64_t>(0, (padding - b + stride - 1) / stride);
        const int64_t c_hi = std::min<int64_t>(Wq, (W + padding - b + stride - 1) / stride);
        if (c_hi <= c_lo) {
          continue;
        }
        for (int64_t r = 0; r < Hq; ++r) {
          const int64_t h = r * stride + a - padding;
          if (h < 0 || h >= H) {
            continue;
          }
          f((a * stride + b) * phase_size + r * Wq + c_lo, h * W + c_lo * stride + b - padding, c_hi - c_lo);
        }
      }
    }
  }
};

Geometry check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                      int64_t padding, int64_t dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x has shape ", shape_str(x.sizes()), ", expected 4 dims [B, C, H, W]");
  TORCH_CHECK(x.device().is_cpu(), op, ": x is on ", x.device(), ", this kernel runs on cpu");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                       x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   op, ": x has dtype ", dtype_str(x.scalar_type()),
                   ", expected one of float32, float64, float16, bfloat16");
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                        weight.size(2) == weight.size(3) && weight.size(2) >= 1,
                    op, ": weight has shape ", shape_str(weight.sizes()), ", expected (", C,
                    ", 1, k, k) for x with ", C, " channels");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ",
                   dtype_str(weight.scalar_type()), ", expected ", dtype_str(x.scalar_type()), " like x");
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight is on ", weight.device(), ", expected ",
                    x.device(), " like x");
  TORCH_CHECK_VALUE(stride >= 1, op, ": stride is ", stride, ", expected >= 1");
  TORCH_CHECK_VALUE(dilation >= 1, op, ": dilation is ", dilation, ", expected >= 1");
  TORCH_CHECK_VALUE(padding >= 0, op, ": padding is ", padding, ", expected >= 0");
  Geometry g{x.size(0), C, x.size(2), x.size(3), weight.size(2), stride, padding, dilation, 0, 0};
  const int64_t span = dilation * (g.k - 1) + 1;
  g.Ho = (g.H + 2 * padding - span) / stride + 1;
  g.Wo = (g.W + 2 * padding - span) / stride + 1;
  TORCH_CHECK_VALUE(g.H + 2 * padding >= span && g.W + 2 * padding >= span, op, ": x has shape ",
                    shape_str(x.sizes()), ", too small for a ", g.k, "x", g.k, " kernel with dilation ",
                    dilation, " and padding ", padding);
  g.finish();
  return g;
}

// Planes per parallel task: enough work (~32K multiply-adds) to be worth a task.
int64_t plane_grain(const Geometry& g) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.grid * g.k * g.k));
}

// Copy one input plane [H, W] into the zeroed phase buffer.
template <typename scalar_t, typename acc_t>
void scatter_plane(const Geometry& g, const scalar_t* x, acc_t* phases) {
  std::fill(phases, phases + g.stride * g.stride * g.phase_size, acc_t(0));
  const int64_t s = g.stride;
  g.for_each_run([&](int64_t po, int64_t xo, int64_t len) {
    for (int64_t t = 0; t < len; ++t) {
      phases[po + t] = static_cast<acc_t>(x[xo + t * s]);
    }
  });
}

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* w, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kk = g.k * g.k;
  at::parallel_for(0, g.B * g.C, plane_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> phases(g.stride * g.stride * g.phase_size);
    std::vector<acc_t> acc(g.grid);
    for (int64_t plane = begin; plane < end; ++plane) {
      scatter_plane(g, x + plane * g.H * g.W, phases.data());
      const acc_t* wp = w + (plane % g.C) * kk;
      for (int64_t n0 = 0; n0 < g.grid; n0 += kBlock) {
        acc_t a[kBlock] = {};
        for (int64_t t = 0; t < kk; ++t) {
          const acc_t wv = wp[t];
          const acc_t* __restrict__ src = phases.data() + g.taps[t] + n0;
          for (int64_t l = 0; l < kBlock; ++l) {
            a[l] += wv * src[l];
          }
        }
        std::copy_n(a, kBlock, acc.data() + n0);
      }
      scalar_t* op = out + plane * g.Ho * g.Wo;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          op[oh * g.Wo + ow] = static_cast<scalar_t>(acc[oh * g.Wq + ow]);
        }
      }
    }
  });
}

// grad_x (when gx is not null) and per-plane weight-gradient partial sums [B * C, k * k] (when gw_planes is not
// null), in one pass over grad and x. The output gradient is laid out on the grid with zeros in the thrown-away
// columns, so that it adds nothing there: grad_weight[i, j] is one dot product per tap, and grad_x is the
// forward's loops run backwards (each tap adds w * grad into the phase buffer of the padded input gradient).
template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* grad, const scalar_t* x, const at::opmath_type<scalar_t>* w,
                     scalar_t* gx, at::opmath_type<scalar_t>* gw_planes) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kk = g.k * g.k;
  const int64_t phases_size = g.stride * g.stride * g.phase_size;
  at::parallel_for(0, g.B * g.C, plane_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_phases(gw_planes ? phases_size : 0);
    std::vector<acc_t> gx_phases(gx ? phases_size : 0);
    std::vector<acc_t> go(g.grid, acc_t(0));  // the zeros past Wo are never overwritten
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* gp = grad + plane * g.Ho * g.Wo;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          go[oh * g.Wq + ow] = static_cast<acc_t>(gp[oh * g.Wo + ow]);
        }
      }
      const acc_t* __restrict__ gr = go.data();
      if (gw_planes) {
        scatter_plane(g, x + plane * g.H * g.W, x_phases.data());
        acc_t* gwp = gw_planes + plane * kk;
        for (int64_t t = 0; t < kk; ++t) {
          const acc_t* __restrict__ src = x_phases.data() + g.taps[t];
          acc_t lanes[kBlock] = {};  // independent partial sums: the reduction vectorises
          for (int64_t n0 = 0; n0 < g.grid; n0 += kBlock) {
            for (int64_t l = 0; l < kBlock; ++l) {
              lanes[l] += gr[n0 + l] * src[n0 + l];
            }
          }
          gwp[t] = std::accumulate(lanes, lanes + kBlock, acc_t(0));
        }
      }
      if (gx) {
        std::fill(gx_phases.begin(), gx_phases.end(), acc_t(0));
        const acc_t* wp = w + (plane % g.C) * kk;
        for (int64_t t = 0; t < kk; ++t) {
          const acc_t wv = wp[t];
          acc_t* __restrict__ dst = gx_phases.data() + g.taps[t];
          for (int64_t n = 0; n < g.grid; ++n) {
            dst[n] += wv * gr[n];
          }
        }
        scalar_t* gxp = gx + plane * g.H * g.W;
        const int64_t s = g.stride;
        g.for_each_run([&](int64_t po, int64_t xo, int64_t len) {
          for (int64_t t = 0; t < len; ++t) {
            gxp[xo + t * s] = static_cast<scalar_t>(gx_phases[po + t]);
          }
        });
      }
    }
  });
}

at::Tensor depthwise_conv_cpu(const at::Tensor& x_in, const at::Tensor& weight, int64_t stride, int64_t padding,
                              int64_t dilation) {
  const Geometry g = check_inputs("depthwise_conv", x_in, weight, stride, padding, dilation);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor w = weight.to(at::toOpMathType(x.scalar_type())).contiguous();
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
  const int64_t kk = g.k * g.k;
  at::Tensor grad_x = output_mask[0] ? at::empty_like(x) : at::Tensor();
  at::Tensor gw_planes = output_mask[1] ? at::empty({g.B, g.C, kk}, x.options().dtype(acc_dtype)) : at::Tensor();
  // Always run: every plane writes its weight-gradient partial sums, even a plane with no pixels (H = 0).
  const at::Tensor w = weight.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t>(g, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<acc_t>(), output_mask[0] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                              output_mask[1] ? gw_planes.mutable_data_ptr<acc_t>() : nullptr);
  });
  at::Tensor grad_weight;
  if (output_mask[1]) {
    grad_weight = at::zeros({g.C, 1, g.k, g.k}, gw_planes.options());
    AT_DISPATCH_FLOATING_TYPES(gw_planes.scalar_type(), "depthwise_conv_grad_weight_cpu", [&] {
      const scalar_t* planes = gw_planes.const_data_ptr<scalar_t>();
      scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
      for (int64_t b = 0; b < g.B; ++b) {  // the batch sum in a fixed order
        for (int64_t e = 0; e < g.C * kk; ++e) {
          gw[e] += planes[b * g.C * kk + e];
        }
      }
    });
    grad_weight = grad_weight.to(weight.scalar_type());
  }
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts_C, CPU, m) {
  m.impl("depthwise_conv", &depthwise_conv_cpu);
  m.impl("depthwise_conv_backward", &depthwise_conv_backward_cpu);
}

}  // namespace fastdarts
