"""Working-set record and replay: the second restore of an image faults far less."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from lazypaged import workingset
from lazypaged.sources.raw import RawImageSource

from .conftest import DaemonHandle, MiB, finish, start_daemon, stop_daemon

SIZE = 32 * MiB


def _run(d: DaemonHandle, *extra: str, fill: bool = False) -> dict[str, object]:
    """One restore touching a fixed tenth of the image; its result, and its
    session's end line (fault count, pages installed, session id)."""
    before = len(_ended(d))
    proc = d.target("img", SIZE, "--touch", "subset", *([] if fill else ["--no-fill"]), *extra, wait=False)
    rc, lines, err = finish(proc)
    assert rc == 0, (lines, err)
    deadline = time.monotonic() + 20
    while len(_ended(d)) == before and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the log for the session's end line
    end = _ended(d)[-1]
    return {**lines[-1], "faults": end["faults"], "pages_installed": end["pages_installed"],
            "session": end["session"]}


def _ended(d: DaemonHandle) -> list[dict[str, object]]:
    return [x for x in d.log_lines() if x.get("event") == "session_ended"]


def test_second_restore_replays_the_first_ones_faults(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, working_set=True)
    try:
        image = d.image("img", SIZE)
        first = _run(d)
        ws_file = Path(str(image) + workingset.SUFFIX)
        assert ws_file.exists(), d.log.read_text()[-2000:]
        second = _run(d, fill=True)  # a replay installs ahead of faults: only with fill on
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
        got = _run(d, fill=True)
        assert got["ok"] is True
        corrupt = [x for x in d.log_lines() if x.get("event") == "working_set_chunk_corrupt"]
        assert corrupt
    finally:
        assert stop_daemon(d) == 0


#: Pages the "subset" touch of target_prog reads: a tenth of the image.
SUBSET = SIZE // 4096 // 10


def test_fill_off_installs_only_faulted_pages(tmp_path: Path) -> None:
    """fill: false with fault-around off installs exactly the pages touched:
    while recording (no whole granules), and with a record at hand (no
    replay ahead of the faults)."""
    d = start_daemon(tmp_path, working_set=True)
    try:
        image = d.image("img", SIZE)
        first = _run(d, "--no-fault-around")
        assert Path(str(image) + workingset.SUFFIX).exists(), d.log.read_text()[-2000:]
        assert first["pages_installed"] == SUBSET, first
        second = _run(d, "--no-fault-around")
        assert second["pages_installed"] == SUBSET, second
        replays = [x for x in d.log_lines() if x.get("event") == "working_set_replay"
                   and x.get("session") == second["session"]]
        assert not replays
    finally:
        assert stop_daemon(d) == 0



def test_record_cut_short_in_use_is_refused_not_sigbus(tmp_path: Path) -> None:
    """A record truncated while a session has it mapped: its lost chunks
    fail verification (served from the image instead); the daemon never
    reads the mapping past the file's end."""
    image = tmp_path / "img"
    image.write_bytes(os.urandom(16 * 65536))
    granule = 65536

    async def main() -> None:
        src = RawImageSource(image)
        try:
            rec = workingset.Recorder(src, granule, 64)
            for idx in range(16):
                rec.note(idx * granule, idx * granule + 1)
            path = Path(str(image) + workingset.SUFFIX)
            size = workingset.save(rec, path, 1.0)
            ws, why = workingset.load(src)
            assert ws is not None, why
            try:
                assert all(ws.verify(c, granule) for c in ws.chunks)
                # From a thread: the truncate waits for the loop to let the record's lease go.
                await asyncio.to_thread(os.truncate, path, size // 2)
                assert not ws.verify(ws.chunks[-1], granule)  # past the new end
                assert not any(ws.verify(c, granule) for c in ws.chunks)
            finally:
                ws.close()
        finally:
            src.close()

    asyncio.run(main())
