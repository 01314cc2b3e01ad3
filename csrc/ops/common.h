// Helpers shared by every op's input checks: values written the way Python users see them.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>

namespace fastdarts {

// "(2, 4, 8, 8)" / "(7,)": shapes written the way Python users see them.
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out << (i ? ", " : "") << sizes[i];
  }
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// "float32" / "bfloat16": dtypes written the way Python users see them.
inline std::string dtype_str(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return std::string(c10::toString(dtype));
  }
}

// x is [B, C, H, W] on the CPU in float32, float64, float16 or bfloat16 (what every CPU kernel here takes).
inline void check_image(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x has shape ", shape_str(x.sizes()), ", expected 4 dims [B, C, H, W]");
  TORCH_CHECK(x.device().is_cpu(), op, ": x is on ", x.device(), ", this kernel runs on cpu");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                       x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   op, ": x has dtype ", dtype_str(x.scalar_type()),
                   ", expected one of float32, float64, float16, bfloat16");
}

// t in dtype and contiguous: t itself, with no dispatcher call, when it already is both (the common case).
inline at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

// t in dtype: t itself when it already is.
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// Register tiles written with GCC vector extensions (`typedef T vec __attribute__((vector_size(32)))`) stay in
// registers only when every loop over a tile has a constant trip count and is unrolled before GCC's scalar
// replacement runs: put DARTS_UNROLL before those loops, and zero a tile with such a loop, not `vec a[n] = {}`
// (that one zeroes it on the stack with rep stos and copies it out through 16-byte moves: store-forwarding stalls
// that cost more than the arithmetic).
#define DARTS_UNROLL _Pragma("GCC unroll 16")

// at::parallel_for whose tasks run f(begin, end) compiled twice: for AVX2 + FMA, chosen at run time when the CPU
// has them, and for the baseline ISA the extension is built for. `flatten` inlines f and everything it calls into
// each copy, so that the vectoriser sees the wider registers (GCC and Clang, x86-64; elsewhere one plain copy).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename F>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}
template <typename F>
__attribute__((flatten)) void run_baseline(const F& f, int64_t begin, int64_t end) {
  f(begin, end);
}
inline bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (cpu_has_avx2()) {
    at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { run_avx2(f, b, e); });
  } else {
    at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { run_baseline(f, b, e); });
  }
}
#else
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}
#endif

}  // namespace fastdarts
