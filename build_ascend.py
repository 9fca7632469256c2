"""Build decision for the Ascend extension `moge_kernels._ascend_C` (csrc/ascend/); setup.py calls
`ascend_extensions(log)` and adds what it returns to its extensions.

The extension is built only where a CANN toolkit is found (ASCEND_HOME_PATH, which CANN's set_env.sh
exports, or ASCEND_TOOLKIT_HOME) and torch_npu is installed; anywhere else the build says so in one line
and goes on with the CPU/CUDA extensions unchanged. torch_npu is located without being imported: importing
it loads the CANN runtime and the NPU driver, which a build machine need not have.

Environment:
  MOGE_BUILD_ASCEND=0|1                   force the Ascend extension off (or on: then a missing
                                          toolkit or torch_npu is an error)
  ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME  the CANN toolkit (e.g. /usr/local/Ascend/ascend-toolkit/latest)
"""
from __future__ import annotations

import glob
import importlib.util
import os

ROOT = os.path.dirname(os.path.abspath(__file__))
TOOLKIT_VARS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
EXTENSION = "moge_kernels._ascend_C"


def find_cann_toolkit(env) -> tuple[str | None, str]:
    """(toolkit directory or None, why not)."""
    for var in TOOLKIT_VARS:
        path = env.get(var, "").strip()
        if path:
            if os.path.isdir(path):
                return path, ""
            return None, f"{var}={path} is not a directory"
    return None, f"no CANN toolkit ({' / '.join(TOOLKIT_VARS)} not set)"


def find_torch_npu() -> str | None:
    """torch_npu's install directory, found without importing it; None if it is not installed."""
    spec = importlib.util.find_spec("torch_npu")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def ascend_build_plan(env=None, torch_npu_dir=None) -> tuple[bool, str]:
    """(build the extension?, one line saying why). `torch_npu_dir` defaults to find_torch_npu()."""
    env = os.environ if env is None else env
    forced = env.get("MOGE_BUILD_ASCEND", "").strip()
    if forced == "0":
        return False, "MOGE_BUILD_ASCEND=0: Ascend extension skipped"
    toolkit, why = find_cann_toolkit(env)
    if toolkit is not None:
        torch_npu_dir = torch_npu_dir or find_torch_npu()
        if torch_npu_dir is None:
            why = f"CANN toolkit at {toolkit} but torch_npu is not installed"
    if toolkit is None or torch_npu_dir is None:
        if forced == "1":
            raise RuntimeError(f"MOGE_BUILD_ASCEND=1 but {why}")
        return False, f"{why}: Ascend extension skipped"
    return True, f"building the Ascend extension against CANN at {toolkit}, torch_npu at {torch_npu_dir}"


def op_plugin_version_macro(torch_version: str) -> str:
    """-DCURRENT_VERSION for op-plugin's headers (op_plugin/utils/Version.h: V2R1 = 0, ..., V2R13 = 12).

    NpuExtension leaves it undefined, which the preprocessor reads as 0 (torch 2.1); from torch 2.13 on
    that selects a removed ATen header (ATen/NamedTensorUtils.h) and the build fails."""
    major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    if major != 2:
        raise RuntimeError(f"the Ascend extension needs torch 2.x, got {torch_version}")
    return f"-DCURRENT_VERSION={minor - 1}"


def ascend_extensions(log, env=None, torch_npu_dir=None, debug=False) -> list:
    """[the Ascend CppExtension] or []; `log` gets one line either way."""
    env = os.environ if env is None else env
    build, message = ascend_build_plan(env, torch_npu_dir)
    log(message)
    if not build:
        return []
    import torch
    from torch.utils import cpp_extension

    toolkit, _ = find_cann_toolkit(env)
    torch_npu_dir = torch_npu_dir or find_torch_npu()
    npu_include = os.path.join(torch_npu_dir, "include")
    npu_lib = os.path.join(torch_npu_dir, "lib")
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "ascend", "*.cpp")))
    # Include and link flags of torch_npu.utils.cpp_extension.NpuExtension plus the op-plugin include
    # directories its C++-extension example adds (npu_cpp_extension.h, EXEC_NPU_CMD_EXT, aclnn types).
    include_dirs = [
        npu_include,
        os.path.join(npu_include, "third_party", "hccl", "inc"),
        os.path.join(npu_include, "third_party", "acl", "inc"),
        os.path.join(npu_include, "third_party", "op-plugin"),
        os.path.join(npu_include, "third_party", "op-plugin", "op_plugin", "include"),
        os.path.join(toolkit, "include"),
    ]
    cxx = (["-O0", "-g"] if debug else ["-O3"]) + ["-std=c++17", op_plugin_version_macro(torch.__version__)]
    return [cpp_extension.CppExtension(
        EXTENSION, sources + ["csrc/checks.cpp"],
        include_dirs=include_dirs, library_dirs=[npu_lib], runtime_library_dirs=[npu_lib],
        libraries=["torch_npu"], extra_compile_args={"cxx": cxx})]
