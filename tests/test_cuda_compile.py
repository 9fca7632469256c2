"""CI check (no GPU needed) that the CUDA backend's sources compile: csrc/cuda/*.cu with nvcc for sm_90
(inline PTX, register use and shared memory included), and the ATen glue (csrc/cuda/*.cpp) through the
host compiler against the installed torch's headers.

Why not setup.py: it builds the CUDA extension only with a CUDA build of torch (torch.version.cuda), and
CI has the CPU wheel. The .cu files include no ATen header on purpose, so they need only the toolkit. The
glue needs c10/cuda headers, which the CPU wheel ships except for one generated file
(c10/cuda/impl/cuda_cmake_macros.h, a single define): the test writes it into a scratch include folder.
Skipped when nvcc is absent. MOGE_CI_CUDA_ARCHS (default "90a", as setup.py builds for Hopper, with
MOGE_SM90A so the wgmma launcher compiles too) picks the targets, e.g. "80,90a".
"""
import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
# What torch.utils.cpp_extension.CUDAExtension passes to nvcc, minus the build-specific parts.
TORCH_NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
                    "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "-D__CUDA_NO_HALF2_OPERATORS__"]


def _nvcc():
    for candidate in (os.environ.get("CUDA_HOME", "") + "/bin/nvcc", shutil.which("nvcc") or "",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit)")


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _kernel_cmd(source, out_dir):
    archs = os.environ.get("MOGE_CI_CUDA_ARCHS", "90a").split(",")
    gencode = [f"-gencode=arch=compute_{a.strip()},code=sm_{a.strip()}" for a in archs if a.strip()]
    return [NVCC, *TORCH_NVCC_FLAGS, "-DMOGE_SM90A=1", *gencode, "-Xptxas", "-v", "-I", str(CUDA_SRC), "-c",
            str(source), "-o", str(out_dir / (source.stem + ".o"))]


def _host_cmd(out_dir):
    # One translation unit holding every glue file: the torch headers are parsed once.
    unit = out_dir / "cuda_host_glue.cpp"
    unit.write_text("".join(f'#include "{p}"\n' for p in sorted(CUDA_SRC.glob("*.cpp"))))
    shim = out_dir / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_include = pathlib.Path(torch.__file__).parent / "include"
    return [NVCC, "-std=c++17", "-x", "c++", "-Xcompiler", "-fsyntax-only", "-w",
            "-DPy_LIMITED_API=0x03090000", "-I", str(out_dir / "shim"), "-I", str(torch_include),
            "-I", str(torch_include / "torch" / "csrc" / "api" / "include"),
            "-I", sysconfig.get_paths()["include"], "-c", str(unit), "-o", str(out_dir / "glue.o")]


def test_cuda_sources_compile(tmp_path):
    kernels = sorted(CUDA_SRC.glob("*.cu"))
    assert kernels, "no CUDA sources in csrc/cuda"
    commands = {src.name: _kernel_cmd(src, tmp_path) for src in kernels}
    if (pathlib.Path(torch.__file__).parent / "include" / "c10" / "cuda" / "CUDAStream.h").exists():
        commands["ATen glue (*.cpp)"] = _host_cmd(tmp_path)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(commands, pool.map(_run, commands.values())))
    failures = {name: log for name, (rc, log) in results.items() if rc != 0}
    assert not failures, "\n\n".join(f"== {name}\n{log[-4000:]}" for name, log in failures.items())
    # Spilled accumulators would live in local memory: slow, so a regression. The pipelined big-tile
    # variants sit at the 255-register cap and spill one or two words outside the mma loop: allowed.
    spills = [f"{name}: {m.group(0)}" for name, (_, log) in results.items()
              for m in re.finditer(r"(\d+) bytes spill stores", log) if int(m.group(1)) > 32]
    assert not spills, "\n".join(spills)
