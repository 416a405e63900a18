"""A source that fails mid-restore: wait, SIGBUS or kill — never zeros."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import HERE, TARGET, DaemonHandle, MiB, start_daemon, stop_daemon

CHECK_TARGET = HERE / "poison_check_target.py"

SIZE = 8 * MiB


def _start(tmp: Path, policy: str) -> tuple[DaemonHandle, subprocess.Popen[str], Path]:
    d = start_daemon(tmp)
    image = d.image("img", SIZE)
    proc = subprocess.Popen(
        [sys.executable, str(TARGET), "--socket", str(d.socket), "--image", str(image), "--name", "img",
         "--size", str(SIZE), "--touch", "halves", "--no-fill", "--no-fault-around", "--policy", policy],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    for _ in range(2):  # "accepted", then "half"
        line = proc.stdout.readline()
        assert line.startswith("{"), line
    return d, proc, image


def _truncate(image: Path) -> bytes:
    """Cut the image to half its size; return what was cut off."""
    with open(image, "r+b") as f:
        f.seek(SIZE // 2)
        tail = f.read()
        f.truncate(SIZE // 2)
    return tail


@pytest.mark.parametrize(("policy", "sig"), [("sigbus", signal.SIGBUS), ("kill", signal.SIGKILL)])
def test_lost_source_ends_in_a_signal_not_zeros(tmp_path: Path, policy: str, sig: int) -> None:
    d, proc, image = _start(tmp_path, policy)
    try:
        _truncate(image)
        out, err = proc.communicate("go\n", timeout=30)
        assert proc.returncode == -sig, (proc.returncode, out, err)
        lines = d.log_lines()
        failed = [x for x in lines if x.get("event") == "source_failed"]
        assert failed, "no source_failed logged"
        assert failed[0]["policy"] == policy
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert stop_daemon(d) == 0


def test_wait_policy_blocks_then_recovers(tmp_path: Path) -> None:
    d, proc, image = _start(tmp_path, "wait")
    try:
        tail = _truncate(image)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not any(x.get("event") == "source_failed" for x in d.log_lines()):
            assert time.monotonic() < deadline, "no source_failed logged"
            time.sleep(0.02)  # polling the log for the event
        assert proc.poll() is None, "the target should wait for its missing pages"
        # The file comes back (same bytes): the retry installs them.
        with open(image, "ab") as f:
            f.write(tail)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, err)
        result = json.loads(out.splitlines()[-1])
        assert result["ok"] is True
        events = [x.get("event") for x in d.log_lines()]
        assert "source_failed" in events
        assert "source_recovered" in events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert stop_daemon(d) == 0


def test_sigbus_with_fill_off_completes_once_every_page_is_settled(tmp_path: Path) -> None:
    """Poisoned pages count as settled: the restorer is told ``complete``
    once every page is installed or poisoned, not only when it exits."""
    d = start_daemon(tmp_path)
    image = d.image("img", SIZE)
    ref = tmp_path / "img.ref"
    ref.write_bytes(image.read_bytes())
    proc = subprocess.Popen(
        [sys.executable, str(CHECK_TARGET), "--socket", str(d.socket), "--image", str(ref), "--name", "img",
         "--size", str(SIZE), "--policy", "sigbus", "--no-fill", "--go", "--timeout", "30"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().startswith("{")
        _truncate(image)
        out, err = proc.communicate("go\n", timeout=60)
        result = json.loads(out.splitlines()[-1])
        assert result["wrong_pages"] == 0, result
        assert result["poisoned_pages"] == SIZE // 2 // 4096, result
        assert result["complete"], (result, err)
        assert result["complete"]["pages"] == SIZE // 4096, result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert stop_daemon(d) == 0
