"""Two hosts for real: a restore in namespace B served from an image exported
by a daemon in namespace A, across a veth pair, with mutual TLS.

Each test gets its own pair of namespaces (unique names) and daemons, all
removed in the fixture's ``finally`` whatever happens. The target process
runs in B and checks every byte of its memory against A's image.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from lazypaged.demo import make_image

from . import netns
from .conftest import finish, kill

HERE = Path(__file__).parent
TARGET = HERE / "target_prog.py"
MISBEHAVE = HERE / "peer_misbehave.py"
MiB = 1 << 20
PORT = 7070
URL = f"peer://{netns.ADDR_A}:{PORT}/img"

pytestmark = pytest.mark.skipif(bool(netns.available()), reason=netns.available() or "ok")


@dataclass
class Pki:
    dir: Path
    ca: Path

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"


def _pki(d: Path) -> Pki:
    d.mkdir()
    ca, rogue = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    for name, issuer, ident in (
        ("a", ca, netns.ADDR_A),
        ("b", ca, "node-b"),
        ("rogue", rogue, "node-b"),
    ):
        leaf = issuer.issue_cert(ident)
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
    return Pki(d, d / "ca.crt")


@dataclass
class TwoHosts:
    hosts: netns.Hosts
    work: Path
    pki: Pki
    image: Path
    a: netns.NsDaemon
    b: netns.NsDaemon

    def daemon_b(self, name: str, cert: str, stall: float = 1.0, deadline: float = 30.0) -> netns.NsDaemon:
        crt, key = self.pki.pair(cert)
        extra = (
            f'[remote]\ntls_cert = "{crt}"\ntls_key = "{key}"\ntls_ca = "{self.pki.ca}"\n'
            f"stall_timeout = {stall}\nreconnect_deadline = {deadline}\nbackoff_max = 0.25\nconnect_timeout = 2.0\n"
        )
        snaps = self.work / f"{name}-snaps"
        snaps.mkdir(exist_ok=True)
        cfg, sock, log = netns.daemon_config(self.work, name, snaps, extra)
        d = netns.NsDaemon(self.hosts, "b", cfg, sock, log)
        return d.start()

    def target(self, size: int, *extra: str, daemon: netns.NsDaemon | None = None) -> subprocess.Popen[str]:
        d = daemon or self.b
        args = [sys.executable, str(TARGET), "--socket", str(d.socket), "--image", str(self.image)]
        args += ["--name", URL, "--size", str(size), "--wait", *extra]
        return self.hosts.popen("b", args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_a(h: netns.Hosts, work: Path, pki: Pki) -> netns.NsDaemon:
    crt, key = pki.pair("a")
    extra = (
        f'[export]\nlisten = "{netns.ADDR_A}:{PORT}"\nsnapshots = ["img"]\n'
        f'tls_cert = "{crt}"\ntls_key = "{key}"\ntls_ca = "{pki.ca}"\n'
    )
    cfg, sock, log = netns.daemon_config(work, "a", work / "a-snaps", extra)
    return netns.NsDaemon(h, "a", cfg, sock, log, exports=True).start()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[TwoHosts]:
    h = netns.Hosts()
    daemons: list[netns.NsDaemon] = []
    try:
        h.create()
        pki = _pki(tmp_path / "pki")
        (tmp_path / "a-snaps").mkdir()
        image = tmp_path / "a-snaps" / "img"
        make_image(image, 64 * MiB)
        a = _start_a(h, tmp_path, pki)
        daemons.append(a)
        setup = TwoHosts(h, tmp_path, pki, image, a, a)
        setup.b = setup.daemon_b("b", "b")
        daemons.append(setup.b)
        yield setup
        bugs = [e for d in daemons for e in d.events() if e.get("event") in ("session_bug", "export_bug")]
        assert not bugs, bugs
    finally:
        for d in daemons:
            d.stop()
        h.destroy()


def _ok(proc: subprocess.Popen[str], timeout: float = 90) -> dict[str, object]:
    rc, lines, err = finish(proc, timeout)
    assert rc == 0, f"target failed ({rc}): {lines} {err[-2000:]}"
    assert lines[0].get("accepted"), lines
    result = lines[-1]
    assert result["ok"] is True, result
    assert result.get("complete"), result
    return result


def _wait_for(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _accepted(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert json.loads(line).get("accepted"), line


def test_restore_across_hosts_every_byte(two: TwoHosts) -> None:
    result = _ok(two.target(64 * MiB, "--touch", "random"))
    assert result["complete"]
    # B talked to A over one urgent and one bulk connection, both verified by TLS.
    conns = [e for e in two.a.events() if e.get("event") == "peer_connected"]
    roles = sorted(str(e["role"]) for e in conns if e.get("client") == "DNS:node-b")
    assert roles.count("urgent") >= 1
    assert roles.count("bulk") >= 1


def test_two_restores_from_one_export_at_once(two: TwoHosts) -> None:
    t1 = two.target(64 * MiB, "--touch", "seq")
    t2 = two.target(64 * MiB, "--touch", "threads")
    _ok(t1)
    _ok(t2)
    # Both sessions shared the peer's links: one urgent + one bulk connection
    # (plus the short first-contact exchange).
    roles = [e["role"] for e in two.a.events() if e.get("event") == "peer_connected"]
    assert roles.count("urgent") == 1, roles
    assert roles.count("bulk") <= 3, roles


def test_link_down_mid_restore_completes(two: TwoHosts) -> None:
    two.hosts.shape("120mbit")  # 64 MiB take ~4.5 s: the outage falls mid-restore
    t = two.target(64 * MiB, "--touch", "seq")
    try:
        _accepted(t)
        time.sleep(0.8)
        two.hosts.link(up=False)
        time.sleep(3.0)
        assert t.poll() is None, "the restore ended while the link was down"
        two.hosts.link(up=True)
        rc, lines, err = finish(t, 90)
    finally:
        two.hosts.link(up=True)
        kill(t)
    assert rc == 0, (lines, err[-2000:])
    assert lines[-1]["ok"] is True
    assert lines[-1].get("complete")
    ups = [e for e in two.b.events() if e.get("event") == "peer_link_up"]
    assert max(int(e["connects"]) for e in ups) >= 2, "expected the links to be re-established"


def test_exporter_killed_and_restarted_mid_restore(two: TwoHosts) -> None:
    two.hosts.shape("150mbit")
    t = two.target(64 * MiB, "--touch", "seq")
    try:
        _accepted(t)
        time.sleep(0.8)
        two.a.kill()
        time.sleep(1.5)
        assert t.poll() is None
        two.a.start()
        rc, lines, err = finish(t, 90)
    finally:
        kill(t)
    assert rc == 0, (lines, err[-2000:])
    assert lines[-1]["ok"] is True
    assert lines[-1].get("complete")
    downs = [e for e in two.b.events() if e.get("event") == "peer_link_down"]
    assert downs, "B should have seen the exporter go away"


def test_client_without_valid_certificate_is_refused(two: TwoHosts) -> None:
    rogue = two.daemon_b("rogue", "rogue")
    try:
        t = two.target(4 * MiB, "--touch", "seq", daemon=rogue)
        rc, lines, _ = finish(t, 60)
        assert rc == 2, lines
        assert lines[0]["handoff_error"] == "source_error"
        assert "TLS" in str(lines[0]["message"]), lines
        refused = [e for e in two.a.events() if e.get("event") == "peer_refused"]
        assert any(e.get("code") == "auth" for e in refused), refused
        # The exporter keeps serving the legitimate reader.
        _ok(two.target(16 * MiB, "--touch", "seq"))
    finally:
        rogue.stop()


def test_malformed_and_out_of_bounds_frames(two: TwoHosts) -> None:
    t = two.target(64 * MiB, "--touch", "seq")  # a legitimate restore meanwhile
    crt, key = two.pki.pair("b")
    args = [sys.executable, str(MISBEHAVE), "--host", netns.ADDR_A, "--port", str(PORT), "--export", "img"]
    args += ["--size", str(64 * MiB), "--ca", str(two.pki.ca), "--cert", str(crt), "--key", str(key)]
    r = two.hosts.run("b", args)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "not a lazypaged peer" in res["garbage"]
    assert res["bad-frame"][0] == "Welcome"
    assert res["bad-frame"][1]["reason"] == "protocol"
    assert "unknown frame type 99" in res["bad-frame"][1]["message"]
    assert res["oversize"][1]["reason"] == "protocol"
    assert "limit" in res["oversize"][1]["message"]
    b = res["bounds"]
    assert b[0] == "Welcome"
    assert b[1] == "Opened"
    # Refusals are answered at once, so they may overtake the valid read.
    replies = sorted(b[2:], key=str)
    assert replies[0] == {"type": "ReadDone", "length": 4096}, b
    assert [r["reason"] for r in replies[1:]] == ["out_of_bounds", "out_of_bounds"], b
    assert res["no-export"][1]["reason"] == "unknown_export"
    _ok(t)
    errs = [e for e in two.a.events() if e.get("event") == "peer_protocol_error"]
    assert len(errs) >= 3


def _retrying(d: netns.NsDaemon) -> bool:
    return any(e.get("event") == "peer_first_contact_retrying" for e in d.events())


def test_link_down_at_handoff_time_is_ridden_out(two: TwoHosts) -> None:
    """B's end of the link is down when the handoff arrives ("Network is
    unreachable"). The first contact is retried like a reconnect: once the
    link is up again, within the deadline, the restore runs and every byte
    is right."""
    b = two.daemon_b("late", "b", deadline=20.0)
    two.hosts.link(up=False)
    try:
        t = two.target(16 * MiB, "--touch", "seq", daemon=b)
        try:
            _wait_for(lambda: _retrying(b), 20, "the first contact to be retried")
            assert t.poll() is None, "the handoff was refused while the link was down"
        finally:
            two.hosts.link(up=True)
        result = _ok(t)
    finally:
        two.hosts.link(up=True)
        b.stop()
    assert result["complete"]
    retried = [e for e in b.events() if e.get("event") == "peer_first_contact_retrying"]
    assert "unreachable" in str(retried[0]["error"]).lower(), retried


def test_link_down_at_handoff_time_for_good_fails_after_the_deadline(two: TwoHosts) -> None:
    """The link never comes up: the handoff is refused with a clear
    ``source_error`` once the deadline has passed, not before, and the daemon
    goes on serving."""
    deadline = 3.0
    b = two.daemon_b("never", "b", deadline=deadline)
    two.hosts.link(up=False)
    try:
        t0 = time.monotonic()
        t = two.target(4 * MiB, "--touch", "seq", daemon=b)
        rc, lines, err = finish(t, 60)
        took = time.monotonic() - t0
    finally:
        two.hosts.link(up=True)
    try:
        assert rc == 2, (lines, err[-2000:])
        assert lines[0]["handoff_error"] == "source_error", lines
        message = str(lines[0]["message"])
        assert "no connection for" in message, message
        assert f"deadline {deadline} s" in message, message
        assert "unreachable" in message.lower(), message
        assert took >= deadline, took
        # Refused once: the daemon still serves a restore now that the link is up.
        _ok(two.target(4 * MiB, "--touch", "seq", daemon=b))
    finally:
        b.stop()


def test_wait_policy_resumes_when_the_exporter_is_back_after_the_deadline(two: TwoHosts) -> None:
    """``wait`` (the default): the exporter is gone past the deadline, the
    reads fail and keep failing at once while it is away, the target waits;
    once the exporter is back the link finds it and the restore completes
    with every byte right."""
    b = two.daemon_b("patient", "b", deadline=2.0)
    two.hosts.shape("120mbit")
    t = two.target(64 * MiB, "--touch", "seq", daemon=b)
    try:
        _accepted(t)
        two.a.kill()
        _wait_for(lambda: any(e.get("event") == "source_failed" for e in b.events()), 30, "the reads to fail")
        assert any(e.get("event") == "peer_unreachable" for e in b.events())
        assert t.poll() is None, "the target must wait for its pages"
        two.a.start()
        rc, lines, err = finish(t, 90)
    finally:
        kill(t)
        b.stop()
    assert rc == 0, (lines, err[-2000:])
    assert lines[-1]["ok"] is True, lines
    assert lines[-1].get("complete"), lines
    failed = [e for e in b.events() if e.get("event") == "source_failed"]
    assert {e["policy"] for e in failed} == {"wait"}, failed
