"""Handoffs to a daemon that may not read its targets' address space.

The shipped unit keeps CAP_KILL and CAP_LEASE only: no CAP_SYS_PTRACE,
so /proc/PID/maps and smaps of a target of another uid, or of a root
target holding capabilities the daemon lacks, cannot be opened. The checks
that read them must then fall back to what the uffd itself proves, never
to believing the client. The daemon here runs the way the unit runs it:
root, with the unit's own ``CapabilityBoundingSet=`` as its bounding set,
so its capabilities after exec are that set alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazypaged.demo import make_image

from .conftest import HERE, MiB, _needs_root, wait_for_ready

CLIENT = HERE / "noptrace_client.py"
NOBODY = 65534
SIZE = 2 * MiB
CAP_KILL = 5
CAP_SYS_PTRACE = 19
CAP_LEASE = 28
UNIT = HERE.parent / "systemd" / "lazypaged.service"


def unit_caps() -> list[str]:
    """The shipped unit's CapabilityBoundingSet=, as capability names."""
    (line,) = [x for x in UNIT.read_text().splitlines() if x.startswith("CapabilityBoundingSet=")]
    return line.partition("=")[2].split()


def cap_mask(names: list[str]) -> int:
    bits = {"CAP_KILL": CAP_KILL, "CAP_LEASE": CAP_LEASE, "CAP_SYS_PTRACE": CAP_SYS_PTRACE}
    return sum(1 << bits[n] for n in names)


class Daemon:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "handoff.sock"
        self.log = base / "daemon.log"
        snaps = base / "snapshots"
        snaps.mkdir()
        self.image = snaps / "img"
        make_image(self.image, SIZE)
        bounding = ["+" + n.removeprefix("CAP_").lower() for n in unit_caps()]
        cfg = base / "lazypaged.toml"
        cfg.write_text(
            f'[daemon]\nhandoff_socket = "{self.socket}"\nsnapshot_dirs = ["{snaps}"]\n'
            'log_format = "json"\nlog_level = "debug"\nshutdown_grace = 5.0\nsocket_mode = "0666"\n'
            "[working_set]\nenabled = false\n"
        )
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"lazypaged-test-{os.getpid()}-{time.monotonic_ns()}"
        ready.bind("\0" + name)
        env = {**os.environ, "NOTIFY_SOCKET": "@" + name}
        try:
            with open(self.log, "wb") as lf:
                self.proc = subprocess.Popen(
                    ["setpriv", "--bounding-set", ",".join(["-all", *bounding]), "--inh-caps", "-all", "--",
                     sys.executable, "-m", "lazypaged", "serve", "--config", str(cfg)],
                    stdout=lf, stderr=lf, env=env,
                )
            wait_for_ready(ready, self.proc, timeout=30)
        finally:
            ready.close()

    def lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"unparsed": line})
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    _needs_root()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) is needed to drop the daemon's capabilities")
    base = Path(tempfile.mkdtemp(prefix="lazypaged-noptrace-"))
    base.chmod(0o755)  # the unprivileged client must reach the socket
    d = Daemon(base)
    try:
        yield d
    finally:
        rc = d.stop()
        text = d.log.read_text()
        shutil.rmtree(base, ignore_errors=True)
        assert rc == 0, f"daemon exited with {rc}; log:\n{text[-4000:]}"


def _caps(pid: int, which: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(which + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {which} for {pid}")


def run(d: Daemon, case: str, uid: int | None) -> dict[str, object]:
    if uid is None and not _caps(os.getpid(), "CapEff") & ~cap_mask(unit_caps()):
        pytest.skip("this root process holds no capability the daemon lacks: its maps would be readable")
    cmd = [sys.executable, str(CLIENT), "--socket", str(d.socket), "--name", "img", "--size", str(SIZE),
           "--case", case]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd="/")
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    assert lines, out.stderr[-2000:]
    res: dict[str, object] = json.loads(lines[-1])
    return res


def served_right(d: Daemon, res: dict[str, object]) -> None:
    assert res["ok"], res
    image = d.image.read_bytes()
    parts = res["parts"]
    assert isinstance(parts, list), res
    assert parts, res
    for p in parts:
        want = hashlib.sha256(image[p["offset"] : p["offset"] + p["length"]]).hexdigest()
        assert p["sha256"] == want, f"wrong bytes at offset {p['offset']:#x}+{p['length']:#x}"


USERS = pytest.mark.parametrize("uid", [NOBODY, None], ids=["target-of-another-uid", "root-target-with-all-caps"])


def test_daemon_runs_without_ptrace(daemon: Daemon) -> None:
    """The premise: the daemon holds the unit's capabilities alone, and no ptrace access."""
    assert unit_caps() == ["CAP_KILL", "CAP_LEASE"]
    assert _caps(daemon.proc.pid, "CapEff") == cap_mask(unit_caps())
    assert _caps(daemon.proc.pid, "CapBnd") == cap_mask(unit_caps())
    assert not _caps(daemon.proc.pid, "CapEff") & 1 << CAP_SYS_PTRACE


def test_image_of_another_owner_is_read_under_a_lease(daemon: Daemon) -> None:
    """A lease needs the file's owner or CAP_LEASE: with CAP_KILL alone an
    image written by another user was never leased, so its reads went
    without the guard against a file cut short (docs in sources/lease.py)."""
    other = daemon.image.parent / "theirs"
    other.write_bytes(daemon.image.read_bytes())
    os.chown(other, NOBODY, NOBODY)
    cmd = [sys.executable, str(CLIENT), "--socket", str(daemon.socket), "--name", "theirs", "--size", str(SIZE),
           "--case", "plain", "--hold"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd="/")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("{"), proc.stderr.read() if proc.stderr else ""
        held = json.loads(line)
        assert held.get("held"), held
        served_right(daemon, {"ok": True, "parts": held["parts"]})
        ino = other.stat().st_ino
        leases = [x for x in Path("/proc/locks").read_text().splitlines() if "LEASE" in x and f":{ino} " in x]
        assert leases, "no read lease on an image owned by another user"
        assert "READ" in leases[0], leases
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == 0


@USERS
def test_plain_handoff_is_served(daemon: Daemon, uid: int | None) -> None:
    """Refused ``bad_pid`` before: the hole check could not read the maps."""
    served_right(daemon, run(daemon, "plain", uid))
    assert any(x.get("event") == "address_space_unreadable" for x in daemon.lines())


@USERS
def test_truthful_registered_claim_is_served(daemon: Daemon, uid: int | None) -> None:
    served_right(daemon, run(daemon, "registered", uid))


@USERS
def test_registered_claim_over_another_uffd_is_refused(daemon: Daemon, uid: int | None) -> None:
    res = run(daemon, "other_uffd", uid)
    assert res["code"] == "not_registered", res


@USERS
def test_registered_claim_over_unregistered_memory_gets_every_byte(daemon: Daemon, uid: int | None) -> None:
    """Registering it again with the attached uffd makes the claim true:
    every page not yet present faults to the daemon, none reads zeros."""
    served_right(daemon, run(daemon, "unregistered", uid))


#: Without the maps a session's mappings are not cut at the target's VMAs:
#: a fill copy across a boundary fails ENOENT, and the session must then
#: retry page by page instead of taking the run for gone.
@USERS
def test_registered_range_with_a_hole_is_served(daemon: Daemon, uid: int | None) -> None:
    served_right(daemon, run(daemon, "hole", uid))


@USERS
def test_range_over_two_mappings_is_served(daemon: Daemon, uid: int | None) -> None:
    served_right(daemon, run(daemon, "split", uid))


@USERS
def test_registered_range_wholly_unmapped_is_refused(daemon: Daemon, uid: int | None) -> None:
    """Unmapped as a whole, or memory no uffd can serve: without the maps
    the kernel's EINVAL does not say which, so the claim cannot be proved."""
    res = run(daemon, "unmapped_range", uid)
    assert res["code"] == "not_registered", res
    assert "CAP_SYS_PTRACE" in str(res["message"]), res


@USERS
def test_registered_claim_on_a_uffd_without_api_is_refused(daemon: Daemon, uid: int | None) -> None:
    """Nothing registers on a uffd before UFFDIO_API: said so, not blamed on missing maps."""
    res = run(daemon, "no_api", uid)
    assert res["code"] == "not_registered", res
    assert "UFFDIO_API" in str(res["message"]), res


@USERS
def test_huge_page_size_over_ordinary_memory_is_refused(daemon: Daemon, uid: int | None) -> None:
    """Found by the registration itself: ordinary memory grants UFFDIO_ZEROPAGE, hugetlb does not."""
    res = run(daemon, "huge_declared", uid)
    assert res["code"] == "bad_range", res


def test_daemon_kept_serving(daemon: Daemon) -> None:
    assert daemon.proc.poll() is None
    bugs = [x for x in daemon.lines() if x.get("event") in ("handoff_bug", "session_bug")]
    assert not bugs, bugs
    served_right(daemon, run(daemon, "plain", NOBODY))
