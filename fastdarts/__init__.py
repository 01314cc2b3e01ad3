"""fastdarts: differentiable architecture search (DARTS and its family) on fused kernels.

    import fastdarts
    fastdarts.info()                    # which backends are live, and why not
    fastdarts.set_backend("reference")  # pure PyTorch everywhere ("auto": kernels where live)
    fastdarts.tune_cpu_allocator()      # keep freed tensor memory in the process (what `fastdarts search` does)

Subpackages: fastdarts.ops (kernels and their references), fastdarts.nn (MixedOp, Cell, SearchNetwork),
fastdarts.spaces, fastdarts.search (Architect, run_search), fastdarts.select (genotypes).
"""

from fastdarts.backend import get_backend, info, set_backend, tune_cpu_allocator
from fastdarts.errors import UsageError

__version__ = "0.1.0"

__all__ = ["UsageError", "__version__", "get_backend", "info", "set_backend", "tune_cpu_allocator"]
