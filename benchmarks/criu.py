"""CRIU group: lazypaged against ``criu lazy-pages`` as the daemon of a real
``criu restore --lazy-pages`` (criu 4.1.1), locally and across a netns pair.

The restored program (``tests/criu/heapprog.c``) holds a heap of
``--size-mib`` filled with a known pattern and prints a checksum of it on
every pass, with a wall-clock timestamp. Measured from the moment
``criu restore`` is started:

* first checksum: the first line the restored program prints. The dump is
  taken while the program idles between passes, and a restored program
  starts a pass at once, so this pass reads the whole heap through lazy
  pages while the daemon's background transfer runs. It must carry the
  pre-dump checksum and no bad word;
* complete: the lazy-pages daemon exits, i.e. every page of every task is in.

Local: one plain dump, restored once per run and daemon from the same
images (``pages-1.img`` in the page cache). Remote: per run and daemon, a
fresh program and ``criu dump --lazy-pages`` whose page server runs in one
network namespace, the daemon and ``criu restore`` in the other, joined by a
veth pair. The daemons alternate order run by run; values are medians.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import BenchError, GroupResult, Options, Ratio, Row, log

NAME = "criu"
DESCRIPTION = "lazypaged vs `criu lazy-pages` restoring a real CRIU dump (local and remote)"
KINDS = ("lazypaged", "criu")
#: Info level for every CRIU process and both daemons: per-page debug lines
#: (the tests' ``-v4``) would slow what is measured, and the harness waits
#: for the page server's info line "Starting page server".
VERBOSITY = "-v3"
#: Milliseconds the program idles between passes: the dump is taken right
#: after a pass, while it idles, and a restored program starts its next pass
#: at once (heapprog notices the restore), so the first pass after a restore
#: reads the whole heap through lazy pages.
INTERVAL_MS = 3000
TARGET_SPEEDUP = 2.0


def _harness() -> Any:
    from tests.criu import harness

    return harness


def _measure(h: Any, p: Any, daemon: Any, r: Any, timeout: float) -> tuple[float, float]:
    """(seconds to the first correct checksum, seconds to daemon exit) from restore start.

    ``daemon`` None: an eager restore, complete when the first checksum is.
    """
    first = done = None
    t0_wall = time.time() - (time.monotonic() - r.started)
    deadline = time.monotonic() + timeout
    while first is None or done is None:
        if first is None:
            for ln in p.read_lines():
                if ln.sum != p.expected or ln.bad:
                    raise BenchError(f"{daemon.log.name}: restored checksum {ln.sum} (want {p.expected}), bad {ln.bad}")
                # The pass under way at dump time had touched part of the heap
                # already; count the first pass run wholly after the restore.
                if float(ln.extra["t0"]) >= t0_wall:
                    first = float(ln.extra["t"]) - t0_wall
                    break
        if done is None and daemon is None and first is not None:
            done = first
        if done is None and daemon is not None and daemon.proc.poll() is not None:
            if daemon.proc.returncode != 0:
                raise BenchError(f"lazy-pages daemon exited with {daemon.proc.returncode}:\n{h.log_tail(daemon.log)}")
            done = time.monotonic() - r.started
        if time.monotonic() > deadline:
            raise BenchError(f"restore did not finish within {timeout} s:\n{h.log_tail(daemon.log) if daemon else ''}")
        if r.proc.poll() is not None and first is None:
            tail = h.log_tail(r.pidfile.parent / "restore.log")
            raise BenchError(f"criu restore exited with {r.proc.returncode}:\n{tail}")
        time.sleep(0.002)
    return first, done


def _local(h: Any, criu: Path, prog: Path, work: Path, opts: Options, samples: dict[str, list[float]]) -> None:
    p = h.start_program(prog, work / "out-local.txt", opts.size_mib, "plain", INTERVAL_MS)
    images = work / "local"
    try:
        h.wait_dump(h.dump(criu, p.pid, images, verbosity=VERBOSITY), images, timeout=600)
    finally:
        h.stop_program(p)
    for run in range(opts.runs):
        for kind in (*KINDS, "eager") if run % 2 == 0 else ("eager", *reversed(KINDS)):
            time.sleep(0.3)  # let the previous restore's memory go
            daemon = None if kind == "eager" else h.start_lazy_daemon(kind, criu, images, verbosity=VERBOSITY)
            p.mark()
            r = h.restore(criu, images, lazy=daemon is not None, verbosity=VERBOSITY)
            try:
                first, done = _measure(h, p, daemon, r, 600)
            finally:
                r.kill()
                if daemon is not None:
                    daemon.stop()
            log(opts, f"local {kind}: first checksum {first:.3f} s, complete {done:.3f} s")
            samples.setdefault(f"first_{kind}_local", []).append(first)
            samples.setdefault(f"complete_{kind}_local", []).append(done)


def _remote(h: Any, criu: Path, prog: Path, work: Path, opts: Options, samples: dict[str, list[float]]) -> None:
    port = 29000 + os.getpid() % 1000
    with h.pipe_max_size(), h.netns_pair(f"b{os.getpid() % 10000}") as ns:
        for run in range(opts.runs):
            for kind in KINDS if run % 2 == 0 else tuple(reversed(KINDS)):
                tag = f"{kind}-{run}"
                p = h.start_program(prog, work / f"out-{tag}.txt", opts.size_mib, "plain", INTERVAL_MS, netns=ns.source)
                src, dst = work / f"src-{tag}", work / f"dst-{tag}"
                d = h.dump(
                    criu, p.pid, src, lazy_address=ns.source_addr, lazy_port=port, netns=ns.source, verbosity=VERBOSITY
                )
                try:
                    h.wait_page_server(src, d, timeout=600)
                    h.copy_images(src, dst)
                    daemon = h.start_lazy_daemon(
                        kind, criu, dst, address=ns.source_addr, port=port, netns=ns.dest, verbosity=VERBOSITY
                    )
                    p.mark()
                    r = h.restore(criu, dst, netns=ns.dest, verbosity=VERBOSITY)
                    try:
                        first, done = _measure(h, p, daemon, r, 600)
                        h.wait_dump(d, src, timeout=120)
                    finally:
                        r.kill()
                        daemon.stop()
                finally:
                    if d.poll() is None:
                        d.kill()
                        d.wait()
                    h.stop_program(p)
                log(opts, f"remote {kind}: first checksum {first:.3f} s, complete {done:.3f} s")
                samples.setdefault(f"first_{kind}_remote", []).append(first)
                samples.setdefault(f"complete_{kind}_remote", []).append(done)


def run(opts: Options) -> GroupResult:
    try:
        h = _harness()
        criu = h.find_criu()
    except Exception as e:  # CriuUnavailable, or no tests package to borrow from
        raise BenchError(f"criu 4.1.1 is not available: {e}") from None
    if subprocess.run(["ip", "-V"], capture_output=True, check=False).returncode:
        raise BenchError("the remote half needs iproute2 (ip netns)")
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lazypaged-bench-criu-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        prog = h.build_program(work)
        _local(h, criu, prog, work, opts, samples)
        _remote(h, criu, prog, work, opts, samples)
    res = GroupResult(NAME)
    res.setup = [
        f"heap {opts.size_mib} MiB (pattern, 1 page in 16 zero), dumped while idle; "
        "the first pass after restore reads all of it",
        "local: plain dump, restore --lazy-pages from the images; remote: dump --lazy-pages page server "
        "in one netns, daemon + restore in another (veth)",
        f"criu: {criu}",
    ]
    labels = {"lazypaged": "lazypaged criu-lazy-pages", "criu": "criu lazy-pages"}
    for where in ("local", "remote"):
        for what, text in (("first", "first correct checksum"), ("complete", "daemon exit (all pages in)")):
            for kind in KINDS:
                key = f"{what}_{kind}_{where}"
                res.rows.append(Row(key, f"{where}: {text}, {labels[kind]}", "s", tuple(samples[key])))
    res.rows.append(
        Row(
            "first_eager_local",
            "local: first correct checksum, plain `criu restore` (eager, no lazy pages)",
            "s",
            tuple(samples["first_eager_local"]),
        )
    )
    med = {r.key: r.median for r in res.rows}
    speed: dict[str, float] = {}
    for where in ("local", "remote"):
        speed[f"first_{where}"] = med[f"first_criu_{where}"] / med[f"first_lazypaged_{where}"]
        speed[f"complete_{where}"] = med[f"complete_criu_{where}"] / med[f"complete_lazypaged_{where}"]
    for what, text in (("first", "first correct checksum"), ("complete", "daemon exit")):
        name = "criu_first_checksum_speedup" if what == "first" else "criu_complete_speedup"
        res.ratios.append(
            Ratio(
                name,
                min(speed[f"{what}_local"], speed[f"{what}_remote"]),
                TARGET_SPEEDUP,
                ">=",
                f"criu lazy-pages ÷ lazypaged, time to {text} (the lower of local and remote)",
                "×",
            )
        )
        for where in ("local", "remote"):
            res.ratios.append(
                Ratio(
                    f"{name}_{where}",
                    speed[f"{what}_{where}"],
                    TARGET_SPEEDUP,
                    ">=",
                    f"criu lazy-pages ÷ lazypaged, time to {text}, {where}",
                    "×",
                )
            )
    res.notes.append("every restored checksum matched the pre-dump value with no bad word")
    return res
