"""moge_kernels.options: every runtime switch parsed and validated once, overridable in code.

Import-time behaviour (the environment is read once, when the package is imported) runs in subprocesses
with the variable set; the code API runs in this process and restores every value it changes."""
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import moge_kernels as mk
from moge_kernels import options, registry

ROOT = pathlib.Path(__file__).resolve().parents[1]

# option -> (valid (given, stored) pairs from code, invalid values); environment spellings follow below
CASES = {
    "validate": ([(True, True), (False, False), ("1", True), ("off", False)], ["2", "maybe", 1, None]),
    "triton_autotune": ([(True, True), ("yes", True), ("0", False)], ["", "enable", 0.5]),
    "triton_mlp_streams": ([(None, None), ("auto", None), (True, True), ("true", True), ("0", False)],
                           ["sometimes", 2]),
    "cuda_gemm_tile": ([("auto", "auto"), ("wgmma", "wgmma"), ("WGMMA96", "wgmma96"), ("big", "big")],
                       ["wgmma_pp", "wgmma64", "mma", "", None, "wgmma_cl", "big4", "sq"]),
    "bwd_gemm": ([("auto", "auto"), ("Triton", "triton")], ["grouped_mm", "cuda"]),
    "ascend_impl": ([("python", "python"), ("cpp", "cpp")], ["c++", "npu"]),
    "eager_direct": ([(True, True), ("off", False), ("1", True)], ["direct", 2]),
    "triton_pdl": ([(True, True), ("off", False), ("yes", True)], ["pdl", 1]),
    "fp8_fast_accum": ([(True, True), ("0", False), ("on", True)], ["fast", 2]),
    "bench_flush": ([("read", "read"), ("WRITE", "write")], ["memset", True, 0]),
    "shared_expert_stream": ([(None, None), ("auto", None), (True, True), ("off", False)], ["side", 3]),
    "eager_graphs": ([(0, 0), (16, 16), ("8", 8), (" 4 ", 4)], [True, False, "on", -1, "-2", 1.5, None]),
    "triton_gemm_config": ([(None, None), ("64,128,64,8,4", (64, 128, 64, 8, 4)),
                            ("128,128,64,8,4,1,0,1,0,32", (128, 128, 64, 8, 4, True, False, True, 0, 32)),
                            ([16, 64, 64, 4, 6, True, 0, 0, 2], (16, 64, 64, 4, 6, True, False, False, 2))],
                           ["64,64,32,4", "64,64,32,4,x", "64,64,32,4,3,2", "0,64,32,4,3", "1,2,3,4,5,0,0,0,0,0,0,9",
                            "64,64,32,-4,3", 7]),
}


def _run(code: str, **env):
    """Run `code` in a fresh interpreter with the given environment variables (and no MOGE_* inherited)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MOGE_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**base, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def test_every_option_has_cases():
    assert set(CASES) | {"backend"} == set(options.NAMES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_valid_and_invalid(name):
    valid, invalid = CASES[name]
    for given, stored in valid:
        assert options.parse(name, given) == stored, given
    env = options._OPTIONS[name].env
    for value in invalid:
        with pytest.raises(ValueError) as info:
            options.parse(name, value)
        message = str(info.value)
        assert name in message and env in message and "expected" in message, message


def test_invalid_message_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"MOGE_CUDA_GEMM_TILE.*'wgmma96'.*'big'"):
        mk.set_options(cuda_gemm_tile="wgmma_clx")
    with pytest.raises(ValueError, match=r"MOGE_TRITON_MLP_STREAMS.*'auto' or True/False.*0/false/no/off"):
        mk.set_options(triton_mlp_streams="2")
    with pytest.raises(ValueError, match=r"MOGE_BWD_GEMM.*'auto', 'triton'"):
        mk.set_options(bwd_gemm="cutlass")
    with pytest.raises(ValueError, match=r"unknown option 'validat'.*validate"):
        mk.set_options(validat=True)


def test_gemm_config_fields_match_gemm_configs():
    gemm_configs = pytest.importorskip("moge_kernels.triton.gemm_configs")
    assert options.GEMM_CONFIG_FIELDS == tuple(f.name for f in dataclasses.fields(gemm_configs.GemmConfig))
    cfg = gemm_configs.GemmConfig(64, 128, 64, 8, 4, tma=True, split_n=True)
    assert options.parse("triton_gemm_config", cfg) == dataclasses.astuple(cfg)   # a GemmConfig in code


def test_set_options_validates_all_before_setting_any():
    before = mk.get_options()
    with pytest.raises(ValueError, match="cuda_gemm_tile"):
        mk.set_options(validate=True, cuda_gemm_tile="nope")
    assert mk.get_options() == before


def test_use_options_restores_also_on_exception():
    before = mk.get_options()
    with mk.use_options(validate=True, triton_mlp_streams=False, bwd_gemm="triton"):
        assert options.current.validate is True
        assert options.current.triton_mlp_streams is False
        assert options.current.bwd_gemm == "triton"
    assert mk.get_options() == before
    with pytest.raises(KeyError):
        with mk.use_options(validate=True, backend="reference"):
            assert mk.get_backend() == "reference"
            raise KeyError("inside")
    assert mk.get_options() == before and mk.get_backend() == before["backend"]


def test_current_is_read_only():
    with pytest.raises(AttributeError, match="set_options"):
        options.current.validate = True


def test_on_change_is_called_with_the_new_value():
    seen = []
    options.on_change("bwd_gemm", seen.append)
    try:
        with mk.use_options(bwd_gemm="triton"):
            mk.set_options(bwd_gemm="triton")     # unchanged: no second call
        assert seen == ["triton", "auto"]
    finally:
        options._listeners["bwd_gemm"].remove(seen.append)


def test_backend_option_is_the_registry_selection():
    with mk.use_options(backend="reference"):
        assert mk.get_backend() == "reference" and mk.get_options()["backend"] == "reference"
        assert mk.resolve("grouped_gemm", "cpu")[0] == "reference"
    assert mk.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be"):
        mk.set_options(backend="foo")


def test_validate_switches_value_checks():
    from moge_kernels import checks
    with mk.use_options(validate=False):
        assert checks.validate_values() is False
    with mk.use_options(validate=True):
        assert checks.validate_values() is True


def test_triton_options_change_the_kernel_choice():
    gemm_configs = pytest.importorskip("moge_kernels.triton.gemm_configs")
    assert gemm_configs.forced_config() is None
    with mk.use_options(triton_gemm_config="64,128,64,8,4,1"):
        assert gemm_configs.forced_config() == gemm_configs.GemmConfig(64, 128, 64, 8, 4, tma=True)
    assert gemm_configs.forced_config() is None
    with mk.use_options(triton_autotune=True):
        assert gemm_configs.autotune_enabled()
    assert not gemm_configs.autotune_enabled()


def test_mlp_streams_choice(monkeypatch):
    grouped_gemm = pytest.importorskip("moge_kernels.triton.grouped_gemm")
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])

    class FakeCuda:   # _two_streams looks at is_cuda, dtype, the shape and the element size only
        is_cuda, dtype, shape = True, torch.bfloat16, (64 * 64, 5120)

        def element_size(self):
            return 2

    x = FakeCuda()
    assert grouped_gemm._two_streams(x, 64, 1344)      # auto: on from 32 rows per expert (Pangu weights)
    x.shape = (64 * 128, 2048)                          # Qwen3-30B experts: 1.2 GB of weights
    assert not grouped_gemm._two_streams(x, 128, 768)   # eager: the fork/join would cost more than it gains
    capturing[0] = True
    assert grouped_gemm._two_streams(x, 128, 768)       # under CUDA-graph capture it is free
    capturing[0] = False
    with mk.use_options(triton_mlp_streams=False):
        x.shape = (64 * 64, 5120)
        assert not grouped_gemm._two_streams(x, 64, 1344)
    with mk.use_options(triton_mlp_streams=True):
        x.shape = (64, 128)                             # 1 row per expert: auto would say off
        assert grouped_gemm._two_streams(x, 64, 16)


def test_bwd_gemm_choice():
    """bwd_gemm="triton" takes the grouped_mm backend out of the backward GEMMs' order."""
    if not mk.backends()["grouped_mm"]["available"]:
        pytest.skip(mk.backends()["grouped_mm"]["reason"])
    for op in ("grouped_gemm_dgrad", "grouped_gemm_wgrad"):
        chain = [k.backend for k in mk.registry.candidates(op, "cuda", torch.bfloat16)]
        assert chain[0] == "grouped_mm"
        with mk.use_options(bwd_gemm="triton"):
            assert "grouped_mm" not in [k.backend for k in mk.registry.candidates(op, "cuda", torch.bfloat16)]
        assert [k.backend for k in mk.registry.candidates(op, "cuda", torch.bfloat16)] == chain


def test_cuda_gemm_tile_arguments_for_the_launcher():
    """The C++ launcher gets (variant, width) from _cuda.gemm_tile_args: check the mapping
    without the extension (moge_kernels/_cuda.py imports only where it was built)."""
    source = (ROOT / "moge_kernels" / "_cuda.py").read_text()
    start = source.index("def gemm_tile_args")
    namespace = {}
    exec(source[start:source.index("\ndef ", start + 1)], namespace)   # noqa: S102  the function alone
    tile_args = namespace["gemm_tile_args"]
    expected = {"auto": (0, 0), "wgmma": (0, 0), "wgmma96": (0, 96), "wgmma128": (0, 128), "big": (1, 0)}
    for tile, args in expected.items():
        assert tile_args(tile) == args, tile
    for tile in options.CUDA_GEMM_TILES:   # every allowed value maps to what the C++ setter accepts
        variant, width = tile_args(tile)
        assert 0 <= variant <= 1 and width in (0, 96, 128)
    header = (ROOT / "csrc" / "cuda" / "kernels.h").read_text()
    assert "kAuto = 0, kBig = 1 }" in header


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gemm_tile_reaches_the_extension():
    """The C++ setter rejects values outside its enum; on sm_90 with a 9.0a build, "auto" runs the wgmma
    kernel and "big" the mma.sync one (kernel names in the profiler): the option set in code decides."""
    cuda_backend = pytest.importorskip("moge_kernels._cuda")
    import ctypes
    lib = ctypes.CDLL(cuda_backend._cuda_C.__file__)
    assert lib.moge_cuda_set_gemm_tile(2, 0) == -1 and lib.moge_cuda_set_gemm_tile(0, 64) == -1
    if torch.cuda.get_device_capability() != (9, 0) or not cuda_backend.wgmma_built():
        pytest.skip("the wgmma / mma.sync switch needs an sm_90 device and a 9.0a build")
    from moge_kernels.testing import make_expert_weights, random_offsets
    x = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16)
    offsets = random_offsets(2048, 4, seed=3, device="cuda")
    w_gate_up, w_down = make_expert_weights(4, 512, 192, torch.bfloat16, "cuda", seed=3)

    def kernel_names(tile):
        with mk.use_backend("cuda"), mk.use_options(cuda_gemm_tile=tile):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                mk.grouped_mlp(x, w_gate_up, w_down, offsets)
                torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    assert sum("wgmma_kernel" in n for n in kernel_names("auto")) == 2
    big = kernel_names("big")
    assert big and not any("wgmma_kernel" in n for n in big), big
    assert sum("wgmma_kernel" in n for n in kernel_names("wgmma128")) == 2


# ----------------------------------------------------------------------------- the environment, at import
def test_env_read_at_import():
    code = ("import moge_kernels as mk, os; o = mk.get_options(); "
            "os.environ['MOGE_VALIDATE'] = '0'; "           # read once: a later change does nothing
            "print(o['validate'], o['triton_mlp_streams'], o['cuda_gemm_tile'], o['triton_gemm_config'], "
            "o['bwd_gemm'], mk.options.current.validate, mk.options.BENCH_COMMIT)")
    rc, out, err = _run(code, MOGE_VALIDATE="1", MOGE_TRITON_MLP_STREAMS="true", MOGE_CUDA_GEMM_TILE="wgmma128",
                        MOGE_TRITON_GEMM_CONFIG="64,64,32,4,3", MOGE_BWD_GEMM="triton",
                        MOGE_BENCH_COMMIT="abc123")
    assert rc == 0, err
    assert out.split() == ["True", "True", "wgmma128", "(64,", "64,", "32,", "4,", "3)", "triton", "True", "abc123"]


def test_env_empty_is_unset():
    rc, out, err = _run("import moge_kernels as mk; print(mk.get_options()['triton_mlp_streams'], "
                        "mk.get_options()['cuda_gemm_tile'])", MOGE_TRITON_MLP_STREAMS="", MOGE_CUDA_GEMM_TILE=" ")
    assert rc == 0, err
    assert out.split() == ["None", "auto"]


@pytest.mark.parametrize("var,value", [("MOGE_VALIDATE", "2"), ("MOGE_TRITON_MLP_STREAMS", "sometimes"),
                                       ("MOGE_CUDA_GEMM_TILE", "wgmma_pp"), ("MOGE_BWD_GEMM", "cutlass"),
                                       ("MOGE_TRITON_GEMM_CONFIG", "64,64"), ("MOGE_TRITON_AUTOTUNE", "x"),
                                       ("MOGE_ASCEND_IMPL", "c")])
def test_env_invalid_fails_import_naming_variable(var, value):
    rc, out, err = _run("import moge_kernels", **{var: value})
    assert rc != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("ValueError: environment variable " + var) and "expected" in last, err


def test_env_bad_backend_warns_and_imports():
    rc, out, err = _run("import warnings; warnings.simplefilter('always')\n"
                        "import moge_kernels as mk; print(mk.get_backend())", MOGE_BACKEND="foo")
    assert rc == 0, err
    assert out.strip() == "auto"
    assert "MOGE_BACKEND='foo'" in err and "reference" in err and "using 'auto'" in err, err


def test_env_backend_selects():
    rc, out, err = _run("import moge_kernels as mk; print(mk.get_backend(), mk.resolve('grouped_gemm', 'cpu')[0])",
                        MOGE_BACKEND="Reference")
    assert rc == 0, err
    assert out.split() == ["reference", "reference"]


def test_triton_interpret_read_like_triton():
    rc, out, err = _run("from moge_kernels import options; print(options.TRITON_INTERPRET)", TRITON_INTERPRET="on")
    assert rc == 0, err
    assert out.strip() == "True"


# ----------------------------------------------------------------------------- one place
def test_no_other_module_reads_the_environment():
    offenders = []
    for path in sorted((ROOT / "moge_kernels").rglob("*.py")):
        if path.name == "options.py" and path.parent.name == "moge_kernels":
            continue
        if re.search(r"os\.environ|getenv", path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cpp", ".cu", ".cuh", ".h", ".hpp") and "getenv" in path.read_text():
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"read the environment outside moge_kernels/options.py: {offenders}"
