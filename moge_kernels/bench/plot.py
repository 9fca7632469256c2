"""PNG plots of a bench run (matplotlib, headless): one grid per figure, a row per shape, a column per op.

    speedup_vs_eager.png        speed-up over the eager reference vs T, a line per method
    speedup_vs_grouped_mm.png   speed-up over the torch._grouped_mm pipeline vs T (when it ran)
    floor_fraction.png          fraction of the physical floor reached vs T (1.0 = at the floor)

Also `python -m moge_kernels.bench --plot-only results.json --out DIR` redraws them from a JSON."""
from __future__ import annotations

import os

STYLE = {   # method -> (color, marker): the same method looks the same in every figure
    "triton": ("tab:blue", "o"), "triton_packed": ("tab:cyan", "o"), "cuda": ("tab:green", "s"),
    "cpu": ("tab:purple", "D"),
    "ascend": ("tab:brown", "v"), "grouped_mm": ("tab:orange", "^"), "loop": ("tab:gray", "x"),
    "eager": ("black", "."),
}


def _series(rows, shape, op, method, field):
    points = sorted((r["T"], r[field]) for r in rows
                    if r["shape"] == shape and r["op"] == op and r["method"] == method and r[field])
    return [t for t, _ in points], [v for _, v in points]


def _decades(ax) -> float:
    import math
    lo, hi = ax.get_ylim()
    return math.log10(hi / lo) if lo > 0 and hi > 0 else 99.0


def _grid(rows, field, title, ylabel, skip=(), log_y=True, unit_line=True):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in skip]
    tokens = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(len(shapes), len(ops), figsize=(3.6 * len(ops), 2.9 * len(shapes)),
                             squeeze=False, constrained_layout=True)
    for i, shape in enumerate(shapes):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            for method in methods:
                ts, vs = _series(rows, shape, op, method, field)
                if ts:
                    color, marker = STYLE.get(method, (None, "o"))
                    ax.plot(ts, vs, marker=marker, color=color, label=method, linewidth=1.4, markersize=4)
            ax.set_xscale("log", base=2)
            ax.set_xticks(tokens, [str(t) for t in tokens])
            ax.minorticks_off() if not log_y else ax.xaxis.set_minor_locator(plt.NullLocator())
            if log_y:
                ax.set_yscale("log")
                plain = FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain if _decades(ax) < 1.2 else NullFormatter())
            else:
                ax.set_ylim(0, 1.05)
            if unit_line:
                ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_title(f"{shape}: {op}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(which="both", labelsize=7)
            if i == len(shapes) - 1:
                ax.set_xlabel("tokens T", fontsize=8)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.suptitle(title, fontsize=10)
    try:       # "outside" placement: matplotlib >= 3.7
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                   ncol=len(handles), fontsize=8)
    except (ValueError, TypeError):
        axes[0][-1].legend(list(handles.values()), list(handles.keys()), fontsize=7)
    return fig


def plot(rows: list[dict], out_dir: str, title: str = "") -> list[str]:
    """Writes the PNGs into out_dir; returns their paths (none when there are no rows)."""
    if not rows:
        return []
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    figures = [
        ("speedup_vs_eager.png", "x_eager", f"speed-up over the eager reference {title}",
         "x faster than eager", ("eager",), True),
        ("speedup_vs_grouped_mm.png", "x_gmm", f"speed-up over the torch._grouped_mm pipeline {title}",
         "x faster than _grouped_mm", ("grouped_mm",), True),
        ("floor_fraction.png", "floor_fraction", f"fraction of the physical floor reached {title}",
         "floor / time", (), False),
    ]
    paths = []
    for name, field, fig_title, ylabel, skip, log_y in figures:
        if not any(r[field] for r in rows if r["method"] not in skip):
            continue
        fig = _grid(rows, field, fig_title.strip(), ylabel, skip=skip, log_y=log_y, unit_line=log_y)
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
