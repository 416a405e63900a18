"""lazypaged as the lazy-pages daemon of the real ``criu restore --lazy-pages``.

Each test dumps the test program (tests/criu/heapprog.c: a heap filled with
a known pattern, a checksum printed every pass) with criu 4.1.1, restores it
with ``--lazy-pages`` and ``lazypaged criu-lazy-pages`` as the daemon, and
checks that the restored process prints the pre-dump checksum with no bad
word, that the daemon exits 0, and that the process keeps running after it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazypaged.criu.procs import descendants
from tests.criu import harness as h

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20


@pytest.fixture(scope="session")
def criu() -> Path:
    if os.geteuid() != 0:
        pytest.skip("criu dump/restore needs root")
    try:
        return h.find_criu()
    except h.CriuUnavailable as e:
        pytest.skip(f"criu 4.1.1 cannot be installed or run here: {e}")


@pytest.fixture(scope="session")
def heapprog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.build_program(tmp_path_factory.mktemp("criu-prog"))


@pytest.fixture
def program(heapprog: Path, tmp_path: Path) -> Iterator[list[h.Program]]:
    started: list[h.Program] = []
    yield started
    for p in started:
        h.stop_program(p)


def _check_lines(lines: list[h.Line], expected: str) -> None:
    for ln in lines:
        assert ln.sum == expected, f"pass {ln.passno}: sum {ln.sum}, want {expected} (bad words: {ln.bad})"
        assert ln.bad == 0, f"pass {ln.passno}: {ln.bad} words differ from the pattern"


def _lazy_restore_local(
    criu: Path, heapprog: Path, tmp: Path, started: list[h.Program], mode: str, size_mib: int,
    kind: str = "lazypaged", snapshot: bool = False,
) -> tuple[h.Program, list[h.Line], int, list[h.Line]]:
    p = h.start_program(heapprog, tmp / "out.txt", size_mib, mode)
    started.append(p)
    images = tmp / "images"
    h.wait_dump(h.dump(criu, p.pid, images), images)
    extra = []
    if snapshot:
        from lazypaged.criu.convert import create_from_criu

        create_from_criu(images, tmp / "criu.lzs", level=1)
        extra = ["--snapshot", str(tmp / "criu.lzs")]
    daemon = h.start_lazy_daemon(kind, criu, images, extra=extra)
    p.mark()
    r = h.restore(criu, images)
    try:
        lines = p.wait_lines(3, 120, alive=r.proc)
        rc = daemon.wait(120)
        after = p.wait_lines(2, 30, alive=r.proc)
        assert r.proc.poll() is None, "the restored process tree ended"
    finally:
        r.kill()
        daemon.stop()
    if rc != 0:
        pytest.fail(f"{kind} exited with {rc}:\n{h.log_tail(daemon.log)}")
    return p, lines, rc, after


def test_local_lazy_restore(criu: Path, heapprog: Path, tmp_path: Path, program: list[h.Program]) -> None:
    p, lines, _rc, after = _lazy_restore_local(criu, heapprog, tmp_path, program, "plain", 64)
    _check_lines(lines + after, p.expected)
    log = (tmp_path / "images" / "lazypaged.log").read_text()
    assert '"criu_restore_finished"' in log
    assert '"outcome": "complete"' in log


def test_local_lazy_restore_from_a_snapshot_of_the_dump(
    criu: Path, heapprog: Path, tmp_path: Path, program: list[h.Program]
) -> None:
    """The dump converted to a compressed, checksummed lazypaged snapshot
    (``create_from_criu``) and the restore served from it."""
    p, lines, _rc, after = _lazy_restore_local(criu, heapprog, tmp_path, program, "plain", 64, snapshot=True)
    _check_lines(lines + after, p.expected)
    assert '"sources": ["criu.lzs"]' in (tmp_path / "images" / "lazypaged.log").read_text()


def test_process_tree_with_a_zombie(criu: Path, heapprog: Path, tmp_path: Path, program: list[h.Program]) -> None:
    """Three tasks dumped: the program, a worker sharing part of its heap
    copy-on-write, and a zombie. Restore sends two task records and one
    zombie record; both live tasks get their memory back."""
    p, lines, _rc, after = _lazy_restore_local(criu, heapprog, tmp_path, program, "tree", 64)
    _check_lines(lines + after, p.expected)
    assert {ln.extra.get("who") for ln in lines + after} == {"parent", "worker"}
    log = [json.loads(x) for x in (tmp_path / "images" / "lazypaged.log").read_text().splitlines()]
    done = next(x for x in log if x["event"] == "criu_restore_done")
    assert (done["tasks"], done["zombies"], done["complete"]) == (2, 1, 2)


def test_restored_program_forks(criu: Path, heapprog: Path, tmp_path: Path, program: list[h.Program]) -> None:
    """Every pass forks a child that checks its copy and then scribbles on it:
    the child sees the right bytes and the scribbles never reach the parent.

    Whether the first fork lands before the 64 MiB are in depends on timing
    (after RSTF the fill takes tens of ms); a fork in mid-restore, with the
    child's session serving what the parent had not yet received, is forced
    deterministically in tests/test_events.py (fill off)."""
    p, lines, _rc, after = _lazy_restore_local(criu, heapprog, tmp_path, program, "fork", 64)
    _check_lines(lines + after, p.expected)
    assert {ln.extra.get("who") for ln in lines + after} == {"child", "parent"}
    assert all(ln.extra.get("child_status", "0") == "0" for ln in lines + after)


def test_restored_program_drops_pages(criu: Path, heapprog: Path, tmp_path: Path, program: list[h.Program]) -> None:
    """MADV_DONTNEED during the lazy restore: the dropped pages read back as
    zeros (never as image data), and the rest stays intact."""
    p, lines, _rc, after = _lazy_restore_local(criu, heapprog, tmp_path, program, "dontneed", 64)
    _check_lines(lines + after, p.expected)
    assert all(ln.extra["zero_bad"] == "0" for ln in lines + after)


def test_remote_lazy_restore_across_netns(
    criu: Path, heapprog: Path, tmp_path: Path, program: list[h.Program]
) -> None:
    """Source: the program and ``criu dump --lazy-pages``'s page server in one
    namespace. Destination: lazypaged and ``criu restore`` in the other."""
    tag = f"{os.getpid() % 100000}"
    with h.pipe_max_size(), h.netns_pair(tag) as ns:
        p = h.start_program(heapprog, tmp_path / "out.txt", 64, "plain", netns=ns.source)
        program.append(p)
        src = tmp_path / "src"
        port = 27000 + os.getpid() % 1000
        d = h.dump(criu, p.pid, src, lazy_address=ns.source_addr, lazy_port=port, netns=ns.source)
        try:
            h.wait_page_server(src, d)
            dst = h.copy_images(src, tmp_path / "dst")
            daemon = h.start_lazy_daemon("lazypaged", criu, dst, address=ns.source_addr, port=port, netns=ns.dest)
            p.mark()
            r = h.restore(criu, dst, netns=ns.dest)
            try:
                lines = p.wait_lines(3, 120, alive=r.proc)
                rc = daemon.wait(120)
                h.wait_dump(d, src, timeout=60)
                after = p.wait_lines(2, 30, alive=r.proc)
            finally:
                r.kill()
                daemon.stop()
        finally:
            if d.poll() is None:
                d.kill()
                d.wait()
    assert rc == 0, h.log_tail(daemon.log)
    _check_lines(lines + after, p.expected)
    log = daemon.log.read_text()
    ends = [ln for ln in log.splitlines() if "page_server" in ln or "session_ended" in ln]
    assert '"acknowledged": true' in log, ends


def test_daemon_killed_mid_restore_kills_the_target(
    criu: Path, heapprog: Path, tmp_path: Path, program: list[h.Program]
) -> None:
    """SIGKILL of the daemon after the restore finished but before every page
    is in: its keeper kills the restored task, which never reads a zero page
    in place of its data (criu's own daemon would leave it reading zeros)."""
    cfg = tmp_path / "slow.toml"
    # One page per fault and no fill: the restore stays incomplete for a while.
    cfg.write_text("[session]\nfault_around = false\nfill = false\n")
    p = h.start_program(heapprog, tmp_path / "out.txt", 64, "plain")
    program.append(p)
    images = tmp_path / "images"
    h.wait_dump(h.dump(criu, p.pid, images), images)
    daemon = h.start_lazy_daemon("lazypaged", criu, images, extra=["--config", str(cfg)])
    p.mark()
    r = h.restore(criu, images)
    try:
        deadline = time.monotonic() + 60
        while '"criu_restore_finished"' not in daemon.log.read_text():
            assert time.monotonic() < deadline, h.log_tail(daemon.log)
            assert daemon.proc.poll() is None, h.log_tail(daemon.log)
            time.sleep(0.005)
        pid = r.pid()
        daemon.proc.kill()
        daemon.proc.wait()
        # The restored task dies, and so criu restore, its parent, ends.
        r.proc.wait(timeout=30)
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    finally:
        r.kill()
        daemon.stop()
    time.sleep(0.3)
    lines = p.read_lines()
    _check_lines(lines, p.expected)  # whatever it printed before dying was right


def test_daemon_frozen_then_killed_before_reading_records(
    criu: Path, heapprog: Path, tmp_path: Path, program: list[h.Program]
) -> None:
    """The daemon is stopped before the restore connects and killed while the
    restorer is stuck on a lazy page, before the end-of-restore marker: the
    restore fails (its connection is gone; the keeper also takes and kills
    what was queued on it) and the task never runs on with zeros."""
    p = h.start_program(heapprog, tmp_path / "out.txt", 64, "plain")
    program.append(p)
    images = tmp_path / "images"
    h.wait_dump(h.dump(criu, p.pid, images), images)
    daemon = h.start_lazy_daemon("lazypaged", criu, images)
    daemon.proc.send_signal(signal.SIGSTOP)
    p.mark()
    r = h.restore(criu, images)
    try:
        time.sleep(1.0)  # the restore is now stuck on its first lazy page
        tasks = [t for t in descendants(r.proc.pid) if _comm(t) == "heapprog"]
        assert tasks, "criu restore created no task"
        assert r.proc.poll() is None, "the restore went on without its memory"
        assert not p.read_lines(), "the restored task ran without its memory"
        pid = tasks[0]
        daemon.proc.kill()
        daemon.proc.wait()
        r.proc.wait(timeout=30)
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    finally:
        r.kill()
        daemon.stop()
    time.sleep(0.3)
    assert not p.read_lines()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] in "ZX"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "remote"])
def test_one_gib_lazy_restore(
    criu: Path, heapprog: Path, tmp_path: Path, program: list[h.Program], where: str
) -> None:
    if where == "local":
        p, lines, _rc, after = _lazy_restore_local(criu, heapprog, tmp_path, program, "plain", 1024)
        _check_lines(lines + after, p.expected)
        return
    with h.pipe_max_size(), h.netns_pair(f"{os.getpid() % 100000}g") as ns:
        p = h.start_program(heapprog, tmp_path / "out.txt", 1024, "plain", netns=ns.source)
        program.append(p)
        src = tmp_path / "src"
        port = 28000 + os.getpid() % 1000
        d = h.dump(criu, p.pid, src, lazy_address=ns.source_addr, lazy_port=port, netns=ns.source)
        try:
            h.wait_page_server(src, d, timeout=120)
            dst = h.copy_images(src, tmp_path / "dst")
            daemon = h.start_lazy_daemon("lazypaged", criu, dst, address=ns.source_addr, port=port, netns=ns.dest)
            p.mark()
            r = h.restore(criu, dst, netns=ns.dest)
            try:
                lines = p.wait_lines(2, 240, alive=r.proc)
                rc = daemon.wait(240)
                h.wait_dump(d, src, timeout=120)
            finally:
                r.kill()
                daemon.stop()
        finally:
            if d.poll() is None:
                d.kill()
                d.wait()
    assert rc == 0, h.log_tail(daemon.log)
    _check_lines(lines, p.expected)
