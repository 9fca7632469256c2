"""The per-shape tables of bench/README.md from a `moge-bench` results.json or its printed table:

    python bench/readme_tables.py bench/results/h100/results.json
    python bench/readme_tables.py bench/results/h100/cli_h100.txt

Each cell: ms (CUDA-graph replay, cold L2) / speed-up over the torch._grouped_mm pipeline / % of the floor,
for the package's backends (the baselines stay in the full table, results/<device>/cli_<device>.txt)."""
import json
import sys

BACKENDS = ("triton", "triton_packed", "cuda")
OPS = ("dispatch", "mlp", "combine", "layer")


def tables(results: dict) -> str:
    rows = results["rows"]
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        Ts = sorted({r["T"] for r in rows if r["shape"] == shape})
        cell = {(r["op"], r["method"], r["T"]): r for r in rows if r["shape"] == shape}
        out += [f"**{shape}** — each cell: ms (CUDA-graph replay, cold L2) / speed-up over the "
                "`torch._grouped_mm` pipeline / % of the floor", "",
                "| op | backend | " + " | ".join(f"T={T}" for T in Ts) + " |",
                "|---|---|" + "---|" * len(Ts)]
        for op in OPS:
            for backend in BACKENDS:
                if not any((op, backend, T) in cell for T in Ts):
                    continue
                cells = []
                for T in Ts:
                    r = cell.get((op, backend, T))
                    cells.append("-" if r is None else
                                 f"{r['ms']:.4f} / {r['x_gmm']:.2f}x / {100 * r['floor_fraction']:.0f}%")
                out.append(f"| {op} | {backend} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def rows_from_table(text: str) -> list[dict]:
    """The rows of the CLI's printed table (shape T op method mode ms TFLOP/s GB/s x_eager x_gmm floor_ms
    %floor [note]), with the fields tables() reads."""
    rows = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 12 or not f[1].isdigit() or f[4] not in ("graph", "eager") or not f[9].endswith("x"):
            continue
        rows.append(dict(shape=f[0], T=int(f[1]), op=f[2], method=f[3], ms=float(f[5]),
                         x_gmm=float(f[9][:-1]), floor_fraction=float(f[11][:-1]) / 100))
    return rows


if __name__ == "__main__":
    path = sys.argv[1]
    text = open(path).read()
    print(tables(json.loads(text) if path.endswith(".json") else {"rows": rows_from_table(text)}))
