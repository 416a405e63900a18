"""``lazypaged report TIMELINE.json -o restore.png``: draw a session timeline.

matplotlib is an optional extra (``pip install 'lazypaged[plot]'``); it is
imported only here, only when drawing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .timeline import VERSION

MiB = 1 << 20


class ReportError(Exception):
    """The timeline file cannot be read or is not a timeline."""


class PlotUnavailable(ReportError):
    """matplotlib is not installed."""


def load_timeline(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ReportError(f"{path} is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ReportError(f"{path} is not a lazypaged timeline (version {VERSION})")
    samples = doc.get("samples")
    need = ("t", "bytes_fault", "bytes_fill", "faults", "fault_p50_us", "fault_p99_us")
    if not isinstance(samples, dict) or not all(isinstance(samples.get(c), list) for c in need):
        raise ReportError(f"{path}: samples lack one of {', '.join(need)}")
    if len({len(samples[c]) for c in need}) != 1 or not samples["t"]:
        raise ReportError(f"{path}: sample columns are empty or of different lengths")
    return doc


def _title(doc: dict[str, Any]) -> str:
    total = doc.get("bytes_total", 0)
    pid = doc.get("pid")
    who = f"{doc.get('kind', '?')} session {doc.get('session', '?')}" + (f", pid {pid}" if pid else "")
    return (
        f"{who}: {doc.get('outcome', '?')} in {float(doc.get('seconds', 0)):.3f} s, "
        f"{total / MiB:.1f} MiB from {', '.join(doc.get('sources', [])) or '?'}"
    )


def draw(doc: dict[str, Any], out: Path, *, dpi: int = 120) -> None:
    """Installed bytes (stacked by fault and fill) and fault latency over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("drawing needs matplotlib: pip install 'lazypaged[plot]'") from None
    s = doc["samples"]
    t = s["t"]
    fault = [b / MiB for b in s["bytes_fault"]]
    fill = [b / MiB for b in s["bytes_fill"]]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5), height_ratios=(3, 2))
    try:
        # Running totals, sampled: a straight line between two samples.
        top.stackplot(t, fault, fill, labels=("fault-driven", "background fill"), colors=("#d9534f", "#5b8ff9"),
                      alpha=0.85)
        total = doc.get("bytes_total")
        if total:
            top.axhline(total / MiB, color="black", linewidth=0.8, linestyle="--", label="image size")
        top.set_ylabel("installed (MiB)")
        top.legend(loc="lower right")
        top.grid(alpha=0.3)
        top.set_title(_title(doc), fontsize=10)

        p50 = [(x, y) for x, y in zip(t, s["fault_p50_us"], strict=True) if y is not None]
        p99 = [(x, y) for x, y in zip(t, s["fault_p99_us"], strict=True) if y is not None]
        if p50:
            # A sample's percentiles describe the faults since the previous sample.
            bottom.step([x for x, _ in p50], [y for _, y in p50], where="pre", label="p50", color="#2ca02c")
            bottom.step([x for x, _ in p99], [y for _, y in p99], where="pre", label="p99", color="#ff7f0e")
            bottom.set_yscale("log", base=2)
            bottom.legend(loc="upper right")
        else:
            bottom.text(0.5, 0.5, "no faults", transform=bottom.transAxes, ha="center", va="center")
        bottom.set_ylabel("fault service (µs, bucket bound)")
        bottom.set_xlabel("seconds since handoff")
        bottom.grid(alpha=0.3)
        faults = s["faults"]
        if faults and faults[-1]:
            twin = bottom.twinx()
            twin.plot(t, faults, color="grey", linewidth=0.8, alpha=0.6)
            twin.set_ylabel("faults (total)", color="grey")
        fig.tight_layout()
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
