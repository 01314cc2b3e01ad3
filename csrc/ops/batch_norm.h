// The BatchNorm passes of the fused candidate ops (csrc/ops/dil_conv.cpp, csrc/ops/pool_bn.cpp) over a
// contiguous [B, C, N] tensor p in the accumulation type T: forward y = (p - mean) * invstd * weight + bias with
// the batch statistics (training) or the running ones, and its backward. As F.batch_norm: the running statistics
// move by momentum towards the batch mean and the unbiased batch variance. Every reduction is summed per row
// (b, c), then over the batch in a fixed order (rows shorter than a block: per channel straight down the batch):
// bitwise the same for any thread count.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <optional>
#include <vector>

#include "ops/common.h"
#include "ops/depthwise_conv.h"

namespace fastdarts {
namespace bn {

using depthwise::kBlock;

// sum_{n < len} f(n), in kBlock independent partial sums (so that it vectorises), added up in a fixed order.
template <typename T, typename F>
inline T lane_sum(int64_t len, F f) {
  T lanes[kBlock] = {};
  int64_t n = 0;
  for (; n + kBlock <= len; n += kBlock) {
    for (int64_t l = 0; l < kBlock; ++l) {
      lanes[l] += f(n + l);
    }
  }
  T tail = 0;
  for (; n < len; ++n) {
    tail += f(n);
  }
  return depthwise::sum_block(lanes) + tail;
}

// The channel of row r + 1 from that of row r (rows are (b, c), c fastest): no division per row, which on tiny
// planes (one to four values a row) costs more than the row's arithmetic.
inline int64_t next_channel(int64_t c, int64_t C) {
  return c + 1 == C ? 0 : c + 1;
}

// Rows per parallel task: about 16K multiply-adds each.
inline int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_row));
}

// Checks an optional [C] parameter or statistic.
inline void check_channels(const char* op, const at::Tensor& t, const char* name, int64_t C, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, op, ": ", name, " has shape ", shape_str(t.sizes()),
                    ", expected (", C, ",) for ", C, " output channels");
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected ", x.device(),
                    " like x");
}

// The running statistics (both or neither, [C]), eval mode having them, training having more than one value per
// channel (B * Ho * Wo), eps > 0.
inline void check_stats(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                        const std::optional<at::Tensor>& running_var, int64_t B, int64_t C, int64_t Ho, int64_t Wo,
                        bool training, double eps) {
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(), op,
                    ": running_mean and running_var must be given together or both be None");
  if (running_mean) {
    check_channels(op, *running_mean, "running_mean", C, x);
    check_channels(op, *running_var, "running_var", C, x);
  }
  TORCH_CHECK_VALUE(training || running_mean, op,
                    ": training is False but running_mean and running_var are None: eval mode normalises with them");
  TORCH_CHECK_VALUE(!training || B * Ho * Wo > 1, op, ": the BatchNorm input has shape (", B, ", ", C, ", ", Ho,
                    ", ", Wo, "), expected more than one value per channel to compute batch statistics");
  TORCH_CHECK_VALUE(eps > 0, op, ": eps is ", eps, ", expected > 0");
}

// (1 - momentum) * running + momentum * batch, in the dtype of running (computed in double).
inline at::Tensor moved_towards(const at::Tensor& running, const std::vector<double>& batch, double momentum) {
  const at::Tensor old = running.contiguous();
  at::Tensor moved = at::empty_like(old);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, old.scalar_type(), "batch_norm_running", [&] {
    const scalar_t* o = old.const_data_ptr<scalar_t>();
    scalar_t* m = moved.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < batch.size(); ++c) {
      m[c] = static_cast<scalar_t>((1 - momentum) * static_cast<double>(o[c]) + momentum * batch[c]);
    }
  });
  return moved;
}

// What the forward produces besides y: mean and invstd [C] (kept for the backward) and, when training with
// running statistics, their new values (empty otherwise).
struct Stats {
  at::Tensor mean, invstd, new_mean, new_var;
};

// Per channel of p [B, C, N]: the batch mean and M2 (the sum of squared deviations from it), in double.
struct Moments {
  std::vector<double> mean, m2;
};

// Rows shorter than a block (planes of fewer than 16 values, where a row's own set-up costs more than its values):
// per channel straight down the batch, mean then M2. Channels are split between the threads, each summed over b in
// order: the same for any thread count.
template <typename T>
Moments short_row_moments(const T* p, int64_t B, int64_t C, int64_t N) {
  Moments mo{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  const double count = static_cast<double>(B * N);
  fastdarts::parallel_for(0, C, row_grain(2 * B * N), [&](int64_t c0, int64_t c1) {
    for (int64_t b = 0; b < B; ++b) {
      const T* block = p + b * C * N;
      for (int64_t c = c0; c < c1; ++c) {
        double row = 0;
        for (int64_t n = 0; n < N; ++n) {
          row += block[c * N + n];
        }
        mo.mean[c] += row;
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      mo.mean[c] /= count;
    }
    for (int64_t b = 0; b < B; ++b) {
      const T* block = p + b * C * N;
      for (int64_t c = c0; c < c1; ++c) {
        double row = 0;
        for (int64_t n = 0; n < N; ++n) {
          const double d = block[c * N + n] - mo.mean[c];
          row += d * d;
        }
        mo.m2[c] += row;
      }
    }
  });
  return mo;
}

// Longer rows: per row (b, c) in lanes, mean then M2, then Chan et al.'s merge of the equal-sized rows over the
// batch (mean of the means; M2 = sum of M2 + N * sum (mean_b - mean)^2), in a fixed order.
template <typename T>
Moments row_moments(const T* p, int64_t B, int64_t C, int64_t N) {
  std::vector<T> row_mean(B * C), row_m2(B * C);
  fastdarts::parallel_for(0, B * C, row_grain(2 * N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = p + r * N;
      const T mu = lane_sum<T>(N, [&](int64_t n) { return row[n]; }) / static_cast<T>(N);
      row_mean[r] = mu;
      row_m2[r] = lane_sum<T>(N, [&](int64_t n) { return (row[n] - mu) * (row[n] - mu); });
    }
  });
  Moments mo{std::vector<double>(C), std::vector<double>(C)};
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t b = 0; b < B; ++b) {
      sum += row_mean[b * C + c];
    }
    const double mu = sum / B;
    double m2 = 0;
    for (int64_t b = 0; b < B; ++b) {
      const double dev = row_mean[b * C + c] - mu;
      m2 += row_m2[b * C + c] + N * dev * dev;
    }
    mo.mean[c] = mu;
    mo.m2[c] = m2;
  }
  return mo;
}

// y = BatchNorm(p) for p, y: [B, C, N] contiguous in T (acc_options' dtype).
template <typename T>
Stats forward(const T* p, T* y, int64_t B, int64_t C, int64_t N, const std::optional<at::Tensor>& weight,
              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
              const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
              const at::TensorOptions& acc_options) {
  Stats s{at::empty({C}, acc_options), at::empty({C}, acc_options), at::empty({0}, acc_options),
          at::empty({0}, acc_options)};
  T* m = s.mean.mutable_data_ptr<T>();
  T* is = s.invstd.mutable_data_ptr<T>();
  if (training) {
    Moments mo = N < kBlock ? short_row_moments(p, B, C, N) : row_moments(p, B, C, N);
    const double count = static_cast<double>(B * N);
    for (int64_t c = 0; c < C; ++c) {
      m[c] = static_cast<T>(mo.mean[c]);
      is[c] = static_cast<T>(1.0 / std::sqrt(mo.m2[c] / count + eps));
      mo.m2[c] /= count - 1;  // the unbiased variance, for the running statistics
    }
    if (running_mean) {
      s.new_mean = moved_towards(*running_mean, mo.mean, momentum);
      s.new_var = moved_towards(*running_var, mo.m2, momentum);
    }
  } else {
    const at::Tensor rm = as_contiguous(*running_mean, acc_options.dtype().toScalarType());
    const at::Tensor rv = as_contiguous(*running_var, acc_options.dtype().toScalarType());
    for (int64_t c = 0; c < C; ++c) {
      m[c] = rm.const_data_ptr<T>()[c];
      is[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(rv.const_data_ptr<T>()[c]) + eps));
    }
  }
  std::vector<T> scale(C), shift(C);  // y = p * scale + shift per channel
  const at::ScalarType acc = acc_options.dtype().toScalarType();
  const at::Tensor w = weight ? as_contiguous(*weight, acc) : at::Tensor();
  const at::Tensor b = bias ? as_contiguous(*bias, acc) : at::Tensor();
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = is[c] * (weight ? w.const_data_ptr<T>()[c] : T(1));
    shift[c] = (bias ? b.const_data_ptr<T>()[c] : T(0)) - m[c] * scale[c];
  }
  fastdarts::parallel_for(0, B * C, row_grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin, c = begin % C; r < end; ++r, c = next_channel(c, C)) {
      const T a = scale[c], sh = shift[c];
      for (int64_t n = 0; n < N; ++n) {
        y[r * N + n] = p[r * N + n] * a + sh;
      }
    }
  });
  return s;
}

// The backward of forward() at gradient g [B, C, N]: grad_p (when gp is not null) = weight * invstd * (g -
// sum(g) / M - xhat * sum(g * xhat) / M) with batch statistics (M = B * N), weight * invstd * g with running ones;
// grad_weight = sum(g * xhat) and grad_bias = sum(g) (when not null), xhat = (p - mean) * invstd.
template <typename T>
void backward(const T* g, const T* p, const T* m, const T* is, const std::optional<at::Tensor>& weight, int64_t B,
              int64_t C, int64_t N, bool training, T* gp, T* grad_weight, T* grad_bias) {
  std::vector<T> sum_g(C, T(0)), sum_gxhat(C, T(0));
  if (N < kBlock) {  // short rows: per channel straight down the batch, channels split between the threads
    fastdarts::parallel_for(0, C, row_grain(2 * B * N), [&](int64_t c0, int64_t c1) {
      for (int64_t b = 0; b < B; ++b) {
        const T* gb = g + b * C * N;
        const T* pb = p + b * C * N;
        for (int64_t c = c0; c < c1; ++c) {
          T row_g = 0, row_gx = 0;
          for (int64_t n = 0; n < N; ++n) {
            row_g += gb[c * N + n];
            row_gx += gb[c * N + n] * (pb[c * N + n] - m[c]);
          }
          sum_g[c] += row_g;
          sum_gxhat[c] += row_gx * is[c];
        }
      }
    });
  } else {
    std::vector<T> row_g(B * C), row_gx(B * C);
    fastdarts::parallel_for(0, B * C, row_grain(2 * N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin, c = begin % C; r < end; ++r, c = next_channel(c, C)) {
        const T* gr = g + r * N;
        const T* pr = p + r * N;
        const T mu = m[c];
        row_g[r] = lane_sum<T>(N, [&](int64_t n) { return gr[n]; });
        row_gx[r] = lane_sum<T>(N, [&](int64_t n) { return gr[n] * (pr[n] - mu); }) * is[c];
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        sum_g[c] += row_g[b * C + c];
        sum_gxhat[c] += row_gx[b * C + c];
      }
    }
  }
  if (grad_weight) {
    std::copy(sum_gxhat.begin(), sum_gxhat.end(), grad_weight);
  }
  if (grad_bias) {
    std::copy(sum_g.begin(), sum_g.end(), grad_bias);
  }
  if (!gp) {
    return;
  }
  const at::Tensor w = weight ? as_contiguous(*weight, c10::CppTypeToScalarType<T>::value) : at::Tensor();
  std::vector<T> a(C), c0(C), k(C);
  const T M = static_cast<T>(B * N);
  for (int64_t c = 0; c < C; ++c) {
    a[c] = (weight ? w.const_data_ptr<T>()[c] : T(1)) * is[c];
    c0[c] = training ? sum_g[c] / M : T(0);
    k[c] = training ? sum_gxhat[c] / M * is[c] : T(0);  // times (p - mean) gives xhat * sum(g * xhat) / M
  }
  fastdarts::parallel_for(0, B * C, row_grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin, c = begin % C; r < end; ++r, c = next_channel(c, C)) {
      const T ac = a[c], cc = c0[c], kc = k[c], mu = m[c];
      for (int64_t n = 0; n < N; ++n) {
        gp[r * N + n] = ac * (g[r * N + n] - cc - (p[r * N + n] - mu) * kc);
      }
    }
  });
}

}  // namespace bn
}  // namespace fastdarts
