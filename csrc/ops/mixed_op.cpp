// CPU kernels of mixed_op, the DARTS softmax-weighted sum of candidate outputs:
//   forward:  out = sum_k weights[k] * xs[k]
//   backward: grad_xs[k] = weights[k] * grad,  grad_weights[k] = <grad, xs[k]>
// Both are one pass over memory. The flat index range is cut into fixed chunks run by at::parallel_for; inside a
// chunk, blocks of elements are processed one input at a time so that the inner loops are simple and
// vectorisable and the block's accumulators stay in L1. Accumulation is in at::opmath_type (fp32, fp64 for fp64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "ops/mixed_op.h"

namespace fastdarts {
namespace {

// Block sizes measured on x86 (fp32, K = 7): the forward does not care; the backward, which streams 2K + 1
// arrays, is ~2x faster with 2048-element blocks than with 256 (fewer switches between streams).
constexpr int64_t kForwardBlock = 256;    // elements per inner block of the forward
constexpr int64_t kBackwardBlock = 2048;  // elements per inner block of the backward
constexpr int64_t kChunk = 16384;         // elements per parallel task (a multiple of both blocks)
constexpr int64_t kLanes = 16;            // independent partial sums per dot product: the reduction vectorises

// The chunking is fixed (it does not depend on the number of threads), and per-chunk partial dot products are
// combined in chunk order, so grad_weights is bitwise the same for any thread count.
int64_t num_chunks(int64_t n) {
  return (n + kChunk - 1) / kChunk;
}

template <typename scalar_t>
void forward_kernel(const std::vector<const scalar_t*>& xs, const at::opmath_type<scalar_t>* w, scalar_t* out,
                    int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = static_cast<int64_t>(xs.size());
  at::parallel_for(0, num_chunks(n), 1, [&](int64_t c_begin, int64_t c_end) {
    acc_t acc[kForwardBlock];
    const int64_t end = std::min(n, c_end * kChunk);
    for (int64_t begin = c_begin * kChunk; begin < end; begin += kForwardBlock) {
      const int64_t len = std::min(kForwardBlock, end - begin);
      const scalar_t* __restrict__ x0 = xs[0] + begin;
      const acc_t w0 = w[0];
      for (int64_t j = 0; j < len; ++j) {
        acc[j] = w0 * static_cast<acc_t>(x0[j]);
      }
      for (int64_t k = 1; k < K; ++k) {
        const scalar_t* __restrict__ x = xs[k] + begin;
        const acc_t wk = w[k];
        for (int64_t j = 0; j < len; ++j) {
          acc[j] += wk * static_cast<acc_t>(x[j]);
        }
      }
      scalar_t* __restrict__ o = out + begin;
      for (int64_t j = 0; j < len; ++j) {
        o[j] = static_cast<scalar_t>(acc[j]);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const std::vector<const scalar_t*>& xs,
                     const at::opmath_type<scalar_t>* w, const std::vector<scalar_t*>& grad_xs,
                     at::opmath_type<scalar_t>* grad_w, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = static_cast<int64_t>(xs.size());
  const int64_t chunks = num_chunks(n);
  std::vector<acc_t> partial(chunks * K);  // [chunks, K] dot products of each chunk
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    acc_t g[kBackwardBlock];
    std::vector<acc_t> lanes(K * kLanes);  // [K, kLanes], allocated once per task, reset per chunk
    for (int64_t c = c_begin; c < c_end; ++c) {
      std::fill(lanes.begin(), lanes.end(), acc_t(0));
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t begin = c * kChunk; begin < end; begin += kBackwardBlock) {
        const int64_t len = std::min(kBackwardBlock, end - begin);
        const int64_t full = len / kLanes * kLanes;
        const scalar_t* __restrict__ gb = grad + begin;
        for (int64_t j = 0; j < len; ++j) {
          g[j] = static_cast<acc_t>(gb[j]);
        }
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* __restrict__ x = xs[k] + begin;
          scalar_t* __restrict__ gx = grad_xs[k] + begin;
          const acc_t wk = w[k];
          // A local copy of the partial sums, so that they live in registers rather than in memory that the
          // compiler must assume gx may alias.
          acc_t s[kLanes];
          std::copy_n(lanes.data() + k * kLanes, kLanes, s);
          for (int64_t j = 0; j < full; j += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) {
              const acc_t gv = g[j + l];
              gx[j + l] = static_cast<scalar_t>(wk * gv);
              s[l] += gv * static_cast<acc_t>(x[j + l]);
            }
          }
          for (int64_t j = full; j < len; ++j) {
            gx[j] = static_cast<scalar_t>(wk * g[j]);
            s[j - full] += g[j] * static_cast<acc_t>(x[j]);
          }
          std::copy_n(s, kLanes, lanes.data() + k * kLanes);
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        acc_t sum = 0;
        for (int64_t l = 0; l < kLanes; ++l) {
          sum += lanes[k * kLanes + l];
        }
        partial[c * K + k] = sum;
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    acc_t sum = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      sum += partial[c * K + k];
    }
    grad_w[k] = sum;
  }
}

at::Tensor mixed_op_cpu(at::TensorList xs, const at::Tensor& weights) {
  check_mixed_op_inputs("mixed_op", xs, weights, at::Tensor(), c10::DeviceType::CPU);
  const FlatTensors flat = flat_walkable(xs.vec());
  at::Tensor out = flat.new_output();
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  const at::ScalarType acc_dtype = at::toOpMathType(xs[0].scalar_type());
  const at::Tensor w = as_contiguous(weights, acc_dtype);  // K numbers
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_op_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& x : flat.tensors) {
      ptrs.push_back(x.const_data_ptr<scalar_t>());
    }
    forward_kernel<scalar_t>(ptrs, w.const_data_ptr<at::opmath_type<scalar_t>>(), out.mutable_data_ptr<scalar_t>(),
                             n);
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cpu(const at::Tensor& grad, at::TensorList xs,
                                                                      const at::Tensor& weights) {
  check_mixed_op_inputs("mixed_op_backward", xs, weights, grad, c10::DeviceType::CPU);
  const int64_t K = static_cast<int64_t>(xs.size());
  std::vector<at::Tensor> all = xs.vec();
  all.push_back(grad);
  const FlatTensors flat = flat_walkable(std::move(all));  // [xs..., grad]
  std::vector<at::Tensor> grad_xs;
  for (int64_t k = 0; k < K; ++k) {
    grad_xs.push_back(flat.new_output());
  }
  const at::ScalarType acc_dtype = at::toOpMathType(xs[0].scalar_type());
  at::Tensor grad_w = at::empty({K}, weights.options().dtype(acc_dtype));
  const int64_t n = grad.numel();
  if (n == 0) {
    return {grad_xs, grad_w.zero_().to(weights.scalar_type())};
  }
  const at::Tensor w = as_contiguous(weights, acc_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_op_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> x_ptrs;
    std::vector<scalar_t*> gx_ptrs;
    for (int64_t k = 0; k < K; ++k) {
      x_ptrs.push_back(flat.tensors[k].const_data_ptr<scalar_t>());
      gx_ptrs.push_back(grad_xs[k].mutable_data_ptr<scalar_t>());
    }
    backward_kernel<scalar_t>(flat.tensors[K].const_data_ptr<scalar_t>(), x_ptrs, w.const_data_ptr<acc_t>(),
                              gx_ptrs, grad_w.mutable_data_ptr<acc_t>(), n);
  });
  return {grad_xs, as_dtype(grad_w, weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts_C, CPU, m) {
  m.impl("mixed_op", &mixed_op_cpu);
  m.impl("mixed_op_backward", &mixed_op_backward_cpu);
}

}  // namespace fastdarts
