"""Run lazypaged's benchmarks and print a table (and, with --json, one JSON line).

    .venv/bin/python benchmarks/run.py --only core            # 1 GiB, 5 runs
    .venv/bin/python benchmarks/run.py --only core --size-mib 128 --runs 3 --json

Needs root (userfaultfd must serve faults taken inside the kernel) and gcc
(the C baselines are built into benchmarks/build/). Each group is a module
``benchmarks/<group>.py`` with ``NAME``, ``DESCRIPTION`` and ``run(opts)``;
add its name to ``GROUPS`` to make it runnable.

With ``--json`` the last line of output is one JSON object:

    {"ratios": {name: value, ...},              every group's ratios
     "targets": {name: [op, target], ...},       e.g. ["<=", 0.8]
     "met": {name: bool, ...},
     "absolute": {group: {key: {"median", "min", "max", "unit"}}},
     "meta": {...}}

The exit status is 0 when every group ran (targets missed are reported, not
failures), 1 when a benchmark could not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BenchError, GroupResult, Options, Ratio, Row

#: Benchmark groups in run order; each is the module benchmarks/<name>.py.
GROUPS = ["core", "snapshot", "remote"]
GROUPS.append("criu")  # benchmarks/criu.py: needs criu (scripts/install-criu.sh) and ip netns
GROUPS.append("workingset")  # benchmarks/workingset.py: working-set record/replay, local and across a netns pair


def _group(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.{name}")


def _fmt(x: float) -> str:
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _row_line(r: Row, width: int) -> str:
    spread = f"[{_fmt(min(r.samples))}–{_fmt(max(r.samples))}]" if len(r.samples) > 1 else ""
    label = f"{r.label} ({r.note})" if r.note else r.label
    return f"  {label:<{width}} {_fmt(r.median):>8} {r.unit:<6} {spread}"


def _ratio_line(q: Ratio, width: int) -> str:
    verdict = "met" if q.met else "MISSED"
    value = f"{_fmt(q.value)}{' ' + q.unit if q.unit else ''}"
    target = f"{q.op} {_fmt(q.target)}{' ' + q.unit if q.unit else ''}"
    return f"  {q.name:<{width}} {value:>9}   target {target:<10} {verdict:<6}  {q.what}"


def print_table(res: GroupResult) -> None:
    print(f"== {res.name} ==")
    for line in res.setup:
        print(f"  {line}")
    print()
    width = max((len(r.label) + (len(r.note) + 3 if r.note else 0) for r in res.rows), default=10)
    for r in res.rows:
        print(_row_line(r, width))
    print()
    width = max((len(q.name) for q in res.ratios), default=10)
    for q in res.ratios:
        print(_ratio_line(q, width))
    for n in res.notes:
        print(f"  note: {n}")
    print(flush=True)


def to_json(results: list[GroupResult], opts: Options, seconds: float) -> dict[str, object]:
    ratios: dict[str, float] = {}
    targets: dict[str, list[object]] = {}
    met: dict[str, bool] = {}
    absolute: dict[str, dict[str, dict[str, object]]] = {}
    for res in results:
        for q in res.ratios:
            ratios[q.name] = round(q.value, 4)
            targets[q.name] = [q.op, q.target]
            met[q.name] = q.met
        absolute[res.name] = {
            r.key: {
                "median": round(r.median, 4),
                "min": round(min(r.samples), 4),
                "max": round(max(r.samples), 4),
                "unit": r.unit,
            }
            for r in res.rows
        }
    meta = {
        "groups": [r.name for r in results],
        "size_mib": opts.size_mib,
        "runs": opts.runs,
        "image": opts.image,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "seconds": round(seconds, 1),
        "setup": {r.name: r.setup for r in results},
    }
    return {"ratios": ratios, "targets": targets, "met": met, "absolute": absolute, "meta": meta}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="lazypaged benchmarks (baselines measured in the same run)")
    ap.add_argument("--only", choices=GROUPS, action="append", help="run only this group (repeatable)")
    ap.add_argument("--size-mib", type=int, default=1024, help="image size in MiB (default 1024)")
    ap.add_argument("--runs", type=int, default=5, help="repetitions; medians are reported (default 5)")
    ap.add_argument(
        "--image",
        choices=["random", "demo"],
        default="random",
        help="random: incompressible bytes, no zero pages (default); demo: every 8th page a hole",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object with every ratio as the last line")
    ap.add_argument("--workdir", type=Path, help="scratch directory for images and sockets (default: $TMPDIR)")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress and raw results on stderr")
    ap.add_argument("--plot", type=Path, metavar="DIR", help="also draw each group's comparisons as DIR/GROUP.png")
    args = ap.parse_args(argv)
    if args.size_mib < 8 or args.runs < 1:
        ap.error("--size-mib must be at least 8 and --runs at least 1")
    if os.geteuid() != 0:
        print("benchmarks/run.py: needs root (userfaultfd faults taken in the kernel)", file=sys.stderr)
        return 1
    opts = Options(size_mib=args.size_mib, runs=args.runs, image=args.image, verbose=args.verbose, workdir=args.workdir)
    t0 = time.monotonic()
    results = []
    for name in args.only or GROUPS:
        mod = _group(name)
        print(f"running {name}: {mod.DESCRIPTION} ({opts.size_mib} MiB, {opts.runs} runs)", file=sys.stderr, flush=True)
        try:
            res: GroupResult = mod.run(opts)
        except BenchError as e:
            print(f"benchmark group {name} failed: {e}", file=sys.stderr)
            return 1
        print_table(res)
        results.append(res)
    if args.plot:
        from benchmarks.plot import plot

        for path in plot(results, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_json(results, opts, time.monotonic() - t0), ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
