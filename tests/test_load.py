"""Many targets restored at once from mixed sources; every byte checked.

Default run: 9 targets × 32 MiB. ``pytest -m slow tests/test_load.py``:
32 × 256 MiB. A third of the targets restore from the raw image, a third
from a zstd snapshot of it (``lazypaged snapshot create``), a third from a
peer: a second daemon that exports both (alternately the raw image and the
zstd snapshot) from another network namespace, across a veth pair, over
mutual TLS (tests/peer_pair.py). The restoring daemon runs in the other
namespace; the targets run outside both and reach it through its socket
path. Each target (tests/load_target.py) touches its memory from one or two
threads in random orders while the fill streams, waits for the daemon's
completion message, then compares every byte with the image.

Reported (stdout, and load-<n>x<size>MiB.json in the test's directory):
per-target time from the handoff to the completion message as the target
measured it (the test reads results one after another, so its own clock
would only bound it from above), the restoring daemon's per-session p99
fault latency (read to install; for a peer source it stops when the fetch is
sent, so it leaves out the network), the p99 of every touch as the target
timed it (network included), both daemons' peak RSS, and the same by source. Nothing is
asserted about speed: a starved target shows up as an outlier, and a target
that never finishes fails the test by its timeout.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lazypaged.demo import make_image

from . import netns
from .conftest import HERE, MiB, _needs_root
from .peer_pair import make_pki, peak_rss_kib, peer_url, start_exporter, start_reader

TARGET = HERE / "load_target.py"
SOURCES = ("raw", "zstd", "peer")


def _source_of(k: int) -> tuple[str, str]:
    """Target k's (label, snapshot name): raw, zstd and peer in turn; peer
    targets alternate between the exported raw image and zstd snapshot."""
    kind = SOURCES[k % 3]
    if kind == "raw":
        return "raw", "img.raw"
    if kind == "zstd":
        return "zstd", "img.lps"
    if (k // 3) % 2 == 0:
        return "peer-raw", peer_url("img.raw")
    return "peer-zstd", peer_url("img.lps")


def _spread(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"min": None, "median": None, "max": None}
    return {"min": min(xs), "median": round(statistics.median(xs), 3), "max": max(xs)}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    p99s = [float(r["fault_p99_us"]) for r in rows if r["fault_p99_us"] is not None]
    return {
        "targets": len(rows),
        "completion_s": _spread([float(r["complete_s"]) for r in rows if r["complete_s"] is not None]),
        "fault_p99_us": {"median": statistics.median(p99s) if p99s else None, "max": max(p99s) if p99s else None},
        "faults_median": statistics.median([int(r["faults"] or 0) for r in rows]) if rows else None,
        "touch_p99_us": _spread([float(r["touch_p99_us"]) for r in rows if r["touch_p99_us"] is not None]),
        "touch_max_us": max((int(r["touch_max_us"]) for r in rows if r["touch_max_us"] is not None), default=None),
        "touches_over_1ms_median": statistics.median([int(r["touches_over_1ms"] or 0) for r in rows])
        if rows else None,
    }


def run_load(tmp: Path, n: int, size: int) -> dict[str, Any]:
    snaps = tmp / "snapshots"
    snaps.mkdir()
    raw = snaps / "img.raw"
    make_image(raw, size)
    subprocess.run([sys.executable, "-m", "lazypaged", "snapshot", "create", "--from-raw", str(raw), "-o",
                    str(snaps / "img.lps"), "-q"], check=True, capture_output=True)
    pki = make_pki(tmp / "pki")
    hosts = netns.Hosts()
    procs: list[tuple[str, float, subprocess.Popen[str]]] = []
    results: list[dict[str, Any]] = []
    daemons: list[netns.NsDaemon] = []
    try:
        hosts.create()
        exporter = start_exporter(hosts, tmp, snaps, ["img.raw", "img.lps"], pki)
        daemons.append(exporter)
        reader = start_reader(hosts, tmp, snaps, pki, stall=5.0, daemon="max_sessions = 64")
        daemons.append(reader)
        t0 = time.monotonic()
        for k in range(n):
            label, name = _source_of(k)
            args = [sys.executable, str(TARGET), "--socket", str(reader.socket), "--image", str(raw), "--name", name,
                    "--size", str(size), "--threads", str(1 + k % 2), "--seed", str(k)]
            procs.append((label, time.monotonic(), subprocess.Popen(args, stdout=subprocess.PIPE,
                                                                    stderr=subprocess.PIPE, text=True)))
        for label, started, p in procs:
            out, err = p.communicate(timeout=900)
            lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            last = lines[-1] if lines else {"ok": False, "stderr": err[-500:]}
            results.append({"source": label, "rc": p.returncode, "ok": last.get("ok"),
                            "wrong_pages": last.get("wrong_pages"), "complete_s": last.get("complete_s"),
                            "touch_p99_us": last.get("touch_p99_us"), "touch_p999_us": last.get("touch_p999_us"),
                            "touch_max_us": last.get("touch_max_us"), "touches_over_1ms": last.get("touches_over_1ms"),
                            "seconds": round(time.monotonic() - started, 3),
                            "pid": lines[0].get("pid") if lines else 0,
                            "error": None if lines and lines[-1].get("ok") is not None else (lines, err[-500:])})
        wall = time.monotonic() - t0
        assert reader.proc is not None
        assert exporter.proc is not None
        rss = {"reader": peak_rss_kib(reader.proc.pid), "exporter": peak_rss_kib(exporter.proc.pid)}
    finally:
        for _, _, p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        codes = [d.stop() for d in reversed(daemons)]
        hosts.destroy()
    assert codes == [0] * len(daemons), [d.tail() for d in daemons]
    bugs = [e for d in daemons for e in d.events() if e.get("event") in ("session_bug", "export_bug")]
    assert not bugs, bugs
    ended = {x.get("pid"): x for x in reader.events() if x.get("event") == "session_ended"}
    for r in results:
        s = ended.get(r["pid"], {})
        r["fault_p99_us"] = s.get("fault_p99_us")
        r["faults"] = s.get("faults")
        r["outcome"] = s.get("outcome")
    report: dict[str, Any] = {
        "targets": n,
        "bytes_each": size,
        "wall_s": round(wall, 2),
        **{k: v for k, v in _summary(results).items() if k != "targets"},
        "peak_rss_mib": {k: round(v / 1024, 1) for k, v in rss.items()},
        "wrong_pages": sum(int(r["wrong_pages"] or 0) for r in results),
        "by_source": {s: _summary([r for r in results if r["source"] == s])
                      for s in sorted({str(r["source"]) for r in results})},
        "per_target": results,
    }
    (tmp / f"load-{n}x{size >> 20}MiB.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "per_target"}))
    return report


def check(report: dict[str, Any]) -> None:
    per = report["per_target"]
    bad = [r for r in per if r["rc"] != 0 or r["ok"] is not True or r["outcome"] != "complete"]
    assert not bad, bad
    # Every kind of source really was in the mix.
    assert {r["source"] for r in per} >= {"raw", "zstd", "peer-raw"}, per


@pytest.fixture
def need_namespaces() -> None:
    _needs_root()
    if netns.available():
        pytest.skip(netns.available())


@pytest.mark.usefixtures("need_namespaces")
@pytest.mark.timeout(300)
def test_load_small(tmp_path: Path) -> None:
    check(run_load(tmp_path, 9, 32 * MiB))


@pytest.mark.slow
@pytest.mark.usefixtures("need_namespaces")
@pytest.mark.timeout(1800)
def test_load_32_targets_of_256_mib(tmp_path: Path) -> None:
    check(run_load(tmp_path, 32, 256 * MiB))
