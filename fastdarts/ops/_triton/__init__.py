"""Triton kernels of fastdarts ops, one module per op stem; imported only where Triton runs them (a CUDA device, or
the CPU under ``TRITON_INTERPRET=1`` in the tests)."""
