"""`lazypaged snapshot create|inspect|verify` through the real argument parser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazypaged.cli import main
from lazypaged.snapshot import SnapshotReader
from lazypaged.snapshot.commands import parse_size

from .snapshot_images import PAGE, flip_bit, write_image

SIZE = 2 << 20


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "mem.raw"
    write_image(path, SIZE, seed=2)
    return path


def test_create_inspect_verify(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mem.lzs"
    assert main(["snapshot", "create", "--from-raw", str(raw), "-o", str(out), "--level", "5", "-q"]) == 0
    line = capsys.readouterr().out
    assert "2.00 MiB in 1 region" in line
    assert "zero" in line
    assert "ratio" in line
    assert "MiB/s" in line

    assert main(["snapshot", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "zstd"
    assert info["checksum"] == "xxh3-128"
    assert info["chunk_size"] == 64 << 10
    assert info["size"] == SIZE
    assert 0.2 < info["zero_fraction"] < 0.4
    assert info["ratio"] > 1.5
    assert info["regions"][0]["name"] == "mem.raw"

    assert main(["snapshot", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "xxh3-128" in text
    assert "mem.raw" in text

    assert main(["snapshot", "verify", str(out), "-q"]) == 0
    assert "sound" in capsys.readouterr().out


def test_raw_layout_and_chunk_size(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mem.lzs"
    assert main(["snapshot", "create", "--from-raw", str(raw), "-o", str(out), "--raw", "--chunk-size", "32K"]) == 0
    with SnapshotReader(out) as rd:
        assert rd.header.raw
        assert rd.header.chunk_size == 32 << 10
    assert "ratio" in capsys.readouterr().out
    assert main(["snapshot", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "raw"


def test_verify_names_the_first_bad_chunk(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mem.lzs"
    assert main(["snapshot", "create", "--from-raw", str(raw), "-o", str(out), "-q"]) == 0
    with SnapshotReader(out) as rd:
        bad = [i for i, c in enumerate(rd.index.chunks) if c.kind != 0][3:5]
        frames = [rd.index.chunks[i] for i in bad]
    for c in frames:
        flip_bit(out, c.frame_offset + c.frame_size // 2)
    capsys.readouterr()
    assert main(["snapshot", "verify", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "CORRUPT: 2 of" in err
    assert f"first: chunk {bad[0]} of region 'mem.raw'" in err


def test_verify_damaged_index_and_missing_file(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mem.lzs"
    assert main(["snapshot", "create", "--from-raw", str(raw), "-o", str(out), "-q"]) == 0
    flip_bit(out, out.stat().st_size - 100)
    assert main(["snapshot", "verify", str(out)]) == 1
    assert "corrupt snapshot" in capsys.readouterr().err
    assert main(["snapshot", "inspect", str(out)]) == 1
    assert main(["snapshot", "verify", str(tmp_path / "nope")]) == 2


def test_usage_errors(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.lzs")
    assert main(["snapshot", "create", "--from-raw", str(raw), "-o", out, "--chunk-size", "1000"]) == 2
    assert "chunk size" in capsys.readouterr().err
    assert main(["snapshot", "create", "--from-raw", str(tmp_path / "missing"), "-o", out]) == 1
    with pytest.raises(SystemExit):
        main(["snapshot", "create", "-o", out])  # no source given
    capsys.readouterr()
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1
    assert main(["snapshot", "create", "--from-pid", str(pid), "-o", out]) == 1
    assert f"no process with pid {pid}" in capsys.readouterr().err


def test_parse_size() -> None:
    assert parse_size("65536") == 65536
    assert parse_size("64K") == parse_size("64KiB") == parse_size("64kb") == 64 << 10
    assert parse_size("1M") == 1 << 20
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_from_pid_with_progress_bar(tmp_path: Path) -> None:
    """The real command in a subprocess, progress bar on: captures a sleeping child."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        out = tmp_path / "p.lzs"
        res = subprocess.run(
            [sys.executable, "-m", "lazypaged", "snapshot", "create", "--from-pid", str(child.pid), "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert "regions" in res.stdout
        assert child.poll() is None
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().rpartition(")")[2].split()[0] != "T"
        with SnapshotReader(out) as rd:
            assert any(r.name == "[stack]" for r in rd.regions)
    finally:
        child.kill()
        child.wait()


# -- where create writes ------------------------------------------------------------------


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _no_leftovers(d: Path) -> None:
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")], list(d.iterdir())


@pytest.mark.parametrize("force", [False, True])
def test_create_refuses_to_write_over_its_input(
    tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str], force: bool
) -> None:
    before = raw.read_bytes()
    link = tmp_path / "alias.raw"
    link.symlink_to(raw.name)
    hard = tmp_path / "hard.raw"
    os.link(raw, hard)
    for out in (raw, link, hard):
        capsys.readouterr()
        argv = ["snapshot", "create", "--from-raw", str(raw), "-o", str(out), "-q"] + ["--force"] * force
        assert main(argv) == 1
        assert "is the input" in _one_line(capsys.readouterr().err)
        assert raw.read_bytes() == before
    _no_leftovers(tmp_path)


def test_create_refuses_an_existing_output_unless_forced(
    tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mem.lzs"
    out.write_bytes(b"precious")
    assert main(["snapshot", "create", "--from-raw", str(raw), "-o", str(out), "-q"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "exists" in line
    assert "--force" in line
    assert out.read_bytes() == b"precious"
    assert main(["snapshot", "create", "--from-raw", str(raw), "-o", str(out), "-q", "--force"]) == 0
    with SnapshotReader(out) as rd:
        assert rd.size == SIZE
    _no_leftovers(tmp_path)
    capsys.readouterr()
    (tmp_path / "adir").mkdir()
    assert main(["snapshot", "create", "--from-raw", str(raw), "-o", str(tmp_path / "adir"), "-q", "--force"]) == 1
    assert "directory" in _one_line(capsys.readouterr().err)


def test_create_from_pid_and_criu_refuse_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken.lzs"
    out.write_bytes(b"precious")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert main(["snapshot", "create", "--from-pid", str(child.pid), "-o", str(out), "-q"]) == 1
        assert "exists" in _one_line(capsys.readouterr().err)
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().rpartition(")")[2].split()[0] != "T"  # never stopped
    finally:
        child.kill()
        child.communicate()
    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(bytes(PAGE))
    assert main(["snapshot", "create", "--from-criu", str(images), "-o", str(out), "-q"]) == 1
    assert "exists" in _one_line(capsys.readouterr().err)
    assert out.read_bytes() == b"precious"
    # An output that is one of the images is refused even when forced.
    target = images / "pages-1.img"
    assert main(["snapshot", "create", "--from-criu", str(images), "-o", str(target), "-q", "--force"]) == 1
    assert "is the input" in _one_line(capsys.readouterr().err)
    assert target.read_bytes() == bytes(PAGE)


def test_failed_create_leaves_nothing_under_the_output_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "odd.raw"
    bad.write_bytes(bytes(PAGE + 7))
    out = tmp_path / "out.lzs"
    assert main(["snapshot", "create", "--from-raw", str(bad), "-o", str(out), "-q"]) == 2  # unusable input
    _one_line(capsys.readouterr().err)
    empty = tmp_path / "images"
    empty.mkdir()
    assert main(["snapshot", "create", "--from-criu", str(empty), "-o", str(out), "-q"]) == 1
    _one_line(capsys.readouterr().err)
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_library_create_from_raw_refuses_its_input_as_output(raw: Path) -> None:
    from lazypaged.snapshot import create_from_raw

    before = raw.read_bytes()
    with pytest.raises(ValueError, match="is the input"):
        create_from_raw(raw, raw)
    assert raw.read_bytes() == before


# -- damaged input: one plain line each ---------------------------------------------------


def _damaged_inputs(tmp_path: Path, raw: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, what its one line must say)."""
    good = tmp_path / "good.lzs"
    assert main(["snapshot", "create", "--from-raw", str(raw), "-o", str(good), "-q"]) == 0
    blob = good.read_bytes()
    with SnapshotReader(good) as rd:
        index_at = rd.header.index_offset
        chunk = next(c for c in rd.index.chunks if c.kind == 2)

    def variant(name: str, data: bytes, flips: tuple[int, ...] = ()) -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        for at in flips:
            flip_bit(p, at)
        return p

    fifo = tmp_path / "fifo.lzs"
    os.mkfifo(fifo)
    (tmp_path / "dir.lzs").mkdir()
    return {
        "empty": (variant("empty.lzs", b""), "truncated"),
        "truncated header": (variant("short.lzs", blob[:40]), "truncated"),
        "truncated file": (variant("cut.lzs", blob[:-5]), "truncated"),
        "flipped header": (variant("hdr.lzs", blob, (30,)), "header checksum"),
        "flipped magic": (variant("magic.lzs", blob, (10,)), "damaged snapshot header"),
        "flipped index": (variant("index.lzs", blob, (index_at + 60,)), "index checksum"),
        "flipped chunk": (variant("chunk.lzs", blob, (chunk.frame_offset + chunk.frame_size // 2,)), "CORRUPT"),
        "zeros": (variant("zeros.lzs", bytes(2 * PAGE)), "not a lazypaged snapshot"),
        "directory": (tmp_path / "dir.lzs", "not a regular file"),
        "fifo": (fifo, "not a regular file"),
        "missing": (tmp_path / "missing.lzs", "No such file"),
    }


def test_verify_and_inspect_say_one_plain_line_for_damaged_input(tmp_path: Path, raw: Path) -> None:
    for case, (path, says) in _damaged_inputs(tmp_path, raw).items():
        for cmd in (["verify", "-q"], ["inspect"], ["inspect", "--json"]):
            # A subprocess: a FIFO must not hang the command, and nothing may print a traceback.
            res = subprocess.run(
                [sys.executable, "-m", "lazypaged", "snapshot", cmd[0], str(path), *cmd[1:]],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if case == "flipped chunk" and cmd[0] == "inspect":
                assert res.returncode == 0, res.stderr  # the index is sound; only verify reads chunks
                continue
            line = _one_line(res.stderr)
            assert res.returncode in (1, 2), (case, cmd, res)
            assert line.startswith("lazypaged: "), (case, line)
            assert says in line, (case, cmd, line)
            assert not line.rstrip().endswith(":"), (case, line)
            for internal in ("Error", "errno", "None", "b'", "Traceback"):
                assert internal not in line, (case, line)
            if case in ("zeros", "directory", "fifo", "missing"):
                assert "corrupt" not in line, (case, line)  # not a damaged snapshot: not a snapshot at all
