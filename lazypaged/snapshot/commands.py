"""``lazypaged snapshot create|inspect|verify``: the command-line front.

Exit codes follow the rest of the CLI: 0 success (for verify: sound),
1 failure (for verify: corrupt; for create: an output that would replace its
input or, without ``--force``, an existing file), 2 usage error or unusable
input. Every failure is one line on stderr, never a traceback.

``create`` writes under a temporary name in the output's directory and moves
the finished file into place at the end, as ``zstd`` does: a failed or
interrupted run leaves nothing under the output name, and an existing file
is only replaced with ``--force`` (and never when it is the input itself).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..criu.images import ImageError
from . import format as fmt
from .capture import CaptureError, Mapping, capture_pid
from .reader import Damage, SnapshotReader
from .writer import DEFAULT_LEVEL, WriteStats, create_from_raw

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'64K', '64KiB', '1M', '65536' → bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 64K, 1M)")
    return int(m[1]) * _UNITS[m[2].lower()]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snap = sub.add_parser("snapshot", help="create, inspect and verify lazypaged snapshot files")
    ssub = snap.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    create = ssub.add_parser("create", help="write a snapshot from a raw memory file or a live process")
    src = create.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-raw", metavar="FILE", help="a flat memory image (holes and zero pages detected)")
    src.add_argument("--from-pid", metavar="PID", type=int, help="a live process (stopped while captured)")
    src.add_argument("--from-criu", metavar="DIR", help="a CRIU images directory (one region per lazy range)")
    create.add_argument("-o", "--output", required=True, metavar="OUT", help="snapshot file to write")
    create.add_argument("-f", "--force", action="store_true", help="replace OUT if it exists (never the input)")
    create.add_argument("--level", type=int, default=DEFAULT_LEVEL, help=f"zstd level (default {DEFAULT_LEVEL})")
    create.add_argument(
        "--chunk-size",
        type=parse_size,
        metavar="SIZE",
        help=f"bytes per chunk (default {human(fmt.DEFAULT_CHUNK)}, {human(fmt.DEFAULT_RAW_CHUNK)} with --raw)",
    )
    create.add_argument("--raw", action="store_true", help="store chunks uncompressed (served zero-copy from an mmap)")
    create.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    inspect = ssub.add_parser("inspect", help="show a snapshot's regions, sizes and layout")
    inspect.add_argument("image")
    inspect.add_argument("--json", action="store_true")
    verify = ssub.add_parser("verify", help="read and check every chunk (exit 0 sound, 1 corrupt)")
    verify.add_argument("image")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    cmd: Callable[[argparse.Namespace], int] = {"create": _create, "inspect": _inspect, "verify": _verify}[
        args.snapshot_command
    ]
    return cmd(args)


def _err(msg: str) -> None:
    print(f"lazypaged: {msg}", file=sys.stderr)


@contextmanager
def _progress(quiet: bool, label: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """(advance, set_total) callbacks driving a bytes/s progress bar on stderr."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)
        yield (lambda n: bar.advance(task, n)), (lambda t: bar.update(task, total=t))


def summary(st: WriteStats) -> str:
    speed = st.size / st.seconds / (1 << 20) if st.seconds else 0.0
    return (
        f"{st.path}: {human(st.size)} in {st.regions} region{'s' * (st.regions != 1)}, "
        f"{st.zero_fraction:.1%} zero, {human(st.file_size)} on disk (ratio {st.ratio:.2f}), "
        f"{st.seconds:.2f} s ({speed:.0f} MiB/s)"
    )


class OutputRefused(Exception):
    """The output name may not be written: it is the input, or exists without --force."""


def _inputs(args: argparse.Namespace) -> list[Path]:
    """Files the run reads, which its output must never replace."""
    if args.from_raw is not None:
        return [Path(args.from_raw)]
    if args.from_criu is not None:
        d = Path(args.from_criu)
        try:
            return [d, *d.iterdir()]
        except OSError:
            return [d]  # unreadable: the conversion itself will say so
    return []


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Raise OutputRefused unless ``out`` may be written (checked again when
    the file is moved into place, where an existing one is not replaced
    unless forced)."""
    try:
        st = os.stat(out)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputRefused(f"{out}: {e.strerror}") from None
    for p in inputs:
        try:
            same = os.path.samestat(st, os.stat(p))
        except OSError:
            continue
        if same:
            raise OutputRefused(f"output {out} is the input {p}: write the snapshot to another file")
    if stat.S_ISDIR(st.st_mode):
        raise OutputRefused(f"output {out} is a directory")
    if not force:
        raise OutputRefused(f"output {out} exists: use --force to replace it")


def _place(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished file to its name; without ``force`` only if nothing
    took the name meanwhile (a hard link fails rather than replaces)."""
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise OutputRefused(
            f"output {out} appeared while the snapshot was written: use --force to replace it"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A filesystem without hard links: the check and the rename are two steps.
        if os.path.lexists(out):
            raise OutputRefused(f"output {out} exists: use --force to replace it") from None
        os.rename(tmp, out)
        return
    os.unlink(tmp)


def _create(args: argparse.Namespace) -> int:
    out = Path(args.output)
    try:
        check_output(out, _inputs(args), args.force)
    except OutputRefused as e:
        _err(str(e))
        return EXIT_FAIL
    tmp = out.with_name(f".{out.name}.create-{os.getpid()}")
    try:
        st = _write(args, tmp)
        # Inputs are checked once more: the output may have been made a link to one meanwhile.
        check_output(out, _inputs(args), force=True)
        _place(tmp, out, args.force)
        st = dataclasses.replace(st, path=out)
    except OutputRefused as e:
        _err(str(e))
        return EXIT_FAIL
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    except CaptureError as e:
        _err(f"capture failed: {e}")
        return EXIT_FAIL
    except ImageError as e:
        _err(f"CRIU images: {e}")
        return EXIT_FAIL
    except OSError as e:
        _err(f"{e.filename}: {e.strerror or e}" if e.filename else (e.strerror or str(e)))
        return EXIT_FAIL
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    print(summary(st))
    return EXIT_OK


def _write(args: argparse.Namespace, dest: Path) -> WriteStats:
    """Run the capture or conversion the arguments ask for, into ``dest``."""
    opts = {"chunk_size": args.chunk_size, "level": args.level, "raw": args.raw}
    with _progress(args.quiet, "capturing" if args.from_pid else "compressing") as (advance, total):
        if args.from_raw is not None:
            total(os.stat(args.from_raw).st_size)
            return create_from_raw(args.from_raw, dest, progress=advance, **opts)
        if args.from_criu is not None:
            from ..criu.convert import create_from_criu

            return create_from_criu(args.from_criu, dest, progress=advance, **opts)

        def sized(maps: list[Mapping]) -> None:
            total(sum(m.length for m in maps))

        return capture_pid(args.from_pid, dest, progress=advance, on_stopped=sized, **opts)


def describe(rd: SnapshotReader) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain data."""
    h, idx = rd.header, rd.index
    regions: list[dict[str, Any]] = []
    for r, zeros in zip(idx.regions, idx.zero_pages, strict=True):
        chunks = idx.chunks[r.first_chunk : r.first_chunk + r.chunk_count]
        stored = sum(c.frame_size for c in chunks if c.kind != fmt.ChunkKind.ZERO)
        zero = zeros.count(1) * r.page_size
        regions.append(
            {
                "name": r.name,
                "start": r.start,
                "length": r.length,
                "page_size": r.page_size,
                "offset": r.offset,
                "chunks": r.chunk_count,
                "zero_bytes": zero,
                "stored_bytes": stored,
            }
        )
    size = idx.size
    zero_total = sum(r["zero_bytes"] for r in regions)
    return {
        "path": rd.path,
        "version": h.version,
        "layout": "raw" if h.raw else "zstd",
        "checksum": fmt.CHECKSUM_NAMES[h.checksum_kind],
        "chunk_size": h.chunk_size,
        "chunks": h.chunk_count,
        "size": size,
        "file_size": h.file_size,
        "zero_fraction": zero_total / size,
        "ratio": size / h.file_size,
        "regions": regions,
    }


def _open(image: str) -> SnapshotReader | int:
    try:
        return SnapshotReader(image)
    except fmt.NotASnapshot as e:
        _err(str(e))
        return EXIT_FAIL
    except fmt.FormatError as e:
        _err(f"corrupt snapshot: {e}")
        return EXIT_FAIL
    except OSError as e:
        _err(f"{image}: {e.strerror or e}")
        return EXIT_USAGE


def _inspect(args: argparse.Namespace) -> int:
    rd = _open(args.image)
    if isinstance(rd, int):
        return rd
    with rd:
        d = describe(rd)
    if args.json:
        print(json.dumps(d, indent=2))
        return EXIT_OK
    print(f"{d['path']}: lazypaged snapshot v{d['version']}, {d['layout']} layout")
    print(f"  chunk size {human(d['chunk_size'])}, {d['chunks']} chunks, checksum {d['checksum']}")
    print(
        f"  memory {human(d['size'])}, file {human(d['file_size'])}, "
        f"zero {d['zero_fraction']:.1%}, ratio {d['ratio']:.2f}"
    )
    print(f"  {'region':<40} {'start':>18} {'length':>12} {'zero':>6} {'stored':>12}")
    for r in d["regions"]:
        start = f"{r['start']:#x}" if r["start"] is not None else "-"
        print(
            f"  {r['name'][-40:]:<40} {start:>18} {human(r['length']):>12} "
            f"{r['zero_bytes'] / r['length']:>6.1%} {human(r['stored_bytes']):>12}"
        )
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    rd = _open(args.image)
    if isinstance(rd, int):
        return rd
    t0 = time.monotonic()
    bad: list[Damage] = []
    with rd, _progress(args.quiet, "verifying") as (advance, total):
        total(rd.size)
        for item in rd.verify():
            if isinstance(item, Damage):
                bad.append(item)
            else:
                advance(item)
        chunks = len(rd.index.chunks)
    if bad:
        first = bad[0]
        _err(
            f"{args.image}: CORRUPT: {len(bad)} of {chunks} chunks bad; first: chunk {first.chunk} "
            f"of region {first.region!r} (source offset {first.offset:#x}): {first.what}"
        )
        return EXIT_FAIL
    print(f"{args.image}: sound: {chunks} chunks checked in {time.monotonic() - t0:.2f} s")
    return EXIT_OK
