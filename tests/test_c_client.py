"""The C example client against a real daemon: the protocol document is enough.

``examples/c/handoff_client.c`` was written from ``docs/handoff.md`` alone,
hand-encoding its msgpack. Here it is compiled and run as a real restorer:
it maps memory, hands its uffd over, checks every byte against the image and
waits for the completion message.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lazypaged.demo import PAGE

from .conftest import DaemonHandle

SOURCE = Path(__file__).resolve().parent.parent / "examples" / "c" / "handoff_client.c"
MiB = 1 << 20


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build examples/c/handoff_client.c")
    exe = tmp_path_factory.mktemp("cclient") / "handoff_client"
    build = subprocess.run(
        [gcc, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert build.returncode == 0, build.stderr
    return exe


def run(client: Path, daemon: DaemonHandle, image: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(client), "-s", str(daemon.socket), "-t", "30", *args, str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def complete_stats(out: str) -> dict[str, int]:
    m = re.search(r"^complete (\w+) (.*)$", out, re.M)
    assert m, out
    return {k: int(float(v)) for k, v in re.findall(r"(\w+)=([\d.]+)", m.group(2))}


VARIANTS: list[tuple[str, ...]] = [
    (),
    ("-K",),  # the client closes its uffd right after "accepted"
    ("-r", "4", "-e", "0x48"),  # several ranges; EVENT_REMOVE | EVENT_UNMAP negotiated
    ("-o", str(4 * PAGE), "-l", str(16 * PAGE)),  # a slice of the snapshot
    ("-r", "32"),  # more than 15 ranges: an array16 header in the request
]


def test_c_client_restores(client: Path, daemon: DaemonHandle) -> None:
    size = 4 * MiB
    image = daemon.image("app.img", size)
    for args in VARIANTS:
        p = run(client, daemon, image, *args)
        assert p.returncode == 0, (args, p.stdout, p.stderr)
        lines = p.stdout.splitlines()
        assert re.fullmatch(r"accepted \w+", lines[0]), args
        session = lines[0].split()[1]
        length = int(args[args.index("-l") + 1]) if "-l" in args else size
        assert lines[1] == f"verified {length} bytes", args
        assert lines[2].startswith(f"complete {session} "), args
        stats = complete_stats(p.stdout)
        assert stats["pages"] == length // PAGE, args
        assert stats["bytes_copied"] + stats["bytes_zero"] == length, args


def test_c_client_options_reach_the_session(client: Path, daemon: DaemonHandle) -> None:
    # No fill and no fault-around: every page comes in through its own fault,
    # which only happens if the daemon read the hand-encoded options map.
    image = daemon.image("app.img", 2 * MiB)
    p = run(client, daemon, image, "-F", "-A")
    assert p.returncode == 0, p.stdout + p.stderr
    assert complete_stats(p.stdout)["faults"] == 2 * MiB // PAGE
    p = run(client, daemon, image, "-A")
    assert p.returncode == 0, p.stdout + p.stderr
    assert complete_stats(p.stdout)["faults"] < 2 * MiB // PAGE


def test_c_client_reports_refusals(client: Path, daemon: DaemonHandle) -> None:
    image = daemon.image("app.img", 1 * MiB)
    daemon.image("small.img", PAGE)
    cases = [
        (("-n", "missing.img"), "unknown_source"),
        (("-n", "../app.img"), "forbidden_source"),
        (("-n", "small.img"), "bad_range"),  # 1 MiB asked of a one-page snapshot
        (("-e", "0x1000000000"), None),  # a feature bit the kernel refuses: fails before connecting
    ]
    for args, code in cases:
        p = run(client, daemon, image, *args)
        if code is None:
            assert p.returncode == 1, p.stderr
            assert "UFFDIO_API" in p.stderr
            continue
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert p.stdout == ""
        assert re.match(rf"error {code}: \S", p.stderr), p.stderr
    # The daemon is unharmed and serves the next client.
    p = run(client, daemon, image)
    assert p.returncode == 0, p.stderr


def test_c_client_notices_wrong_bytes(client: Path, daemon: DaemonHandle) -> None:
    """The byte check is real: a snapshot one page off is caught at its first byte."""
    image = daemon.image("app.img", 1 * MiB)
    shifted = daemon.snapshots / "shifted.img"
    shifted.write_bytes(image.read_bytes()[PAGE:] + bytes(PAGE))
    p = run(client, daemon, image, "-n", "shifted.img")
    assert p.returncode == 4, p.stdout + p.stderr
    assert "mismatch at byte 0:" in p.stderr
