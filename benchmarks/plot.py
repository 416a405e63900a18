"""Charts of a benchmark run: lazypaged against each baseline, per group.

``benchmarks/run.py --plot DIR`` writes, for every group that ran, one PNG
with two panels: the ratios against their targets (the green band is the
target side), and the absolute medians of each unit with their min–max
spread. Needs matplotlib (``pip install 'lazypaged[plot]'``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from benchmarks.common import GroupResult


def plot(results: list[GroupResult], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for res in results:
        by_unit: dict[str, list[tuple[str, float, float, float]]] = defaultdict(list)
        for r in res.rows:
            label = f"{r.label} ({r.note})" if r.note else r.label
            by_unit[r.unit].append((label, r.median, min(r.samples), max(r.samples)))
        units = [u for u, rows in by_unit.items() if len(rows) > 1]  # comparisons only
        panels = 1 + len(units)
        heights = [max(1.2, 0.45 * len(res.ratios) + 0.8)] + [0.45 * len(by_unit[u]) + 0.8 for u in units]
        fig, axes = plt.subplots(panels, 1, figsize=(10, sum(heights)), gridspec_kw={"height_ratios": heights})
        axes = axes if panels > 1 else [axes]
        ax = axes[0]
        names = [q.name for q in res.ratios]
        for k, q in enumerate(res.ratios):
            scale = max(q.value, q.target) * 1.3 or 1.0
            if q.op == "<=":
                ax.barh(k, q.target / scale, color="#d9f2d9", height=0.8)
            else:
                ax.barh(k, 1 - q.target / scale, left=q.target / scale, color="#d9f2d9", height=0.8)
            ax.barh(k, q.value / scale, color="#2b7bb9" if q.met else "#c0392b", height=0.45)
            ax.text(q.value / scale, k, f"  {q.value:.3g}{q.unit} (target {q.op} {q.target:g}{q.unit})", va="center")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks([])
        ax.set_xlim(0, 1.6)
        ax.invert_yaxis()
        ax.set_title(f"{res.name}: ratios (blue: target met, red: missed; green: the target side)")
        for ax, unit in zip(axes[1:], units, strict=True):
            rows = by_unit[unit]
            med = [m for _, m, _, _ in rows]
            err = [[m - lo for _, m, lo, _ in rows], [hi - m for _, m, _, hi in rows]]
            colors = ["#2b7bb9" if "lazypaged" in label else "#999999" for label, *_ in rows]
            ax.barh(range(len(rows)), med, xerr=err, color=colors, capsize=3)
            ax.set_yticks(range(len(rows)), [label for label, *_ in rows], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(unit)
        fig.tight_layout()
        path = out_dir / f"{res.name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
