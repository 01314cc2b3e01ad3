// CPU kernels of dil_conv, DARTS' ReLU -> depthwise conv -> pointwise conv -> BatchNorm unit (DilConv is one,
// SepConv two), in one call each way:
//   r = relu(x);  d = depthwise(r, dw_weight);  p[b, o] = sum_i pw_weight[o, i] * d[b, i];
//   y = (p - mean) * invstd * bn_weight + bn_bias
// with the batch statistics of p (training) or the running ones (eval). At DARTS' sizes the eager chain spends its
// time on per-call set-up of ~5 kernels each way (oneDNN convolutions, BatchNorm, ReLU); here each pass is a plain
// loop over memory that is still in cache. Everything is computed in at::opmath_type (fp32, fp64 for fp64): half
// and bfloat16 inputs are converted on entry and the results on exit. Every reduction (the statistics, the weight
// gradients) is summed per row or per sample and then in a fixed order: bitwise the same for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "ops/batch_norm.h"
#include "ops/common.h"
#include "ops/depthwise_conv.h"

namespace fastdarts {
namespace {

using depthwise::Geometry;

using bn::row_grain;

// One tile of the 1x1 convolution: kO output rows x V vectors of pixels, the partial sums in kO * V vector
// registers across the whole reduction over i (GCC vector extensions; a broadcast multiply-add per weight).
// src points at in[b, 0, n0] (rows N apart), dst[r] at out[b, o0 + r, n0]. Every row is stored (a fixed count,
// so that the sums stay in registers): rows past O repeat the last row's weights and destination.
template <int kO, int V, typename T>
inline void pointwise_tile(const T* const* wr, const T* src, int64_t I, int64_t N, T* const* dst) {
  typedef T vec __attribute__((vector_size(32)));
  constexpr int64_t L = 32 / sizeof(T);
  vec acc[kO][V];
  DARTS_UNROLL for (int r = 0; r < kO; ++r) {
    DARTS_UNROLL for (int v = 0; v < V; ++v) {
      acc[r][v] = vec{};
    }
  }
  for (int64_t i = 0; i < I; ++i) {
    vec x[V];
    DARTS_UNROLL for (int v = 0; v < V; ++v) {
      __builtin_memcpy(&x[v], src + i * N + v * L, sizeof(vec));
    }
    DARTS_UNROLL for (int r = 0; r < kO; ++r) {
      const T wv = wr[r][i];
      DARTS_UNROLL for (int v = 0; v < V; ++v) {
        acc[r][v] += wv * x[v];
      }
    }
  }
  DARTS_UNROLL for (int r = 0; r < kO; ++r) {
    DARTS_UNROLL for (int v = 0; v < V; ++v) {
      __builtin_memcpy(dst[r] + v * L, &acc[r][v], sizeof(vec));
    }
  }
}

// The 1x1 convolution on short rows (N < one vector, the 2x2 and 1x1 planes): vectors along the outputs, P pixels
// x 2 vectors of output channels per tile. wt is w transposed, [I, Op] with Op a whole number of 2 vectors.
template <int P, typename T>
inline void pointwise_tile_t(const T* wt, int64_t Op, const T* src, int64_t I, int64_t N, T* dst, int64_t outs) {
  typedef T vec __attribute__((vector_size(32)));
  constexpr int64_t L = 32 / sizeof(T);
  vec acc[P][2];
  DARTS_UNROLL for (int p = 0; p < P; ++p) {
    acc[p][0] = acc[p][1] = vec{};
  }
  for (int64_t i = 0; i < I; ++i) {
    vec wv[2];
    __builtin_memcpy(&wv[0], wt + i * Op, sizeof(vec));
    __builtin_memcpy(&wv[1], wt + i * Op + L, sizeof(vec));
    DARTS_UNROLL for (int p = 0; p < P; ++p) {
      const T xv = src[i * N + p];
      acc[p][0] += xv * wv[0];
      acc[p][1] += xv * wv[1];
    }
  }
  DARTS_UNROLL for (int p = 0; p < P; ++p) {
    T lanes[2 * L];
    __builtin_memcpy(lanes, &acc[p][0], sizeof(vec));
    __builtin_memcpy(lanes + L, &acc[p][1], sizeof(vec));
    for (int64_t l = 0; l < outs; ++l) {
      dst[l * N + p] = lanes[l];
    }
  }
}

// out[b, o, :] = sum_i w[o, i] * in[b, i, :] for w [O, I], in [B, I, N], out [B, O, N] (the 1x1 convolution), in
// register tiles: 4 output rows x 2 vectors of pixels when the rows are at least a vector long (the last vector of
// a row overlaps the one before it instead of a scalar tail), else pixels x output vectors (pointwise_tile_t).
template <typename T>
void pointwise(const T* w, const T* in, T* out, int64_t B, int64_t I, int64_t O, int64_t N) {
  constexpr int64_t L = 32 / sizeof(T), kO = 4;
  if (N >= L) {
    const int64_t tiles = (O + kO - 1) / kO;
    fastdarts::parallel_for(0, B * tiles, row_grain(kO * I * N), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / tiles, o0 = (t % tiles) * kO;
        const T* wr[kO];
        for (int64_t r = 0; r < kO; ++r) {
          wr[r] = w + std::min(o0 + r, O - 1) * I;  // rows past O repeat the last
        }
        const T* src = in + b * I * N;
        T* dst[kO];
        auto at = [&](int64_t n0) {
          for (int64_t r = 0; r < kO; ++r) {
            dst[r] = out + (b * O + std::min(o0 + r, O - 1)) * N + n0;
          }
          return dst;
        };
        int64_t n0 = 0;
        for (; n0 + 2 * L <= N; n0 += 2 * L) {
          pointwise_tile<kO, 2>(wr, src + n0, I, N, at(n0));
        }
        for (; n0 < N; n0 += L) {
          const int64_t start = std::min(n0, N - L);
          pointwise_tile<kO, 1>(wr, src + start, I, N, at(start));
        }
      }
    });
  } else {
    const int64_t Op = (O + 2 * L - 1) / (2 * L) * (2 * L);
    std::vector<T> wt(I * Op, T(0));  // w transposed, [I, Op], zero past O
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t i = 0; i < I; ++i) {
        wt[i * Op + o] = w[o * I + i];
      }
    }
    fastdarts::parallel_for(0, B, row_grain(O * I * N), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const T* src = in + b * I * N;
        for (int64_t o0 = 0; o0 < O; o0 += 2 * L) {
          T* dst = out + (b * O + o0) * N;
          const T* wo = wt.data() + o0;
          const int64_t outs = std::min(2 * L, O - o0);
          int64_t n = 0;
          for (; n + 4 <= N; n += 4) {
            pointwise_tile_t<4>(wo, Op, src + n, I, N, dst + n, outs);
          }
          switch (N - n) {
            case 3: pointwise_tile_t<3>(wo, Op, src + n, I, N, dst + n, outs); break;
            case 2: pointwise_tile_t<2>(wo, Op, src + n, I, N, dst + n, outs); break;
            case 1: pointwise_tile_t<1>(wo, Op, src + n, I, N, dst + n, outs); break;
            default: break;
          }
        }
      }
    });
  }
}

// gw[o, i] = sum_b sum_n g[b, o, n] * in[b, i, n]: each weight one dot product over (b, n), in tiles of 4 x 4
// weights whose partial sums stay in vector registers (GCC vector extensions), its lanes added pairwise at the end.
// Rows of N whole vectors are read in place; shorter or ragged rows (the 2x2 planes) are first copied channel-major
// ([C, B * N], zero-padded to whole vectors). Each weight is summed by one task in a fixed order: bitwise the same
// for any thread count.
template <typename T>
void pointwise_grad_weight(const T* g, const T* in, T* gw, int64_t B, int64_t I, int64_t O, int64_t N) {
  typedef T vec __attribute__((vector_size(32)));
  constexpr int64_t L = 32 / sizeof(T), kT = 4;
  // the rows: row r of sample b is at base + b * step + r * row, len elements (a whole number of vectors)
  int64_t nb = B, len = N, g_step = O * N, i_step = I * N, row = N;
  std::vector<T> gc, ic;
  if (N % L != 0) {
    len = row = (B * N + L - 1) / L * L;
    nb = 1;
    g_step = i_step = 0;
    gc.assign(O * len, T(0));
    ic.assign(I * len, T(0));
    fastdarts::parallel_for(0, B, row_grain((O + I) * N), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t o = 0; o < O; ++o) {
          std::copy_n(g + (b * O + o) * N, N, gc.data() + o * len + b * N);
        }
        for (int64_t i = 0; i < I; ++i) {
          std::copy_n(in + (b * I + i) * N, N, ic.data() + i * len + b * N);
        }
      }
    });
    g = gc.data();
    in = ic.data();
  }
  const int64_t o_tiles = (O + kT - 1) / kT, i_tiles = (I + kT - 1) / kT;
  fastdarts::parallel_for(0, o_tiles * i_tiles, row_grain(kT * kT * nb * len), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = (t / i_tiles) * kT, i0 = (t % i_tiles) * kT;
      int64_t g_off[kT], i_off[kT];
      for (int64_t r = 0; r < kT; ++r) {  // rows past O or I repeat the last (their sums are not stored)
        g_off[r] = std::min(o0 + r, O - 1) * row;
        i_off[r] = std::min(i0 + r, I - 1) * row;
      }
      vec acc[kT][kT];
      DARTS_UNROLL for (int a = 0; a < kT; ++a) {
        DARTS_UNROLL for (int c = 0; c < kT; ++c) {
          acc[a][c] = vec{};
        }
      }
      for (int64_t b = 0; b < nb; ++b) {
        const T* gb = g + b * g_step;
        const T* ib = in + b * i_step;
        for (int64_t n = 0; n < len; n += L) {
          vec gv[kT], iv[kT];
          DARTS_UNROLL for (int r = 0; r < kT; ++r) {
            __builtin_memcpy(&gv[r], gb + g_off[r] + n, sizeof(vec));
            __builtin_memcpy(&iv[r], ib + i_off[r] + n, sizeof(vec));
          }
          DARTS_UNROLL for (int a = 0; a < kT; ++a) {
            DARTS_UNROLL for (int c = 0; c < kT; ++c) {
              acc[a][c] += gv[a] * iv[c];
            }
          }
        }
      }
      T lanes[kT][kT][L];  // stored whole first: indexing acc at run time would keep it in memory
      DARTS_UNROLL for (int a = 0; a < kT; ++a) {
        DARTS_UNROLL for (int c = 0; c < kT; ++c) {
          __builtin_memcpy(lanes[a][c], &acc[a][c], sizeof(vec));
        }
      }
      for (int64_t a = 0; a < std::min(kT, O - o0); ++a) {
        for (int64_t c = 0; c < std::min(kT, I - i0); ++c) {
          T* l = lanes[a][c];
          for (int64_t width = L / 2; width >= 1; width /= 2) {
            for (int64_t k = 0; k < width; ++k) {
              l[k] += l[k + width];
            }
          }
          gw[(o0 + a) * I + i0 + c] = l[0];
        }
      }
    }
  });
}

struct Unit {
  Geometry g;  // of the depthwise convolution: B, C = Ci, H, W -> Ho, Wo
  int64_t Co;
  int64_t N() const { return g.Ho * g.Wo; }
};

Unit check_unit(const char* op, const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                const std::optional<at::Tensor>& bn_weight, int64_t stride, int64_t padding, int64_t dilation) {
  Unit u{depthwise::check_inputs(op, x, dw_weight, stride, padding, dilation, "dw_weight"), 0};
  const int64_t Ci = u.g.C;
  TORCH_CHECK_VALUE(pw_weight.dim() == 4 && pw_weight.size(1) == Ci && pw_weight.size(2) == 1 &&
                        pw_weight.size(3) == 1,
                    op, ": pw_weight has shape ", shape_str(pw_weight.sizes()), ", expected (C_out, ", Ci,
                    ", 1, 1) for x with ", Ci, " channels");
  TORCH_CHECK_TYPE(pw_weight.scalar_type() == x.scalar_type(), op, ": pw_weight has dtype ",
                   dtype_str(pw_weight.scalar_type()), ", expected ", dtype_str(x.scalar_type()), " like x");
  TORCH_CHECK_VALUE(pw_weight.device() == x.device(), op, ": pw_weight is on ", pw_weight.device(), ", expected ",
                    x.device(), " like x");
  u.Co = pw_weight.size(0);
  if (bn_weight) {
    bn::check_channels(op, *bn_weight, "bn_weight", u.Co, x);
  }
  return u;
}

// The tensor in the accumulation dtype, contiguous (no copy when it already is both).
at::Tensor acc_contiguous(const at::Tensor& t) {
  return as_contiguous(t, at::toOpMathType(t.scalar_type()));
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs dil_conv_cpu(const at::Tensor& x_in, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                     const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                     const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                     int64_t stride, int64_t padding, int64_t dilation, bool training, double momentum, double eps) {
  const char* op = "dil_conv";
  const Unit u = check_unit(op, x_in, dw_weight, pw_weight, bn_weight, stride, padding, dilation);
  const Geometry& g = u.g;
  TORCH_CHECK_VALUE(bn_weight.has_value() == bn_bias.has_value(), op,
                    ": bn_weight and bn_bias must be given together (BatchNorm affine) or both be None");
  if (bn_bias) {
    bn::check_channels(op, *bn_bias, "bn_bias", u.Co, x_in);
  }
  bn::check_stats(op, x_in, running_mean, running_var, g.B, u.Co, g.Ho, g.Wo, training, eps);

  const at::ScalarType acc = at::toOpMathType(x_in.scalar_type());
  const at::TensorOptions acc_options = x_in.options().dtype(acc);
  const at::Tensor x = acc_contiguous(x_in);
  const at::Tensor dw = acc_contiguous(dw_weight);
  const at::Tensor pw = acc_contiguous(pw_weight);
  const int64_t B = g.B, Ci = g.C, Co = u.Co, N = u.N();
  at::Tensor d = at::empty({B, Ci, g.Ho, g.Wo}, acc_options);
  at::Tensor p = at::empty({B, Co, g.Ho, g.Wo}, acc_options);
  at::Tensor y = at::empty({B, Co, g.Ho, g.Wo}, acc_options);
  const bool update = training && running_mean.has_value();
  bn::Stats stats;

  AT_DISPATCH_FLOATING_TYPES(acc, "dil_conv_cpu", [&] {
    using T = scalar_t;
    if (d.numel() > 0) {
      depthwise::forward_kernel<T>(g, x.const_data_ptr<T>(), dw.const_data_ptr<T>(), d.mutable_data_ptr<T>(),
                                   /*relu=*/true);
    }
    pointwise<T>(pw.const_data_ptr<T>(), d.const_data_ptr<T>(), p.mutable_data_ptr<T>(), B, Ci, Co, N);
    stats = bn::forward<T>(p.const_data_ptr<T>(), y.mutable_data_ptr<T>(), B, Co, N, bn_weight, bn_bias,
                           update || !training ? running_mean : std::nullopt,
                           update || !training ? running_var : std::nullopt, training, momentum, eps, acc_options);
  });
  return {as_dtype(y, x_in.scalar_type()), d, p, stats.mean, stats.invstd, stats.new_mean, stats.new_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dil_conv_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& d_in, const at::Tensor& p_in,
    const at::Tensor& mean_in, const at::Tensor& invstd_in, int64_t stride, int64_t padding, int64_t dilation,
    bool training, std::array<bool, 5> output_mask) {
  const char* op = "dil_conv_backward";
  const Unit u = check_unit(op, x_in, dw_weight, pw_weight, bn_weight, stride, padding, dilation);
  const Geometry& g = u.g;
  const int64_t B = g.B, Ci = g.C, Co = u.Co, N = u.N();
  const at::ScalarType acc = at::toOpMathType(x_in.scalar_type());
  auto check_saved = [&](const at::Tensor& t, const char* name, c10::IntArrayRef shape) {
    TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " has shape ", shape_str(t.sizes()), ", expected ",
                      shape_str(shape));
    TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " has dtype ", dtype_str(t.scalar_type()),
                     ", expected ", dtype_str(acc), " (what dil_conv returns)");
    TORCH_CHECK_VALUE(t.device() == x_in.device(), op, ": ", name, " is on ", t.device(), ", expected ",
                      x_in.device(), " like x");
  };
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({B, Co, g.Ho, g.Wo}), op, ": grad has shape ",
                    shape_str(grad_in.sizes()), ", expected (", B, ", ", Co, ", ", g.Ho, ", ", g.Wo,
                    ") like the output");
  TORCH_CHECK_VALUE(grad_in.device() == x_in.device(), op, ": grad is on ", grad_in.device(), ", expected ",
                    x_in.device(), " like x");
  check_saved(d_in, "d", {B, Ci, g.Ho, g.Wo});
  check_saved(p_in, "p", {B, Co, g.Ho, g.Wo});
  check_saved(mean_in, "mean", {Co});
  check_saved(invstd_in, "invstd", {Co});

  const at::Tensor grad = acc_contiguous(grad_in);
  const at::Tensor d = d_in.contiguous(), p = p_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  const at::TensorOptions acc_options = x_in.options().dtype(acc);
  const bool need_x = output_mask[0], need_dw = output_mask[1], need_pw = output_mask[2];
  const bool need_bn = bn_weight.has_value() && (output_mask[3] || output_mask[4]);
  // Gradients not asked for are returned empty.
  auto none = [&] { return at::empty({0}, acc_options); };  // distinct tensors: outputs must not alias
  at::Tensor gx = none(), gdw = none(), gpw = none(), gbw = none(), gbb = none();
  if (!(need_x || need_dw || need_pw || need_bn)) {
    return {gx, gdw, gpw, gbw, gbb};
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "dil_conv_backward_cpu", [&] {
    using T = scalar_t;
    const T* gr = grad.const_data_ptr<T>();
    const T* pp = p.const_data_ptr<T>();
    const T* m = mean.const_data_ptr<T>();
    const T* is = invstd.const_data_ptr<T>();
    if (need_bn && output_mask[3]) {
      gbw = at::empty({Co}, acc_options);
    }
    if (need_bn && output_mask[4]) {
      gbb = at::empty({Co}, acc_options);
    }
    const bool need_gp = need_x || need_dw || need_pw;
    at::Tensor gp = need_gp ? at::empty({B, Co, g.Ho, g.Wo}, acc_options) : at::Tensor();
    T* gpp = need_gp ? gp.mutable_data_ptr<T>() : nullptr;
    bn::backward<T>(gr, pp, m, is, bn_weight, B, Co, N, training, gpp, gbw.numel() ? gbw.mutable_data_ptr<T>() : nullptr,
                    gbb.numel() ? gbb.mutable_data_ptr<T>() : nullptr);
    if (!need_gp) {
      return;
    }
    const at::Tensor pw = acc_contiguous(pw_weight).view({Co, Ci});
    if (need_pw) {
      gpw = at::empty({Co, Ci, 1, 1}, acc_options);
      pointwise_grad_weight<T>(gpp, d.const_data_ptr<T>(), gpw.mutable_data_ptr<T>(), B, Ci, Co, N);
    }
    if (!(need_x || need_dw)) {
      return;
    }
    const at::Tensor pw_t = pw.t().contiguous();  // [Ci, Co]: grad_d = pw^T grad_p
    at::Tensor gd = at::empty({B, Ci, g.Ho, g.Wo}, acc_options);
    pointwise<T>(pw_t.const_data_ptr<T>(), gpp, gd.mutable_data_ptr<T>(), B, Co, Ci, N);
    const at::Tensor x = acc_contiguous(x_in);
    const at::Tensor dw = acc_contiguous(dw_weight);
    if (need_x) {
      gx = at::empty({B, Ci, g.H, g.W}, acc_options);
    }
    if (need_dw) {
      gdw = at::empty({Ci, 1, g.k, g.k}, acc_options);
    }
    depthwise::backward_kernel<T>(g, gd.const_data_ptr<T>(), x.const_data_ptr<T>(), dw.const_data_ptr<T>(),
                                  need_x ? gx.mutable_data_ptr<T>() : nullptr,
                                  need_dw ? gdw.mutable_data_ptr<T>() : nullptr, /*relu=*/true);
  });
  const at::Tensor& bn_like = bn_weight ? *bn_weight : x_in;
  return {as_dtype(gx, x_in.scalar_type()), as_dtype(gdw, dw_weight.scalar_type()),
          as_dtype(gpw, pw_weight.scalar_type()), as_dtype(gbw, bn_like.scalar_type()),
          as_dtype(gbb, bn_like.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts_C, CPU, m) {
  m.impl("dil_conv", &dil_conv_cpu);
  m.impl("dil_conv_backward", &dil_conv_backward_cpu);
}

}  // namespace fastdarts
