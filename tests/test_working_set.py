"""Working-set record and replay: the second restore of an image faults far less."""

from __future__ import annotations

import time
from pathlib import Path

from lazypaged import workingset

from .conftest import DaemonHandle, MiB, finish, start_daemon, stop_daemon

SIZE = 32 * MiB


def _run(d: DaemonHandle, *extra: str) -> dict[str, object]:
    """One restore touching a fixed tenth of the image; its result and fault count."""
    before = len(_ended(d))
    proc = d.target("img", SIZE, "--touch", "subset", "--no-fill", *extra, wait=False)
    rc, lines, err = finish(proc)
    assert rc == 0, (lines, err)
    deadline = time.monotonic() + 20
    while len(_ended(d)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    return {**lines[-1], "faults": _ended(d)[-1]["faults"]}


def _ended(d: DaemonHandle) -> list[dict[str, object]]:
    return [x for x in d.log_lines() if x.get("event") == "session_ended"]


def test_second_restore_replays_the_first_ones_faults(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, working_set=True)
    try:
        image = d.image("img", SIZE)
        first = _run(d)
        ws_file = Path(str(image) + workingset.SUFFIX)
        assert ws_file.exists(), d.log.read_text()[-2000:]
        second = _run(d)
        events = [x["event"] for x in d.log_lines()]
        assert "working_set_recorded" in events
        assert "working_set_replayed" in events
        assert int(second["faults"]) * 5 < int(first["faults"]), (first, second)  # type: ignore[call-overload]
        # Switched off per restore: faults as in the first run.
        third = _run(d, "--no-working-set")
        assert int(third["faults"]) > int(second["faults"]) * 5  # type: ignore[call-overload]
    finally:
        assert stop_daemon(d) == 0


def test_record_of_a_changed_image_is_not_used(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, working_set=True)
    try:
        image = d.image("img", SIZE)
        _run(d)
        # Rewrite one page of the image: its identity (ctime) changes.
        with open(image, "r+b") as f:
            f.seek(4096)
            f.write(b"\x5a" * 4096)
        got = _run(d)  # target_prog compares against the image as it is now
        assert got["ok"] is True
        unusable = [x for x in d.log_lines() if x.get("event") == "working_set_unusable"]
        assert unusable, "a stale record was not refused"
    finally:
        assert stop_daemon(d) == 0


def test_corrupt_record_is_refused_not_installed(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, working_set=True)
    try:
        image = d.image("img", SIZE)
        _run(d)
        ws_file = Path(str(image) + workingset.SUFFIX)
        data = bytearray(ws_file.read_bytes())
        data[-100] ^= 0xFF  # a bit flip in the stored data
        ws_file.write_bytes(bytes(data))
        got = _run(d)
        assert got["ok"] is True
        corrupt = [x for x in d.log_lines() if x.get("event") == "working_set_chunk_corrupt"]
        assert corrupt
    finally:
        assert stop_daemon(d) == 0
