// CPU kernels of pool_bn, DARTS' pooling candidates: a 3x3 max or average pool (padding 1, stride 1 or 2; the
// average counts only the pixels inside the image) followed by a BatchNorm without affine, in one call each way.
// At DARTS' sizes ATen's max pool is a scalar loop (2.4 ms for a 16x16x32x32 CIFAR cell state on this project's
// CPU) and each step of the eager chain pays its own set-up. Here the planes of a channel are stacked in padded
// phase buffers as the depthwise convolution's (-inf or 0 around them; csrc/ops/depthwise_conv.h), so that each of
// the 9 taps is one branch-free vector loop over the whole stack; the max pool records which tap won (the first
// maximum in row-major tap order, NaN winning, as ATen), so that its backward is a scatter. Computed in
// at::opmath_type; the BatchNorm passes are those of csrc/ops/batch_norm.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>
#include <vector>

#include "ops/batch_norm.h"
#include "ops/common.h"
#include "ops/depthwise_conv.h"

namespace fastdarts {
namespace {

using depthwise::Geometry;

// Taps of the window of output o (row or column) that fall inside [0, size): [lo, hi) in 0..3.
inline std::pair<int64_t, int64_t> valid_taps(int64_t o, int64_t stride, int64_t size) {
  const int64_t first = o * stride - 1;
  return {first < 0 ? -first : 0, std::min<int64_t>(3, size - first)};
}

// The pool's window is a depthwise convolution's (3x3, padding 1, dilation 1): the same stacked, padded phase
// planes (csrc/ops/depthwise_conv.h), padded with -inf for the max and 0 for the average.
Geometry check_pool(const char* op, const at::Tensor& x, int64_t stride) {
  check_image(op, x);
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, op, ": stride is ", stride, ", expected 1 or 2");
  TORCH_CHECK_VALUE(x.size(2) >= 1 && x.size(3) >= 1, op, ": x has shape ", shape_str(x.sizes()),
                    ", expected H and W >= 1");
  const int64_t H = x.size(2), W = x.size(3);
  Geometry g{x.size(0), x.size(1), H, W, 3, stride, 1, 1, (H - 1) / stride + 1, (W - 1) / stride + 1};
  g.finish();
  return g;
}

// The live taps' offsets into the phase buffer and their indices (0..8, row-major in the window).
std::pair<std::vector<int64_t>, std::vector<int32_t>> live_taps(const Geometry& g) {
  std::vector<int64_t> off;
  std::vector<int32_t> id;
  for (const int64_t t : g.live) {
    off.push_back(g.taps[t]);
    id.push_back(static_cast<int32_t>(t));
  }
  return {off, id};
}

// out[m] = max over the taps of src[off[t] + m], win[m] = the first tap holding it (NaN winning, as ATen) or -1 when
// none beats -inf, for m < n (whole kBlock): branch-free, kBlock lanes in vector registers across the taps. The tap
// is kept as a T (0..8 are exact) so that it shares the value's lanes and masks.
template <typename T>
void max_taps(const T* src, const int64_t* off, const int32_t* id, int64_t ntaps, T* out, T* win, int64_t n) {
  typedef T vec __attribute__((vector_size(32)));
  constexpr int64_t L = 32 / sizeof(T), V = depthwise::kBlock / L;
  for (int64_t m = 0; m < n; m += depthwise::kBlock) {
    vec a[V], w[V];
    DARTS_UNROLL for (int64_t v = 0; v < V; ++v) {
      a[v] = vec{} - std::numeric_limits<T>::infinity();
      w[v] = vec{} - T(1);
    }
    for (int64_t t = 0; t < ntaps; ++t) {
      const T* s = src + off[t] + m;
      const vec tap = vec{} + static_cast<T>(id[t]);
      DARTS_UNROLL for (int64_t v = 0; v < V; ++v) {
        vec x;
        __builtin_memcpy(&x, s + v * L, sizeof(vec));
        const auto take = (x > a[v]) | (x != x);
        a[v] = take ? x : a[v];
        w[v] = take ? tap : w[v];
      }
    }
    DARTS_UNROLL for (int64_t v = 0; v < V; ++v) {
      __builtin_memcpy(out + m + v * L, &a[v], sizeof(vec));
      __builtin_memcpy(win + m + v * L, &w[v], sizeof(vec));
    }
  }
}

// Per output position of a plane [Ho * Wo]: the number of window pixels inside the image (the average's divisor)
// and the first of its taps inside the image (the max's index when nothing beats -inf, as ATen).
template <typename T>
std::pair<std::vector<T>, std::vector<int32_t>> window_tables(const Geometry& g) {
  std::vector<T> count(g.Ho * g.Wo);
  std::vector<int32_t> first(g.Ho * g.Wo);
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const auto [row_lo, row_hi] = valid_taps(oh, g.stride, g.H);
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      const auto [col_lo, col_hi] = valid_taps(ow, g.stride, g.W);
      count[oh * g.Wo + ow] = static_cast<T>((row_hi - row_lo) * (col_hi - col_lo));
      first[oh * g.Wo + ow] = static_cast<int32_t>(row_lo * 3 + col_lo);
    }
  }
  return {count, first};
}

// p = pool(x) and, for the max, the winning tap of each output (0..8), for the stacks [begin, end). Each tap is one
// loop over the grid of a stack (depthwise::Geometry); the average is the window's sum over its pixel count.
template <typename T>
void pool_stacks(const Geometry& g, bool is_max, const T* x, T* p, int32_t* taps, int64_t begin, int64_t end) {
  const auto [off, id] = live_taps(g);
  const auto [count, first] = window_tables<T>(g);
  const int64_t nl = static_cast<int64_t>(off.size()), plane_q = g.Hq * g.Wq, N = g.Ho * g.Wo;
  const T pad = is_max ? -std::numeric_limits<T>::infinity() : T(0);
  std::vector<T> phases(g.stride * g.stride * g.phase_size, pad), acc(g.grid), ones(nl, T(1));
  std::vector<T> win(is_max ? g.grid : 0);
  for (int64_t t = begin; t < end; ++t) {
    int64_t b0, n_planes, c;
    g.stack(t, &b0, &n_planes, &c);
    for (int64_t q = 0; q < n_planes; ++q) {
      depthwise::scatter_plane(g, x + ((b0 + q) * g.C + c) * g.H * g.W, phases.data(), q, false);
    }
    if (is_max) {
      max_taps(phases.data(), off.data(), id.data(), nl, acc.data(), win.data(), g.grid);
    } else {
      depthwise::tap_sums(phases.data(), off.data(), ones.data(), nl, acc.data(), 0, g.grid);
    }
    for (int64_t q = 0; q < n_planes; ++q) {
      const int64_t plane = (b0 + q) * g.C + c;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const int64_t o = oh * g.Wo, m = q * plane_q + oh * g.Wq;
        const T* __restrict__ a = acc.data() + m;
        T* __restrict__ pp = p + plane * N + o;
        if (is_max) {
          const T* __restrict__ w = win.data() + m;
          int32_t* __restrict__ tp = taps + plane * N + o;
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            pp[ow] = a[ow];
            tp[ow] = w[ow] >= T(0) ? static_cast<int32_t>(w[ow]) : first[o + ow];
          }
        } else {
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            pp[ow] = a[ow] / count[o + ow];
          }
        }
      }
    }
  }
}

// Tiny planes (depthwise::Geometry::on_lanes): the kBlock samples of a chunk side by side, one vector lane each,
// each output visiting only the taps inside the image (depthwise::LaneTaps). The max starts from -inf and the
// first of those taps, ATen's index when nothing beats -inf.
template <typename T>
void pool_lanes(const Geometry& g, bool is_max, const T* x, T* p, int32_t* taps, int64_t begin, int64_t end) {
  typedef T vec __attribute__((vector_size(32)));
  constexpr int64_t L = 32 / sizeof(T), V = depthwise::kBlock / L, K = depthwise::kBlock;
  const depthwise::LaneTaps lt = depthwise::lane_taps(g);
  const int64_t HW = g.H * g.W, N = g.Ho * g.Wo;
  std::vector<T> in(HW * K), acc(N * K), win(N * K);
  for (int64_t t = begin; t < end; ++t) {
    int64_t b0, count, c;
    g.lane_chunk(t, &b0, &count, &c);
    depthwise::to_lanes<false>(x, g.C, HW, b0, count, c, in.data());
    for (int64_t o = 0; o < N; ++o) {
      vec a[V], w[V];
      DARTS_UNROLL for (int64_t v = 0; v < V; ++v) {
        a[v] = vec{} + (is_max ? -std::numeric_limits<T>::infinity() : T(0));
        w[v] = vec{} + static_cast<T>(lt.tap[lt.start[o]]);
      }
      for (int64_t e = lt.start[o]; e < lt.start[o + 1]; ++e) {
        const T* src = in.data() + lt.pixel[e] * K;
        const vec tap = vec{} + static_cast<T>(lt.tap[e]);
        DARTS_UNROLL for (int64_t v = 0; v < V; ++v) {
          vec xv;
          __builtin_memcpy(&xv, src + v * L, sizeof(vec));
          if (is_max) {
            const auto take = (xv > a[v]) | (xv != xv);
            a[v] = take ? xv : a[v];
            w[v] = take ? tap : w[v];
          } else {
            a[v] += xv;
          }
        }
      }
      const T n_taps = static_cast<T>(lt.start[o + 1] - lt.start[o]);
      DARTS_UNROLL for (int64_t v = 0; v < V; ++v) {
        if (!is_max) {
          a[v] /= n_taps;
        }
        __builtin_memcpy(acc.data() + o * K + v * L, &a[v], sizeof(vec));
        __builtin_memcpy(win.data() + o * K + v * L, &w[v], sizeof(vec));
      }
    }
    const int64_t base = (b0 * g.C + c) * N, step = g.C * N;
    for (int64_t o = 0; o < N; ++o) {
      for (int64_t s = 0; s < count; ++s) {
        p[base + s * step + o] = acc[o * K + s];
        if (is_max) {
          taps[base + s * step + o] = static_cast<int32_t>(win[o * K + s]);
        }
      }
    }
  }
}

// pool_lanes' backward: each output's gradient (over the window's pixel count for the average) added, lane by lane,
// into the input pixels of its taps (for the max, where the tap won), in the order of the outputs.
template <typename T>
void pool_backward_lanes(const Geometry& g, bool is_max, const T* gp, const int32_t* taps, T* gx, int64_t begin,
                         int64_t end) {
  typedef T vec __attribute__((vector_size(32)));
  constexpr int64_t L = 32 / sizeof(T), V = depthwise::kBlock / L, K = depthwise::kBlock;
  const depthwise::LaneTaps lt = depthwise::lane_taps(g);
  const int64_t HW = g.H * g.W, N = g.Ho * g.Wo;
  std::vector<T> go(N * K), tw(is_max ? N * K : 0), gin(HW * K);
  for (int64_t t = begin; t < end; ++t) {
    int64_t b0, count, c;
    g.lane_chunk(t, &b0, &count, &c);
    depthwise::to_lanes<false>(gp, g.C, N, b0, count, c, go.data());  // zero lanes past count
    if (is_max) {
      depthwise::to_lanes<false>(taps, g.C, N, b0, count, c, tw.data());
    }
    std::fill(gin.begin(), gin.end(), T(0));
    for (int64_t o = 0; o < N; ++o) {
      vec gr[V], wr[V];
      const T n_taps = static_cast<T>(lt.start[o + 1] - lt.start[o]);
      DARTS_UNROLL for (int64_t v = 0; v < V; ++v) {
        __builtin_memcpy(&gr[v], go.data() + o * K + v * L, sizeof(vec));
        if (is_max) {
          __builtin_memcpy(&wr[v], tw.data() + o * K + v * L, sizeof(vec));
        } else {
          gr[v] /= n_taps;
        }
      }
      for (int64_t e = lt.start[o]; e < lt.start[o + 1]; ++e) {
        T* d = gin.data() + lt.pixel[e] * K;
        const vec tap = vec{} + static_cast<T>(lt.tap[e]);
        DARTS_UNROLL for (int64_t v = 0; v < V; ++v) {
          vec dv;
          __builtin_memcpy(&dv, d + v * L, sizeof(vec));
          dv += is_max ? (wr[v] == tap ? gr[v] : vec{}) : gr[v];
          __builtin_memcpy(d + v * L, &dv, sizeof(vec));
        }
      }
    }
    for (int64_t s = 0; s < count; ++s) {  // whole rows of gx
      T* gxp = gx + ((b0 + s) * g.C + c) * HW;
      for (int64_t n = 0; n < HW; ++n) {
        gxp[n] = gin[n * K + s];
      }
    }
  }
}

// grad_x of the pool for the stacks [begin, end), from grad_p, added into the padded input gradient of each stack
// (the padding collects what falls outside and is dropped). Max: each kept output's gradient goes to its winning
// tap, one scatter (windows overlap: scalar). Average: the output gradient over the window's pixel count, laid out
// on the grid (zero off the kept outputs), added tap by tap.
template <typename T>
void pool_backward_stacks(const Geometry& g, bool is_max, const T* gp, const int32_t* taps, T* gx, int64_t begin,
                          int64_t end) {
  const auto [off, id] = live_taps(g);
  const int64_t nl = static_cast<int64_t>(off.size()), plane_q = g.Hq * g.Wq, N = g.Ho * g.Wo;
  const std::vector<T> count = std::get<0>(window_tables<T>(g));
  std::vector<T> go(is_max ? 0 : g.grid, T(0)), phases(g.stride * g.stride * g.phase_size);
  std::array<int64_t, 9> tap_at{};  // where tap i * 3 + j adds, relative to its output's grid position
  for (int64_t t = 0; t < 9; ++t) {
    tap_at[t] = g.taps[t];
  }
  for (int64_t t = begin; t < end; ++t) {
    int64_t b0, n_planes, c;
    g.stack(t, &b0, &n_planes, &c);
    std::fill(phases.begin(), phases.end(), T(0));
    if (is_max) {
      for (int64_t q = 0; q < n_planes; ++q) {
        const int64_t plane = (b0 + q) * g.C + c;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const int64_t m = q * plane_q + oh * g.Wq, o = plane * N + oh * g.Wo;
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            phases[tap_at[taps[o + ow]] + m + ow] += gp[o + ow];
          }
        }
      }
    } else {
      for (int64_t q = 0; q < g.S; ++q) {
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          T* dst = go.data() + q * plane_q + oh * g.Wq;
          if (q >= n_planes) {  // a short last stack: no gradient from its missing planes
            std::fill(dst, dst + g.Wo, T(0));
            continue;
          }
          const T* gr = gp + ((b0 + q) * g.C + c) * N + oh * g.Wo;
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            dst[ow] = gr[ow] / count[oh * g.Wo + ow];
          }
        }
      }
      for (int64_t j = 0; j < nl; ++j) {
        T* __restrict__ d = phases.data() + off[j];
        const T* __restrict__ src = go.data();
        for (int64_t m = 0; m < g.grid; ++m) {
          d[m] += src[m];
        }
      }
    }
    for (int64_t q = 0; q < n_planes; ++q) {
      T* gxp = gx + ((b0 + q) * g.C + c) * g.H * g.W;
      const T* base = phases.data() + q * plane_q;
      g.for_each_run([&](int64_t po, int64_t xo, int64_t len) {
        for (int64_t i = 0; i < len; ++i) {
          gxp[xo + i * g.stride] = base[po + i];
        }
      });
    }
  }
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs pool_bn_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& running_mean,
                    const std::optional<at::Tensor>& running_var, bool is_max, int64_t stride, bool training,
                    double momentum, double eps) {
  const char* op = "pool_bn";
  const Geometry g = check_pool(op, x_in, stride);
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
    if (g.on_lanes()) {
      fastdarts::parallel_for(0, g.lane_chunks() * g.C, 1, [&](int64_t begin, int64_t end) {
        pool_lanes<T>(g, is_max, xp, pp, tp, begin, end);
      });
    } else {
      fastdarts::parallel_for(0, g.chunks * g.C, depthwise::stack_grain(g), [&](int64_t begin, int64_t end) {
        pool_stacks<T>(g, is_max, xp, pp, tp, begin, end);
      });
    }
    const bool with_stats = running_mean.has_value();
    stats = bn::forward<T>(pp, y.mutable_data_ptr<T>(), g.B, g.C, g.Ho * g.Wo, std::nullopt, std::nullopt,
                           with_stats ? running_mean : std::nullopt, with_stats ? running_var : std::nullopt,
                           training, momentum, eps, acc_options);
  });
  return {as_dtype(y, x_in.scalar_type()), p, taps, stats.mean, stats.invstd, stats.new_mean, stats.new_var};
}

at::Tensor pool_bn_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& p_in,
                                const at::Tensor& taps_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                bool is_max, int64_t stride, bool training) {
  const char* op = "pool_bn_backward";
  const Geometry g = check_pool(op, x_in, stride);
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
                    invstd.const_data_ptr<T>(), std::nullopt, g.B, g.C, g.Ho * g.Wo, training, gp.mutable_data_ptr<T>(),
                    nullptr, nullptr);
    const T* gpp = gp.const_data_ptr<T>();
    const int32_t* tp = is_max ? taps.const_data_ptr<int32_t>() : nullptr;
    T* gxp = gx.mutable_data_ptr<T>();
    if (g.on_lanes()) {
      fastdarts::parallel_for(0, g.lane_chunks() * g.C, 1, [&](int64_t begin, int64_t end) {
        pool_backward_lanes<T>(g, is_max, gpp, tp, gxp, begin, end);
      });
    } else {
      fastdarts::parallel_for(0, g.chunks * g.C, depthwise::stack_grain(g), [&](int64_t begin, int64_t end) {
        pool_backward_stacks<T>(g, is_max, gpp, tp, gxp, begin, end);
      });
    }
  });
  return as_dtype(gx, x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts_C, CPU, m) {
  m.impl("pool_bn", &pool_bn_cpu);
  m.impl("pool_bn_backward", &pool_bn_backward_cpu);
}

}  // namespace fastdarts
