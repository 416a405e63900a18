"""A raw image cut short while it is being restored.

A page whose bytes are not all in the file any more is missing: never
installed with a zeroed tail, poisoned under ``sigbus`` (and only such
pages), waited for under ``wait``. However the cut races the daemon's own
reads of the file, the daemon survives it and goes on serving.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import HERE, DaemonHandle, MiB, start_daemon, stop_daemon

CHECK_TARGET = HERE / "poison_check_target.py"
PAGE = os.sysconf("SC_PAGE_SIZE")
SIZE = 4 * MiB
#: Not a page multiple: the page holding the cut keeps only its first bytes.
CUT = 2 * MiB + 3 * PAGE + 1000


def _target(d: DaemonHandle, name: str, ref: Path, size: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHECK_TARGET), "--socket", str(d.socket), "--image", str(ref), "--name", name,
         "--size", str(size), "--timeout", "30", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("{"), (line, proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
    out: dict[str, object] = json.loads(line)
    return out


def _image(d: DaemonHandle, name: str, size: int) -> tuple[Path, Path]:
    """An image the daemon serves and a copy of it to check bytes against."""
    image = d.image(name, size)
    ref = image.parent.parent / f"{name}.ref"
    shutil.copyfile(image, ref)
    return image, ref


def _truncate(image: Path, at: int, *, held: bool = False) -> None:
    """Cut the file at ``at``: by path, or (``held``) through a descriptor
    open for writing, which keeps the daemon from taking a lease meanwhile."""
    if not held:
        os.truncate(image, at)
        return
    fd = os.open(image, os.O_WRONLY)
    try:
        os.ftruncate(fd, at)
    finally:
        os.close(fd)


def _wait_log(d: DaemonHandle, event: str, timeout: float = 30.0) -> dict[str, object]:
    """The first log line of ``event``, once the daemon has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for x in d.log_lines():
            if x.get("event") == event:
                return x
        assert d.alive(), "the daemon died"
        time.sleep(0.02)  # polling the log for the event, not a wait for time
    raise AssertionError(f"no {event} logged within {timeout} s")


def _ended(d: DaemonHandle, session: object) -> dict[str, object]:
    ended = [x for x in d.log_lines() if x.get("event") == "session_ended" and x.get("session") == session]
    assert ended, f"session {session} did not end"
    return ended[-1]


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, object]:
    # Through the buffered reader that _line used: it may hold lines already.
    assert proc.stdout is not None
    assert proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    proc.wait(timeout=timeout)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert lines, (proc.returncode, out, err)
    last: dict[str, object] = lines[-1]
    assert "wrong_pages" in last, (proc.returncode, out, err)
    return last


@pytest.mark.parametrize("fault_around", [True, False], ids=["fault_around", "page_by_page"])
def test_cut_page_is_poisoned_not_zeroed(tmp_path: Path, fault_around: bool) -> None:
    """sigbus, fill off: exactly the pages from the one holding the cut are
    poisoned; every page below it holds its bytes; the restore completes."""
    d = start_daemon(tmp_path)
    try:
        image, ref = _image(d, "img", SIZE)
        proc = _target(d, "img", ref, SIZE, "--policy", "sigbus", "--no-fill", "--go",
                       *([] if fault_around else ["--no-fault-around"]))
        sid = _line(proc)["accepted"]
        _truncate(image, CUT)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        res = _finish(proc)
        first_cut = CUT // PAGE
        npages = SIZE // PAGE
        assert res["wrong_pages"] == 0, res
        assert res["poisoned"] == [[first_cut, npages - first_cut]], res
        assert res["complete"], res  # every page installed or poisoned: complete
        end = _ended(d, sid)
        assert end["outcome"] == "complete", end
        assert end["bytes_poisoned"] == (npages - first_cut) * PAGE, end
        assert d.alive()
    finally:
        assert stop_daemon(d) == 0


@pytest.mark.parametrize("fault_around", [True, False], ids=["fault_around", "page_by_page"])
def test_cut_page_waits_for_its_bytes(tmp_path: Path, fault_around: bool) -> None:
    """wait, fill off: the page holding the cut is not installed from what
    is left of it; once the bytes are back, every page reads right."""
    d = start_daemon(tmp_path)
    try:
        image, ref = _image(d, "img", SIZE)
        proc = _target(d, "img", ref, SIZE, "--policy", "wait", "--no-fill", "--go",
                       *([] if fault_around else ["--no-fault-around"]))
        _line(proc)
        _truncate(image, CUT)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        _wait_log(d, "source_failed")
        assert proc.poll() is None
        with open(image, "r+b") as f, open(ref, "rb") as r:
            r.seek(CUT)
            f.seek(CUT)
            f.write(r.read())
        res = _finish(proc)
        assert res["wrong_pages"] == 0, res
        assert res["poisoned_pages"] == 0, res
        assert res["complete"], res
        assert d.alive()
    finally:
        assert stop_daemon(d) == 0


ROUNDS = int(os.environ.get("TRUNCATE_ROUNDS", "21"))


def _rounds(tmp_path: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    size = 8 * MiB
    npages = size // PAGE
    d = start_daemon(tmp_path)
    try:
        for n in range(rounds):
            name = f"img{n}"
            image, ref = _image(d, name, size)
            cut = rng.randrange(PAGE, size - PAGE)
            mark = rng.randrange(0, npages // 2)
            proc = _target(d, name, ref, size, "--policy", "sigbus", "--order", "random", "--seed", str(n),
                           "--mark", str(mark))
            try:
                sid = _line(proc)["accepted"]
                assert _line(proc) == {"mark": mark}
                _truncate(image, cut, held=n % 2 == 1)
                res = _finish(proc)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            detail = {"round": n, "cut": cut, "mark": mark, **res}
            assert d.alive(), ("the daemon died", detail, d.log.read_text()[-3000:])
            assert res["wrong_pages"] == 0, detail
            poisoned = res["poisoned"]
            assert isinstance(poisoned, list)
            if not all(first >= cut // PAGE for first, _ in poisoned):
                said = [x for x in d.log_lines() if x.get("session") == sid and x.get("event") in (
                    "source_failed", "failure_narrowed", "poison_failed", "session_bug")]
                raise AssertionError(("a page below the cut was poisoned", cut // PAGE, poisoned, detail, said))
            assert res["complete"], detail
            assert _ended(d, sid)["outcome"] == "complete"
            image.unlink()
            ref.unlink()
        bugs = [x for x in d.log_lines() if x.get("event") == "session_bug"]
        assert not bugs, bugs
    finally:
        assert stop_daemon(d) == 0


def test_truncation_rounds_daemon_survives(tmp_path: Path) -> None:
    """Cuts at random offsets while the fill and the target's reads run."""
    _rounds(tmp_path, ROUNDS, int(os.environ.get("TRUNCATE_SEED", "1")))


@pytest.mark.slow
def test_truncation_rounds_daemon_survives_many(tmp_path: Path) -> None:
    _rounds(tmp_path, 300, int(os.environ.get("TRUNCATE_SEED", "2")))
