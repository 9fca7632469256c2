"""The per-shape tables of bench/README.md from a `moge-bench` results.json:

    python bench/readme_tables.py bench/results/h100/results.json

Each cell: ms (CUDA-graph replay, cold L2) / speed-up over the torch._grouped_mm pipeline / % of the floor,
for the package's backends (the baselines stay in the full table, results/<device>/cli_<device>.txt)."""
import json
import sys

BACKENDS = ("triton", "cuda")
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


if __name__ == "__main__":
    print(tables(json.load(open(sys.argv[1]))))
