"""Remote group: restores across two network namespaces joined by a veth pair.

Host A (namespace ``a``, 10.77.0.1) runs ``lazypaged serve`` exporting the
image; host B (namespace ``b``) runs ``lazypaged serve`` and the restored
targets, reading ``peer://10.77.0.1:7070/remote.img``. Measured in the same
run, interleaved run by run:

* fill: a restore with no touches, accepted → complete (``target.py
  lp-fill``), against a plain TCP stream of the same bytes between the same
  namespaces (a minimal Python sender ``sendall``-ing from an mmap and a
  receiver ``recv_into`` a reused buffer), with the CPU seconds per GiB
  each side spent (sender + receiver; A's and B's daemons): on a machine
  with few cores the fill is bound by that CPU, not by the wire; and
  against the floor of any receive-and-install pipeline, a minimal C
  receiver (``c/receiver.c``) that copies each MiB it receives into
  userfaultfd-registered memory with UFFDIO_COPY (no protocol, no checksum);
* urgent faults: random 4 KiB touches with fault-around and fill off
  (``target.py lp-random``), on an idle link and while another restore's fill
  keeps the same peer connection pair saturated (``remote_helper.py load``);
* sequential touch: ``target.py lp-seq`` from A against the same image read
  by B's daemon from its local disk.

Then the same over a slower, longer link: tbf at 1 Gbit/s on both veth ends
and a relay in B that holds every chunk 2.5 ms each way (5 ms round trip);
the peer (and the TCP baseline) are reached through the relay. The plain
link is unencrypted, like the TCP baseline (``insecure = true``); one more
fill runs over mutual TLS for reference.
"""

from __future__ import annotations

import contextlib
import glob
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests import netns

from . import common
from .common import BenchError, GiB, GroupResult, Options, Ratio, Row, log

NAME = "remote"
DESCRIPTION = "restores from a peer across a veth pair (plain and 1 Gbit/5 ms RTT), vs TCP and local"

HERE = Path(__file__).resolve().parent
TARGET = HERE / "target.py"
HELPER = HERE / "remote_helper.py"
PORT, TLS_PORT, TCP_PORT = 7070, 7071, 7099
RELAY_PORT, RELAY_TCP_PORT = 7170, 7199
SESSION_TOML = (
    "fault_around = true\nfault_around_min = 65536\nfault_around_max = 2097152\nfill = true\nfill_chunk = 2097152\n"
)
RANDOM_TOUCHES = 2000
SLOW_TOUCHES = 300
#: The slower link: tbf rate on both ends, and the relay's delay each way.
SLOW_RATE = "1gbit"
SLOW_DELAY_MS = 2.5
SLOW_MAX_MIB = 256
#: The C receiver's recv and UFFDIO_COPY size (its fastest here: 4 MiB is ~20% slower).
C_CHUNK = 1 << 20


def _cpu_s(pid: int) -> float:
    """CPU seconds a process has run, all threads (schedstat: time on a CPU, ns)."""
    total = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f).read_text().split()[0])
    return total / 1e9


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class _Bench:
    def __init__(self, opts: Options, h: netns.Hosts, work: Path, lib: Path) -> None:
        self.opts, self.h, self.work, self.lib = opts, h, work, lib
        self.daemons: list[netns.NsDaemon] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def daemon(self, side: str, name: str, snaps: Path, extra: str, exports: bool = False) -> netns.NsDaemon:
        cfg, sock, logf = netns.daemon_config(self.work, name, snaps, extra, SESSION_TOML, log_level="info")
        d = netns.NsDaemon(self.h, side, cfg, sock, logf, exports=exports).start()
        self.daemons.append(d)
        return d

    def helper(self, side: str, *args: str) -> subprocess.Popen[bytes]:
        p = self.h.popen(side, [sys.executable, str(HELPER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise BenchError(f"helper {args[0]} failed: {p.stderr.read().decode()[-2000:] if p.stderr else ''}")
        return p

    def target(self, mode: str, image: Path, size: int, socket: Path, name: str, *extra: str) -> dict[str, float]:
        cmd = [sys.executable, str(TARGET), mode, "--lib", str(self.lib), "--image", str(image)]
        cmd += ["--size", str(size), "--socket", str(socket), "--name", name, *extra]
        time.sleep(0.1)
        r = self.h.run("b", cmd, timeout=900)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode or not lines:
            raise BenchError(f"target {mode} {name} failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        log(self.opts, f"{mode} {name}: {lines[-1]}")
        out: dict[str, float] = json.loads(lines[-1])
        return out

    def c_receiver(self, binary: Path, host: str, port: int, size: int) -> float:
        cmd = [str(binary), host, str(port), str(size), str(C_CHUNK), "1"]
        r = self.h.run("b", cmd, 600)
        if r.returncode:
            raise BenchError(f"C receiver failed: {r.stdout}{r.stderr[-2000:]}")
        return float(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])

    def tcp(self, connect: str, size: int) -> float:
        r = self.h.run("b", [sys.executable, str(HELPER), "recv", "--connect", connect, "--size", str(size)], 600)
        if r.returncode:
            raise BenchError(f"TCP receiver failed: {r.stdout}{r.stderr[-2000:]}")
        return float(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])

    @contextlib.contextmanager
    def loader(self, socket: Path, name: str, size: int) -> Iterator[None]:
        """Another restore's fill keeping the link busy (restarted as each completes)."""
        p = self.helper("b", "load", "--socket", str(socket), "--name", name, "--size", str(size))
        try:
            time.sleep(0.3)  # let its fill reach full speed
            yield
        finally:
            p.terminate()
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for d in self.daemons:
            d.stop()


def _tls(work: Path) -> tuple[str, str]:
    import trustme

    ca = trustme.CA()
    d = work / "pki"
    d.mkdir()
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    for name, ident in (("a", netns.ADDR_A), ("b", "node-b")):
        leaf = ca.issue_cert(ident)
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))

    def sec(name: str) -> str:
        return f'tls_cert = "{d / name}.crt"\ntls_key = "{d / name}.key"\ntls_ca = "{d / "ca.crt"}"\n'

    return sec("a"), sec("b")


def run(opts: Options) -> GroupResult:
    why = netns.available()
    if why:
        raise BenchError(f"the remote group {why}")
    bins = common.build_c()
    lib = bins["touch"]
    size = opts.size
    slow_size = min(size, SLOW_MAX_MIB << 20)
    s: dict[str, list[float]] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lazypaged-bench-remote-", dir=opts.workdir) as tmp, netns.hosts() as h:
        work = Path(tmp)
        snaps = work / "snapshots"
        snaps.mkdir()
        image = snaps / "remote.img"
        what = common.make_image(image, size, opts.image, lib)
        small = snaps / "slow.img"
        common.make_image(small, slow_size, opts.image, lib)
        common.warm_page_cache(image)
        common.warm_page_cache(small)
        b = _Bench(opts, h, work, lib)
        try:
            tls_a, tls_b = _tls(work)
            exports = 'snapshots = ["remote.img", "slow.img"]\n'
            b.daemon("a", "a", snaps, f'[export]\nlisten = "{netns.ADDR_A}:{PORT}"\ninsecure = true\n{exports}', True)
            b.daemon("a", "a-tls", snaps, f'[export]\nlisten = "{netns.ADDR_A}:{TLS_PORT}"\n{exports}{tls_a}', True)
            db = b.daemon("b", "b", snaps, "[remote]\ninsecure = true\n")
            dbt = b.daemon("b", "b-tls", snaps, f"[remote]\n{tls_b}")
            sender = b.helper("a", "send", "--listen", f"{netns.ADDR_A}:{TCP_PORT}", "--file", str(image))
            pids = [d.proc.pid for d in (b.daemons[0], db) if d.proc is not None]
            b.helper("a", "send", "--listen", f"{netns.ADDR_A}:{TCP_PORT + 1}", "--file", str(small))
            remote = f"peer://{netns.ADDR_A}:{PORT}/remote.img"
            remote_tls = f"peer://{netns.ADDR_A}:{TLS_PORT}/remote.img"
            touches = ("--count", str(min(RANDOM_TOUCHES, size // common.PAGE // 2)))
            for i in range(opts.runs):
                log(opts, f"fast link, run {i + 1}/{opts.runs}")
                # CPU seconds per GiB moved: on two cores the fill is bound by
                # the daemons' CPU, not the wire; this shows by how much.
                c0 = _cpu_s(sender.pid) + _children_cpu_s()
                common.collect(s, "tcp_s", b.tcp(f"{netns.ADDR_A}:{TCP_PORT}", size))
                common.collect(s, "tcp_cpu", (_cpu_s(sender.pid) + _children_cpu_s() - c0) / (size / GiB))
                common.collect(s, "c_recv_s", b.c_receiver(bins["receiver"], netns.ADDR_A, TCP_PORT, size))
                c1 = [_cpu_s(p) for p in pids]
                r = b.target("lp-fill", image, size, db.socket, remote)
                common.collect(s, "fill_s", r["ns"] / 1e9)
                if len(pids) == 2:
                    c2 = [_cpu_s(p) - c for p, c in zip(pids, c1, strict=True)]
                    common.collect(s, "fill_cpu_a", c2[0] / (size / GiB))
                    common.collect(s, "fill_cpu_b", c2[1] / (size / GiB))
                r = b.target("lp-fill", image, size, dbt.socket, remote_tls)
                common.collect(s, "fill_tls_s", r["ns"] / 1e9)
                r = b.target("lp-random", image, size, db.socket, remote, *touches)
                common.collect(s, "idle_us", r["mean_us"])
                common.collect(s, "idle_p99_us", r["p99_us"])
                with b.loader(db.socket, remote, size):
                    r = b.target("lp-random", image, size, db.socket, remote, *touches)
                common.collect(s, "loaded_us", r["mean_us"])
                common.collect(s, "loaded_p99_us", r["p99_us"])
                r = b.target("lp-seq", image, size, db.socket, remote)
                common.collect(s, "seq_remote_s", r["ns"] / 1e9)
                r = b.target("lp-seq", image, size, db.socket, image.name)
                common.collect(s, "seq_local_s", r["ns"] / 1e9)
            # The slower, longer link.
            h.shape(SLOW_RATE, burst="512kb", latency="20ms")
            relay_pairs = [
                ("--pair", f"127.0.0.1:{RELAY_PORT}", f"{netns.ADDR_A}:{PORT}"),
                ("--pair", f"127.0.0.1:{RELAY_TCP_PORT}", f"{netns.ADDR_A}:{TCP_PORT + 1}"),
            ]
            b.helper("b", "relay", *[x for p in relay_pairs for x in p], "--delay-ms", str(SLOW_DELAY_MS))
            slow = f"peer://127.0.0.1:{RELAY_PORT}/slow.img"
            slow_touches = ("--count", str(SLOW_TOUCHES))
            for i in range(opts.runs):
                log(opts, f"slow link, run {i + 1}/{opts.runs}")
                common.collect(s, "slow_tcp_s", b.tcp(f"127.0.0.1:{RELAY_TCP_PORT}", slow_size))
                r = b.target("lp-fill", small, slow_size, db.socket, slow)
                common.collect(s, "slow_fill_s", r["ns"] / 1e9)
                r = b.target("lp-random", small, slow_size, db.socket, slow, *slow_touches)
                common.collect(s, "slow_idle_us", r["mean_us"])
                with b.loader(db.socket, slow, slow_size):
                    r = b.target("lp-random", small, slow_size, db.socket, slow, *slow_touches)
                common.collect(s, "slow_loaded_us", r["mean_us"])
                r = b.target("lp-seq", small, slow_size, db.socket, slow)
                common.collect(s, "slow_seq_remote_s", r["ns"] / 1e9)
                r = b.target("lp-seq", small, slow_size, db.socket, small.name)
                common.collect(s, "slow_seq_local_s", r["ns"] / 1e9)
            problems = [e for d in b.daemons for e in d.events() if e.get("level") in ("error", "critical")]
            if problems:
                notes.append(f"daemons logged {len(problems)} error(s), first: {json.dumps(problems[0])[:300]}")
        finally:
            b.close()
    return _result(opts, s, what, slow_size, notes)


def _result(opts: Options, s: dict[str, list[float]], what: str, slow_size: int, notes: list[str]) -> GroupResult:
    med = {k: common.median(v) for k, v in s.items()}
    gib, slow_gib = opts.size / GiB, slow_size / GiB
    res = GroupResult(NAME)
    res.setup = [
        f"image: {opts.size_mib} MiB of {what}, in A's page cache; namespaces a/b, veth pair, "
        f"{opts.runs} runs, medians [min–max]",
        f"slow link: tbf {SLOW_RATE} both ways + relay holding each chunk {SLOW_DELAY_MS} ms each way, "
        f"image {slow_size >> 20} MiB",
        "peer link plaintext (insecure = true), like the TCP baseline; one fill over mutual TLS for reference",
    ]

    def rate(key: str, label: str, sample: str, g: float = gib) -> None:
        res.rows.append(Row(key, label, "GiB/s", tuple(g / x for x in s[sample])))

    def row(key: str, label: str, unit: str, sample: str, note: str = "") -> None:
        res.rows.append(Row(key, label, unit, tuple(s[sample]), note))

    rate("tcp_gibps", "plain TCP stream A→B (Python sendall / recv_into)", "tcp_s")
    rate("c_recv_gibps", "minimal C receiver: recv + UFFDIO_COPY per MiB, one thread", "c_recv_s")
    rate("fill_gibps", "lazypaged fill from A, accepted → complete", "fill_s")
    rate("fill_tls_gibps", "lazypaged fill from A over mutual TLS", "fill_tls_s")
    row("tcp_cpu", "plain TCP stream: CPU of sender + receiver", "s/GiB", "tcp_cpu", "CPU seconds per GiB")
    if "fill_cpu_a" in s:
        row("fill_cpu_a", "lazypaged fill: CPU of A's daemon (exporter)", "s/GiB", "fill_cpu_a", "CPU seconds per GiB")
        row("fill_cpu_b", "lazypaged fill: CPU of B's daemon (reader)", "s/GiB", "fill_cpu_b", "CPU seconds per GiB")
    row("idle_us", "random 4 KiB fault from A, idle link", "µs", "idle_us", "mean")
    row("idle_p99_us", "random 4 KiB fault from A, idle link", "µs", "idle_p99_us", "p99")
    row("loaded_us", "random 4 KiB fault from A, fill saturating the link", "µs", "loaded_us", "mean")
    row("loaded_p99_us", "random 4 KiB fault from A, fill saturating the link", "µs", "loaded_p99_us", "p99")
    rate("seq_remote_gibps", "sequential write-touch, pages from A", "seq_remote_s")
    rate("seq_local_gibps", "sequential write-touch, pages from B's local file", "seq_local_s")
    rate("slow_tcp_gibps", "slow link: plain TCP stream", "slow_tcp_s", slow_gib)
    rate("slow_fill_gibps", "slow link: lazypaged fill", "slow_fill_s", slow_gib)
    row("slow_idle_us", "slow link: random 4 KiB fault, idle", "µs", "slow_idle_us", "mean")
    row("slow_loaded_us", "slow link: random 4 KiB fault, fill saturating", "µs", "slow_loaded_us", "mean")
    rate("slow_seq_remote_gibps", "slow link: sequential write-touch from A", "slow_seq_remote_s", slow_gib)
    rate("slow_seq_local_gibps", "slow link: sequential write-touch, local file", "slow_seq_local_s", slow_gib)

    res.ratios = [
        Ratio("remote_fill_vs_tcp", med["tcp_s"] / med["fill_s"], 0.8, ">=", "fill throughput ÷ plain TCP stream"),
        Ratio(
            "remote_c_receiver_vs_tcp",
            med["tcp_s"] / med["c_recv_s"],
            0.0,
            ">=",
            "minimal C recv + UFFDIO_COPY ÷ plain TCP stream: the floor's own ratio (reported, no target)",
        ),
        Ratio(
            "remote_fill_vs_c_receiver",
            med["c_recv_s"] / med["fill_s"],
            0.0,
            ">=",
            "fill throughput ÷ minimal C recv + UFFDIO_COPY (reported, no target)",
        ),
        Ratio(
            "remote_urgent_loaded_vs_idle",
            med["loaded_us"] / med["idle_us"],
            3.0,
            "<=",
            "mean 4 KiB fault latency, fill saturating the link ÷ idle link",
        ),
        Ratio(
            "remote_seq_touch_vs_local",
            med["seq_remote_s"] / med["seq_local_s"],
            float("inf"),
            "<=",
            "sequential touch time, pages from A ÷ from B's local file (reported, no target)",
        ),
        Ratio("remote_slow_fill_vs_tcp", med["slow_tcp_s"] / med["slow_fill_s"], 0.8, ">=", "slow link: fill ÷ TCP"),
        Ratio(
            "remote_slow_urgent_loaded_vs_idle",
            med["slow_loaded_us"] / med["slow_idle_us"],
            3.0,
            "<=",
            "slow link: mean 4 KiB fault latency, loaded ÷ idle",
        ),
        Ratio(
            "remote_slow_seq_touch_vs_local",
            med["slow_seq_remote_s"] / med["slow_seq_local_s"],
            float("inf"),
            "<=",
            "slow link: sequential touch time, from A ÷ local (reported, no target)",
        ),
    ]
    res.notes.extend(notes)
    return res
