"""SIGHUP reloads the configuration file: what can change safely is applied,
one ``reloaded`` line says what changed and what needs a restart, and a file
that does not validate leaves the running configuration in place."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from lazypaged.cli import _parser, serve_config
from lazypaged.config import Config
from lazypaged.daemon import flatten
from lazypaged.demo import make_image

from .conftest import MiB, _needs_root, finish, start_daemon, stop_daemon
from .test_signals import wait_log

SIZE = 2 * MiB


def test_reload_applies_the_level_and_names_what_needs_a_restart(tmp_path: Path) -> None:
    _needs_root()
    d = start_daemon(tmp_path)
    try:
        text = d.config.read_text()
        assert 'log_level = "debug"' in text
        moved = tmp_path / "elsewhere.sock"
        d.config.write_text(
            text.replace('log_level = "debug"', 'log_level = "warning"').replace(str(d.socket), str(moved))
        )
        mark = len(d.log_lines())
        d.proc.send_signal(signal.SIGHUP)
        line = wait_log(d, "reloaded", mark)
        assert line["changed"] == ["log_level"], line
        assert line["needs_restart"] == ["handoff_socket"], line
        # Still on the socket it listens on, and now quiet below warning.
        mark = len(d.log_lines())
        d.image("img", SIZE)
        rc, lines, err = finish(d.target("img", SIZE))
        assert rc == 0, (lines, err)
        assert lines[-1]["ok"], (lines, err)
        assert not moved.exists()
        quiet = d.log_lines()[mark:]
        assert not [x for x in quiet if x.get("level") in ("debug", "info")], quiet
    finally:
        assert stop_daemon(d) == 0


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ('log_level = "debug"', 'log_level = "verbose"', "log_level"),
        ("[daemon]\n", "[daemon]\nsocket_mode = 660\n", "socket_mode"),
        ("[daemon]\n", "[daemon\n", "lazypaged.toml"),
    ],
)
def test_a_bad_file_on_reload_keeps_the_running_configuration(tmp_path: Path, old: str, new: str, words: str) -> None:
    _needs_root()
    d = start_daemon(tmp_path)
    try:
        good = d.config.read_text()
        assert old in good
        d.config.write_text(good.replace(old, new, 1))
        mark = len(d.log_lines())
        d.proc.send_signal(signal.SIGHUP)
        line = wait_log(d, "reload_failed", mark)
        assert words in str(line["error"]), line
        assert "\n" not in str(line["error"])
        # Serving as before.
        d.image("img", SIZE)
        rc, lines, err = finish(d.target("img", SIZE))
        assert rc == 0, (lines, err)
        assert lines[-1]["ok"], (lines, err)
        assert [x for x in d.log_lines()[mark:] if x.get("event") == "session_started"]
        assert not [x for x in d.log_lines()[mark:] if x.get("event") == "reloaded"]
        # Fixed, the next reload goes through and finds nothing changed.
        d.config.write_text(good)
        mark = len(d.log_lines())
        d.proc.send_signal(signal.SIGHUP)
        line = wait_log(d, "reloaded", mark)
        assert (line["changed"], line["needs_restart"]) == ([], []), line
    finally:
        assert stop_daemon(d) == 0


def test_command_line_overrides_outlive_a_reload(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[daemon]\nlog_format = "json"\nhandoff_socket = "/run/x/a.sock"\n')
    args = _parser().parse_args(["serve", "--config", str(cfg), "--log-format", "console",
                                 "--snapshot-dir", str(tmp_path)])
    first = serve_config(args)
    cfg.write_text('[daemon]\nlog_format = "json"\nhandoff_socket = "/run/x/b.sock"\nlog_level = "error"\n')
    again = serve_config(args)
    assert (first.log_format, again.log_format) == ("console", "console")
    assert again.snapshot_dirs == (tmp_path,)
    assert (str(again.handoff_socket), again.log_level) == ("/run/x/b.sock", "error")


def test_flatten_names_every_setting_by_its_dotted_key() -> None:
    flat = flatten(Config())
    assert {"log_level", "socket_mode", "session.fill", "access.allow_gids", "control.socket_mode"} <= set(flat)
    assert not [k for k, v in flat.items() if hasattr(v, "__dataclass_fields__")]


def test_a_part_that_refuses_the_reload_is_reported_as_failed(tmp_path: Path) -> None:
    """The exporter takes new exports all or nothing: one that cannot be
    opened leaves its running exports, and the line says it failed."""
    _needs_root()
    (tmp_path / "snapshots").mkdir()
    make_image(tmp_path / "snapshots" / "img", SIZE)  # exported from the start
    d = start_daemon(tmp_path, extra_config='[export]\nlisten = "127.0.0.1:0"\nsnapshots = ["img"]\n')
    try:
        text = d.config.read_text()
        d.config.write_text(text.replace('snapshots = ["img"]', 'snapshots = ["img", "absent"]')
                            .replace('log_level = "debug"', 'log_level = "info"'))
        mark = len(d.log_lines())
        d.proc.send_signal(signal.SIGHUP)
        line = wait_log(d, "reloaded", mark)
        assert line["failed"] == ["export.snapshots"], line
        assert line["changed"] == ["log_level"], line
        part = wait_log(d, "reload_failed", mark)
        assert part["part"] == "export"
    finally:
        assert stop_daemon(d) == 0
