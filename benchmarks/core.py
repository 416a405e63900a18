"""Core group: lazypaged against eager copy, the kernel's lazy mmap and C.

One raw image (in the page cache) is restored, in the same run, by:

* an eager ``pread`` into fresh anonymous memory;
* the kernel's own lazy ``mmap(MAP_PRIVATE)`` of the file, every page
  write-touched (each page becomes a private copy, as with UFFDIO_COPY);
* a minimal C handler in its own process (``c/handler.c``): one 4 KiB
  UFFDIO_COPY per fault, or a plain loop of 2 MiB UFFDIO_COPY ioctls;
* lazypaged (``lazypaged serve`` with the documented session defaults).

Each measurement runs in a fresh target process (``target.py``) whose touches
all go through the same C library (``c/touch.c``). Measurements are
interleaved run by run, and the order within each pair alternates, so noise
from other load spreads over all variants alike. Reported values are
medians over the runs; ratios are ratios of those medians.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import common
from .common import PAGE, BenchError, GiB, GroupResult, Options, Ratio, Row, log

NAME = "core"
DESCRIPTION = "lazypaged vs eager pread, kernel lazy MAP_PRIVATE and a minimal C handler"

#: The [session] table lazypaged runs with (the documented defaults).
SESSION_TOML = """\
fault_around = true
fault_around_min = 65536
fault_around_max = 2097152
fill = true
fill_chunk = 2097152
"""
#: Working-set replay (installing what earlier restores of the image touched
#: first) is off: every restore here starts from nothing, like the baselines.
#: The working-set group measures it.
EXTRA_TOML = """\
[working_set]
enabled = false
"""
RANDOM_TOUCHES = 20000
TARGET = Path(__file__).resolve().parent / "target.py"
SETTLE_S = 0.15


def _target(opts: Options, lib: Path, image: Path, mode: str, *extra: str) -> dict[str, float]:
    cmd = [
        sys.executable,
        str(TARGET),
        mode,
        "--lib",
        str(lib),
        "--image",
        str(image),
        "--size",
        str(opts.size),
        *extra,
    ]
    time.sleep(SETTLE_S)  # let the previous target's memory be freed
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        raise BenchError(f"target {mode} failed (status {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    out: dict[str, float] = json.loads(lines[-1])
    log(opts, f"{mode}: {lines[-1]}")
    return out


@dataclass
class _Setup:
    opts: Options
    lib: Path
    image: Path
    lp: tuple[str, ...]  # target arguments to reach lazypaged
    lp_nopoll: tuple[str, ...]  # ... a second daemon with fault_poll_us = 0
    cs: tuple[str, ...]  # ... and the C handler
    touches: int
    servers: dict[str, int]  # pid of each server, for its CPU time


def run(opts: Options) -> GroupResult:
    bins = common.build_c()
    lib = bins["touch"]
    touches = min(RANDOM_TOUCHES, opts.size // PAGE // 2)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lazypaged-bench-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        snaps = work / "snapshots"
        snaps.mkdir()
        image = snaps / "core.img"
        t0 = time.monotonic()
        what = common.make_image(image, opts.size, opts.image, lib)
        common.warm_page_cache(image)
        log(opts, f"image written and read in {time.monotonic() - t0:.1f} s")
        s: dict[str, list[float]] = {}
        nopoll = work / "nopoll"
        nopoll.mkdir()
        with (
            common.lazypaged_daemon(work, snaps, SESSION_TOML, EXTRA_TOML) as daemon,
            common.lazypaged_daemon(nopoll, snaps, SESSION_TOML + "fault_poll_us = 0\n", EXTRA_TOML) as daemon0,
            common.c_handler(bins["handler"], work, image) as chandler,
        ):
            setup = _Setup(
                opts,
                lib,
                image,
                ("--socket", str(daemon.socket), "--name", image.name),
                ("--socket", str(daemon0.socket), "--name", image.name),
                ("--socket", str(chandler.socket)),
                touches,
                {"c": chandler.pid, "lp": daemon.proc.pid, "lp0": daemon0.proc.pid},
            )
            done = rewarmed = discarded = 0
            while done < opts.runs:
                log(opts, f"run {done + 1}/{opts.runs}")
                rewarmed += _ensure_cached(lib, image, opts.size)
                one = _one_run(setup, flip=done % 2 == 1)
                if _cached_fraction(lib, image, opts.size) < 0.999:
                    # Part of the image left the page cache during the run
                    # (memory pressure, someone dropping caches): not comparable.
                    discarded += 1
                    if discarded > opts.runs:
                        raise BenchError("the image keeps leaving the page cache during runs")
                    continue
                for k, v in one.items():
                    common.collect(s, k, v)
                done += 1
            problems = _daemon_problems(daemon.log) + _daemon_problems(daemon0.log)
    if rewarmed:
        notes.append(f"the image had left the page cache and was read again before {rewarmed} run(s)")
    if discarded:
        notes.append(f"{discarded} run(s) discarded: the image left the page cache while they ran")
    if problems:
        notes.append(f"lazypaged logged {len(problems)} error(s), first: {problems[0]}")
    return _result(opts, s, what, touches, notes)


def _one_run(su: _Setup, *, flip: bool) -> dict[str, float]:
    """Every measurement once; ``flip`` swaps the order within each pair."""
    opts, lib, image = su.opts, su.lib, su.image
    out: dict[str, float] = {}
    r = _target(opts, lib, image, "pread")
    out["pread_s"] = r["ns"] / 1e9

    for mode in _pair("kernel-lazy", "lp-seq", flip):
        if mode == "kernel-lazy":
            r = _target(opts, lib, image, mode)
            out["kernel_lazy_s"] = r["ns"] / 1e9
        else:
            r = _target(opts, lib, image, mode, *su.lp)
            out["lp_seq_s"] = r["ns"] / 1e9
            out["lp_seq_complete_s"] = r["complete_ns"] / 1e9

    for who in ("c", "lp", "lp0") if not flip else ("lp0", "lp", "c"):
        cpu0 = common.cpu_ns(su.servers[who])
        if who == "c":
            r = _target(opts, lib, image, "c-random", *su.cs, "--count", str(su.touches))
        else:
            where = su.lp if who == "lp" else su.lp_nopoll
            r = _target(opts, lib, image, "lp-random", *where, "--count", str(su.touches))
        cpu = common.cpu_ns(su.servers[who]) - cpu0
        out[f"{who}_fault_mean_us"] = r["mean_us"]
        out[f"{who}_fault_p50_us"] = r["p50_us"]
        out[f"{who}_fault_p99_us"] = r["p99_us"]
        out[f"{who}_fault_cpu_us"] = cpu / r["touches"] / 1e3

    for mode in _pair("c-precopy", "lp-fill", flip):
        if mode == "c-precopy":
            r = _target(opts, lib, image, mode, *su.cs)
            out["c_precopy_s"] = r["ns"] / 1e9
            out["c_precopy_loop_s"] = r["loop_ns"] / 1e9
        else:
            r = _target(opts, lib, image, mode, *su.lp)
            out["lp_fill_s"] = r["ns"] / 1e9

    r = _target(opts, lib, image, "lp-first", *su.lp)
    out["lp_first_ms"] = r["ns"] / 1e6
    out["lp_handoff_ms"] = r["handoff_ns"] / 1e6
    r = _target(opts, lib, image, "lp-first-nofill", *su.lp)
    out["lp_first_nofill_ms"] = r["ns"] / 1e6
    return out


def _ensure_cached(lib: Path, image: Path, size: int) -> int:
    """Read the image again if part of it left the page cache; 1 if it had to."""
    if _cached_fraction(lib, image, size) >= 0.999:
        return 0
    common.warm_page_cache(image)
    if _cached_fraction(lib, image, size) < 0.99:
        raise BenchError("the image does not stay in the page cache (memory pressure?)")
    return 1


def _pair(a: str, b: str, flip: bool) -> tuple[str, str]:
    return (b, a) if flip else (a, b)


def _cached_fraction(lib: Path, image: Path, size: int) -> float:
    """Fraction of the image resident in the page cache (mincore)."""
    c = ctypes.CDLL(str(lib))
    c.bench_cached_ppm.argtypes = [ctypes.c_int, ctypes.c_size_t]
    c.bench_cached_ppm.restype = ctypes.c_int64
    fd = os.open(image, os.O_RDONLY)
    try:
        ppm = c.bench_cached_ppm(fd, size)
    finally:
        os.close(fd)
    if ppm < 0:
        raise BenchError(f"mincore failed: {os.strerror(-ppm)}")
    return float(ppm) / 1e6


def _daemon_problems(logf: Path) -> list[str]:
    """Errors the daemon logged, and anything that would skew the comparison."""
    out = []
    for line in logf.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("level") in ("error", "critical") or ev.get("event") == "session_bug":
            out.append(line[:300])
        elif str(ev.get("event", "")).startswith("working_set_replay"):
            out.append(f"working-set replay ran although it is configured off: {line[:200]}")
    return out


def _thp() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[")[1].split("]")[0] if "[" in text else text.strip()


def _result(opts: Options, s: dict[str, list[float]], what: str, touches: int, notes: list[str]) -> GroupResult:
    gib = opts.size / GiB
    med = {k: common.median(v) for k, v in s.items()}
    res = GroupResult(NAME)
    res.setup = [
        f"image: {opts.size_mib} MiB of {what}, in the page cache",
        f"{opts.runs} runs, medians [min–max]; THP {_thp()}; lazypaged [session] defaults "
        "(fault-around 64 KiB→2 MiB, fill 2 MiB chunks), working-set replay off",
    ]
    env = _environment_note()
    if env:
        res.setup.append(env)

    def row(key: str, label: str, unit: str, sample: str, note: str = "") -> None:
        res.rows.append(Row(key, label, unit, tuple(s[sample]), note))

    def rate(key: str, label: str, sample: str) -> None:
        res.rows.append(Row(key, label, "GiB/s", tuple(gib / x for x in s[sample])))

    rate("pread_gibps", "eager pread into anonymous memory", "pread_s")
    rate("kernel_lazy_gibps", "kernel lazy MAP_PRIVATE, write-touch every page", "kernel_lazy_s")
    rate("lp_seq_gibps", "lazypaged: restore() + write-touch every page", "lp_seq_s")
    row("lp_seq_complete_s", "lazypaged: accepted → complete, while touching", "s", "lp_seq_complete_s")
    c, lp = "C handler: random touch, 4 KiB/fault", "lazypaged: random touch, no fault-around/fill"
    row("c_fault_us", c, "µs", "c_fault_mean_us", "mean")
    row("c_fault_p50_us", c, "µs", "c_fault_p50_us", "p50")
    row("c_fault_p99_us", c, "µs", "c_fault_p99_us", "p99")
    row("c_fault_cpu_us", c, "µs", "c_fault_cpu_us", "handler CPU/fault")
    row("lp_fault_us", lp, "µs", "lp_fault_mean_us", "mean")
    row("lp_fault_p50_us", lp, "µs", "lp_fault_p50_us", "p50")
    row("lp_fault_p99_us", lp, "µs", "lp_fault_p99_us", "p99")
    row("lp_fault_cpu_us", lp, "µs", "lp_fault_cpu_us", "daemon CPU/fault")
    lp0 = "lazypaged, fault_poll_us = 0: random touch, no fault-around/fill"
    row("lp0_fault_us", lp0, "µs", "lp0_fault_mean_us", "mean")
    row("lp0_fault_cpu_us", lp0, "µs", "lp0_fault_cpu_us", "daemon CPU/fault")
    rate("c_precopy_gibps", "C 2 MiB UFFDIO_COPY loop, accepted → done", "c_precopy_s")
    rate("c_precopy_loop_gibps", "C 2 MiB UFFDIO_COPY loop, ioctls only", "c_precopy_loop_s")
    rate("lp_fill_gibps", "lazypaged fill, no touches, accepted → complete", "lp_fill_s")
    row("lp_handoff_ms", "lazypaged: restore() call (connect → accepted)", "ms", "lp_handoff_ms")
    row("lp_first_ms", "lazypaged: first touch after accepted", "ms", "lp_first_ms")
    row("lp_first_nofill_ms", "lazypaged: first touch after accepted, fill off", "ms", "lp_first_nofill_ms")

    res.ratios = [
        Ratio(
            "seq_touch_vs_kernel_lazy",
            med["lp_seq_s"] / med["kernel_lazy_s"],
            0.8,
            "<=",
            "seq write-touch time, lazypaged ÷ kernel lazy MAP_PRIVATE",
        ),
        Ratio(
            "fault4k_vs_c_handler",
            med["lp_fault_mean_us"] / med["c_fault_mean_us"],
            1.3,
            "<=",
            f"mean time per random 4 KiB fault ({touches} touches), lazypaged ÷ C handler",
        ),
        Ratio(
            "fill_vs_c_precopy",
            med["c_precopy_s"] / med["lp_fill_s"],
            0.9,
            ">=",
            "fill throughput, lazypaged ÷ C 2 MiB UFFDIO_COPY loop",
        ),
        Ratio(
            "first_fault_ms",
            med["lp_first_ms"],
            1.0,
            "<=",
            "first touch right after restore() returns (fill running)",
            "ms",
        ),
    ]
    res.notes.append(
        "fault4k with the daemon sleeping in its event loop between faults (fault_poll_us = 0), as the C "
        f"handler does in poll(2): {med['lp0_fault_mean_us'] / med['c_fault_mean_us']:.2f}× the C handler"
    )
    res.notes.extend(notes)
    return res


def _environment_note() -> str:
    """Say so when freed guest memory goes back to a hypervisor (a source of noise)."""
    reported = Path("/sys/module/page_reporting/parameters/reported_kib")
    if Path("/sys/bus/virtio/drivers/virtio_balloon").exists() and reported.exists():
        return (
            "virtio-balloon free page reporting is active: freshly allocated memory may fault in the "
            "host, so every variant (all allocate the restored memory anew) is noisier"
        )
    return ""
