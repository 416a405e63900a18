"""Session timelines written by a real daemon, and ``lazypaged report`` drawing them."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazypaged.cli import main
from lazypaged.config import Config, ConfigError, from_dict
from lazypaged.timeline import interval_percentile_us, prune

from .conftest import MiB
from .ops_helpers import OpsDaemon, running_ops_daemon

SIZE = 16 * MiB
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def ops_daemon(tmp_path: Path) -> Iterator[OpsDaemon]:
    yield from running_ops_daemon(tmp_path)


def _timeline(od: OpsDaemon, timeout: float = 15.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(od.timelines.glob("*.json")) if od.timelines.exists() else []
        if files:
            return files[0]
        time.sleep(0.05)
    raise TimeoutError("no timeline written")


def test_finished_session_writes_its_timeline(ops_daemon: OpsDaemon, tmp_path: Path) -> None:
    ops_daemon.d.image("img", SIZE)
    t0 = time.time()
    t = ops_daemon.target("img", SIZE, 30, fill=True)
    try:
        sid = t.line()["accepted"]
        t.line()
        t.line()
    finally:
        assert t.release() == 0
    path = _timeline(ops_daemon)
    assert path.name.endswith(f"-{sid}.json")
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert doc["session"] == sid
    assert doc["kind"] == "native"
    assert doc["outcome"] == "complete"
    assert doc["sources"] == ["img"]
    assert doc["bytes_total"] == SIZE
    assert doc["pages_total"] == SIZE // PAGE
    assert t0 - 1 <= doc["started_unix"] <= time.time()
    s = doc["samples"]
    n = len(s["t"])
    assert n >= 2
    assert all(len(col) == n for col in s.values())
    assert s["t"][0] == 0
    assert s["t"] == sorted(s["t"])
    for col in ("bytes_fault", "bytes_fill", "bytes_installed", "faults"):
        assert s[col][0] == 0
        assert s[col] == sorted(s[col]), col  # running totals never go down
    assert s["bytes_installed"][-1] == SIZE
    assert s["bytes_fault"][-1] + s["bytes_fill"][-1] == SIZE
    assert s["t"][-1] == pytest.approx(doc["seconds"], abs=0.01)
    assert any(v is not None for v in s["fault_p99_us"]) == (s["faults"][-1] > 0)
    logged = [x for x in ops_daemon.d.log_lines() if x.get("event") == "timeline_written"]
    assert logged
    assert logged[0]["session"] == sid
    assert logged[0]["path"] == str(path)

    pytest.importorskip("matplotlib")
    out = tmp_path / "restore.png"
    assert main(["report", str(path), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_report_refuses_what_is_not_a_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    for text in ("not json", '{"version": 1}', '{"version": 9, "samples": {}}',
                 '{"version": 1, "samples": {"t": [0, 1], "bytes_fault": [0], "bytes_fill": [0, 0], '
                 '"faults": [0, 0], "fault_p50_us": [null, null], "fault_p99_us": [null, null]}}'):
        bad.write_text(text)
        assert main(["report", str(bad)]) == 2, text
        assert "lazypaged:" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_interval_percentiles() -> None:
    before = [0] * 32
    now = [0] * 32
    assert interval_percentile_us(now, before, 0.5) is None
    now[3] = 90  # 90 faults under 8 µs
    now[10] = 10  # 10 under 1024 µs
    assert interval_percentile_us(now, before, 0.5) == 8.0
    assert interval_percentile_us(now, before, 0.99) == 1024.0
    # Only what happened since the previous sample counts.
    assert interval_percentile_us(now, [0, 0, 0, 90] + [0] * 28, 0.5) == 1024.0


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    names = [f"20240101T0000{i:02d}Z-s{i}.json" for i in range(6)]
    for n in names:
        (tmp_path / n).write_text("{}")
    (tmp_path / ".tmp-x.json").write_text("")  # a write in progress is not counted
    prune(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.glob("2*.json")) == names[2:]
    assert (tmp_path / ".tmp-x.json").exists()
    prune(tmp_path, 0)
    assert len(list(tmp_path.glob("2*.json"))) == 4


def test_timeline_settings_are_checked() -> None:
    assert Config().timeline.enabled is False
    assert from_dict({"timeline": {"directory": "/tmp/t", "interval": 1}}).timeline.interval == 1.0
    for bad in ({"interval": 0}, {"interval": 120}, {"keep": -1}, {"directory": 3}):
        with pytest.raises(ConfigError, match=r"timeline\."):
            from_dict({"timeline": bad})
