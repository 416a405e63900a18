"""The Firecracker-compatible listener, driven by an independent client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazypaged.demo import make_image
from lazypaged.firecracker_protocol import FirecrackerProtocolError, HandshakeDecoder

from .conftest import HERE, DaemonHandle, MiB, start_daemon, stop_daemon


@pytest.fixture
def fc_daemon(tmp_path: Path) -> Iterator[tuple[DaemonHandle, Path, Path]]:
    mem = tmp_path / "guest.mem"
    make_image(mem, 12 * MiB)
    sock = tmp_path / "fc.sock"
    d = start_daemon(
        tmp_path, extra_config=f'request_timeout = 1.0\n[firecracker]\nsocket = "{sock}"\nmem_file = "{mem}"\n'
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield d, sock, mem
    finally:
        assert stop_daemon(d) == 0, d.log.read_text()[-3000:]


def _client(sock: Path, mem: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HERE / "fc_client.py"), str(sock), str(mem)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def _wait_log(d: DaemonHandle, event: str, n: int = 1) -> list[dict[str, object]]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = [x for x in d.log_lines() if x.get("event") == event]
        if len(got) >= n:
            return got
        time.sleep(0.05)
    raise AssertionError(f"no {event} in log:\n{d.log.read_text()[-3000:]}")


def test_firecracker_style_restore(fc_daemon: tuple[DaemonHandle, Path, Path]) -> None:
    d, sock, mem = fc_daemon
    res = _client(sock, mem)
    assert res.returncode == 0, (res.stdout, res.stderr)
    ended = _wait_log(d, "session_ended")
    assert ended[0]["kind"] == "firecracker"
    assert ended[0]["outcome"] in ("complete", "target_exited"), ended


def test_two_vms_in_a_row(fc_daemon: tuple[DaemonHandle, Path, Path]) -> None:
    d, sock, mem = fc_daemon
    for _ in range(2):
        res = _client(sock, mem)
        assert res.returncode == 0, (res.stdout, res.stderr)
    _wait_log(d, "session_ended", 2)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 3000}]',
        b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096}',  # cut short
        json.dumps([{"base_host_virt_addr": 1 << 30, "size": 64 * MiB, "offset": 0, "page_size": 4096}]).encode(),
    ],
    ids=["garbage", "empty", "bad-page-size", "truncated", "past-end-of-file"],
)
def test_bad_handshakes_are_refused_and_serving_goes_on(
    fc_daemon: tuple[DaemonHandle, Path, Path], payload: bytes
) -> None:
    d, sock, mem = fc_daemon
    r, w = os.pipe()  # a descriptor to attach: not a uffd, but the handshake fails first
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            assert s.recv(1) == b""  # no reply, as Firecracker expects
    finally:
        os.close(r)
        os.close(w)
    refused = _wait_log(d, "handoff_refused")
    assert refused[-1]["listener"] == "firecracker"
    res = _client(sock, mem)
    assert res.returncode == 0, (res.stdout, res.stderr)


def test_decoder_waits_for_split_json() -> None:
    doc = json.dumps([{"base_host_virt_addr": 1 << 21, "size": 8192, "offset": 4096, "page_size_kib": 4096}])
    raw = doc.encode()
    for cut in range(1, len(raw)):
        dec = HandshakeDecoder()
        assert dec.feed(raw[:cut]) is None
        (region,) = dec.feed(raw[cut:]) or []
        assert (region.base, region.size, region.offset, region.page_size) == (1 << 21, 8192, 4096, 4096)
    with pytest.raises(FirecrackerProtocolError):
        HandshakeDecoder().feed(b'[{"base_host_virt_addr": 0, "size": 8192, "offset": 0, "page_size": 4096},'
                                b' {"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size": 4096}]')


HANDSHAKE = HERE / "fc_handshake.py"
NOBODY = 65534
GROUP_IN = 4243


def _handshake(sock: Path, mem: Path, *flags: str, user: list[str] | None = None) -> subprocess.Popen[str]:
    """A client that sent its handshake (uffd attached) and waits on stdin."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([*(user or []), sys.executable, str(HANDSHAKE), "--socket", str(sock),
                             "--mem-file", str(mem), *flags],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd="/")
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert json.loads(first or "{}").get("sent") is True, (first, proc.stderr.read() if proc.stderr else "")
    return proc


def _release(proc: subprocess.Popen[str]) -> tuple[int, list[dict[str, object]]]:
    out, _ = proc.communicate("go\n", timeout=60)
    return proc.returncode, [json.loads(x) for x in out.splitlines() if x.startswith("{")]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_refused_handshakes_hold_no_descriptors(fc_daemon: tuple[DaemonHandle, Path, Path]) -> None:
    """Each refusal closes what it received, while the clients still live
    (it used to keep the uffd and a pidfd until the client exited)."""
    d, sock, mem = fc_daemon
    before = _fds(d.proc.pid)
    clients = [_handshake(sock, mem, "--malformed") for _ in range(12)]
    try:
        _wait_log(d, "handoff_refused", len(clients))
        after = _fds(d.proc.pid)
        assert after <= before + 4, (before, after)  # slack for the daemon's own work (it held 2 per refusal)
        assert all(c.poll() is None for c in clients)  # they keep their uffd: nothing to kill
    finally:
        for c in clients:
            rc, _ = _release(c)
            assert rc == 0
    res = _client(sock, mem)
    assert res.returncode == 0, (res.stdout, res.stderr)


def test_a_refused_uffd_only_the_daemon_holds_is_not_left_to_zero_fill(
    fc_daemon: tuple[DaemonHandle, Path, Path],
) -> None:
    """The client dropped its own copy: closing ours would let its memory
    read zeros, so its process is killed first (a clear failure)."""
    d, sock, mem = fc_daemon
    proc = _handshake(sock, mem, "--malformed", "--drop", "--touch")
    try:
        assert proc.wait(timeout=60) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    killed = _wait_log(d, "killing_target")
    assert killed[-1]["pid"] == proc.pid


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory an unprivileged client can reach (pytest's tmp_path is 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) is needed to run a client as another user")
    d = Path(tempfile.mkdtemp(prefix="lazypaged-fc-access-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _fc_access_daemon(base: Path, access: str) -> tuple[DaemonHandle, Path, Path]:
    mem = base / "guest.mem"
    make_image(mem, 4 * MiB)
    sock = base / "fc.sock"
    d = start_daemon(base, extra_config=(
        f'request_timeout = 5.0\nsocket_mode = "0660"\n[firecracker]\nsocket = "{sock}"\nmem_file = "{mem}"\n'
        f'[access]\nsocket_group = "{NOBODY}"\n{access}\n'))
    return d, sock, mem


def _as(uid: int, *groups: int) -> list[str]:
    extra = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", *extra]


def test_firecracker_socket_takes_the_handoff_sockets_access_rules(open_dir: Path) -> None:
    """Mode, owning group and the SO_PEERCRED allow-list, as on the handoff socket
    (the Firecracker socket had none of the last two)."""
    d, sock, mem = _fc_access_daemon(open_dir, f"allow_gids = [{GROUP_IN}]")
    try:
        st = os.stat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, NOBODY)
        stranger = _handshake(sock, mem, "--touch", user=_as(NOBODY))
        try:
            refused = _wait_log(d, "handoff_refused")[-1]
        finally:
            stranger.kill()
            stranger.communicate()
        assert (refused["listener"], refused["code"], refused["peer_uid"]) == ("firecracker", "forbidden", NOBODY)
        assert "access.allow_uids / access.allow_gids" in str(refused["error"])
        assert not [x for x in d.log_lines() if x.get("event") == "session_started"]
        # Allowed through a supplementary group: served, every byte of the page right.
        member = _handshake(sock, mem, "--touch", user=_as(NOBODY, GROUP_IN))
        rc, lines = _release(member)
        assert rc == 0, lines
        assert lines[-1]["ok"] is True
        assert _wait_log(d, "session_started")[-1]["kind"] == "firecracker"
    finally:
        assert stop_daemon(d) == 0


def test_firecracker_memory_file_follows_tenant_rules(open_dir: Path) -> None:
    mem_glob = open_dir / "guest.*"
    d, sock, mem = _fc_access_daemon(open_dir, f'[[access.tenants]]\nsnapshots = ["{mem_glob}"]\nuids = [4242]\n')
    try:
        stranger = _handshake(sock, mem, user=_as(NOBODY))
        try:
            refused = _wait_log(d, "handoff_refused")[-1]
        finally:
            stranger.kill()
            stranger.communicate()
        assert refused["code"] == "forbidden"
        assert "no tenant rule admits it" in str(refused["error"])
    finally:
        assert stop_daemon(d) == 0


def test_reload_changes_who_the_firecracker_socket_admits(open_dir: Path) -> None:
    d, sock, mem = _fc_access_daemon(open_dir, "allow_uids = [4242]")
    try:
        d.config.write_text(d.config.read_text().replace("allow_uids = [4242]", f"allow_uids = [{NOBODY}]"))
        mark = len(d.log_lines())
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not [x for x in d.log_lines()[mark:] if x.get("event") == "reloaded"]:
            assert time.monotonic() < deadline, d.log.read_text()[-2000:]
            time.sleep(0.02)  # polling the log for the line
        client = _handshake(sock, mem, "--touch", user=_as(NOBODY))
        rc, lines = _release(client)
        assert rc == 0, lines
        assert lines[-1]["ok"] is True
    finally:
        assert stop_daemon(d) == 0
