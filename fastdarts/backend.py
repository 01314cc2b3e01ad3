"""Which kernels fastdarts runs: the compiled extension ``fastdarts._C`` (C++ CPU and CUDA kernels), Triton,
or the pure-PyTorch references.

Importing this module never fails: when ``fastdarts._C`` is missing, was built against another torch, or does
not load, the reason is recorded and every op falls back to its ``<op>_ref``. :func:`info` says what is live.
"""

import ctypes
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from fastdarts.errors import UsageError

__all__ = [
    "BACKENDS",
    "autocast_enabled",
    "extension_loaded",
    "get_backend",
    "info",
    "kernel_live",
    "set_backend",
    "triton_live",
    "tune_cpu_allocator",
]

logger = logging.getLogger(__name__)

#: "auto": compiled kernels where they are live, the pure-PyTorch reference elsewhere.
#: "reference": the pure-PyTorch reference everywhere (the oracle; also a way to rule kernels out).
BACKENDS = ("auto", "reference")

_REBUILD = "rebuild it with `pip install --no-deps --no-build-isolation -e .` in the fastdarts checkout"
_backend = "auto"


def _version() -> str:
    try:
        return importlib.metadata.version("fastdarts")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def _torch_release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a torch version string such as "2.11.0+cu130"."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


def _read_build_info() -> dict[str, Any] | None:
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_extension(build: dict[str, Any] | None) -> tuple[bool, str]:
    """Imports fastdarts._C (which registers torch.ops.fastdarts_C); returns (loaded, why)."""
    if build is not None and not build.get("ext", True):
        return False, "fastdarts was installed with FASTDARTS_SKIP_EXT=1 (pure PyTorch); " + _REBUILD
    if importlib.util.find_spec("fastdarts._C") is None:
        return False, "fastdarts._C is not built; " + _REBUILD
    if build is not None and build.get("torch"):
        built, running = _torch_release(build["torch"]), _torch_release(torch.__version__)
        if built != running:
            why = (
                f"fastdarts._C was built against torch {build['torch']} but torch {torch.__version__} "
                f"is running; {_REBUILD}"
            )
            logger.warning("%s (using the pure-PyTorch reference ops)", why)
            return False, why
    try:
        importlib.import_module("fastdarts._C")
    except Exception as exc:  # noqa: BLE001 - any load failure (undefined symbol, no libcudart...) means "not live"
        why = f"fastdarts._C failed to load ({type(exc).__name__}: {exc}); {_REBUILD}"
        logger.warning("%s (using the pure-PyTorch reference ops)", why)
        return False, why
    return True, "fastdarts._C loaded"


_BUILD = _read_build_info()
_EXT_LOADED, _EXT_WHY = _load_extension(_BUILD)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_registered: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result  # torch.compile cannot trace the dispatcher query; fixed once loaded
def _has_kernel(op_name: str, device_type: str) -> bool:
    """Whether fastdarts._C registered a kernel for ``fastdarts_C::<op_name>`` on this device type."""
    key = (op_name, device_type)
    if key not in _registered:
        dispatch_key = _DISPATCH_KEYS.get(device_type)
        _registered[key] = bool(
            _EXT_LOADED
            and dispatch_key is not None
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdarts_C::{op_name}", dispatch_key)
        )
    return _registered[key]


def extension_loaded() -> bool:
    """Whether ``fastdarts._C`` loaded, so that its operators ``torch.ops.fastdarts_C.*`` exist."""
    return _EXT_LOADED


def set_backend(name: str) -> None:
    """Selects the kernels that fastdarts ops run, for the whole process.

    Args:
        name: "auto" (compiled kernels where live, the pure-PyTorch reference elsewhere) or "reference"
            (pure PyTorch everywhere).

    Raises:
        UsageError: ``name`` is not one of :data:`BACKENDS`.
    """
    global _backend
    if name not in BACKENDS:
        raise UsageError(f"backend {name!r} is unknown, expected one of {', '.join(map(repr, BACKENDS))}")
    _backend = name


def get_backend() -> str:
    """The backend chosen with :func:`set_backend` ("auto" unless changed)."""
    return _backend


def kernel_live(op_name: str, device: torch.device) -> bool:
    """Whether op ``op_name`` runs its compiled kernel for tensors on ``device``.

    True when the backend is "auto", ``fastdarts._C`` registered ``fastdarts_C::<op_name>`` for the device's type
    (CPU or CUDA), ``torch.autocast`` is off for it, no ``torch.func`` transform is running and torch.compile is
    not tracing: under autocast the ops run their references, plain ATen calls that autocast casts as it casts
    any model (the kernels take one dtype); under ``vmap`` / ``grad`` too, ATen ops having the transforms'
    batching rules (the kernels' autograd Functions have none); and under torch.compile, which compiles those
    references.
    """
    device = torch.device(device)
    return _backend == "auto" and _has_kernel(op_name, device.type) and _plain(device)


def autocast_enabled(device: torch.device) -> bool:
    """``torch.is_autocast_enabled`` for the device's type; False on the meta device, which autocast does not
    know (it raises there), so that a forward on meta tensors (shape inference) runs the references."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def _plain(device: torch.device) -> bool:
    """Neither autocast on ``device``, nor a torch.func transform (vmap, grad), nor torch.compile tracing. Under
    torch.compile the ops are their references, which it compiles: dynamo cannot tell whether it traces inside a
    transform, and a compiled kernel traced inside one loses its autograd (silently zero gradients)."""
    if autocast_enabled(device) or torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is None


def triton_live(device: torch.device) -> bool:
    """Whether ops with a Triton kernel run it for tensors on ``device``: the backend is "auto", the device is a
    GPU, Triton imports, ``torch.autocast`` is off, no torch.func transform runs and torch.compile is not tracing
    (as :func:`kernel_live`)."""
    device = torch.device(device)
    return _backend == "auto" and device.type == "cuda" and _triton_status()[0] and _plain(device)


# glibc mallopt parameters and the values tune_cpu_allocator sets: tensors up to 32 MiB (glibc's largest mmap
# threshold) come from the heap, and up to 512 MiB of freed heap is kept instead of being returned to the OS.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOPT = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 512 << 20), (_M_TOP_PAD, 64 << 20))


def tune_cpu_allocator() -> bool:
    """Makes glibc keep freed tensor memory for the next tensor instead of unmapping it, for this whole process.

    PyTorch's CPU allocator is plain malloc, and glibc maps tensors of more than 128 KiB (a 16x16x32x32 CIFAR cell
    state is 1 MiB) fresh, or returns freed heap to the OS, so that they are page-faulted in again (its thresholds
    adapt to what was freed, but a search step's thousands of allocations keep hitting this). On this project's
    2-core machine half of a pooling kernel's time went to those page faults. This raises
    glibc's mmap and trim thresholds (``mallopt``), as the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    environment variables would: it affects every allocation of the process (torch's and ours alike), holds on to
    up to 512 MiB of freed memory, and is what ``fastdarts search`` does at start. A no-op returning False where
    malloc is not glibc's.

    Returns:
        Whether all settings were applied.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(param, value) == 1 for param, value in _MALLOPT)


@functools.cache
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        importlib.import_module("triton")
    except Exception as exc:  # noqa: BLE001 - a broken triton install must not break info()
        return False, f"triton failed to import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return False, "no GPU: torch.cuda.is_available() is False"
    return True, "triton imported and a GPU is present"


def info() -> dict[str, Any]:
    """Which backends are live, and why not.

    Returns:
        A dict with keys "version" (of fastdarts), "torch" (the running torch), "backend" (the selection,
        see :func:`set_backend`), "build" (fastdarts/_build_info.json written at build time, or None), and
        "cpp", "cuda", "triton", each ``{"live": bool, "why": str}``: "cpp" is live when ``fastdarts._C``
        loaded, "cuda" when it also has CUDA kernels and a GPU is present, "triton" when Triton imports and a
        GPU is present.
    """
    cpp = {"live": _EXT_LOADED, "why": _EXT_WHY}
    if not _EXT_LOADED:
        cuda = {"live": False, "why": _EXT_WHY}
    elif not _has_kernel("mixed_op", "cuda"):
        cuda = {"live": False, "why": "fastdarts._C was built without CUDA kernels (no CUDA toolkit found)"}
    elif not torch.cuda.is_available():
        cuda = {"live": False, "why": "no GPU: torch.cuda.is_available() is False"}
    else:
        cuda = {"live": True, "why": "CUDA kernels compiled in and a GPU is present"}
    triton_ok, triton_why = _triton_status()
    return {
        "version": _version(),
        "torch": torch.__version__,
        "backend": _backend,
        "build": _BUILD,
        "cpp": cpp,
        "cuda": cuda,
        "triton": {"live": triton_ok, "why": triton_why},
    }
