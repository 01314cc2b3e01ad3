// CPU kernels of pool_bn, DARTS' pooling candidates: a 3x3 max or average pool (padding 1, stride 1 or 2; the
// average counts only the pixels inside the image) followed by a BatchNorm without affine, in one call each way.
// At DARTS' sizes ATen's max pool is a scalar loop (2.4 ms for a 16x16x32x32 CIFAR cell state on this project's
// CPU) and each step of the eager chain pays its own set-up. Here each plane is copied once into a padded buffer
// (-inf or 0 around it), so that every one of the 9 taps is a branch-free loop along an output row; the max pool
// records which tap won (the first maximum in row-major tap order, NaN winning, as ATen), so that its backward is a
// scatter. Computed in at::opmath_type; the BatchNorm passes are those of csrc/ops/batch_norm.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>
#include <vector>

#include "ops/batch_norm.h"
#include "ops/common.h"

namespace fastdarts {
namespace {

struct PoolGeometry {
  int64_t B, C, H, W, stride, Ho, Wo;
  int64_t Hp() const { return H + 2; }  // the padded plane
  int64_t Wp() const { return W + 2; }
  int64_t N() const { return Ho * Wo; }
};

// Taps of the window of output o (row or column) that fall inside [0, size): [lo, hi) in 0..3.
inline std::pair<int64_t, int64_t> valid_taps(int64_t o, int64_t stride, int64_t size) {
  const int64_t first = o * stride - 1;
  return {first < 0 ? -first : 0, std::min<int64_t>(3, size - first)};
}

PoolGeometry check_pool(const char* op, const at::Tensor& x, int64_t stride) {
  check_image(op, x);
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, op, ": stride is ", stride, ", expected 1 or 2");
  TORCH_CHECK_VALUE(x.size(2) >= 1 && x.size(3) >= 1, op, ": x has shape ", shape_str(x.sizes()),
                    ", expected H and W >= 1");
  const int64_t H = x.size(2), W = x.size(3);
  return {x.size(0), x.size(1), H, W, stride, (H - 1) / stride + 1, (W - 1) / stride + 1};
}

// p = pool(x) for the planes [begin, end); with is_max, also the winning tap (0..8) of each output in taps.
// The stride is a template argument so that the row loops have a constant step (stride 1 vectorises).
template <int64_t s, typename T>
void pool_planes(const PoolGeometry& g, bool is_max, const T* x, T* p, int32_t* taps, int64_t begin, int64_t end) {
  const int64_t Hp = g.Hp(), Wp = g.Wp();
  const T pad = is_max ? -std::numeric_limits<T>::infinity() : T(0);
  std::vector<T> plane(Hp * Wp), acc(g.Wo), col_count(g.Wo);
  std::vector<int32_t> win(g.Wo), col_first(g.Wo);
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    const auto [lo, hi] = valid_taps(ow, s, g.W);
    col_count[ow] = static_cast<T>(hi - lo);
    col_first[ow] = static_cast<int32_t>(lo);
  }
  for (int64_t pl = begin; pl < end; ++pl) {
    std::fill(plane.begin(), plane.end(), pad);
    const T* xp = x + pl * g.H * g.W;
    for (int64_t h = 0; h < g.H; ++h) {
      std::copy_n(xp + h * g.W, g.W, plane.data() + (h + 1) * Wp + 1);
    }
    T* pp = p + pl * g.N();
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const auto [row_lo, row_hi] = valid_taps(oh, s, g.H);
      T* __restrict__ a = acc.data();
      int32_t* __restrict__ w = win.data();
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        a[ow] = pad;
        w[ow] = static_cast<int32_t>(row_lo * 3) + col_first[ow];  // ATen's index when nothing beats -inf
      }
      for (int64_t i = 0; i < 3; ++i) {
        const T* row = plane.data() + (oh * s + i) * Wp;
        for (int64_t j = 0; j < 3; ++j) {
          const T* __restrict__ src = row + j;
          if (is_max) {
            const int32_t t = static_cast<int32_t>(i * 3 + j);
            for (int64_t ow = 0; ow < g.Wo; ++ow) {
              const T v = src[ow * s];
              const bool take = v > a[ow] || v != v;
              a[ow] = take ? v : a[ow];
              w[ow] = take ? t : w[ow];
            }
          } else {
            for (int64_t ow = 0; ow < g.Wo; ++ow) {
              a[ow] += src[ow * s];
            }
          }
        }
      }
      if (is_max) {
        std::copy_n(a, g.Wo, pp + oh * g.Wo);
        std::copy_n(w, g.Wo, taps + pl * g.N() + oh * g.Wo);
      } else {
        const T rows = static_cast<T>(row_hi - row_lo);
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          pp[oh * g.Wo + ow] = a[ow] / (rows * col_count[ow]);
        }
      }
    }
  }
}

// grad_x of the pool for the planes [begin, end), from grad_p. Max: each output's gradient goes to its winning
// tap. Average: the gradient scaled by 1 / count is spread over each window in two gathers, along the row (into a
// padded row R) and then down the columns, so that no loop adds into memory that it has just written.
template <int64_t s, typename T>
void pool_backward_planes(const PoolGeometry& g, bool is_max, const T* gp, const int32_t* taps, T* gx,
                          int64_t begin, int64_t end) {
  const int64_t Wp = g.Wp();
  std::vector<T> plane(g.Hp() * Wp), rows(is_max ? 0 : g.Ho * Wp), scaled(g.Wo + 4), col_count(g.Wo);
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    const auto [lo, hi] = valid_taps(ow, s, g.W);
    col_count[ow] = static_cast<T>(hi - lo);
  }
  for (int64_t pl = begin; pl < end; ++pl) {
    std::fill(plane.begin(), plane.end(), T(0));
    const T* gr = gp + pl * g.N();
    if (is_max) {
      const int32_t* t = taps + pl * g.N();
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          const int32_t tap = t[oh * g.Wo + ow];
          plane[(oh * s + tap / 3) * Wp + ow * s + tap % 3] += gr[oh * g.Wo + ow];
        }
      }
    } else {
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const auto [row_lo, row_hi] = valid_taps(oh, s, g.H);
        const T n_rows = static_cast<T>(row_hi - row_lo);
        T* sc = scaled.data() + 2;  // two zeros on either side
        for (int64_t ow = 0; ow < g.Wo; ++ow) {
          sc[ow] = gr[oh * g.Wo + ow] / (n_rows * col_count[ow]);
        }
        T* r = rows.data() + oh * Wp;  // r[c] = sum of sc[ow] over the windows (ow * s .. ow * s + 2) holding c
        if (s == 1) {
          for (int64_t c = 0; c < Wp; ++c) {
            r[c] = sc[c - 2] + sc[c - 1] + sc[c];
          }
        } else {
          for (int64_t k = 0; 2 * k < Wp; ++k) {
            r[2 * k] = sc[k] + sc[k - 1];
            if (2 * k + 1 < Wp) {
              r[2 * k + 1] = sc[k];
            }
          }
        }
      }
      for (int64_t hp = 0; hp < g.Hp(); ++hp) {  // padded row hp collects rows oh with oh * s <= hp <= oh * s + 2
        T* __restrict__ dst = plane.data() + hp * Wp;
        for (int64_t oh = std::max<int64_t>(0, (hp - 2 + s - 1) / s); oh <= std::min(g.Ho - 1, hp / s); ++oh) {
          const T* __restrict__ r = rows.data() + oh * Wp;
          for (int64_t c = 0; c < Wp; ++c) {
            dst[c] += r[c];
          }
        }
      }
    }
    T* gxp = gx + pl * g.H * g.W;  // the padding ring collected what falls outside: dropped
    for (int64_t h = 0; h < g.H; ++h) {
      std::copy_n(plane.data() + (h + 1) * Wp + 1, g.W, gxp + h * g.W);
    }
  }
}

inline int64_t plane_grain(const PoolGeometry& g) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 9 * g.N()));
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs pool_bn_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& running_mean,
                    const std::optional<at::Tensor>& running_var, bool is_max, int64_t stride, bool training,
                    double momentum, double eps) {
  const char* op = "pool_bn";
  const PoolGeometry g = check_pool(op, x_in, stride);
  bn::check_stats(op, x_in, running_mean, running_var, g.B, g.C, g.Ho, g.Wo, training, eps);
  const at::ScalarType acc = at::toOpMathType(x_in.scalar_type());
  const at::TensorOptions acc_options = x_in.options().dtype(acc);
  const at::Tensor x = as_contiguous(x_in, acc);
  at::Tensor p = at::empty({g.B, g.C, g.Ho, g.Wo}, acc_options);
  at::Tensor y = at::empty({g.B, g.C, g.Ho, g.Wo}, acc_options);
  at::Tensor taps = at::empty({is_max ? g.B : 0, g.C, g.Ho, g.Wo}, x_in.options().dtype(at::kInt));
  bn::Stats stats;
  AT_DISPATCH_FLOATING_TYPES(acc, "pool_bn_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    T* pp = p.mutable_data_ptr<T>();
    int32_t* tp = is_max ? taps.mutable_data_ptr<int32_t>() : nullptr;
    fastdarts::parallel_for(0, g.B * g.C, plane_grain(g), [&](int64_t begin, int64_t end) {
      if (stride == 1) {
        pool_planes<1, T>(g, is_max, xp, pp, tp, begin, end);
      } else {
        pool_planes<2, T>(g, is_max, xp, pp, tp, begin, end);
      }
    });
    const bool with_stats = running_mean.has_value();
    stats = bn::forward<T>(pp, y.mutable_data_ptr<T>(), g.B, g.C, g.N(), std::nullopt, std::nullopt,
                           with_stats ? running_mean : std::nullopt, with_stats ? running_var : std::nullopt,
                           training, momentum, eps, acc_options);
  });
  return {as_dtype(y, x_in.scalar_type()), p, taps, stats.mean, stats.invstd, stats.new_mean, stats.new_var};
}

at::Tensor pool_bn_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& p_in,
                                const at::Tensor& taps_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                bool is_max, int64_t stride, bool training) {
  const char* op = "pool_bn_backward";
  const PoolGeometry g = check_pool(op, x_in, stride);
  const at::ScalarType acc = at::toOpMathType(x_in.scalar_type());
  const std::array<int64_t, 4> out_shape{g.B, g.C, g.Ho, g.Wo};
  auto check = [&](const at::Tensor& t, const char* name, c10::IntArrayRef shape, at::ScalarType dtype) {
    TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " has shape ", shape_str(t.sizes()), ", expected ",
                      shape_str(shape));
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " has dtype ", dtype_str(t.scalar_type()),
                     ", expected ", dtype_str(dtype));
    TORCH_CHECK_VALUE(t.device() == x_in.device(), op, ": ", name, " is on ", t.device(), ", expected ",
                      x_in.device(), " like x");
  };
  check(grad_in, "grad", out_shape, x_in.scalar_type());
  check(p_in, "p", out_shape, acc);
  if (is_max) {
    check(taps_in, "taps", out_shape, at::kInt);
  }
  check(mean_in, "mean", {g.C}, acc);
  check(invstd_in, "invstd", {g.C}, acc);
  const at::TensorOptions acc_options = x_in.options().dtype(acc);
  const at::Tensor grad = as_contiguous(grad_in, acc), p = p_in.contiguous(), taps = taps_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  at::Tensor gx = at::empty({g.B, g.C, g.H, g.W}, acc_options);
  AT_DISPATCH_FLOATING_TYPES(acc, "pool_bn_backward_cpu", [&] {
    using T = scalar_t;
    at::Tensor gp = at::empty({g.B, g.C, g.Ho, g.Wo}, acc_options);
    bn::backward<T>(grad.const_data_ptr<T>(), p.const_data_ptr<T>(), mean.const_data_ptr<T>(),
                    invstd.const_data_ptr<T>(), std::nullopt, g.B, g.C, g.N(), training, gp.mutable_data_ptr<T>(),
                    nullptr, nullptr);
    const T* gpp = gp.const_data_ptr<T>();
    const int32_t* tp = is_max ? taps.const_data_ptr<int32_t>() : nullptr;
    T* gxp = gx.mutable_data_ptr<T>();
    fastdarts::parallel_for(0, g.B * g.C, plane_grain(g), [&](int64_t begin, int64_t end) {
      if (stride == 1) {
        pool_backward_planes<1, T>(g, is_max, gpp, tp, gxp, begin, end);
      } else {
        pool_backward_planes<2, T>(g, is_max, gpp, tp, gxp, begin, end);
      }
    });
  });
  return as_dtype(gx, x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts_C, CPU, m) {
  m.impl("pool_bn", &pool_bn_cpu);
  m.impl("pool_bn_backward", &pool_bn_backward_cpu);
}

}  // namespace fastdarts
