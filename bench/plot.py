"""A PNG of effective bandwidth against vocabulary size, drawn from the JSON records alone.

One panel per (op, mode, dtype); one line per provider (cases with status 'ok'); the
copy bandwidth of the run as a dashed line. Usable on its own:

    python -m softmax_ce_gpu.bench.plot results.json [more.json ...] -o bandwidth.png
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from .report import read_json


def plot(json_paths, out_png):
    """Draw the plot; returns its path, or None (with a message on stderr) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot drawn (pip install matplotlib, or the "
              "project's 'bench' extra); the JSON is complete without it", file=sys.stderr)
        return None
    records = read_json(json_paths)
    panels = defaultdict(list)
    for r in records:
        panels[(r["op"], r["mode"], r["dtype"])].append(r)
    keys = sorted(panels)
    fig, axes = plt.subplots(len(keys) or 1, 1, figsize=(8, 4.2 * max(len(keys), 1)),
                             squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        rows = panels[key]
        by_provider = defaultdict(list)
        for r in rows:
            if r["status"] == "ok":
                by_provider[r["provider"]].append(r)
        for provider, pts in by_provider.items():
            pts.sort(key=lambda r: (r["v"], r["n"]))
            ax.plot([r["v"] for r in pts], [r["gbps"] for r in pts], marker="o", label=provider)
        copies = sorted({r["copy_gbps"] for r in rows if r.get("copy_gbps")})
        for j, c in enumerate(copies):
            ax.axhline(c, linestyle="--", color="black", linewidth=1,
                       label=f"device copy ({c:.0f} GB/s)" if j == 0 else None)
        devices = ", ".join(sorted({r["device"] for r in rows}))
        shapes = ", ".join(f"{n}x{v}" for n, v in sorted({(r["n"], r["v"]) for r in rows},
                                                         key=lambda s: (s[1], s[0])))
        ax.set_title(f"{key[0]} {key[1]} {key[2]} on {devices}\nshapes (N x V): {shapes}",
                     fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("V (vocabulary size)")
        ax.set_ylabel("effective GB/s")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m softmax_ce_gpu.bench.plot",
                                     description="Plot GB/s against V from bench JSON files.")
    parser.add_argument("json", nargs="+", help="JSON files or directories of them")
    parser.add_argument("-o", "--out", default="bandwidth.png", help="PNG path")
    args = parser.parse_args(argv)
    return 0 if plot(args.json, args.out) else 1


if __name__ == "__main__":
    sys.exit(main())
