// Helpers shared by every op's input checks: values written the way Python users see them.
#pragma once

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

}  // namespace fastdarts
