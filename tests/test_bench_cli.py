"""The bench CLI end to end on CPU with a tiny shape: self-check, timing table, JSON, PNG plots."""
import importlib.util
import json

import pytest
import torch

from moge_kernels import bench
from moge_kernels.bench import baselines as B
from moge_kernels.bench.methods import available_backends
from moge_kernels.bench.problems import SHAPES, make_problem, work


def test_entry_points_resolve():
    # pyproject: moge-bench = "moge_kernels.bench:main"; `python -m moge_kernels.bench` runs __main__
    assert callable(bench.main)
    assert importlib.util.find_spec("moge_kernels.bench.__main__") is not None


def test_cli_end_to_end_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    code = bench.main(["--device", "cpu", "--shapes", "tiny", "--tokens", "1,8", "--rounds", "1",
                       "--check-shape", "tiny", "--check-tokens", "1,5", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    # no floor on CPU (its caches beat the copy bandwidth the floor assumes): test_floor_on_gpu_rows
    assert "self-check (tiny shape" in printed and "%floor" not in printed and "no floor on CPU" in printed

    data = json.loads((out / "results.json").read_text())
    env = data["environment"]
    for key in ("device", "torch", "triton", "commit"):
        assert key in env
    assert data["ceilings"]["bandwidth_gbs"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    assert data["self_check"] and all(c["ok"] for c in data["self_check"])
    rows = data["rows"]
    seen = {(r["T"], r["op"], r["method"]) for r in rows}
    has_cpu = "cpu" in available_backends(torch.device("cpu"))     # the C++ extension is built
    for T in (1, 8):
        for op in ("dispatch", "mlp", "combine", "layer"):
            assert (T, op, "eager") in seen and ((T, op, "cpu") in seen or not has_cpu)
        assert (T, "mlp", "loop") in seen
    for r in rows:
        assert r["ms"] > 0 and r["floor_ms"] is None and r["floor_fraction"] is None
        assert r["x_eager"] == pytest.approx(r["eager_ms"] / r["ms"])
        assert r["check"] == "PASS"
    if B.grouped_mm_support("cpu", None, torch.float32) is None:
        assert (8, "mlp", "grouped_mm") in seen
        assert all(r["x_gmm"] for r in rows)

    pytest.importorskip("matplotlib")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "speedup_vs_eager.png" in pngs and "floor_fraction.png" not in pngs
    assert (out / "speedup_vs_eager.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_only_redraws_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(shape="tiny", T=t, op="mlp", method=m, x_eager=s, x_gmm=None, floor_fraction=0.5)
            for t in (1, 16) for m, s in (("cpu", 2.0), ("eager", 1.0))]
    (tmp_path / "r.json").write_text(json.dumps(dict(rows=rows, environment={}, dtype="float32")))
    assert bench.main(["--plot-only", str(tmp_path / "r.json"), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "speedup_vs_eager.png").exists()
    assert (tmp_path / "png" / "floor_fraction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _timed_row(method, ms, T=4, op="mlp", flops=2e9, nbytes=1e9):
    return dict(shape="pangu", H=5120, I=1344, E=64, G=8, k_g=1, T=T, M=T * 8, active_experts=8, op=op,
                method=method, kind="backend", served_by="", mode="graph", note="", ms=ms, ms_p10=ms,
                ms_p90=ms, samples=3, flops=flops, bytes=nbytes)


def test_floor_on_gpu_rows():
    """On a GPU the floor is max(FLOPs / matmul rate, bytes / copy bandwidth): 1e9 bytes at 1000 GB/s
    is 1 ms, 2e9 FLOPs at 500 TFLOP/s 0.004 ms, so a 2 ms row is at 50% of its floor."""
    from moge_kernels.bench import report
    rows = report.finalize([_timed_row("triton", 2.0), _timed_row("eager", 8.0)], 1000.0, 500.0)
    assert rows[0]["floor_ms"] == pytest.approx(1.0) and rows[0]["floor_bound"] == "mem"
    assert rows[0]["floor_fraction"] == pytest.approx(0.5) and rows[0]["x_eager"] == pytest.approx(4.0)
    report.mark_checks(rows, [dict(op="mlp", method="triton", ok=True)])
    table = report.format_table(rows)
    assert "%floor" in table and "50.0%" in table and "SELF-CHECK" not in table
    assert "fraction of the physical floor" in report.format_summary(rows)
    cpu_rows = report.finalize([_timed_row("cpu", 2.0)], 1000.0, 500.0, floors=False)
    assert cpu_rows[0]["floor_fraction"] is None and "%floor" not in report.format_table(cpu_rows)


def test_mark_checks():
    from moge_kernels.bench import report
    rows = report.finalize([_timed_row(m, 1.0) for m in ("triton", "cuda", "eager", "loop")], 1000.0, 500.0)
    checks = [dict(op="mlp", method="triton", ok=True), dict(op="mlp", method="cuda", ok=True),
              dict(op="mlp", method="cuda", ok=False)]
    report.mark_checks(rows, checks)
    assert [r["check"] for r in rows] == ["PASS", "FAIL", "PASS", "unchecked"]
    table = report.format_table(rows)
    assert table.count("SELF-CHECK FAILED") == 1 and "not self-checked" in table
    report.mark_checks(rows, [], skipped=True)
    assert {r["check"] for r in rows} == {"skipped"}
    assert "SELF-CHECK FAILED" not in report.format_table(rows)


def test_skip_self_check_says_skipped(capsys):
    code = bench.main(["--device", "cpu", "--shapes", "tiny", "--tokens", "2", "--rounds", "1", "--ops", "combine",
                       "--skip-self-check"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "SELF-CHECK FAILED" not in printed and "self-check: skipped" in printed
    assert "self-check skipped" in printed.split("self-check: skipped")[1]      # on the rows


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "foo"], "--shapes: unknown foo (choose from pangu,"),
    (["--check-shape", "foo"], "--check-shape: unknown foo"),
    (["--ops", "mlp,foo"], "--ops: unknown foo"),
    (["--backends", "foo"], "--backends: unknown foo"),
    (["--baselines", "foo"], "--baselines: unknown foo"),
    (["--tokens", "1,x"], "--tokens '1,x': expected a comma list of integers"),
    (["--tokens", "0"], "every T must be >= 1"),
    (["--rounds", "0"], "--rounds 0: must be >= 1"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--device", "nonsense"], "--device 'nonsense': not a device"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu"] + argv if "--device" not in argv else argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("moge-bench: error: ")


def test_device_cuda_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "moge-bench: error: --device cuda: no CUDA device here" in capsys.readouterr().err


def test_backend_not_available_here(capsys):
    import moge_kernels as mk
    off = [b for b, r in mk.backends().items() if b not in ("reference", "grouped_mm") and   # (not timed)
           (not r["available"] or not ({"cpu", "*"} & set(r["devices"])))]
    if not off:
        pytest.skip("every backend runs on CPU here")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--backends", off[0]])
    assert f"--backends {off[0]}: not available on cpu here" in capsys.readouterr().err


def test_baselines_compute_the_op():
    """The torch pipeline's stages match the reference (so its timings are of the same function)."""
    from moge_kernels import reference as R
    p = make_problem(SHAPES["tiny"], 9, torch.float32, "cpu", seed=3)
    t = p.tensors
    out = B.torch_dispatch(t["hidden"], t["logits"], p.shape["G"], p.shape["k_g"])
    ref = R.grouped_dispatch(t["hidden"], t["logits"], p.shape["G"], p.shape["k_g"])
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(B.torch_combine(t["expert_out"], t["weights"], t["row_index"]),
                               R.grouped_combine(t["expert_out"], t["weights"], t["row_index"]))
    ref_mlp = R.grouped_mlp(t["permuted"], t["w_gate_up"], t["w_down"], t["offsets"])
    torch.testing.assert_close(B.loop_mlp(t["permuted"], t["w_gate_up"], t["w_down"], t["offsets"]), ref_mlp)
    if B.grouped_mm_support("cpu", None, torch.float32) is None:
        torch.testing.assert_close(B.grouped_mm_mlp(t["permuted"], t["w_gate_up"], t["w_down"], t["offsets"]),
                                   ref_mlp, rtol=1e-4, atol=1e-5)


def test_work_counts():
    """FLOPs and fewest bytes of the Pangu shape at T=4096 (bf16), as SEMANTICS.md counts them."""
    p = make_problem(SHAPES["tiny"], 4, torch.bfloat16, "cpu")
    H, I, E, K, T = 5120, 1344, 64, 8, 4096
    p.shape, p.T, p.active_experts = SHAPES["pangu"], T, E
    flops, nbytes = work(p, "dispatch")
    assert flops == 0 and nbytes == T * H * 2 + T * K * H * 2 + T * E * 4 + 3 * T * K * 4 + (E + 1) * 4
    flops, nbytes = work(p, "mlp")
    assert flops == 6 * T * K * H * I and nbytes == (E * 3 * H * I + 2 * T * K * H) * 2
    _, nbytes = work(p, "combine")
    assert nbytes == T * K * H * 2 + T * H * 2 + 2 * T * K * 4


def test_weight_bank_experts_differ(monkeypatch):
    """On CPU large stacks are built from a bank of 8 random experts: every expert must still differ."""
    from moge_kernels.bench import problems
    monkeypatch.setattr(problems, "CPU_BANK_ABOVE", 0)
    w_gate_up, w_down = problems.make_weights(SHAPES["tiny"], torch.float32, torch.device("cpu"))
    flat = w_gate_up.flatten(1)
    assert torch.unique(flat[:, :64], dim=0).shape[0] == SHAPES["tiny"]["E"]
    assert torch.unique(w_down.flatten(1)[:, :64], dim=0).shape[0] == SHAPES["tiny"]["E"]


def test_called_column_and_overhead_line():
    """Graph-timed rows carry the as-called time beside the replay; the overhead line is their
    difference at the smallest T; the top-k model shapes are selectable."""
    from moge_kernels.bench import report
    rows = [dict(shape="pangu", T=t, op=op, method="triton", mode="graph", ms=ms, called_ms=called, note="",
                 served_by="", check="PASS", flops=1.0, bytes=1.0)
            for t, op, ms, called in ((1, "dispatch", 0.005, 0.025), (1, "mlp", 0.087, 0.100),
                                      (1024, "mlp", 0.9, 0.91))]
    report.finalize(rows, 1000.0, 100.0)
    table = report.format_table(rows)
    assert "called ms" in table.splitlines()[0] and "0.0250" in table
    line = report.format_overhead(rows)
    assert "pangu T=1: dispatch triton 20; mlp triton 13" in line
    assert "as called, no CUDA graph" in report.format_summary(rows)
    assert SHAPES["qwen3_30b"] == dict(name="qwen3_30b", H=2048, I=768, E=128, G=1, k_g=8)
    assert SHAPES["mixtral_8x7b"]["E"] == 8 and SHAPES["mixtral_8x7b"]["k_g"] == 2
