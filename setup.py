"""Build of moge_kernels' C++ extensions.

Always: `moge_kernels._C`, the CPU kernels (csrc/*.cpp, csrc/cpu/). Also `moge_kernels._cuda_C`
(csrc/cuda/) when a CUDA toolkit and a CUDA build of torch are both present, and `moge_kernels._ascend_C`
(csrc/ascend/) where a CANN toolkit and torch_npu are found; the decision reads
CUDA_HOME and torch.version.cuda, never torch.cuda.is_available(), so a GPU-less build box still builds
the CUDA kernels. No toolkit means a CPU-only build, never a failed install.

Environment:
  MOGE_BUILD_CUDA=0|1     force the CUDA extension off (or on: then a missing toolkit is an error)
  MOGE_BUILD_ASCEND=0|1   the same for the Ascend (CANN) extension, decided in build_ascend.py
  TORCH_CUDA_ARCH_LIST    GPU targets; default "8.0;9.0a" (9.0a: Hopper with wgmma, the fast grouped GEMM;
                          a list without 9.0a builds no wgmma kernel and Hopper runs the mma.sync one)
  MOGE_DEBUG_BUILD=1      -O0 -g, and -lineinfo for CUDA
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # build_ascend.py sits beside setup.py; PEP 517 backends do not put it on sys.path
from build_ascend import ascend_extensions  # noqa: E402  Ascend (CANN) extension: built only where CANN is found


def _log(msg):
    print(f"moge_kernels build: {msg}", file=sys.stderr)


def _want_cuda():
    forced = os.environ.get("MOGE_BUILD_CUDA")
    has_toolkit = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if forced == "0":
        _log("MOGE_BUILD_CUDA=0: CUDA extension skipped")
        return False
    if forced == "1" and not has_toolkit:
        raise RuntimeError("MOGE_BUILD_CUDA=1 but no CUDA toolkit (CUDA_HOME) or CPU-only torch "
                           f"(torch.version.cuda={torch.version.cuda})")
    if not has_toolkit:
        why = "no CUDA toolkit found" if cpp_extension.CUDA_HOME is None else \
            f"torch {torch.__version__} is a CPU build"
        _log(f"{why}: building the CPU extension only")
        return False
    return bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat)))


def extensions():
    debug = os.environ.get("MOGE_DEBUG_BUILD") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++17", "-DPy_LIMITED_API=0x03090000"]
    exts = [cpp_extension.CppExtension(
        "moge_kernels._C", _sources("csrc/*.cpp", "csrc/cpu/*.cpp"),
        extra_compile_args={"cxx": cxx + ["-fopenmp"]}, extra_link_args=["-fopenmp"], py_limited_api=True)]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"] + (["-lineinfo", "-g"] if debug else [])
        # The host side may launch the wgmma kernel only if its sm_90a cubin is in the build.
        if "9.0a" in os.environ["TORCH_CUDA_ARCH_LIST"]:
            nvcc.append("-DMOGE_SM90A=1")
        exts.append(cpp_extension.CUDAExtension(
            "moge_kernels._cuda_C", _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp", "csrc/checks.cpp"),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, py_limited_api=True))
        _log(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    exts += ascend_extensions(_log, debug=debug)
    return exts


EXTENSIONS = extensions()
# The wheel is tagged abi3 only when every extension keeps to the limited API (torch_npu's headers don't).
ABI3 = all(getattr(ext, "py_limited_api", False) for ext in EXTENSIONS)

setup(
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ABI3 else {},
)
