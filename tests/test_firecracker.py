"""The Firecracker-compatible listener, driven by an independent client."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
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
