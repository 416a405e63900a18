"""The documented default configuration is the built-in one, and bad values
are refused with the setting named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lazypaged.config import Config, ConfigError, from_dict, load

ROOT = Path(__file__).parent.parent


def test_documented_defaults_match_built_in() -> None:
    assert load(ROOT / "config" / "lazypaged.toml") == Config().validate()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"daemon": {"nope": 1}}, "daemon.nope"),
        ({"nosuch": {}}, "nosuch"),
        ({"session": {"fill": "yes"}}, "session.fill"),
        ({"session": {"fault_around_min": 1000}}, "fault_around_min"),
        ({"session": {"fault_around_min": 1 << 22, "fault_around_max": 1 << 21}}, "fault_around_min"),
        ({"session": {"fault_poll_us": -1}}, "fault_poll_us"),
        ({"daemon": {"socket_mode": "rw"}}, "socket_mode"),
        ({"daemon": {"log_format": "xml"}}, "log_format"),
        ({"firecracker": {"socket": "/tmp/x.sock"}}, "mem_file"),
        ({"daemon": []}, "[daemon]"),
    ],
)
def test_bad_values_are_named(data: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        from_dict(data)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        # TOML integers lose their spelling (660 and 0o1224 parse alike), so a
        # mode must be a string; 660 used to become mode 0o1224.
        ({"daemon": {"socket_mode": 660}}, "daemon.socket_mode"),
        ({"daemon": {"socket_mode": 0o660}}, "daemon.socket_mode"),
        ({"control": {"socket_mode": 660}}, "control.socket_mode"),
        ({"daemon": {"socket_mode": "0x1b0"}}, "daemon.socket_mode"),
        ({"daemon": {"socket_mode": "0o660"}}, "daemon.socket_mode"),
        ({"daemon": {"socket_mode": "-660"}}, "daemon.socket_mode"),
        ({"daemon": {"socket_mode": " 660"}}, "daemon.socket_mode"),
        ({"daemon": {"socket_mode": "4660"}}, "daemon.socket_mode"),
        ({"daemon": {"socket_mode": ""}}, "daemon.socket_mode"),
        ({"control": {"socket_mode": "0988"}}, "control.socket_mode"),
        # Unknown words used to be taken as info.
        ({"daemon": {"log_level": "verbose"}}, "log_level"),
        ({"daemon": {"log_level": ""}}, "log_level"),
        ({"daemon": {"log_level": 10}}, "log_level"),
        ({"session": {"failure_policy": "zero"}}, "failure_policy"),
        ({"criu": {"page_server_header": "4.3"}}, "page_server_header"),
        ({"access": {"unmatched": "maybe"}}, "unmatched"),
    ],
)
def test_modes_and_enumerations_are_strict(data: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as e:
        from_dict(data)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "mode"), [("0660", 0o660), ("660", 0o660), ("0600", 0o600), ("0666", 0o666), ("0", 0), ("0777", 0o777)]
)
def test_octal_mode_strings_are_taken(text: str, mode: int) -> None:
    cfg = from_dict({"daemon": {"socket_mode": text}, "control": {"socket_mode": text}})
    assert cfg.socket_mode == mode
    assert cfg.control.socket_mode == mode


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "critical", "INFO", "Warning"])
def test_known_log_levels_are_taken(level: str) -> None:
    assert from_dict({"daemon": {"log_level": level}}).log_level == level.lower()


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lazypaged", "serve", "--check-config", *args],
                          capture_output=True, text=True, timeout=60)


def test_check_config_answers_in_one_line(tmp_path: Path) -> None:
    good = _check("--config", str(ROOT / "config" / "lazypaged.toml"))
    assert good.returncode == 0, good.stderr
    assert len(good.stdout.splitlines()) == 1
    assert "valid" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nsocket_mode = 660\n")
    r = _check("--config", str(bad))
    assert r.returncode == 1
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1
    assert "daemon.socket_mode" in r.stderr
    # Overrides are checked with the file, as serve would run them.
    r = _check("--config", str(ROOT / "config" / "lazypaged.toml"), "--firecracker-socket", "/tmp/fc.sock")
    assert r.returncode == 1
    assert "mem_file" in r.stderr
