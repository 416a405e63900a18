"""``lazypaged criu-lazy-pages`` against a stand-in restorer (no CRIU needed):
correct bytes and zero pages, bad records, missing images, and the keeper
killing the target when the daemon dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazypaged.criu import images as img
from tests.criu import harness as h
from tests.criu.synth import make_images

PAGE = 4096
ADDR = 0x600000000000
NPAGES = 64
LAZY_PRESENT = img.PE_LAZY | img.PE_PRESENT


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("serving another process's uffd faults taken in the kernel needs root")


class Fake:
    def __init__(self, images: Path, mode: str, lazy: list[tuple[int, int]]) -> None:
        spec = ",".join(f"{a:#x}:{b:#x}" for a, b in lazy)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.criu.fake_restore", str(images / "lazy-pages.socket"), hex(ADDR),
             str(NPAGES), mode, spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=Path(__file__).parent.parent,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if not first:
            self.kill()
            raise RuntimeError("the stand-in restorer did not start")
        self.pid = json.loads(first)["pid"]

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def line(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        raw = self.proc.stdout.readline()
        assert raw, f"the stand-in restorer said nothing; status {self.proc.poll()}"
        out: dict[str, object] = json.loads(raw)
        return out

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def _images(d: Path, pid: int) -> list[tuple[int, int]]:
    """Two VMAs; lazy pages 4-24 and 30-40 (split at the VMA boundary at 32);
    page 2 present but not lazy (criu restores those itself)."""
    vmas = [(ADDR, ADDR + 32 * PAGE), (ADDR + 32 * PAGE, ADDR + NPAGES * PAGE)]
    entries = [(ADDR + 2 * PAGE, 1, img.PE_PRESENT), (ADDR + 4 * PAGE, 20, LAZY_PRESENT),
               (ADDR + 30 * PAGE, 10, LAZY_PRESENT)]
    make_images(d, pid, vmas, entries)
    return [(ADDR + 4 * PAGE, ADDR + 24 * PAGE), (ADDR + 30 * PAGE, ADDR + 40 * PAGE)]


def _start(tmp: Path, mode: str, *, extra: list[str] | None = None, pid_offset: int = 0) -> tuple[Fake, h.LazyDaemon]:
    images = tmp / "images"
    images.mkdir()
    # The lazy ranges do not depend on the pid: build them once to hand to the fake.
    lazy = _images(tmp / "probe", 1)
    fake = Fake(images, mode, lazy)
    _images(images, fake.pid + pid_offset)
    daemon = h.start_lazy_daemon("lazypaged", Path("criu"), images, extra=extra)
    return fake, daemon


def test_serves_lazy_ranges_and_zero_pages_then_exits_zero(tmp_path: Path) -> None:
    fake, daemon = _start(tmp_path, "normal")
    try:
        fake.go()
        assert fake.line() == {"ready": True}
        result = fake.line()
        assert result["ok"], result
        assert daemon.wait(30) == 0, h.log_tail(daemon.log)
    finally:
        fake.kill()
        daemon.stop()
    log = [json.loads(x) for x in daemon.log.read_text().splitlines()]
    started = next(x for x in log if x["event"] == "session_started")
    assert started["ranges"] == 3
    assert started["bytes"] == 30 * PAGE
    ended = next(x for x in log if x["event"] == "session_ended")
    assert ended["outcome"] == "complete"
    assert ended["pages_installed"] == 30


@pytest.mark.parametrize(("mode", "words"), [("badpid", "pid 0"), ("twofds", "2 descriptors")])
def test_malformed_records_fail_the_restore_clearly(tmp_path: Path, mode: str, words: str) -> None:
    fake, daemon = _start(tmp_path, mode)
    try:
        fake.go()
        assert daemon.wait(30) == 1
    finally:
        fake.kill()
        daemon.stop()
    broken = [json.loads(x) for x in daemon.log.read_text().splitlines() if "criu_restore_broken" in x]
    assert broken
    assert words in str(broken[0]["error"])


def test_missing_task_images_fail_the_restore(tmp_path: Path) -> None:
    fake, daemon = _start(tmp_path, "normal", pid_offset=1)
    try:
        fake.go()
        assert daemon.wait(30) == 1
    finally:
        fake.kill()
        daemon.stop()
    assert f"pagemap-{fake.pid}.img: no such image" in daemon.log.read_text()


def test_killed_daemon_kills_its_half_restored_target(tmp_path: Path) -> None:
    cfg = tmp_path / "slow.toml"
    cfg.write_text("[session]\nfault_around = false\nfill = false\n")
    fake, daemon = _start(tmp_path, "slow", extra=["--config", str(cfg)])
    try:
        fake.go()
        assert fake.line() == {"ready": True}
        time.sleep(0.05)  # some pages in, most not
        daemon.proc.kill()
        daemon.proc.wait()
        rc, out, _err = fake.finish()
    finally:
        fake.kill()
        daemon.stop()
    assert rc == -signal.SIGKILL, f"the target was not killed (status {rc}, output {out!r})"
    assert '"ok"' not in out


def test_records_queued_for_a_frozen_daemon_are_guarded(tmp_path: Path) -> None:
    """The daemon never accepted the connection: the keeper accepts it, takes
    the queued uffd and kills its task before the uffd can be dropped."""
    fake, daemon = _start(tmp_path, "normal")
    try:
        daemon.proc.send_signal(signal.SIGSTOP)
        fake.go()
        assert fake.line() == {"ready": True}  # record and end marker queued, memory registered
        time.sleep(0.2)  # now blocked on its first page
        assert fake.proc.poll() is None
        daemon.proc.kill()
        daemon.proc.wait()
        rc, out, _err = fake.finish()
    finally:
        fake.kill()
        daemon.stop()
    assert rc == -signal.SIGKILL, f"the target was not killed (status {rc}, output {out!r})"
    assert '"ok"' not in out


def test_keeper_tells_a_live_address_space_from_a_gone_one() -> None:
    """How a keeper that could not find a task knows when to stop holding it."""
    import socket

    from lazypaged.criu.keeper import _mm_alive
    from lazypaged.uffd import Userfaultfd

    with Userfaultfd.create() as mine:
        mine.api(0)
        assert _mm_alive(mine.fileno())
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # child: make a uffd, hand it over, exit
        try:
            u = Userfaultfd.create()
            u.api(0)
            socket.send_fds(b, [b"u"], [u.fileno()])
        finally:
            os._exit(0)
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(a, 1, 1)
        os.waitpid(pid, 0)
        assert fds
        assert not _mm_alive(fds[0])
        for fd in fds:
            os.close(fd)
    finally:
        a.close()
        b.close()


def test_serve_with_a_criu_section_serves_restore_after_restore(tmp_path: Path) -> None:
    """The [criu] listener of ``lazypaged serve`` keeps accepting restores."""
    images = tmp_path / "images"
    images.mkdir()
    cfg = tmp_path / "lazypaged.toml"
    cfg.write_text(
        f'[daemon]\nhandoff_socket = "{tmp_path / "handoff.sock"}"\nsnapshot_dirs = ["{tmp_path}"]\n'
        f'log_format = "json"\nlog_level = "info"\nshutdown_grace = 5.0\n'
        f'[criu]\nenabled = true\nimages_dir = "{images}"\n'
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as lf:
        serve = subprocess.Popen(
            [sys.executable, "-m", "lazypaged", "serve", "--config", str(cfg)], stdout=lf, stderr=lf
        )
    try:
        deadline = time.monotonic() + 20
        while '"criu_listening"' not in log.read_text():
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the [criu] listener never started"
            time.sleep(0.02)
        lazy = _images(tmp_path / "probe", 1)
        for _ in range(2):
            fake = Fake(images, "normal", lazy)
            try:
                _images(images, fake.pid)
                fake.go()
                assert fake.line() == {"ready": True}
                result = fake.line()
                assert result["ok"], result
            finally:
                fake.kill()
        deadline = time.monotonic() + 20
        while log.read_text().count('"criu_restore_done"') < 2:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert not (images / "lazy-pages.socket").exists()
    assert log.read_text().count('"ok": true') == 2


@pytest.mark.parametrize("raw", [False, True], ids=["zstd", "raw"])
def test_restore_served_from_a_snapshot_of_the_images(tmp_path: Path, raw: bool) -> None:
    from lazypaged.criu.convert import create_from_criu
    from lazypaged.snapshot.reader import SnapshotReader

    snap = tmp_path / "criu.lzs"
    images = tmp_path / "images"
    images.mkdir()
    lazy = _images(tmp_path / "probe", 1)
    fake = Fake(images, "normal", lazy)
    try:
        _images(images, fake.pid)
        st = create_from_criu(images, snap, raw=raw)
        assert st.regions == 3
        rd = SnapshotReader(snap)
        try:
            starts = [ADDR + 4 * PAGE, ADDR + 30 * PAGE, ADDR + 32 * PAGE]  # the VMAs split at page 32
            assert [(r.name, r.start) for r in rd.regions] == [(f"{fake.pid}:{a:#x}", a) for a in starts]
        finally:
            rd.close()
        pages = images / "pages-1.img"
        pages.write_bytes(b"\xee" * pages.stat().st_size)  # so the bytes can only come from the snapshot
        daemon = h.start_lazy_daemon("lazypaged", Path("criu"), images, extra=["--snapshot", str(snap)])
        try:
            fake.go()
            assert fake.line() == {"ready": True}
            result = fake.line()
            assert result["ok"], result
            assert daemon.wait(30) == 0, h.log_tail(daemon.log)
        finally:
            daemon.stop()
    finally:
        fake.kill()


def test_snapshot_of_other_images_is_refused(tmp_path: Path) -> None:
    from lazypaged.criu.convert import create_from_criu

    other = tmp_path / "other"
    _images(other, 12345)
    snap = tmp_path / "other.lzs"
    create_from_criu(other, snap)
    fake, daemon = _start(tmp_path, "normal", extra=["--snapshot", str(snap)])
    try:
        fake.go()
        assert daemon.wait(30) == 1
    finally:
        fake.kill()
        daemon.stop()
    assert "not made from these images" in daemon.log.read_text()


def test_snapshot_create_from_criu_on_the_command_line(tmp_path: Path) -> None:
    """`lazypaged snapshot create --from-criu DIR` writes one region per lazy range."""
    from lazypaged.cli import main
    from lazypaged.snapshot.reader import SnapshotReader

    images = tmp_path / "images"
    _images(images, 12345)
    snap = tmp_path / "cli.lzs"
    assert main(["snapshot", "create", "--from-criu", str(images), "-o", str(snap), "-q"]) == 0
    rd = SnapshotReader(snap)
    try:
        assert len(rd.regions) == 3
        assert all(r.name.startswith("12345:") for r in rd.regions)
    finally:
        rd.close()
    assert main(["snapshot", "create", "--from-criu", str(tmp_path / "nothing"), "-o", str(snap), "-q"]) == 1
