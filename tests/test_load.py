"""Many targets restored at once from mixed sources; every byte checked.

Default run: 8 targets × 32 MiB. ``pytest -m slow tests/test_load.py``:
32 × 256 MiB. Half the targets restore from the raw image, half from a
zstd snapshot of it (``lazypaged snapshot create``). Each target
(tests/load_target.py) touches its memory from one or two threads in random
orders while the fill streams, waits for the daemon's completion message,
then compares every byte with the image.

Reported (stdout, and load-<n>x<size>.json in the test's directory):
per-target wall time to completion, the daemon's per-session p99 fault
latency, and the daemon's peak RSS. Nothing is asserted about speed: a
starved target shows up as an outlier, and a target that never finishes
fails the test by its timeout.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import HERE, MiB, _needs_root, start_daemon, stop_daemon

TARGET = HERE / "load_target.py"


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def run_load(tmp: Path, n: int, size: int) -> dict[str, object]:
    d = start_daemon(tmp, extra_config="max_sessions = 64\n")
    raw = d.image("img.raw", size)
    subprocess.run([sys.executable, "-m", "lazypaged", "snapshot", "create", "--from-raw", str(raw), "-o",
                    str(d.snapshots / "img.lps"), "-q"], check=True, capture_output=True)
    procs: list[tuple[str, float, subprocess.Popen[str]]] = []
    results: list[dict[str, object]] = []
    try:
        t0 = time.monotonic()
        for k in range(n):
            name = "img.raw" if k % 2 == 0 else "img.lps"
            args = [sys.executable, str(TARGET), "--socket", str(d.socket), "--image", str(raw), "--name", name,
                    "--size", str(size), "--threads", str(1 + k % 2), "--seed", str(k)]
            procs.append((name, time.monotonic(), subprocess.Popen(args, stdout=subprocess.PIPE,
                                                                   stderr=subprocess.PIPE, text=True)))
        for name, started, p in procs:
            out, err = p.communicate(timeout=600)
            lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            last = lines[-1] if lines else {"ok": False, "stderr": err[-500:]}
            results.append({"source": name, "rc": p.returncode, "ok": last.get("ok"),
                            "wrong_pages": last.get("wrong_pages"), "complete_s": last.get("complete_s"),
                            "seconds": round(time.monotonic() - started, 3),
                            "pid": lines[0].get("pid") if lines else 0})
        wall = time.monotonic() - t0
        rss = _peak_rss_kib(d.proc.pid)
    finally:
        for _, _, p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert stop_daemon(d) == 0
    ended = {x.get("pid"): x for x in d.log_lines() if x.get("event") == "session_ended"}
    for r in results:
        s = ended.get(r["pid"], {})
        r["fault_p99_us"] = s.get("fault_p99_us")
        r["faults"] = s.get("faults")
        r["outcome"] = s.get("outcome")
    secs = [float(r["seconds"]) for r in results]  # type: ignore[arg-type]
    p99s = [float(r["fault_p99_us"]) for r in results if r["fault_p99_us"] is not None]  # type: ignore[arg-type]
    report: dict[str, object] = {
        "targets": n,
        "bytes_each": size,
        "wall_s": round(wall, 2),
        "completion_s": {"min": min(secs), "median": round(statistics.median(secs), 3), "max": max(secs)},
        "fault_p99_us": {"median": statistics.median(p99s) if p99s else None, "max": max(p99s) if p99s else None},
        "daemon_peak_rss_mib": round(rss / 1024, 1),
        "per_target": results,
    }
    (tmp / f"load-{n}x{size >> 20}MiB.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "per_target"}))
    return report


def check(report: dict[str, object]) -> None:
    per = report["per_target"]
    assert isinstance(per, list)
    bad = [r for r in per if r["rc"] != 0 or r["ok"] is not True or r["outcome"] != "complete"]
    assert not bad, bad


def test_load_small(tmp_path: Path) -> None:
    _needs_root()
    check(run_load(tmp_path, 8, 32 * MiB))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_load_32_targets_of_256_mib(tmp_path: Path) -> None:
    _needs_root()
    check(run_load(tmp_path, 32, 256 * MiB))
