"""The documented default configuration is the built-in one, and bad values
are refused with the setting named."""

from __future__ import annotations

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
