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
    assert "self-check (tiny shape" in printed and "%floor" in printed

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
        assert r["ms"] > 0 and r["floor_ms"] > 0 and 0 < r["floor_fraction"]
        assert r["x_eager"] == pytest.approx(r["eager_ms"] / r["ms"])
        assert r["check"] == "PASS"
    if B.grouped_mm_support("cpu", None, torch.float32) is None:
        assert (8, "mlp", "grouped_mm") in seen
        assert all(r["x_gmm"] for r in rows)

    pytest.importorskip("matplotlib")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "speedup_vs_eager.png" in pngs and "floor_fraction.png" in pngs
    assert (out / "floor_fraction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_only_redraws_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(shape="tiny", T=t, op="mlp", method=m, x_eager=s, x_gmm=None, floor_fraction=0.5)
            for t in (1, 16) for m, s in (("cpu", 2.0), ("eager", 1.0))]
    (tmp_path / "r.json").write_text(json.dumps(dict(rows=rows, environment={}, dtype="float32")))
    assert bench.main(["--plot-only", str(tmp_path / "r.json"), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "speedup_vs_eager.png").exists()


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
