"""bench/bench_transformers.py's CPU smoke path (--smoke: the real transformers experts modules at tiny
widths): every switch parses, each mode prints one markdown table with a row per (model, T, timing)."""
import importlib.util
import os

import pytest

pytest.importorskip("transformers")

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_transformers.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_transformers", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_prints_one_table_per_mode(capsys):
    # a budget no loaded machine reaches: every cell must be timed (at 60 s, twelve test workers sharing
    # the device machine's CPUs cut cells off and failed it)
    bench = _bench()
    code = bench.main(["--smoke", "--models", "qwen3,gpt-oss", "--tokens", "5", "--impls", "moge,grouped_mm,eager",
                       "--modes", "fwd,fwd_bwd", "--budget-s", "900"])
    assert code == 0
    printed = capsys.readouterr().out
    for model in ("qwen3", "gpt-oss"):
        assert f"{model} T=5: moge vs grouped_mm forward, max rel err" in printed
    tables = [block for block in printed.split("\n\n") if block.startswith("| model | T | timing |")]
    assert len(tables) == 2, printed                                  # fwd, fwd+bwd
    for table in tables:
        lines = table.strip().splitlines()
        assert lines[0] == "| model | T | timing | moge | grouped_mm | eager | grouped_mm / moge |"
        rows = [line.split(" | ") for line in lines[2:]]
        assert [(r[0], r[1], r[2]) for r in rows] == [("| qwen3", "5", "eager"), ("| gpt-oss", "5", "eager")]
        for r in rows:                                                # every cell timed, the ratio computed
            assert all(float(c) > 0 for c in r[3:6]) and r[6].endswith("x |")
    assert "fwd+bwd (ms, median" in printed


@pytest.mark.parametrize("argv,message", [
    (["--smoke", "--modes", "bwd"], "--modes: unknown 'bwd'"),
    (["--smoke", "--models", "llama"], "--models: unknown 'llama'"),
    (["--smoke", "--impls", "moge,fast"], "--impls: unknown 'fast'"),
    (["--smoke", "--tokens", "1,x"], "--tokens: a comma list of integers"),
])
def test_bad_arguments_name_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit):
        _bench().main(argv)
    assert message in capsys.readouterr().err
