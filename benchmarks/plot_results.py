#!/usr/bin/env python
"""PNG plots of the benchmark results: time and peak memory against V and against N.

Reads ``benchmarks/results/<gpu>.jsonl`` (written by bench_loss.py) and writes,
for each case and dtype, ``benchmarks/results/<gpu>_<case>_<dtype>.png`` with
four panels: forward+backward time (solid) and forward time (dashed) against V
at the largest N measured, and against N at the largest V; peak memory of the
forward+backward against V and against N. When a measurement was repeated, the
last line of the file wins.

    python benchmarks/plot_results.py                       # every results/*.jsonl
    python benchmarks/plot_results.py results/NVIDIA_H100_80GB_HBM3.jsonl --out /tmp/plots
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(path):
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}:{number}: not JSON, skipped")
    return records


def latest(records):
    """The last record of each (case, provider, N, V, H, dtype, mode)."""
    keep = {}
    for r in records:
        keep[(r["case"], r["provider"], r["N"], r["V"], r.get("H"), r["dtype"], r["mode"])] = r
    return list(keep.values())


def _panel(ax, rows, x_key, y_key, modes, title, ylabel):
    providers = sorted({r["provider"] for r in rows})
    drawn = False
    for i, prov in enumerate(providers):
        for mode in modes:
            pts = sorted((r[x_key], r[y_key]) for r in rows if r["provider"] == prov
                         and r["mode"] == mode and r.get(y_key) is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", color=f"C{i % 10}",
                    linestyle="-" if mode == "fwd_bwd" else "--",
                    label=prov if mode == modes[0] else None)
            drawn = True
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_records(records, out_dir, stem):
    """Write one PNG per (case, dtype) of `records`; returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    records = latest(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case, dtype in sorted({(r["case"], r["dtype"]) for r in records}):
        rows = [r for r in records if r["case"] == case and r["dtype"] == dtype]
        n_max, v_max = max(r["N"] for r in rows), max(r["V"] for r in rows)
        at_n = [r for r in rows if r["N"] == n_max]
        at_v = [r for r in rows if r["V"] == v_max]
        fig, axes = plt.subplots(2, 2, figsize=(12, 9))
        both = ("fwd_bwd", "fwd")
        _panel(axes[0, 0], at_n, "V", "ms", both, f"time vs V (N={n_max}); dashed: fwd", "ms")
        _panel(axes[0, 1], at_v, "N", "ms", both, f"time vs N (V={v_max}); dashed: fwd", "ms")
        _panel(axes[1, 0], at_n, "V", "peak_gb", ("fwd_bwd",),
               f"peak memory fwd+bwd vs V (N={n_max})", "GB above inputs")
        _panel(axes[1, 1], at_v, "N", "peak_gb", ("fwd_bwd",),
               f"peak memory fwd+bwd vs N (V={v_max})", "GB above inputs")
        gpu = rows[0].get("gpu", stem)
        fig.suptitle(f"{case}, {dtype}, {gpu} (commit {rows[-1].get('commit')})", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{stem}_{case}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for path in written:
        print(f"wrote {path}")
    return written


def plot_file(path, out_dir=None):
    path = Path(path)
    records = load(path)
    if not records:
        print(f"{path}: no records to plot")
        return []
    return plot_records(records, out_dir or path.parent, path.stem)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot benchmarks/results/*.jsonl to PNG files.")
    p.add_argument("files", nargs="*", type=Path, help="jsonl files (default: results/*.jsonl)")
    p.add_argument("--out", type=Path, help="output folder (default: next to each file)")
    args = p.parse_args(argv)
    files = args.files or sorted(RESULTS.glob("*.jsonl"))
    if not files:
        print(f"no results in {RESULTS}: run bench_loss.py first")
    for path in files:
        plot_file(path, args.out)


if __name__ == "__main__":
    main()
