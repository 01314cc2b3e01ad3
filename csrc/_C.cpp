// Registration stub of fastdarts._C: the operator schemas live here, the kernels in csrc/ops/<op>.cpp (CPU)
// and csrc/ops/cuda/<op>.cu (CUDA). Python loads this module only for its side effect of registering the
// operators under torch.ops.fastdarts_C; it has no Python functions of its own (no pybind11).
#include <Python.h>

#include <torch/library.h>

extern "C" {
// An empty module: importing it runs the static TORCH_LIBRARY registrations below and in csrc/ops/.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      nullptr,  // doc
      -1,  // no per-interpreter state
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastdarts_C, m) {
  // out = sum_k weights[k] * xs[k]
  m.def("mixed_op(Tensor[] xs, Tensor weights) -> Tensor");
  // grad_xs[k] = weights[k] * grad; grad_weights[k] = <grad, xs[k]>
  m.def("mixed_op_backward(Tensor grad, Tensor[] xs, Tensor weights) -> (Tensor[], Tensor)");
  // out[b, c] = x[b, c] (*) weight[c, 0], stride s, zero padding p, dilation d
  m.def("depthwise_conv(Tensor x, Tensor weight, int stride, int padding, int dilation) -> Tensor");
  // (grad_x, grad_weight), each computed only where output_mask says so (empty elsewhere)
  m.def("depthwise_conv_backward(Tensor grad, Tensor x, Tensor weight, int stride, int padding, int dilation, "
        "bool[2] output_mask) -> (Tensor, Tensor)");
  // PC-DARTS' partial-channel edge: channel_shuffle(cat([sum_k weights[k] * xs[k], bypass(x[:, C / groups:])]),
  // groups) with bypass the identity (stride 1) or a 2x2 max pool (stride 2)
  m.def("partial_channel(Tensor[] xs, Tensor weights, Tensor x, int groups, int stride) -> Tensor");
  // (grad_xs, grad_weights, grad_x); grad_x is zero in the first C / groups channels (they reach x through xs)
  m.def("partial_channel_backward(Tensor grad, Tensor[] xs, Tensor weights, Tensor x, int groups, int stride) "
        "-> (Tensor[], Tensor, Tensor)");
  // DARTS' ReLU -> depthwise conv -> pointwise conv -> BatchNorm unit: (y, d, p, mean, invstd, new_running_mean,
  // new_running_var) with d the depthwise output, p the pointwise output (both kept for the backward, in fp32 or
  // fp64) and the running statistics after this batch (empty unless training with running statistics)
  m.def("dil_conv(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor? running_mean, Tensor? running_var, int stride, int padding, int dilation, bool training, "
        "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (grad_x, grad_dw_weight, grad_pw_weight, grad_bn_weight, grad_bn_bias), each empty where output_mask is False
  m.def("dil_conv_backward(Tensor grad, Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? bn_weight, "
        "Tensor d, Tensor p, Tensor mean, Tensor invstd, int stride, int padding, int dilation, bool training, "
        "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // DARTS' pooling candidate: 3x3 max or average pool (padding 1, average over the pixels inside) -> BatchNorm
  // without affine: (y, p, taps, mean, invstd, new_running_mean, new_running_var) with p the pool output (fp32 or
  // fp64), taps the winning tap 0..8 of each max-pool output (int32; empty for the average)
  m.def("pool_bn(Tensor x, Tensor? running_mean, Tensor? running_var, bool is_max, int stride, bool training, "
        "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad_x
  m.def("pool_bn_backward(Tensor grad, Tensor x, Tensor p, Tensor taps, Tensor mean, Tensor invstd, bool is_max, "
        "int stride, bool training) -> Tensor");
}
