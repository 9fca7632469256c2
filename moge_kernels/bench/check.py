"""Self-check: every method the bench times (backends and baselines) against the eager reference.

Dispatch: ids, offsets, row_index and permuted rows bit-equal, weights to 1e-5. GEMM-bearing outputs
(gemm, mlp, layer): flash-attention's rule, the method's error against a float64 result is at most twice
the eager reference's error in the run dtype (moge_kernels.testing.assert_error_within). Combine:
elementwise within the dtype's tolerance (moge_kernels.testing.TOLERANCES)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..testing import TOLERANCES, assert_error_within
from .methods import build_methods, reference_call
from .problems import Problem, WeightCache, make_problem


def exact_outputs(problems: list[Problem], ops) -> list[dict]:
    """float64 results of the GEMM-bearing ops ({op: tensor}) of each problem. Experts are the outer
    loop and each expert's weights are converted to float64 once for all problems: the conversions
    dominate on a CPU (the whole Pangu stack in float64 would be 10 GB, so one expert at a time)."""
    exact = [{} for _ in problems]
    if not {"gemm", "mlp", "layer"} & set(ops):
        return exact
    bounds = [p.tensors["offsets"].tolist() for p in problems]
    gate_up = [torch.zeros(p.M, p.tensors["w_gate_up"].shape[1], dtype=torch.float64, device=p.device)
               for p in problems]
    y = [torch.zeros(p.M, p.shape["H"], dtype=torch.float64, device=p.device) for p in problems]
    w_gate_up, w_down = problems[0].tensors["w_gate_up"], problems[0].tensors["w_down"]
    for e in range(w_gate_up.shape[0]):
        active = [i for i, b in enumerate(bounds) if b[e + 1] > b[e]]
        if not active:
            continue
        w_gate_up64, w_down64 = w_gate_up[e].double(), w_down[e].double()
        for i in active:
            lo, hi = bounds[i][e], bounds[i][e + 1]
            gate_up[i][lo:hi] = problems[i].tensors["permuted"][lo:hi].double() @ w_gate_up64.t()
            gate, up = gate_up[i][lo:hi].chunk(2, dim=-1)
            y[i][lo:hi] = (F.silu(gate) * up) @ w_down64.t()
    for i, p in enumerate(problems):
        t = p.tensors
        T, K = t["row_index"].shape
        rows = y[i][t["row_index"].reshape(-1).long()].view(T, K, -1)
        exact[i] = dict(gemm=gate_up[i], mlp=y[i], layer=(t["weights"].double().unsqueeze(-1) * rows).sum(1))
    return exact


def compare(op: str, out, ref, exact, dtype) -> None:
    """Raises AssertionError with a one-line reason when `out` is not the op's result."""
    if op == "dispatch":
        for name, a, b in zip(("permuted_hidden", "topk_weights", "topk_ids", "expert_offsets", "row_index"),
                              out, ref):
            if name == "topk_weights":
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs")
            else:
                assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs from the reference"
    elif op == "permute":
        for name, a, b in zip(("permuted_hidden", "expert_offsets", "row_index"), out, ref):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs from the reference"
    elif op == "combine":
        torch.testing.assert_close(out, ref, **TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16]))
    else:
        assert_error_within(out, ref, exact, what=op)


def self_check(device, dtype, shape, tokens, ops, backends, baselines, log=None) -> list[dict]:
    """[{T, op, method, ok, detail}] for every (T, op, method) on `shape`."""
    rows = []
    weights = WeightCache(dtype, device).get(shape)
    problems = [make_problem(shape, T, dtype, device, weights=weights, seed=T) for T in tokens]
    all_exact = exact_outputs(problems, ops)
    for T, p, exact in zip(tokens, problems, all_exact):
        methods = build_methods(p, ops, backends, baselines)
        refs = {op: reference_call(p, op) for op in ops}
        for m in methods:
            if m.name == "eager":
                continue                      # the reference itself
            ok, detail = True, "matches the reference"
            try:
                compare(m.op, m.fn(), refs[m.op], exact.get(m.op), dtype)
            except AssertionError as err:
                ok, detail = False, (str(err).strip().splitlines() or ["mismatch"])[0][:160]
            except Exception as err:  # noqa: BLE001  a crashing kernel is a failed check, not a crash
                ok, detail = False, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:140]}"
            if m.served_by:
                detail += f" ({m.served_by})"
            rows.append(dict(shape=shape["name"], T=T, op=m.op, method=m.name, ok=ok, detail=detail))
            if log:
                log(f"  check T={T:<4} {m.op:<8} {m.name:<13} {'PASS' if ok else 'FAIL'}  {detail}")
        del methods, refs
    return rows

