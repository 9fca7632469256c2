"""The Ascend build decision (build_ascend.py) with and without a CANN toolkit, simulated through the
environment: no toolkit means one clear line and no extension; a toolkit and torch_npu mean the
`moge_kernels._ascend_C` extension; the CPU/CUDA extensions do not depend on either. No compiler runs."""
import os
import runpy
import sys
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import build_ascend  # noqa: E402


@pytest.fixture
def toolkit(tmp_path):
    path = tmp_path / "ascend-toolkit" / "latest"
    (path / "include").mkdir(parents=True)
    return str(path)


@pytest.fixture
def torch_npu_dir(tmp_path):
    """A directory laid out like an installed torch_npu (headers and libtorch_npu.so are only named)."""
    path = tmp_path / "site-packages" / "torch_npu"
    (path / "include" / "third_party" / "op-plugin" / "op_plugin" / "include").mkdir(parents=True)
    (path / "lib").mkdir()
    return str(path)


def test_no_toolkit_skips_with_one_clear_line():
    lines = []
    assert build_ascend.ascend_extensions(lines.append, env={}) == []
    assert lines == ["no CANN toolkit (ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME not set): Ascend extension skipped"]


@pytest.mark.parametrize("var", build_ascend.TOOLKIT_VARS)
def test_toolkit_and_torch_npu_build_the_extension(var, toolkit, torch_npu_dir):
    lines = []
    exts = build_ascend.ascend_extensions(lines.append, env={var: toolkit}, torch_npu_dir=torch_npu_dir)
    assert len(lines) == 1 and toolkit in lines[0] and lines[0].startswith("building the Ascend extension")
    [ext] = exts
    assert ext.name == "moge_kernels._ascend_C"
    assert {"csrc/ascend/ascend_ops.cpp", "csrc/ascend/registration.cpp", "csrc/checks.cpp"} <= set(ext.sources)
    assert all((ROOT / source).is_file() for source in ext.sources)
    assert os.path.join(torch_npu_dir, "include", "third_party", "op-plugin", "op_plugin", "include") \
        in ext.include_dirs                                   # npu_cpp_extension.h
    assert os.path.join(toolkit, "include") in ext.include_dirs
    assert "torch_npu" in ext.libraries and os.path.join(torch_npu_dir, "lib") in ext.library_dirs
    assert any(flag.startswith("-DCURRENT_VERSION=") for flag in ext.extra_compile_args["cxx"])


def test_toolkit_without_torch_npu_skips(toolkit, monkeypatch):
    monkeypatch.setattr(build_ascend, "find_torch_npu", lambda: None)
    lines = []
    assert build_ascend.ascend_extensions(lines.append, env={"ASCEND_HOME_PATH": toolkit}) == []
    assert lines == [f"CANN toolkit at {toolkit} but torch_npu is not installed: Ascend extension skipped"]


def test_toolkit_variable_naming_a_missing_directory_skips(tmp_path):
    missing = str(tmp_path / "nowhere")
    build, message = build_ascend.ascend_build_plan({"ASCEND_TOOLKIT_HOME": missing})
    assert not build and message == f"ASCEND_TOOLKIT_HOME={missing} is not a directory: Ascend extension skipped"


def test_forcing(toolkit, torch_npu_dir):
    env = {"ASCEND_HOME_PATH": toolkit, "MOGE_BUILD_ASCEND": "0"}
    assert build_ascend.ascend_build_plan(env, torch_npu_dir) == (False, "MOGE_BUILD_ASCEND=0: Ascend extension skipped")
    with pytest.raises(RuntimeError, match="MOGE_BUILD_ASCEND=1 but no CANN toolkit"):
        build_ascend.ascend_build_plan({"MOGE_BUILD_ASCEND": "1"})
    assert build_ascend.ascend_build_plan({"ASCEND_HOME_PATH": toolkit, "MOGE_BUILD_ASCEND": "1"}, torch_npu_dir)[0]


def test_torch_npu_is_found_without_being_imported():
    before = set(sys.modules)
    build_ascend.find_torch_npu()
    assert "torch_npu" not in set(sys.modules) - before


@pytest.mark.parametrize("version,macro", [("2.13.0+cpu", "-DCURRENT_VERSION=12"), ("2.5.1", "-DCURRENT_VERSION=4"),
                                           ("2.7.1+cu126", "-DCURRENT_VERSION=6")])
def test_op_plugin_version_macro(version, macro):
    assert build_ascend.op_plugin_version_macro(version) == macro


def _setup_py_extensions(monkeypatch, capsys, env):
    """Run setup.py with setuptools.setup replaced by a recorder: its extension list, and its log lines."""
    recorded = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: recorded.update(kwargs))
    for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "MOGE_BUILD_ASCEND", "MOGE_BUILD_CUDA"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    capsys.readouterr()
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return [ext.name for ext in recorded["ext_modules"]], capsys.readouterr().err


def test_setup_py_cpu_and_cuda_extensions_do_not_depend_on_cann(monkeypatch, capsys, toolkit):
    if "build_ascend" not in (ROOT / "setup.py").read_text():
        pytest.skip("setup.py does not call build_ascend.ascend_extensions yet")
    monkeypatch.setattr(build_ascend, "find_torch_npu", lambda: None)
    without, log_without = _setup_py_extensions(monkeypatch, capsys, {})
    with_toolkit, log_with = _setup_py_extensions(monkeypatch, capsys, {"ASCEND_HOME_PATH": toolkit})
    assert without == with_toolkit and "moge_kernels._C" in without
    assert "moge_kernels._ascend_C" not in without
    assert "Ascend extension skipped" in log_without and "Ascend extension skipped" in log_with
