"""Build fastdarts and its compiled extension ``fastdarts._C``.

Install against the torch that is already installed (never with build isolation):

    pip install --no-deps --no-build-isolation -e .

``fastdarts._C`` holds the C++ CPU kernels (always) and the CUDA kernels (when a CUDA toolkit is found).
Environment: FASTDARTS_SKIP_EXT=1 gives a pure-Python install, FASTDARTS_FORCE_CUDA=1 fails when no CUDA
toolkit is found, TORCH_CUDA_ARCH_LIST picks the GPU archs (default "8.0;9.0"), CUDA_HOME/CUDA_PATH the toolkit.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SKIP_EXT = os.environ.get("FASTDARTS_SKIP_EXT", "0") == "1"
FORCE_CUDA = os.environ.get("FASTDARTS_FORCE_CUDA", "0") == "1"


def is_cuda_root(path: str | None) -> bool:
    """A CUDA toolkit root has bin/nvcc and the CUDA runtime library."""
    if not path:
        return False
    root = Path(path)
    has_cudart = bool(glob.glob(str(root / "lib64" / "libcudart.so*"))) or bool(
        glob.glob(str(root / "targets" / "*" / "lib" / "libcudart.so*"))
    )
    return (root / "bin" / "nvcc").is_file() and has_cudart


def find_cuda_home() -> str | None:
    # `nvcc` on PATH may be a wrapper script outside the toolkit, so every guess is validated.
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    versioned = glob.glob("/usr/local/cuda-*")
    candidates += sorted(versioned, key=lambda p: [int(n) for n in re.findall(r"\d+", p)], reverse=True)
    return next((c for c in candidates if is_cuda_root(c)), None)


def nvcc_version(cuda_home: str) -> str | None:
    out = subprocess.run(
        [f"{cuda_home}/bin/nvcc", "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


CUDA_HOME = None if SKIP_EXT else find_cuda_home()
if FORCE_CUDA and not SKIP_EXT and CUDA_HOME is None:
    sys.exit(
        "FASTDARTS_FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to a folder with bin/nvcc "
        "and lib64/libcudart.so"
    )
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, so set it first.
    os.environ["CUDA_HOME"] = CUDA_HOME

cmdclass = {}
ext_modules = []
build_info = {"ext": False, "torch": None, "cuda": None, "archs": None, "with_cuda": False, "cxx_flags": []}

if not SKIP_EXT:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class BuildExt(BuildExtension):
        """Keeps ninja's object files in build/ so that rebuilds (editable installs too) are incremental."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(ROOT / "build" / f"temp-{sys.implementation.cache_tag}")

    with_cuda = CUDA_HOME is not None
    cxx_flags = ["-O3", "-fopenmp"] + (["-DWITH_CUDA"] if with_cuda else [])
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-DWITH_CUDA"]
    sources = ["csrc/_C.cpp"] + sorted(glob.glob("csrc/ops/*.cpp", root_dir=ROOT))
    kwargs = {"include_dirs": [str(ROOT / "csrc")], "extra_link_args": ["-fopenmp"]}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/ops/cuda/*.cu", root_dir=ROOT))
        ext = CUDAExtension(
            "fastdarts._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs
        )
    else:
        ext = CppExtension("fastdarts._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    ext_modules = [ext]
    cmdclass["build_ext"] = BuildExt
    build_info = {
        "ext": True,
        "torch": torch.__version__,
        "cuda": nvcc_version(CUDA_HOME) if with_cuda else None,
        "archs": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None,
        "with_cuda": with_cuda,
        "cxx_flags": cxx_flags,
        "nvcc_flags": nvcc_flags if with_cuda else [],
    }


class BuildPy(build_py):
    """Writes fastdarts/_build_info.json, which fastdarts.backend reads before loading fastdarts._C."""

    def run(self):
        super().run()
        text = json.dumps(build_info, indent=2) + "\n"
        for folder in {ROOT / "fastdarts", Path(self.build_lib) / "fastdarts"}:
            if folder.is_dir():
                (folder / "_build_info.json").write_text(text)


cmdclass["build_py"] = BuildPy
setup(ext_modules=ext_modules, cmdclass=cmdclass)
