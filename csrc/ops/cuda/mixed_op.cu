// CUDA kernels of mixed_op, the DARTS softmax-weighted sum of candidate outputs:
//   forward:  out = sum_k weights[k] * xs[k]
//   backward: grad_xs[k] = weights[k] * grad,  grad_weights[k] = <grad, xs[k]>
// Up to kMaxK input pointers travel by value in a struct. Grid-stride loops move 16 bytes per load/store when
// every pointer is 16-byte aligned. The backward's dot products are reduced per block (fp32 accumulation, fp64
// for fp64) into a [num_blocks, K] buffer, then summed by a second tiny kernel in a fixed order: deterministic,
// no floating-point atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "ops/mixed_op.h"

namespace fastdarts {
namespace {

constexpr int kMaxK = 16;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct PtrArray {
  T* p[kMaxK];
};

// kVec elements moved by one 16-byte (or smaller, for kVec == 1) load or store.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load(const T* base, int64_t i) {
  return reinterpret_cast<const Pack<T, kVec>*>(base)[i];
}

template <typename T, int kVec>
__device__ __forceinline__ void store(T* base, int64_t i, const Pack<T, kVec>& value) {
  reinterpret_cast<Pack<T, kVec>*>(base)[i] = value;
}

// out[i] = sum_k w[k] * xs[k][i] over packs i < n / kVec; the n % kVec tail elements are done one by one.
template <typename scalar_t, int kVec>
__global__ void mixed_op_forward_kernel(PtrArray<const scalar_t> xs, const at::opmath_type<scalar_t>* w, int K,
                                        scalar_t* out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t wk[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    wk[k] = k < K ? w[k] : acc_t(0);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / kVec;
  for (int64_t i = tid; i < packs; i += stride) {
    acc_t acc[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      acc[v] = acc_t(0);
    }
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k < K) {
        const Pack<scalar_t, kVec> x = load<scalar_t, kVec>(xs.p[k], i);
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          acc[v] += wk[k] * static_cast<acc_t>(x.v[v]);
        }
      }
    }
    Pack<scalar_t, kVec> o;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      o.v[v] = static_cast<scalar_t>(acc[v]);
    }
    store<scalar_t, kVec>(out, i, o);
  }
  for (int64_t i = packs * kVec + tid; i < n; i += stride) {
    acc_t acc = acc_t(0);
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k < K) {
        acc += wk[k] * static_cast<acc_t>(xs.p[k][i]);
      }
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// grad_xs[k][i] = w[k] * grad[i], and this block's share of <grad, xs[k]> into partials[blockIdx.x * K + k].
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads) mixed_op_backward_kernel(
    const scalar_t* grad, PtrArray<const scalar_t> xs, const at::opmath_type<scalar_t>* w, int K,
    PtrArray<scalar_t> grad_xs, at::opmath_type<scalar_t>* partials, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t wk[kMaxK];
  acc_t dot[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    wk[k] = k < K ? w[k] : acc_t(0);
    dot[k] = acc_t(0);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / kVec;
  for (int64_t i = tid; i < packs; i += stride) {
    const Pack<scalar_t, kVec> gp = load<scalar_t, kVec>(grad, i);
    acc_t g[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      g[v] = static_cast<acc_t>(gp.v[v]);
    }
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k < K) {
        const Pack<scalar_t, kVec> x = load<scalar_t, kVec>(xs.p[k], i);
        Pack<scalar_t, kVec> gx;
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          gx.v[v] = static_cast<scalar_t>(wk[k] * g[v]);
          dot[k] += g[v] * static_cast<acc_t>(x.v[v]);
        }
        store<scalar_t, kVec>(grad_xs.p[k], i, gx);
      }
    }
  }
  for (int64_t i = packs * kVec + tid; i < n; i += stride) {
    const acc_t g = static_cast<acc_t>(grad[i]);
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k < K) {
        grad_xs.p[k][i] = static_cast<scalar_t>(wk[k] * g);
        dot[k] += g * static_cast<acc_t>(xs.p[k][i]);
      }
    }
  }

  // Block reduction: warp shuffles, then one value per warp in shared memory, summed in warp order.
  __shared__ acc_t warp_dots[kMaxK][kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    if (k < K) {
      const acc_t s = warp_sum(dot[k]);
      if (lane == 0) {
        warp_dots[k][warp] = s;
      }
    }
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < K) {
    acc_t s = acc_t(0);
    for (int i = 0; i < kWarps; ++i) {
      s += warp_dots[threadIdx.x][i];
    }
    partials[static_cast<int64_t>(blockIdx.x) * K + threadIdx.x] = s;
  }
}

// out[k] = sum_b partials[b * K + k]: one block per k, each thread a fixed strided subset, then a fixed tree.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const acc_t* partials, int num_blocks, int K,
                                                                acc_t* out) {
  const int k = blockIdx.x;
  acc_t s = acc_t(0);
  for (int b = threadIdx.x; b < num_blocks; b += blockDim.x) {
    s += partials[static_cast<int64_t>(b) * K + k];
  }
  __shared__ acc_t warp_sums[kWarps];
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) {
    warp_sums[threadIdx.x / 32] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = acc_t(0);
    for (int i = 0; i < kWarps; ++i) {
      total += warp_sums[i];
    }
    out[k] = total;
  }
}

int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// 16-byte packs need every pointer 16-byte aligned.
bool all_aligned(const std::vector<const void*>& ptrs) {
  return std::all_of(ptrs.begin(), ptrs.end(),
                     [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; });
}

int grid_size(int64_t work_items, int device, int blocks_per_sm) {
  const int64_t needed = std::max<int64_t>(1, (work_items + kThreads - 1) / kThreads);
  return static_cast<int>(std::min<int64_t>(needed, static_cast<int64_t>(multiprocessor_count(device)) * blocks_per_sm));
}

void check_k(const char* op, int64_t K) {
  TORCH_CHECK_VALUE(K <= kMaxK, op, ": the CUDA kernel takes at most ", kMaxK, " inputs, got ", K,
                    " (fastdarts.ops.mixed_op falls back to the reference above that)");
}

at::Tensor mixed_op_cuda(at::TensorList xs, const at::Tensor& weights) {
  check_mixed_op_inputs("mixed_op", xs, weights, at::Tensor(), c10::DeviceType::CUDA);
  const int K = static_cast<int>(xs.size());
  check_k("mixed_op", K);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const FlatTensors flat = flat_walkable(xs.vec());
  at::Tensor out = flat.new_output();
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  const at::Tensor w = weights.to(at::toOpMathType(xs[0].scalar_type())).contiguous();  // K numbers, on device
  const int device = xs[0].get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_op_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    PtrArray<const scalar_t> ptrs{};
    std::vector<const void*> all{out.const_data_ptr()};
    for (int k = 0; k < K; ++k) {
      ptrs.p[k] = flat.tensors[k].const_data_ptr<scalar_t>();
      all.push_back(ptrs.p[k]);
    }
    const int blocks = grid_size((n + kVec - 1) / kVec, device, 8);
    if (all_aligned(all)) {
      mixed_op_forward_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(
          ptrs, w.const_data_ptr<acc_t>(), K, out.mutable_data_ptr<scalar_t>(), n);
    } else {
      mixed_op_forward_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(
          ptrs, w.const_data_ptr<acc_t>(), K, out.mutable_data_ptr<scalar_t>(), n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cuda(const at::Tensor& grad, at::TensorList xs,
                                                                       const at::Tensor& weights) {
  check_mixed_op_inputs("mixed_op_backward", xs, weights, grad, c10::DeviceType::CUDA);
  const int K = static_cast<int>(xs.size());
  check_k("mixed_op_backward", K);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  std::vector<at::Tensor> all_inputs = xs.vec();
  all_inputs.push_back(grad);
  const FlatTensors flat = flat_walkable(std::move(all_inputs));  // [xs..., grad]
  std::vector<at::Tensor> grad_xs;
  for (int k = 0; k < K; ++k) {
    grad_xs.push_back(flat.new_output());
  }
  const at::ScalarType acc_dtype = at::toOpMathType(xs[0].scalar_type());
  at::Tensor grad_w = at::empty({K}, weights.options().dtype(acc_dtype));
  const int64_t n = grad.numel();
  if (n == 0) {
    return {grad_xs, grad_w.zero_().to(weights.scalar_type())};
  }
  const at::Tensor w = weights.to(acc_dtype).contiguous();
  const int device = xs[0].get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_op_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    PtrArray<const scalar_t> x_ptrs{};
    PtrArray<scalar_t> gx_ptrs{};
    const scalar_t* g = flat.tensors[K].const_data_ptr<scalar_t>();
    std::vector<const void*> all{g};
    for (int k = 0; k < K; ++k) {
      x_ptrs.p[k] = flat.tensors[k].const_data_ptr<scalar_t>();
      gx_ptrs.p[k] = grad_xs[k].mutable_data_ptr<scalar_t>();
      all.push_back(x_ptrs.p[k]);
      all.push_back(gx_ptrs.p[k]);
    }
    // The grid size depends only on n and the GPU, so the reduction order (and the result) is reproducible.
    const int blocks = grid_size((n + kVec - 1) / kVec, device, 4);
    at::Tensor partials = at::empty({blocks, K}, weights.options().dtype(acc_dtype));
    if (all_aligned(all)) {
      mixed_op_backward_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(
          g, x_ptrs, w.const_data_ptr<acc_t>(), K, gx_ptrs, partials.mutable_data_ptr<acc_t>(), n);
    } else {
      mixed_op_backward_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(
          g, x_ptrs, w.const_data_ptr<acc_t>(), K, gx_ptrs, partials.mutable_data_ptr<acc_t>(), n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials_kernel<acc_t><<<K, kThreads, 0, stream>>>(partials.const_data_ptr<acc_t>(), blocks, K,
                                                           grad_w.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_xs, grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts_C, CUDA, m) {
  m.impl("mixed_op", &mixed_op_cuda);
  m.impl("mixed_op_backward", &mixed_op_backward_cuda);
}

}  // namespace fastdarts
