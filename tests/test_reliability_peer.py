"""Peer restores under fault injection: link cuts and bit flips on the wire.

Link cuts: an exporter in namespace A, a restoring daemon in namespace B,
one veth pair between them (tests/netns.py), mutual TLS. Each round starts
a target in B restoring 64 MiB from A over a rate-limited link, takes B's
end of the link down mid-restore for a few seconds, brings it back, and has
the target check every byte of its memory against A's image. The default
run does 2 rounds with 2 s cuts; ``pytest -m slow`` does 20 rounds with
5 s cuts on one pair of daemons.

Bit flips: both daemons on loopback, plaintext, with a relay between them
(tests/peer_relay.py) that changes bits of the exporter's DATA frames. The
target (tests/poison_check_target.py) reads every page through the kernel,
so pages poisoned by the ``sigbus`` policy are counted rather than fatal,
and compares each page it could read with the image.

Each test prints a JSON summary line (the figures in docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lazypaged.demo import make_image

from . import netns
from .conftest import TARGET, DaemonHandle, _needs_root, finish, kill, start_daemon, stop_daemon
from .peer_pair import free_port, make_pki, peer_url, start_exporter, start_reader
from .peer_relay import Corruptor, FlipOnce, FlipRandom, FlipRange, Relay, StallBulk, field_of

HERE = Path(__file__).parent
CHECK_TARGET = HERE / "poison_check_target.py"
MiB = 1 << 20
PAGE = 4096


def _wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


# -- the peer link cut mid-restore ------------------------------------------------------------


@dataclass
class Pair:
    hosts: netns.Hosts
    image: Path
    exporter: netns.NsDaemon
    reader: netns.NsDaemon


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    if netns.available():
        pytest.skip(netns.available())
    hosts = netns.Hosts()
    daemons: list[netns.NsDaemon] = []
    try:
        hosts.create()
        snaps = tmp_path / "a-snaps"
        snaps.mkdir()
        make_image(snaps / "img", 64 * MiB)
        pki = make_pki(tmp_path / "pki")
        daemons.append(start_exporter(hosts, tmp_path, snaps, ["img"], pki))
        (tmp_path / "b-snaps").mkdir()
        # stall 1 s: a dead link is noticed within the cut; deadline 60 s: a
        # cut never fails the restore.
        daemons.append(start_reader(hosts, tmp_path, tmp_path / "b-snaps", pki, stall=1.0, deadline=60.0))
        hosts.shape("120mbit")  # 64 MiB take at least 4.3 s: a cut in the first second is mid-restore
        yield Pair(hosts, snaps / "img", daemons[0], daemons[1])
        bugs = [e for d in daemons for e in d.events() if e.get("event") in ("session_bug", "export_bug")]
        assert not bugs, bugs
    finally:
        for d in reversed(daemons):
            d.stop()
        hosts.destroy()


def _cut_round(p: Pair, rng: random.Random, outage: float, touch: str) -> dict[str, Any]:
    """One restore with the link down for ``outage`` seconds in its first second."""
    downs = len(_named(p.reader.events(), "peer_link_down"))
    ups = len(_named(p.reader.events(), "peer_link_up"))
    args = [sys.executable, str(TARGET), "--socket", str(p.reader.socket), "--image", str(p.image),
            "--name", peer_url("img"), "--size", str(64 * MiB), "--touch", touch, "--wait", "--no-working-set"]
    t0 = time.monotonic()
    t = p.hosts.popen("b", args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert t.stdout is not None
        first = t.stdout.readline()
        assert json.loads(first).get("accepted"), first
        cut_at = rng.uniform(0.2, 1.0)
        time.sleep(cut_at)
        p.hosts.link(up=False)
        try:
            time.sleep(outage)
            alive_after_cut = t.poll() is None
        finally:
            p.hosts.link(up=True)
        rc, lines, err = finish(t, 180)
    finally:
        kill(t)
    ev = p.reader.events()
    result = lines[-1] if lines else {}
    return {
        "touch": touch,
        "cut_at_s": round(cut_at, 2),
        "rc": rc,
        "ok": result.get("ok") is True and bool(result.get("complete")),
        "first_bad": result.get("first_bad", -1),
        "alive_through_cut": alive_after_cut,
        "links_dropped": len(_named(ev, "peer_link_down")) - downs,
        "links_up_again": len(_named(ev, "peer_link_up")) - ups,
        "seconds": round(time.monotonic() - t0, 2),
        "stderr": err[-1000:] if rc else "",
    }


def run_cuts(p: Pair, rounds: int, outage: float) -> list[dict[str, Any]]:
    rng = random.Random(8)
    touches = ("seq", "random", "threads")
    out = [_cut_round(p, rng, outage, touches[k % len(touches)]) for k in range(rounds)]
    passed = sum(1 for r in out if r["rc"] == 0 and r["ok"])
    print(json.dumps({"rounds": rounds, "outage_s": outage, "passed": passed,
                      "wrong_rounds": sum(1 for r in out if r["first_bad"] != -1),
                      "seconds": [r["seconds"] for r in out]}))
    for r in out:
        assert r["rc"] == 0, r
        assert r["ok"], r
        # The restore was still waiting on the link when it went down, and
        # the reader noticed and re-established it: the cut fell mid-restore.
        assert r["alive_through_cut"], r
        assert r["links_dropped"] >= 1, r
        assert r["links_up_again"] >= 1, r
    return out


def test_link_cut_mid_restore_short(pair: Pair) -> None:
    run_cuts(pair, rounds=2, outage=2.0)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_link_cut_5s_mid_restore_20_rounds(pair: Pair) -> None:
    run_cuts(pair, rounds=20, outage=5.0)


# -- bit flips in the exporter's DATA frames ----------------------------------------------------

SIZE = 16 * MiB


@dataclass
class Loop:
    tmp: Path
    image: Path
    exporter: DaemonHandle
    export_port: int
    relay: Relay | None = None
    reader: DaemonHandle | None = None

    def start(self, corruptor: Corruptor, policy: str, stall: float = 2.0) -> DaemonHandle:
        """The relay with ``corruptor`` and a reader whose configured failure policy is ``policy``."""
        self.relay = Relay(("127.0.0.1", self.export_port), corruptor)
        work = self.tmp / "b"
        work.mkdir()
        remote = f"\n[remote]\nstall_timeout = {stall}\nreconnect_deadline = 60.0\nbackoff_max = 0.25\n"
        self.reader = start_daemon(work, extra_config=remote, session_config=f'failure_policy = "{policy}"')
        return self.reader

    def target(self, export: str, order: str = "seq", seed: int = 0, timeout: float = 120) -> subprocess.Popen[str]:
        assert self.reader is not None
        assert self.relay is not None
        url = f"peer://127.0.0.1:{self.relay.port}/{export}"
        args = [sys.executable, str(CHECK_TARGET), "--socket", str(self.reader.socket), "--image", str(self.image),
                "--name", url, "--size", str(SIZE), "--order", order, "--seed", str(seed), "--timeout", str(timeout)]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    _needs_root()
    snaps = tmp_path / "a" / "snapshots"
    snaps.mkdir(parents=True)
    make_image(snaps / "img", SIZE)
    subprocess.run([sys.executable, "-m", "lazypaged", "snapshot", "create", "--from-raw", str(snaps / "img"),
                    "-o", str(snaps / "img.lps"), "-q"], check=True, capture_output=True)
    port = free_port()
    export = f'\n[export]\nlisten = "127.0.0.1:{port}"\nsnapshots = ["img", "img.lps"]\n'
    exporter = start_daemon(tmp_path / "a", extra_config=export)
    setup = Loop(tmp_path, snaps / "img", exporter, port)
    try:
        _wait_for(lambda: any(e.get("event") == "export_listening" for e in exporter.log_lines()), 15,
                  "the export listener")
        yield setup
        for d in (exporter, setup.reader):
            if d is not None:
                bugs = [e for e in d.log_lines() if e.get("event") in ("session_bug", "export_bug")]
                assert not bugs, bugs
    finally:
        codes = [stop_daemon(d) for d in (setup.reader, exporter) if d is not None]
        if setup.relay is not None:
            setup.relay.close()
        assert codes == [0] * len(codes), codes


def _result(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, dict[str, Any], str]:
    try:
        rc, lines, err = finish(proc, timeout)
    finally:
        kill(proc)
    assert rc == 2 or not lines or lines[0].get("accepted"), lines
    return rc, (lines[-1] if len(lines) > 1 else {}), err


def test_a_fault_on_a_page_held_in_a_stalled_fill_read_goes_urgent(loop: Loop) -> None:
    """The fill's first read is held for 8 s on the bulk connection (a link
    full of fill). The target touches those pages at once: each fault is
    asked for again on the urgent connection and served in milliseconds,
    instead of waiting behind the bulk read."""
    hold = 8.0
    stall = StallBulk(seconds=hold, frames=1)
    loop.start(stall, "wait", stall=30.0)
    proc = loop.target("img", "seq")
    try:
        rc, lines, err = finish(proc, 60)
    finally:
        kill(proc)
    assert rc == 0, (lines, err[-2000:])
    assert stall.stalled == 1, "the fill's read was never held"
    read = [ln["read_s"] for ln in lines if "read_s" in ln]
    assert read, lines
    assert read[0] < hold / 2, (read, lines)
    assert lines[-1]["wrong_pages"] == 0, lines[-1]


@pytest.mark.parametrize("export", ["img", "img.lps"])
def test_one_flipped_data_frame_is_fetched_again(loop: Loop, export: str) -> None:
    """A single flip: the checksum catches it, the read is sent again, the
    target gets every byte right and the failure policy is never needed."""
    flip = FlipOnce(nth=3)
    reader = loop.start(flip, "sigbus")
    rc, res, err = _result(loop.target(export, "random", seed=1))
    assert rc == 0, (res, err[-2000:])
    assert res["wrong_pages"] == 0, res
    assert res["poisoned_pages"] == 0, res
    assert len(flip.flips) == 1, flip.flips
    log = reader.log_lines()
    retried = [e for e in log if e.get("event") == "peer_data_corrupt_retrying"]
    assert len(retried) == 1, retried
    assert "checksum mismatch" in str(retried[0]["error"]) or "zstd" in str(retried[0]["error"]), retried
    assert not [e for e in log if e.get("event") == "source_failed"]
    print(json.dumps({"export": export, "flips": len(flip.flips), "wrong_pages": 0, "retried": len(retried)}))


BAD = 9 * MiB + 5 * PAGE  # one page of the image that every read of it gets corrupted


def _failed_ranges(log: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(int(e["offset"], 16), int(e["length"])) for e in log if e.get("event") == "source_failed"]


@pytest.mark.parametrize("export", ["img", "img.lps"])
def test_flips_that_persist_poison_the_pages_sigbus(loop: Loop, export: str) -> None:
    """Every copy of one page's bytes arrives corrupted: the reads holding it
    fail for good, and that one page is poisoned (a touch would raise
    SIGBUS); the rest of those reads is read again and installed, like the
    rest of the image. No wrong byte anywhere."""
    flips = FlipRange(BAD, BAD + PAGE)
    reader = loop.start(flips, "sigbus")
    rc, res, err = _result(loop.target(export, "seq"))
    assert rc == 0, (res, err[-2000:])
    assert res["wrong_pages"] == 0, res
    poisoned = [(a * PAGE, n * PAGE) for a, n in res["poisoned"]]
    assert any(a <= BAD < a + n for a, n in poisoned), poisoned
    log = reader.log_lines()
    failed = [e for e in log if e.get("event") == "source_failed"]
    assert failed, "no source_failed logged"
    assert {e["policy"] for e in failed} == {"sigbus"}, failed
    assert any("checksum" in e["error"] or "zstd" in e["error"] for e in failed), failed
    # Only the bad page is poisoned, though it failed reads of megabytes; the
    # first try and the retry of each such read were both corrupted.
    assert poisoned == [(BAD, PAGE)], poisoned
    ranges = _failed_ranges(log)
    assert any(o <= BAD < o + k for o, k in ranges), ranges
    assert len(flips.flips) >= 2 * len(ranges), (flips.flips, ranges)
    ended = [e for e in log if e.get("event") == "session_ended"]
    assert ended[-1]["outcome"] == "complete", ended
    print(json.dumps({"export": export, "flips": len(flips.flips), "wrong_pages": 0,
                      "poisoned_pages": res["poisoned_pages"], "source_failed": len(failed)}))


def test_policy_use_is_counted_where_an_operator_can_see_it(loop: Loop) -> None:
    """docs/reliability.md: every use of the failure policy is "logged and
    counted". The session's record of itself at its end should say how many
    source failures it had and how many bytes it poisoned."""
    reader = loop.start(FlipRange(BAD, BAD + PAGE), "sigbus")
    rc, res, err = _result(loop.target("img", "seq"))
    assert rc == 0, (res, err[-2000:])
    assert res["poisoned_pages"] > 0, res
    ended = [e for e in reader.log_lines() if e.get("event") == "session_ended"]
    assert ended[-1].get("source_errors", 0) >= 1, ended[-1]
    assert ended[-1].get("bytes_poisoned") == res["poisoned_pages"] * PAGE, ended[-1]


def test_flips_that_persist_kill_the_target(loop: Loop) -> None:
    flips = FlipRange(BAD, BAD + PAGE)
    reader = loop.start(flips, "kill")
    proc = loop.target("img", "seq")
    rc, res, err = _result(proc)
    assert rc == -9, (rc, res, err[-2000:])
    assert res == {}, "the target must be killed before it gets to a result"
    log = reader.log_lines()
    failed = [e for e in log if e.get("event") == "source_failed"]
    assert failed, "no source_failed logged"
    assert failed[0]["policy"] == "kill", failed
    assert [e for e in log if e.get("event") == "target_killed"], "no target_killed logged"
    print(json.dumps({"policy": "kill", "flips": len(flips.flips), "rc": rc}))


def test_flips_that_persist_then_stop_wait_policy(loop: Loop) -> None:
    """``wait``: the target blocks on the bad page while the reads keep
    failing; once the wire is clean again the retry installs it."""
    flips = FlipRange(BAD, BAD + PAGE)
    reader = loop.start(flips, "wait")
    proc = loop.target("img", "seq")
    try:
        _wait_for(lambda: any(e.get("event") == "source_failed" for e in reader.log_lines()), 60,
                  "the source to fail")
        time.sleep(0.5)
        assert proc.poll() is None, "the target must wait for its missing page"
        with flips.lock:
            flips.active = False
        rc, res, err = _result(proc)
    finally:
        kill(proc)
    assert rc == 0, (res, err[-2000:])
    assert res["wrong_pages"] == 0, res
    assert res["poisoned_pages"] == 0, res
    log = reader.log_lines()
    failed = [e for e in log if e.get("event") == "source_failed"]
    assert {e["policy"] for e in failed} == {"wait"}, failed
    # The retry installed the pages (it logs source_recovered unless the
    # pages it installed were the last ones: then the session just ends).
    ended = [e for e in log if e.get("event") == "session_ended"]
    assert ended[-1]["outcome"] == "complete", ended
    assert ended[-1]["pages_installed"] == ended[-1]["pages_total"], ended
    print(json.dumps({"policy": "wait", "flips": len(flips.flips), "wrong_pages": 0, "source_failed": len(failed)}))


def test_wait_policy_retry_never_counts_a_page_twice(loop: Loop) -> None:
    """Only the fill's reads (the bulk connection) of most of the image are
    corrupted, so fill chunks fail for good and wait for their retry while
    the target's fault reads (the urgent connection, clean) go on installing
    pages inside those chunks. Every page must be counted once and every
    restore complete. The overlap is a race: up to 10 restores in a row."""
    flips = FlipRange(2 * MiB, 14 * MiB, role="bulk")
    reader = loop.start(flips, "wait")
    rounds = []
    for k in range(10):
        rc, res, err = _result(loop.target("img", "random", seed=k, timeout=10), timeout=60)
        _wait_for(lambda n=k: len(_named(reader.log_lines(), "session_ended")) > n, 15, "the session to end")
        end = _named(reader.log_lines(), "session_ended")[k]
        rounds.append({"rc": rc, "wrong_pages": res.get("wrong_pages"), "outcome": end["outcome"],
                       "pages_total": end["pages_total"], "pages_installed": end["pages_installed"]})
        if rc != 0 or end["outcome"] != "complete":
            break
    print(json.dumps({"flips": len(flips.flips), "rounds": rounds}))
    for r in rounds:
        assert r["pages_installed"] <= r["pages_total"], r
        assert r["rc"] == 0, (r, err[-2000:])
        assert r["wrong_pages"] == 0, r
        assert r["outcome"] == "complete", r


def run_random_flips(loop: Loop, restores: int, rate: float, limit: int, seed: int = 11) -> dict[str, Any]:
    """Random single-bit flips anywhere in DATA frames (headers included):
    caught by the checksum, the decoder or the frame checks; the reads are
    sent again, on a new connection where the stream itself was hit."""
    flips = FlipRandom(rate=rate, limit=limit * restores, seed=seed)
    reader = loop.start(flips, "wait")
    results = []
    for k in range(restores):
        export = ("img", "img.lps")[k % 2]
        rc, res, err = _result(loop.target(export, ("seq", "random")[k // 2 % 2], seed=k), timeout=180)
        results.append({"export": export, "rc": rc, "wrong_pages": res.get("wrong_pages"),
                        "poisoned_pages": res.get("poisoned_pages"), "stderr": err[-1000:] if rc else ""})
    log = reader.log_lines()
    summary = {
        "restores": restores,
        "passed": sum(1 for r in results if r["rc"] == 0 and r["wrong_pages"] == 0),
        "wrong_pages": sum(int(r["wrong_pages"] or 0) for r in results),
        "flips": len(flips.flips),
        "data_frames": flips.data_frames,
        "flipped_fields": dict(Counter(field_of(f) + ("(zero frame)" if f.flags & 1 else "") for f in flips.flips)),
        "corrupt_retried": len([e for e in log if e.get("event") == "peer_data_corrupt_retrying"]),
        "protocol_errors": len([e for e in log if e.get("event") == "peer_protocol_error"]),
        "links_dropped": len([e for e in log if e.get("event") == "peer_link_down"]),
        "source_failed": len([e for e in log if e.get("event") == "source_failed"]),
    }
    print(json.dumps(summary))
    for r in results:
        assert r["rc"] == 0, r
        assert r["wrong_pages"] == 0, r
        assert r["poisoned_pages"] == 0, r
    assert flips.flips, "nothing was flipped"
    # The reader noticed: a read sent again, or a connection dropped and made anew.
    assert summary["corrupt_retried"] + summary["links_dropped"] >= 1, summary
    return summary


def test_random_bit_flips_in_data_frames(loop: Loop) -> None:
    run_random_flips(loop, restores=2, rate=0.01, limit=10)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_random_bit_flips_in_data_frames_20_restores(loop: Loop) -> None:
    """``FLIP_SEED=N`` picks another sequence of flips (11 by default)."""
    run_random_flips(loop, restores=20, rate=0.01, limit=10, seed=int(os.environ.get("FLIP_SEED", "11")))


# -- an exporter lost for good, and a link down at handoff time -------------------------------

LOSS_TARGET = HERE / "peer_loss_target.py"


@dataclass
class Hosts2:
    """Two namespaces with an exporter in A; the reader is started by each test."""

    hosts: netns.Hosts
    tmp: Path
    image: Path
    pki: Any
    exporter: netns.NsDaemon
    reader: netns.NsDaemon | None = None

    def start_reader(self, deadline: float, policy: str = "sigbus") -> netns.NsDaemon:
        (self.tmp / "b-snaps").mkdir(exist_ok=True)
        self.reader = start_reader(self.hosts, self.tmp, self.tmp / "b-snaps", self.pki, stall=1.0,
                                   deadline=deadline, session=f'failure_policy = "{policy}"')
        return self.reader


@pytest.fixture
def hosts2(tmp_path: Path) -> Iterator[Hosts2]:
    if netns.available():
        pytest.skip(netns.available())
    hosts = netns.Hosts()
    setup: Hosts2 | None = None
    try:
        hosts.create()
        snaps = tmp_path / "a-snaps"
        snaps.mkdir()
        make_image(snaps / "img", 32 * MiB)
        pki = make_pki(tmp_path / "pki")
        exporter = start_exporter(hosts, tmp_path, snaps, ["img"], pki)
        setup = Hosts2(hosts, tmp_path, snaps / "img", pki, exporter)
        yield setup
        bugs = [e for d in (setup.exporter, setup.reader) if d is not None for e in d.events()
                if e.get("event") in ("session_bug", "export_bug")]
        assert not bugs, bugs
    finally:
        if setup is not None:
            for d in (setup.reader, setup.exporter):
                if d is not None:
                    d.stop()
        hosts.destroy()


def _json_line(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    """The target's next JSON line (blocking: the target prints it when ``what`` happened)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("{"), f"no {what} line; got {line!r}, stderr: {proc.stderr.read() if proc.stderr else ''}"
    out: dict[str, Any] = json.loads(line)
    return out


#: How late a poisoned touch may end after the deadline (or after it began,
#: if it began later): the link noticed, the reads failed, the pages
#: poisoned, on a loaded 2-vCPU machine.
LATE_BOUND = 2.0


def _lose_the_exporter(
    hosts2: Hosts2, lose: Callable[[], None], after: Callable[[], None] | None = None, deadline: float = 2.0
) -> None:
    """One restore under ``sigbus`` with a 2 s deadline; ``lose`` takes the
    exporter away for good once the target has read its first MiB (the
    deadline is counted from then), ``after`` waits for whatever should
    happen before the target touches the rest. Then every touch of a page
    that was not installed must end (EFAULT, a user touch's SIGBUS) within
    LATE_BOUND of the deadline, or of its own start if it began later; every
    installed page is right, the session ends with its final frame, and a
    real touch of a poisoned page raises SIGBUS."""
    reader = hosts2.start_reader(deadline)
    hosts2.hosts.shape("40mbit")  # 32 MiB take ~7 s: the loss is early in the restore
    args = [sys.executable, str(LOSS_TARGET), "--socket", str(reader.socket), "--image", str(hosts2.image),
            "--name", peer_url("img"), "--size", str(32 * MiB), "--first", str(MiB), "--deadline", str(deadline)]
    t = hosts2.hosts.popen("b", args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert _json_line(t, "accepted").get("accepted")
        ready = _json_line(t, "ready")
        assert ready.get("ready"), ready
        assert ready["early_poisoned"] == 0, ready
        lost_at = time.monotonic()
        lose()
        if after is not None:
            after()
        assert t.stdin is not None
        t.stdin.write(f"{lost_at}\n")
        t.stdin.flush()
        rc, lines, err = finish(t, 120)
    finally:
        kill(t)
    summary: dict[str, Any] = next((ln for ln in lines if "worst_late_s" in ln), {})
    final: dict[str, Any] = next((ln for ln in lines if "final" in ln), {})
    print(json.dumps({"deadline_s": deadline, **summary, "final": final.get("final"), "rc": rc}))
    assert summary, (lines, err[-2000:])
    assert summary["wrong_pages"] == 0, summary
    assert summary["installed_pages"] >= MiB // PAGE, summary
    assert summary["poisoned_pages"] > 0, summary
    assert summary["worst_late_s"] <= LATE_BOUND, summary
    assert final.get("final") == "complete", (final, err[-2000:])
    assert any("touching" in ln for ln in lines), lines
    assert rc == -7, (rc, lines, err[-2000:])  # SIGBUS
    ended = _named(reader.events(), "session_ended")
    assert ended, "no session_ended logged"
    assert ended[-1]["outcome"] == "complete", ended


def test_exporter_lost_for_good_sigbus_holds_the_deadline(hosts2: Hosts2) -> None:
    """The exporter is SIGKILLed mid-restore and never comes back (both
    connections see it go at once)."""
    _lose_the_exporter(hosts2, hosts2.exporter.kill)


def test_link_cut_for_good_finds_the_idle_link_dead_too(hosts2: Hosts2) -> None:
    """B's end of the link goes down mid-restore and stays down: nothing
    tells either connection. The fill's connection notices the silence
    (``stall_timeout``); the fault connection, idle, is checked at once and
    found dead too, and given up a deadline after the cut. The target touches
    nothing until both are given up, so each of its touches must fail at once.

    Without the check, the fault connection was only found dead by the
    first read sent on it (here the failure policy's re-reads, once the
    fill's reads failed): a stall timeout later, and given up a whole
    deadline after that, at about cut + 3 + 1 + 3 s."""
    deadline = 3.0
    cut_wall = 0.0

    def cut() -> None:
        nonlocal cut_wall
        cut_wall = time.time()
        hosts2.hosts.link(up=False)

    def both_unreachable() -> None:
        assert hosts2.reader is not None
        reader = hosts2.reader
        _wait_for(lambda: {e.get("role") for e in _named(reader.events(), "peer_unreachable")} >= {"urgent", "bulk"},
                  30, "both links to be given up")

    try:
        _lose_the_exporter(hosts2, cut, both_unreachable, deadline=deadline)
    finally:
        hosts2.hosts.link(up=True)
    assert hosts2.reader is not None
    given_up = [e for e in _named(hosts2.reader.events(), "peer_unreachable") if e.get("role") == "urgent"]
    at = datetime.fromisoformat(str(given_up[0]["timestamp"])).timestamp() - cut_wall
    # stall 1 s, ticks of stall/4, a loaded machine: 1.5 s of slack.
    assert at <= deadline + 1.5, f"the idle link was given up {at:.2f} s after the cut"
