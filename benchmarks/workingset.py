"""Working-set group: the second restore of an image, replaying the first one's faults.

The restored program (``ws_target.py``) models a function invocation: it
touches a fixed tenth of its pages, in scattered 64 KiB clusters visited in a
fixed order, with a little arithmetic between touches, and reports the time
from ``restore()`` returning to its last touch ("done"). It then exits, which
ends the session (faults are read from the daemon's ``session_ended`` line).

For each configuration, run by run: delete the record, restore once (it
records: ``IMAGE.ws``, or ``[working_set] dir`` for a peer source), then a
restore that replays the record and one with ``working_set=False`` (order
alternating run by run). Every restore is preceded by ``sync; echo 3 >
/proc/sys/vm/drop_caches`` (cold) or by reading the image and the record
(warm). Configurations:

* local: ``lazypaged serve`` reading the image from a local file;
* remote: two network namespaces joined by a veth pair; A exports the image,
  B's daemon reads ``peer://`` through a relay in B that holds every chunk
  2.5 ms each way (5 ms added round trip; ``remote_helper.py relay``).

The daemons run the documented ``[session]`` defaults (fault-around 64 KiB →
2 MiB, fill on) and ``[working_set]`` defaults except ``record_seconds``,
raised so a slow cold first restore is recorded whole.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import netns

from . import common
from .common import GroupResult, Options, Ratio, Row, log

NAME = "workingset"
DESCRIPTION = "working-set record/replay: time to done of a function-like workload, cold and warm, local and remote"

HERE = Path(__file__).resolve().parent
TARGET = HERE / "ws_target.py"
HELPER = HERE / "remote_helper.py"
SESSION_TOML = (
    "fault_around = true\nfault_around_min = 65536\nfault_around_max = 2097152\nfill = true\nfill_chunk = 2097152\n"
)
RECORD_SECONDS = 120
PORT, RELAY_PORT = 7270, 7370
DELAY_MS = 2.5
KINDS = ("record", "replay", "off")


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _cached(lib: Path, path: Path) -> float:
    if not path.exists():
        return 0.0
    c = ctypes.CDLL(str(lib))
    c.bench_cached_ppm.argtypes = [ctypes.c_int, ctypes.c_size_t]
    c.bench_cached_ppm.restype = ctypes.c_int64
    fd = os.open(path, os.O_RDONLY)
    try:
        ppm = c.bench_cached_ppm(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return max(0.0, float(ppm) / 1e6)


class _Runner:
    """Restores of one configuration (local or remote) and their measurements."""

    def __init__(
        self,
        opts: Options,
        lib: Path,
        image: Path,
        where: str,
        socket: Path,
        name: str,
        ws_files: Callable[[], list[Path]],
        events: Callable[[], list[dict[str, Any]]],
        run: Callable[[list[str]], subprocess.CompletedProcess[str]],
    ) -> None:
        self.opts, self.lib, self.image, self.where = opts, lib, image, where
        self.socket, self.name = socket, name
        self.ws_files, self.events, self.run_cmd = ws_files, events, run
        self.samples: dict[str, list[float]] = {}
        self.cached_after_drop: list[float] = []
        #: Stops the daemons before a cold restore and returns a function that
        #: starts them again: pages a daemon keeps mapped survive drop_caches.
        self.restart: Callable[[], Callable[[], None]] | None = None

    def _ended(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "session_ended"]

    def prepare(self, cache: str) -> None:
        if cache == "cold":
            start = self.restart() if self.restart is not None else None
            _drop_caches()
            self.cached_after_drop.append(_cached(self.lib, self.image))
            if start is not None:
                start()
        else:
            common.warm_page_cache(self.image)
            for f in self.ws_files():
                common.warm_page_cache(f)
        time.sleep(0.1)

    def restore(self, cache: str, kind: str) -> None:
        self.prepare(cache)
        before = len(self._ended())
        cmd = [sys.executable, str(TARGET), "--lib", str(self.lib), "--image", str(self.image)]
        cmd += ["--size", str(self.opts.size), "--socket", str(self.socket), "--name", self.name]
        if kind == "off":
            cmd.append("--no-working-set")
        r = self.run_cmd(cmd)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode or not lines:
            tail = f"{r.stdout[-2000:]}{r.stderr[-3000:]}"
            raise common.BenchError(f"{self.where} {kind} target failed ({r.returncode}):\n{tail}")
        out = json.loads(lines[-1])
        sid = out["session"]
        deadline = time.monotonic() + 120
        ended: dict[str, Any] | None = None
        while ended is None:
            ended = next((e for e in self._ended()[before:] if e.get("session") == sid), None)
            if ended is None:
                if time.monotonic() > deadline:
                    raise common.BenchError(f"{self.where} {kind}: session {sid} did not end")
                time.sleep(0.02)
        replayed = [e for e in self.events() if e.get("event") == "working_set_replayed" and e.get("session") == sid]
        if kind == "record" and not self.ws_files():
            raise common.BenchError(f"{self.where}: the first restore wrote no working-set record")
        if kind == "replay" and not any(
            e.get("event") == "working_set_replay" and e.get("session") == sid for e in self.events()
        ):
            raise common.BenchError(f"{self.where}: the second restore did not replay the record")
        key = f"{self.where}_{cache}_{kind}"
        common.collect(self.samples, f"{key}_done_s", out["done_ns"] / 1e9)
        common.collect(self.samples, f"{key}_faults", float(ended.get("faults", 0)))
        if replayed:
            common.collect(self.samples, f"{key}_replay_mib", replayed[-1]["bytes"] / common.MiB)
            common.collect(self.samples, f"{key}_replay_s", float(replayed[-1]["seconds"]))
        log(self.opts, f"{key}: done {out['done_ns'] / 1e6:.1f} ms, faults {ended.get('faults')}"
            + (f", replayed {replayed[-1]}" if replayed else ""))  # fmt: skip

    def one_run(self, i: int) -> None:
        for cache in ("cold", "warm"):
            for f in self.ws_files():
                f.unlink()
            self.restore(cache, "record")
            for kind in ("replay", "off") if i % 2 == 0 else ("off", "replay"):
                self.restore(cache, kind)


def _local(opts: Options, lib: Path, work: Path, snaps: Path, image: Path) -> _Runner:
    extra = f"[working_set]\nenabled = true\nrecord_seconds = {RECORD_SECONDS}\n"
    ws = Path(str(image) + ".ws")
    with common.lazypaged_daemon(work, snaps, SESSION_TOML, extra) as d:

        def events() -> list[dict[str, Any]]:
            out = []
            for line in d.log.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            return out

        def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)

        r = _Runner(opts, lib, image, "local", d.socket, image.name, lambda: [ws] if ws.exists() else [], events, run)
        for i in range(opts.runs):
            log(opts, f"local, run {i + 1}/{opts.runs}")
            r.one_run(i)
        r.problems = [e for e in events() if e.get("level") in ("error", "critical")]  # type: ignore[attr-defined]
    return r


def _remote(opts: Options, lib: Path, work: Path, snaps: Path, image: Path) -> _Runner:
    ws_dir = work / "ws-b"
    ws_dir.mkdir()
    daemons: list[netns.NsDaemon] = []
    with netns.hosts() as h:
        try:
            cfg, sock, logf = netns.daemon_config(
                work, "wa", snaps, f'[export]\nlisten = "{netns.ADDR_A}:{PORT}"\ninsecure = true\n'
                f'snapshots = ["{image.name}"]\n', SESSION_TOML, log_level="info",
            )  # fmt: skip
            daemons.append(netns.NsDaemon(h, "a", cfg, sock, logf, exports=True).start())
            extra = (
                f'[remote]\ninsecure = true\n[working_set]\nenabled = true\nrecord_seconds = {RECORD_SECONDS}\n'
                f'dir = "{ws_dir}"\n'
            )
            cfg, sock, logf = netns.daemon_config(work, "wb", snaps, extra, SESSION_TOML, log_level="info")
            db = netns.NsDaemon(h, "b", cfg, sock, logf).start()
            daemons.append(db)
            relay = h.popen(
                "b",
                [sys.executable, str(HELPER), "relay", "--pair", f"127.0.0.1:{RELAY_PORT}", f"{netns.ADDR_A}:{PORT}",
                 "--delay-ms", str(DELAY_MS)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert relay.stdout is not None
            if not relay.stdout.readline():
                raise common.BenchError("the delaying relay did not start")
            name = f"peer://127.0.0.1:{RELAY_PORT}/{image.name}"

            def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
                return h.run("b", cmd, timeout=900)

            files = lambda: sorted(ws_dir.glob("*.ws"))  # noqa: E731
            r = _Runner(opts, lib, image, "remote", db.socket, name, files, db.events, run)

            def restart() -> Callable[[], None]:
                # The exporter keeps the image mapped (its pages would stay
                # cached); B's daemon reconnects to the new exporter.
                for d in daemons:
                    d.stop()

                def start() -> None:
                    da, dbb = daemons
                    listening = sum(e.get("event") == "export_listening" for e in da.events())
                    da.start()
                    deadline = time.monotonic() + 15
                    while sum(e.get("event") == "export_listening" for e in da.events()) <= listening:
                        if time.monotonic() > deadline:
                            raise common.BenchError("the exporter did not come back")
                        time.sleep(0.02)
                    dbb.start()

                return start

            r.restart = restart
            for i in range(opts.runs):
                log(opts, f"remote, run {i + 1}/{opts.runs}")
                r.one_run(i)
            r.problems = [e for d in daemons for e in d.events() if e.get("level") in ("error", "critical")]  # type: ignore[attr-defined]
        finally:
            for d in daemons:
                d.stop()
    return r


def run(opts: Options) -> GroupResult:
    why = netns.available()
    if why:
        raise common.BenchError(f"the workingset group {why}")
    lib = common.build_c()["touch"]
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lazypaged-bench-ws-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        snaps = work / "snapshots"
        snaps.mkdir()
        image = snaps / "ws.img"
        what = common.make_image(image, opts.size, opts.image, lib)
        runners = [_local(opts, lib, work, snaps, image), _remote(opts, lib, work, snaps, image)]
    samples: dict[str, list[float]] = {}
    for r in runners:
        samples.update(r.samples)
        worst = max(r.cached_after_drop, default=0.0)
        if worst > 0.01:
            notes.append(f"{r.where}: up to {worst:.1%} of the image stayed in the page cache after dropping it")
        problems = getattr(r, "problems", [])
        if problems:
            notes.append(f"{r.where}: daemons logged {len(problems)} error(s), first: {json.dumps(problems[0])[:300]}")
    return _result(opts, samples, what, notes)


def _result(opts: Options, s: dict[str, list[float]], what: str, notes: list[str]) -> GroupResult:
    from .ws_target import CLUSTER_PAGES, FRACTION, PAGE, workload_pages

    touches = len(workload_pages(opts.size // PAGE))
    med = {k: common.median(v) for k, v in s.items()}
    res = GroupResult(NAME)
    res.setup = [
        f"image: {opts.size_mib} MiB of {what}; workload: {touches} pages ({FRACTION:.0%}) in "
        f"{touches // CLUSTER_PAGES} scattered clusters of {CLUSTER_PAGES} pages, fixed order, compute between touches",
        f"{opts.runs} runs, medians [min–max]; cold: sync + drop_caches before each restore; warm: image and "
        "record read first",
        f"remote: netns pair over veth, B reads peer:// through a relay adding {DELAY_MS} ms each way",
        f"daemon: [session] defaults (fault-around 64 KiB→2 MiB, fill on), [working_set] defaults, "
        f"record_seconds = {RECORD_SECONDS}",
    ]
    labels = {"record": "first restore (records)", "replay": "with replay", "off": "working_set=False"}
    for where in ("local", "remote"):
        for cache in ("cold", "warm"):
            for kind in KINDS:
                key = f"{where}_{cache}_{kind}"
                res.rows.append(Row(f"{key}_done_s", f"{where} {cache}: {labels[kind]}, time to done", "s",
                                    tuple(s[f"{key}_done_s"])))  # fmt: skip
            for kind in KINDS:
                key = f"{where}_{cache}_{kind}"
                res.rows.append(Row(f"{key}_faults", f"{where} {cache}: {labels[kind]}", "faults",
                                    tuple(s[f"{key}_faults"])))  # fmt: skip
            key = f"{where}_{cache}_replay"
            if f"{key}_replay_s" in s:
                res.rows.append(Row(f"{key}_replay_s", f"{where} {cache}: replay (daemon log)", "s",
                                    tuple(s[f"{key}_replay_s"]), f"{med[f'{key}_replay_mib']:.0f} MiB"))  # fmt: skip

    def speed(where: str, cache: str) -> float:
        return med[f"{where}_{cache}_off_done_s"] / med[f"{where}_{cache}_replay_done_s"]

    def fewer(where: str, cache: str) -> float:
        off = med[f"{where}_{cache}_off_faults"]
        return 1 - med[f"{where}_{cache}_replay_faults"] / off if off else 0.0

    res.ratios = [
        Ratio("ws_cold_speedup", speed("local", "cold"), 3.7, ">=",
              "time to done, working_set=False ÷ replay, local file, cold page cache", "×"),
        Ratio("ws_warm_speedup", speed("local", "warm"), 1.0, ">=",
              "the same, warm page cache (no target in the issue: replay must not be slower)", "×"),
        Ratio("ws_remote_speedup", speed("remote", "cold"), 5.0, ">=",
              "time to done, working_set=False ÷ replay, peer across veth + 5 ms RTT, cold page cache", "×"),
        Ratio("ws_remote_warm_speedup", speed("remote", "warm"), 5.0, ">=",
              "the same, warm page cache", "×"),
        Ratio("ws_cold_fault_reduction", fewer("local", "cold"), 0.97, ">=",
              "1 − faults with replay ÷ without, local cold (REAP reports 97% fewer)"),
        Ratio("ws_remote_fault_reduction", fewer("remote", "cold"), 0.97, ">=",
              "1 − faults with replay ÷ without, remote cold"),
    ]  # fmt: skip
    res.notes.extend(notes)
    return res
