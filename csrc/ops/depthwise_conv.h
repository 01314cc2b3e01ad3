// The depthwise convolution kernels of csrc/ops/depthwise_conv.cpp, shared with the fused candidate ops
// (csrc/ops/dil_conv.cpp), which run them on a ReLU of their input.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ops/common.h"

namespace fastdarts {
namespace depthwise {

// The geometry of one call: input plane H x W, output plane Ho x Wo, a k x k kernel with stride s, padding p,
// dilation d. Each input plane is copied, zero-padded, into s x s phase planes of Hq x Wq (phase (a, b) holds
// padded[r * s + a][c * s + b]), so that every kernel tap (i, j) reads phase ((i d) % s, (j d) % s) at the
// constant offset ((i d) / s) * Wq + (j d) / s from the output position: out[oh * Wq + ow] is then one contiguous
// multiply-add loop per tap over the "grid" of Ho rows of Wq >= Wo columns (the columns past Wo are computed
// and thrown away). No bounds checks, no strided access: vectorisable for every stride and dilation. The grid is
// walked in blocks (whole kBlock elements) whose partial sums stay in vector registers across all taps (tap_sums).
//
// Small planes are stacked: the S planes of one channel in S consecutive samples (same weights) lie one under the
// other in each phase buffer, Hq rows apart, and one grid runs over all of them (the Hq - Ho rows between two
// planes' outputs are thrown away too; the taps of a kept output never reach the next plane, nor those of a kept
// input gradient the previous plane's kept outputs). A 2x2 plane alone is a few elements of loop set-up; 64 of
// them are one loop. Taps that read only padding for every output (a 5x5 kernel at dilation 2 on a 2x2 plane has
// 24 of them) are left out: `live`.
//
// Tiny planes (at most kLanePlane outputs, the 4x4 and 2x2 states of DARTS' last cells) take another layout: the
// kBlock samples of a chunk side by side, one vector lane each ([H * W, kBlock], "lanes"), so that every multiply-add
// is a whole vector of useful results and the taps that fall in the padding are never visited (each output lists
// the taps that read the image: LaneTaps). A stacked grid of 2x2 planes is 75% thrown-away positions.
constexpr int64_t kBlock = 16;
constexpr int64_t kStackElems = 2048;  // stack planes up to about this many phase elements
constexpr int64_t kLanePlane = 16;     // planes of at most this many outputs run on lanes

struct Geometry {
  int64_t B, C, H, W, k, stride, padding, dilation, Ho, Wo;
  int64_t Hq = 0, Wq = 0;  // one phase plane
  int64_t S = 1;           // planes stacked per task (consecutive samples of one channel)
  int64_t chunks = 1;      // stacks per channel: ceil(B / S)
  int64_t phase_size = 0;  // S * Hq * Wq plus slack for the last row's and the last block's overhang
  int64_t grid = 0;        // ((S - 1) * Hq + Ho) * Wq rounded up to whole blocks: what each tap's loop runs over
  std::vector<int64_t> taps;  // [k * k]: where tap (i, j) starts reading in the phase buffer
  std::vector<int64_t> live;  // the taps that read at least one input pixel for some output

  bool on_lanes() const { return Ho * Wo <= kLanePlane; }
  int64_t lane_chunks() const { return (B + kBlock - 1) / kBlock; }
  // The lane tasks: (chunk, channel) pairs, chunk-major; chunk t holds samples [b0, b0 + count) of channel c.
  void lane_chunk(int64_t t, int64_t* b0, int64_t* count, int64_t* c) const {
    *c = t % C;
    *b0 = (t / C) * kBlock;
    *count = std::min(kBlock, B - *b0);
  }

  void finish() {
    Hq = (H + 2 * padding + stride - 1) / stride;
    Wq = (W + 2 * padding + stride - 1) / stride;
    S = std::max<int64_t>(1, std::min<int64_t>(B, kStackElems / std::max<int64_t>(1, Hq * Wq)));
    chunks = B > 0 ? (B + S - 1) / S : 0;
    S = chunks > 0 ? (B + chunks - 1) / chunks : 1;  // as many stacks, evened out: 64 planes as 32 + 32, not 56 + 8
    grid = (((S - 1) * Hq + Ho) * Wq + kBlock - 1) / kBlock * kBlock;
    phase_size = S * Hq * Wq + dilation * (k - 1) / stride + kBlock;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        taps.push_back(tap_offset(i, j));
        if (reads_input(i, Ho, H) && reads_input(j, Wo, W)) {
          live.push_back(i * k + j);
        }
      }
    }
  }
  // Where tap (i, j) starts reading in the phase buffer [s * s, phase_size].
  int64_t tap_offset(int64_t i, int64_t j) const {
    const int64_t ri = i * dilation, cj = j * dilation;
    return ((ri % stride) * stride + cj % stride) * phase_size + (ri / stride) * Wq + cj / stride;
  }
  // Whether kernel row (or column) i reads an input row in [0, n) for some output row o < out.
  bool reads_input(int64_t i, int64_t out, int64_t n) const {
    for (int64_t o = 0; o < out; ++o) {
      const int64_t h = o * stride + i * dilation - padding;
      if (h >= 0 && h < n) {
        return true;
      }
    }
    return false;
  }
  // Calls f(phase_offset, x_offset, len) for each run of len input elements x[x_offset + t * s], t < len, of one
  // plane that lands at phase[phase_offset + t] for the first plane of a stack (add q * Hq * Wq for plane q; the
  // zero padding is in no run).
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
  // The tasks: (chunk, channel) pairs, chunk-major; stack t holds samples [b0, b0 + count) of channel c.
  void stack(int64_t t, int64_t* b0, int64_t* count, int64_t* c) const {
    *c = t % C;
    *b0 = (t / C) * S;
    *count = std::min(S, B - *b0);
  }
};

inline Geometry check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                             int64_t padding, int64_t dilation, const char* weight_name = "weight") {
  check_image(op, x);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                        weight.size(2) == weight.size(3) && weight.size(2) >= 1,
                    op, ": ", weight_name, " has shape ", shape_str(weight.sizes()), ", expected (", C,
                    ", 1, k, k) for x with ", C, " channels");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": ", weight_name, " has dtype ",
                   dtype_str(weight.scalar_type()), ", expected ", dtype_str(x.scalar_type()), " like x");
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": ", weight_name, " is on ", weight.device(), ", expected ",
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

// Stacks per parallel task: enough work (~32K multiply-adds) to be worth a task.
inline int64_t stack_grain(const Geometry& g) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.grid * static_cast<int64_t>(g.live.size())));
}

// The kBlock lanes added pairwise, in a fixed order (16 -> 8 -> 4 -> 1; vectorised).
template <typename acc_t>
inline acc_t sum_block(acc_t* lanes) {
  static_assert(kBlock == 16, "sum_block adds 16 lanes");
  for (int64_t l = 0; l < 8; ++l) {
    lanes[l] += lanes[l + 8];
  }
  for (int64_t l = 0; l < 4; ++l) {
    lanes[l] += lanes[l + 4];
  }
  return (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
}

// out[0, E) = sum_{t < ntaps} w[t] * src[off[t] + e] for e < E = V * L (L lanes of a 32-byte vector): the partial
// sums in V vector registers (GCC vector extensions), so that V independent multiply-add chains hide the latency.
template <int V, typename acc_t>
inline void tap_sum(const acc_t* src, const int64_t* off, const acc_t* w, int64_t ntaps, acc_t* out) {
  typedef acc_t vec __attribute__((vector_size(32)));
  constexpr int64_t L = 32 / sizeof(acc_t);
  vec a[V];
  DARTS_UNROLL for (int v = 0; v < V; ++v) {
    a[v] = vec{};
  }
  for (int64_t t = 0; t < ntaps; ++t) {
    const acc_t* s = src + off[t];
    const acc_t wv = w[t];
    DARTS_UNROLL for (int v = 0; v < V; ++v) {
      vec x;
      __builtin_memcpy(&x, s + v * L, sizeof(vec));
      a[v] += wv * x;
    }
  }
  DARTS_UNROLL for (int v = 0; v < V; ++v) {
    __builtin_memcpy(out + v * L, &a[v], sizeof(vec));
  }
}

// tap_sum over [begin, end) (a whole number of kBlock) in blocks of 4 vectors, then of kBlock elements.
template <typename acc_t>
inline void tap_sums(const acc_t* src, const int64_t* off, const acc_t* w, int64_t ntaps, acc_t* out, int64_t begin,
                     int64_t end) {
  constexpr int64_t L = 32 / sizeof(acc_t), kWide = 4 * L, kNarrow = kBlock / L;
  static_assert(kBlock % L == 0 && kWide % kBlock == 0, "blocks must be whole vectors");
  int64_t m = begin;
  for (; m + kWide <= end; m += kWide) {
    tap_sum<4>(src + m, off, w, ntaps, out + m);
  }
  for (; m < end; m += kBlock) {
    tap_sum<kNarrow>(src + m, off, w, ntaps, out + m);
  }
}

// out[j] = sum_{n < len} a[n] * b[off[j] + n] for j < G (len a whole number of vectors): G taps at a time, one
// vector register of partial sums each (independent chains), then each register's lanes added pairwise.
template <int G, typename acc_t>
inline void tap_dot_group(const acc_t* a, const acc_t* b, const int64_t* off, int64_t len, acc_t* out) {
  typedef acc_t vec __attribute__((vector_size(32)));
  constexpr int64_t L = 32 / sizeof(acc_t);
  vec acc[G];
  DARTS_UNROLL for (int j = 0; j < G; ++j) {
    acc[j] = vec{};
  }
  for (int64_t n = 0; n < len; n += L) {
    vec av;
    __builtin_memcpy(&av, a + n, sizeof(vec));
    DARTS_UNROLL for (int j = 0; j < G; ++j) {
      vec bv;
      __builtin_memcpy(&bv, b + off[j] + n, sizeof(vec));
      acc[j] += av * bv;
    }
  }
  DARTS_UNROLL for (int j = 0; j < G; ++j) {
    acc_t lanes[L];
    __builtin_memcpy(lanes, &acc[j], sizeof(vec));
    for (int64_t width = L / 2; width >= 1; width /= 2) {
      for (int64_t l = 0; l < width; ++l) {
        lanes[l] += lanes[l + width];
      }
    }
    out[j] = lanes[0];
  }
}

// tap_dot_group over all ntaps taps, in as few groups of at most eight as there can be, of even sizes (9 taps are
// 5 + 4, not 8 + 1: a group of one is a single chain of dependent multiply-adds, latency-bound).
template <typename acc_t>
inline void tap_dots(const acc_t* a, const acc_t* b, const int64_t* off, int64_t ntaps, int64_t len, acc_t* out) {
  const int64_t groups = (ntaps + 7) / 8;
  for (int64_t t = 0, group = 0; group < groups; ++group) {
    const int64_t size = (ntaps - t + (groups - group) - 1) / (groups - group);
    switch (size) {
      case 8: tap_dot_group<8>(a, b, off + t, len, out + t); break;
      case 7: tap_dot_group<7>(a, b, off + t, len, out + t); break;
      case 6: tap_dot_group<6>(a, b, off + t, len, out + t); break;
      case 5: tap_dot_group<5>(a, b, off + t, len, out + t); break;
      case 4: tap_dot_group<4>(a, b, off + t, len, out + t); break;
      case 3: tap_dot_group<3>(a, b, off + t, len, out + t); break;
      case 2: tap_dot_group<2>(a, b, off + t, len, out + t); break;
      default: tap_dot_group<1>(a, b, off + t, len, out + t); break;
    }
    t += size;
  }
}

// dst[t] = src[t * s] for t < len, and with kRelu max(src[t * s], 0): branch-free, and a plain vectorisable copy
// for s = 1.
template <bool kRelu, typename scalar_t, typename acc_t>
inline void copy_run(const scalar_t* __restrict__ src, int64_t s, acc_t* __restrict__ dst, int64_t len) {
  auto load = [](scalar_t v) {
    const acc_t a = static_cast<acc_t>(v);
    return kRelu ? (a > acc_t(0) ? a : acc_t(0)) : a;
  };
  if (s == 1) {
    for (int64_t t = 0; t < len; ++t) {
      dst[t] = load(src[t]);
    }
  } else {
    for (int64_t t = 0; t < len; ++t) {
      dst[t] = load(src[t * s]);
    }
  }
}

// dst[i] = src[i * step] where x[i] > 0, else +0 (ReLU's backward), for i < len. The choice is a bit mask, not a
// branch (GCC keeps `x > 0 ? v : 0` a jump here): x's sign is a coin flip that a branch predictor loses half the
// time, and this loop was a third of the lane layout's backward. A mask, unlike v * (x > 0), keeps an infinite or
// NaN gradient from turning the zeros into NaN.
template <typename scalar_t, typename acc_t>
inline void relu_backward_run(const scalar_t* __restrict__ x, const acc_t* __restrict__ src, int64_t step,
                              scalar_t* __restrict__ dst, int64_t len) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(bits_t) == sizeof(acc_t), "one mask word per value");
  for (int64_t i = 0; i < len; ++i) {
    const acc_t v = src[i * step];
    bits_t b;
    __builtin_memcpy(&b, &v, sizeof b);
    b &= bits_t(0) - static_cast<bits_t>(static_cast<acc_t>(x[i]) > acc_t(0));
    acc_t kept;
    __builtin_memcpy(&kept, &b, sizeof kept);
    dst[i] = static_cast<scalar_t>(kept);
  }
}

// Copy one input plane [H, W] into the phase buffer at plane q of the stack; with relu, max(x, 0) (DilConv's
// leading ReLU). The buffer is zeroed once when it is made: every plane writes the same runs, so the padding
// between them stays zero.
template <typename scalar_t, typename acc_t>
void scatter_plane(const Geometry& g, const scalar_t* x, acc_t* phases, int64_t q, bool relu) {
  acc_t* base = phases + q * g.Hq * g.Wq;
  g.for_each_run([&](int64_t po, int64_t xo, int64_t len) {
    if (relu) {
      copy_run<true>(x + xo, g.stride, base + po, len);
    } else {
      copy_run<false>(x + xo, g.stride, base + po, len);
    }
  });
}

// The live taps' offsets and, per channel, their weights: [C, live] gathered from w [C, k * k].
template <typename acc_t>
std::vector<acc_t> live_weights(const Geometry& g, const acc_t* w) {
  const int64_t kk = g.k * g.k, nl = static_cast<int64_t>(g.live.size());
  std::vector<acc_t> out(g.C * nl);
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t j = 0; j < nl; ++j) {
      out[c * nl + j] = w[c * kk + g.live[j]];
    }
  }
  return out;
}

// For each output o (row-major, Ho * Wo of them): the taps that read an image pixel, in tap order, and that pixel
// (h * W + w): entries [start[o], start[o + 1]).
struct LaneTaps {
  std::vector<int64_t> start, tap, pixel;
};

inline LaneTaps lane_taps(const Geometry& g) {
  LaneTaps lt;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      lt.start.push_back(static_cast<int64_t>(lt.tap.size()));
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t h = oh * g.stride - g.padding + i * g.dilation;
        for (int64_t j = 0; j < g.k && h >= 0 && h < g.H; ++j) {
          const int64_t w = ow * g.stride - g.padding + j * g.dilation;
          if (w >= 0 && w < g.W) {
            lt.tap.push_back(i * g.k + j);
            lt.pixel.push_back(h * g.W + w);
          }
        }
      }
    }
  }
  lt.start.push_back(static_cast<int64_t>(lt.tap.size()));
  return lt;
}

// Lane chunks per parallel task: ~32K multiply-adds each.
inline int64_t lane_grain(const LaneTaps& lt) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kBlock * static_cast<int64_t>(lt.tap.size())));
}

// dst[n * kBlock + s] = src[(b0 + s) * C + c][n] for n < len (max(., 0) with kRelu), zero in the lanes s >= count.
// The lanes are the inner loop (a fixed count of them in a full chunk): one strided load each, whole-vector stores.
template <bool kRelu, typename scalar_t, typename acc_t>
inline void to_lanes(const scalar_t* src, int64_t C, int64_t len, int64_t b0, int64_t count, int64_t c, acc_t* dst) {
  const scalar_t* base = src + (b0 * C + c) * len;
  const int64_t step = C * len;  // from one sample to the next
  auto load = [&](int64_t n, int64_t s) {
    const acc_t v = static_cast<acc_t>(base[s * step + n]);
    return kRelu ? (v > acc_t(0) ? v : acc_t(0)) : v;
  };
  for (int64_t n = 0; n < len; ++n) {
    acc_t* d = dst + n * kBlock;
    if (count == kBlock) {
      DARTS_UNROLL for (int64_t s = 0; s < kBlock; ++s) {
        d[s] = load(n, s);
      }
    } else {
      for (int64_t s = 0; s < kBlock; ++s) {
        d[s] = s < count ? load(n, s) : acc_t(0);
      }
    }
  }
}

// a[l] += w * b[l] for the kBlock lanes.
template <typename acc_t>
inline void lane_fma(acc_t* __restrict__ a, acc_t w, const acc_t* __restrict__ b) {
  DARTS_UNROLL for (int64_t l = 0; l < kBlock; ++l) {
    a[l] += w * b[l];
  }
}

template <typename scalar_t>
void lane_forward(const Geometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* w, scalar_t* out, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneTaps lt = lane_taps(g);
  const int64_t HW = g.H * g.W, N = g.Ho * g.Wo, kk = g.k * g.k;
  fastdarts::parallel_for(0, g.lane_chunks() * g.C, lane_grain(lt), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> in(HW * kBlock), acc(N * kBlock);
    for (int64_t t = begin; t < end; ++t) {
      int64_t b0, count, c;
      g.lane_chunk(t, &b0, &count, &c);
      if (relu) {
        to_lanes<true>(x, g.C, HW, b0, count, c, in.data());
      } else {
        to_lanes<false>(x, g.C, HW, b0, count, c, in.data());
      }
      const acc_t* wc = w + c * kk;
      for (int64_t o = 0; o < N; ++o) {
        acc_t a[kBlock];
        DARTS_UNROLL for (int64_t l = 0; l < kBlock; ++l) {
          a[l] = acc_t(0);
        }
        for (int64_t e = lt.start[o]; e < lt.start[o + 1]; ++e) {
          lane_fma(a, wc[lt.tap[e]], in.data() + lt.pixel[e] * kBlock);
        }
        std::copy_n(a, kBlock, acc.data() + o * kBlock);
      }
      const int64_t base = (b0 * g.C + c) * N, step = g.C * N;
      for (int64_t o = 0; o < N; ++o) {
        for (int64_t s = 0; s < count; ++s) {
          out[base + s * step + o] = static_cast<scalar_t>(acc[o * kBlock + s]);
        }
      }
    }
  });
}

// The lane layout's backward: grad_weight per tap from the lane products summed per chunk, then over the lanes and
// the chunks in a fixed order; grad_x as the transposed taps added into lanes of the input.
template <typename scalar_t>
void lane_backward(const Geometry& g, const scalar_t* grad, const scalar_t* x, const at::opmath_type<scalar_t>* w,
                   scalar_t* gx, at::opmath_type<scalar_t>* gw, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneTaps lt = lane_taps(g);
  const int64_t HW = g.H * g.W, N = g.Ho * g.Wo, kk = g.k * g.k, chunks = g.lane_chunks();
  std::vector<acc_t> partial(gw ? chunks * g.C * kk : 0);  // [chunks, C, k * k]
  fastdarts::parallel_for(0, chunks * g.C, lane_grain(lt), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go(N * kBlock), in(gw ? HW * kBlock : 0), gin(gx ? HW * kBlock : 0);
    std::vector<acc_t> tap_lanes(gw ? kk * kBlock : 0);
    for (int64_t t = begin; t < end; ++t) {
      int64_t b0, count, c;
      g.lane_chunk(t, &b0, &count, &c);
      to_lanes<false>(grad, g.C, N, b0, count, c, go.data());  // zero lanes past count: they add nothing
      if (gw) {
        if (relu) {
          to_lanes<true>(x, g.C, HW, b0, count, c, in.data());
        } else {
          to_lanes<false>(x, g.C, HW, b0, count, c, in.data());
        }
        std::fill(tap_lanes.begin(), tap_lanes.end(), acc_t(0));
        for (int64_t o = 0; o < N; ++o) {
          const acc_t* gr = go.data() + o * kBlock;
          for (int64_t e = lt.start[o]; e < lt.start[o + 1]; ++e) {
            acc_t* __restrict__ a = tap_lanes.data() + lt.tap[e] * kBlock;
            const acc_t* __restrict__ xv = in.data() + lt.pixel[e] * kBlock;
            DARTS_UNROLL for (int64_t l = 0; l < kBlock; ++l) {
              a[l] += gr[l] * xv[l];
            }
          }
        }
        for (int64_t tap = 0; tap < kk; ++tap) {
          partial[t * kk + tap] = sum_block(tap_lanes.data() + tap * kBlock);
        }
      }
      if (gx) {
        const acc_t* wc = w + c * kk;
        std::fill(gin.begin(), gin.end(), acc_t(0));
        for (int64_t o = 0; o < N; ++o) {
          for (int64_t e = lt.start[o]; e < lt.start[o + 1]; ++e) {
            lane_fma(gin.data() + lt.pixel[e] * kBlock, wc[lt.tap[e]], go.data() + o * kBlock);
          }
        }
        for (int64_t s = 0; s < count; ++s) {  // whole rows of gx
          const int64_t plane = ((b0 + s) * g.C + c) * HW;
          const acc_t* __restrict__ src = gin.data() + s;
          scalar_t* __restrict__ dst = gx + plane;
          if (relu) {
            relu_backward_run(x + plane, src, kBlock, dst, HW);
          } else {
            for (int64_t n = 0; n < HW; ++n) {
              dst[n] = static_cast<scalar_t>(src[n * kBlock]);
            }
          }
        }
      }
    }
  });
  if (gw) {
    std::fill(gw, gw + g.C * kk, acc_t(0));
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // the sum over chunks in a fixed order
      for (int64_t e = 0; e < g.C * kk; ++e) {
        gw[e] += partial[chunk * g.C * kk + e];
      }
    }
  }
}

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* w, scalar_t* out,
                    bool relu = false) {
  if (g.on_lanes()) {
    lane_forward(g, x, w, out, relu);
    return;
  }
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nl = static_cast<int64_t>(g.live.size()), HW = g.H * g.W, plane_out = g.Ho * g.Wo;
  std::vector<int64_t> off(nl);
  for (int64_t j = 0; j < nl; ++j) {
    off[j] = g.taps[g.live[j]];
  }
  const std::vector<acc_t> wl = live_weights(g, w);
  fastdarts::parallel_for(0, g.chunks * g.C, stack_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> phases(g.stride * g.stride * g.phase_size);
    std::vector<acc_t> acc(g.grid);
    for (int64_t t = begin; t < end; ++t) {
      int64_t b0, count, c;
      g.stack(t, &b0, &count, &c);
      for (int64_t q = 0; q < count; ++q) {
        scatter_plane(g, x + ((b0 + q) * g.C + c) * HW, phases.data(), q, relu);
      }
      tap_sums(phases.data(), off.data(), wl.data() + c * nl, nl, acc.data(), 0, g.grid);
      for (int64_t q = 0; q < count; ++q) {
        scalar_t* op = out + ((b0 + q) * g.C + c) * plane_out;
        const acc_t* src = acc.data() + q * g.Hq * g.Wq;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            op[oh * g.Wo + ow] = static_cast<scalar_t>(src[oh * g.Wq + ow]);
          }
        }
      }
    }
  });
}

// grad_x (when gx is not null) and grad_weight [C, k * k] (when gw is not null), in one pass over grad and x. The
// output gradient is laid out on the grid with zeros in the thrown-away rows and columns, so that it adds nothing
// there: grad_weight's live taps are one dot product each per stack (tap_dots), summed over the stacks of a channel
// in a fixed order (bitwise the same for any thread count); grad_x gathers per phase plane of the padded input
// gradient (tap_sums over the output gradient).
template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* grad, const scalar_t* x, const at::opmath_type<scalar_t>* w,
                     scalar_t* gx, at::opmath_type<scalar_t>* gw, bool relu = false) {
  if (g.on_lanes()) {
    lane_backward(g, grad, x, w, gx, gw, relu);
    return;
  }
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kk = g.k * g.k, nl = static_cast<int64_t>(g.live.size());
  const int64_t phases = g.stride * g.stride, HW = g.H * g.W, plane_out = g.Ho * g.Wo, plane_q = g.Hq * g.Wq;
  // grad_x in gather form: phase ph of the padded input gradient is gx_ph[m] = sum over the live taps t reading
  // phase ph of w[t] * go[m - off_t] (off_t: where tap t reads, relative to the output position), register-blocked
  // like the forward. go lives at offset `front` of a zero buffer, so that m - off_t never leaves it.
  std::vector<std::vector<int64_t>> phase_taps(phases), phase_offs(phases);  // per phase: t, and -off_t
  std::vector<int64_t> live_off(nl);
  int64_t front = 0;
  for (int64_t j = 0; j < nl; ++j) {
    const int64_t t = g.live[j];
    const int64_t off = g.taps[t] % g.phase_size;
    live_off[j] = g.taps[t];
    phase_taps[g.taps[t] / g.phase_size].push_back(t);
    phase_offs[g.taps[t] / g.phase_size].push_back(-off);
    front = std::max(front, off);
  }
  const int64_t span = (g.S * plane_q + kBlock - 1) / kBlock * kBlock;  // the phase elements gathered
  const int64_t go_size = front + std::max(g.grid, span) + kBlock;
  std::vector<acc_t> partial(gw ? g.chunks * g.C * nl : 0);  // [chunks, C, live]
  fastdarts::parallel_for(0, g.chunks * g.C, stack_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_phases(gw ? phases * g.phase_size : 0);
    std::vector<acc_t> gx_phases(gx ? phases * g.phase_size : 0);
    std::vector<acc_t> go(go_size, acc_t(0));  // only the kept outputs are ever written: zeros elsewhere
    acc_t* const gr = go.data() + front;
    std::vector<acc_t> w_phase(kk);  // the weights of one phase's taps, in phase_taps order
    for (int64_t t = begin; t < end; ++t) {
      int64_t b0, count, c;
      g.stack(t, &b0, &count, &c);
      for (int64_t q = 0; q < g.S; ++q) {
        acc_t* dst = gr + q * plane_q;
        if (q >= count) {  // a short last stack: zeros for its missing planes
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            std::fill(dst + oh * g.Wq, dst + oh * g.Wq + g.Wo, acc_t(0));
          }
          continue;
        }
        const scalar_t* gp = grad + ((b0 + q) * g.C + c) * plane_out;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            dst[oh * g.Wq + ow] = static_cast<acc_t>(gp[oh * g.Wo + ow]);
          }
        }
      }
      if (gw) {
        for (int64_t q = 0; q < count; ++q) {
          scatter_plane(g, x + ((b0 + q) * g.C + c) * HW, x_phases.data(), q, relu);
        }
        tap_dots(gr, x_phases.data(), live_off.data(), nl, g.grid, partial.data() + t * nl);
      }
      if (gx) {
        const acc_t* wp = w + c * kk;
        for (int64_t ph = 0; ph < phases; ++ph) {
          acc_t* dst = gx_phases.data() + ph * g.phase_size;
          // only the rows that hold input pixels: h = r * s + a - p in [0, H), in the first and the last plane
          const int64_t a_ph = ph / g.stride;
          const int64_t r_lo = std::max<int64_t>(0, (g.padding - a_ph + g.stride - 1) / g.stride);
          const int64_t r_hi = std::min<int64_t>(g.Hq, (g.H + g.padding - a_ph + g.stride - 1) / g.stride);
          const int64_t ntaps = static_cast<int64_t>(phase_taps[ph].size());
          for (int64_t j = 0; j < ntaps; ++j) {
            w_phase[j] = wp[phase_taps[ph][j]];
          }
          const int64_t m_lo = r_lo * g.Wq;
          const int64_t rows = std::max<int64_t>(0, (count - 1) * g.Hq + r_hi - r_lo);
          const int64_t m_hi = m_lo + (rows * g.Wq + kBlock - 1) / kBlock * kBlock;
          tap_sums(gr, phase_offs[ph].data(), w_phase.data(), ntaps, dst, m_lo, m_hi);
        }
        const int64_t s = g.stride;
        for (int64_t q = 0; q < count; ++q) {
          scalar_t* gxp = gx + ((b0 + q) * g.C + c) * HW;
          const scalar_t* xp = x + ((b0 + q) * g.C + c) * HW;
          const acc_t* base = gx_phases.data() + q * plane_q;
          g.for_each_run([&](int64_t po, int64_t xo, int64_t len) {
            const acc_t* __restrict__ src = base + po;
            scalar_t* __restrict__ dst = gxp + xo;
            if (relu && s == 1) {  // the gradient passes where x > 0, as ReLU's backward
              relu_backward_run(xp + xo, src, 1, dst, len);
            } else {
              for (int64_t i = 0; i < len; ++i) {
                dst[i * s] = static_cast<scalar_t>(src[i]);
              }
            }
          });
          if (relu && s > 1) {  // the runs cover the whole plane: mask it in one contiguous (branch-free) pass
            for (int64_t i = 0; i < HW; ++i) {
              gxp[i] = static_cast<acc_t>(xp[i]) > acc_t(0) ? gxp[i] : scalar_t(0);
            }
          }
        }
      }
    }
  });
  if (gw) {
    std::fill(gw, gw + g.C * kk, acc_t(0));  // dead taps: zero
    for (int64_t chunk = 0; chunk < g.chunks; ++chunk) {  // the sum over stacks in a fixed order
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t j = 0; j < nl; ++j) {
          gw[c * kk + g.live[j]] += partial[(chunk * g.C + c) * nl + j];
        }
      }
    }
  }
}

}  // namespace depthwise
}  // namespace fastdarts
