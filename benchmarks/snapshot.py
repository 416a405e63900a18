"""Snapshot group: restore throughput from lazypaged snapshots, zstd vs raw layout.

The image (``opts.size``, 1 GiB by default) is a realistic mix made with a
fixed seed, page by page: 30 % zero pages (never-written memory), 40 %
text-like pages (a random line of words repeated, compresses well) and 30 %
random pages (does not compress). It is turned into two snapshots with
``lazypaged snapshot create`` at the default settings: zstd level 3 with
64 KiB chunks, and the raw layout (128 KiB chunks, served zero-copy).

Each run restores a fresh target from each snapshot, and from the raw image
file itself as a baseline (order rotating), and write-touches every page in
sequence through ``target.py lp-seq``; the time from ``restore()`` to the
last touch gives the throughput. The daemon's CPU time per restore is read
from schedstat. The daemon runs with the same [session] defaults as the core
group, working-set replay off as there: otherwise the first restore of each
file records and every later one replays that record (an uncompressed copy)
instead of reading the snapshot. Creation is timed once per layout (it
writes the file and fsyncs it).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from lazypaged.snapshot import create_from_raw

from . import common
from .common import PAGE, GiB, GroupResult, MiB, Options, Ratio, Row, log
from .core import EXTRA_TOML, SESSION_TOML, _target

NAME = "snapshot"
DESCRIPTION = "restore from zstd and raw-layout snapshots; create throughput and ratio"

_WORDS = b"alpha beta gamma delta page fault region chunk table index value key".split()


def make_mixed_image(path: Path, size: int, seed: int = 1) -> str:
    """Write the zero/text/random page mix described in the module docstring."""
    rnd = random.Random(seed)
    block = 8 * MiB
    with open(path, "wb") as f:
        for _ in range(0, size, block):
            out = bytearray(block)
            for p in range(0, block, PAGE):
                k = rnd.random()
                if k < 0.3:
                    continue
                if k < 0.7:
                    line = b" ".join(rnd.choice(_WORDS) for _ in range(12)) + b"\n"
                    out[p : p + PAGE] = (line * (PAGE // len(line) + 1))[:PAGE]
                else:
                    out[p : p + PAGE] = rnd.randbytes(PAGE)
            f.write(out)
    return "30 % zero, 40 % text-like, 30 % random pages"


def run(opts: Options) -> GroupResult:
    bins = common.build_c()
    lib = bins["touch"]
    s: dict[str, list[float]] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lazypaged-bench-", dir=opts.workdir) as tmp:
        work = Path(tmp)
        snaps = work / "snapshots"
        snaps.mkdir()
        image = snaps / "mixed.img"
        what = make_mixed_image(image, opts.size)
        common.warm_page_cache(image)
        created = {}
        for layout in ("zstd", "raw"):
            out = snaps / f"mixed.{layout}.lzs"
            st = create_from_raw(image, out, raw=layout == "raw")
            created[layout] = st
            log(opts, f"created {out.name}: {st.file_size / MiB:.0f} MiB in {st.seconds:.2f} s")
            common.warm_page_cache(out)
        with common.lazypaged_daemon(work, snaps, SESSION_TOML, EXTRA_TOML) as daemon:
            for i in range(opts.runs):
                order = ["zstd", "raw", "image"]
                for layout in order[i % 3 :] + order[: i % 3]:
                    name = image.name if layout == "image" else f"mixed.{layout}.lzs"
                    cpu0 = common.cpu_ns(daemon.proc.pid)
                    r = _target(opts, lib, image, "lp-seq", "--socket", str(daemon.socket), "--name", name)
                    common.collect(s, f"{layout}_cpu_s", (common.cpu_ns(daemon.proc.pid) - cpu0) / 1e9)
                    common.collect(s, f"{layout}_seq_s", r["ns"] / 1e9)
            problems = [ln for ln in daemon.log.read_text(errors="replace").splitlines() if '"error"' in ln]
    if problems:
        notes.append(f"lazypaged logged {len(problems)} error(s), first: {problems[0][:300]}")
    gib = opts.size / GiB
    z, raw = created["zstd"], created["raw"]
    res = GroupResult(NAME)
    res.setup = [
        f"image: {opts.size_mib} MiB, {what}; snapshots at the defaults (zstd level 3, 64 KiB chunks / raw 128 KiB)",
        f"{opts.runs} runs, medians [min–max]; sequential write-touch of every page via target.py lp-seq",
    ]
    res.rows += [
        Row(
            "zstd_restore_gibps",
            "restore from zstd snapshot, touch every page",
            "GiB/s",
            tuple(gib / x for x in s["zstd_seq_s"]),
        ),
        Row(
            "raw_restore_gibps",
            "restore from raw-layout snapshot (zero-copy)",
            "GiB/s",
            tuple(gib / x for x in s["raw_seq_s"]),
        ),
        Row(
            "image_restore_gibps",
            "restore from the raw image file itself (baseline)",
            "GiB/s",
            tuple(gib / x for x in s["image_seq_s"]),
        ),
        Row("zstd_daemon_cpu_s", "daemon CPU per restore, zstd snapshot", "s", tuple(s["zstd_cpu_s"])),
        Row("raw_daemon_cpu_s", "daemon CPU per restore, raw layout", "s", tuple(s["raw_cpu_s"])),
        Row("image_daemon_cpu_s", "daemon CPU per restore, raw image file", "s", tuple(s["image_cpu_s"])),
        Row("create_zstd_mibps", "snapshot create, zstd level 3 (incl. fsync)", "MiB/s", (z.size / MiB / z.seconds,)),
        Row("create_raw_mibps", "snapshot create, raw layout (incl. fsync)", "MiB/s", (raw.size / MiB / raw.seconds,)),
        Row("zstd_ratio", "compression ratio (memory / file)", "×", (z.ratio,)),
        Row("zero_fraction", "zero pages", "%", (100 * z.zero_fraction,)),
    ]
    zstd_gibps = gib / common.median(s["zstd_seq_s"])
    raw_gibps = gib / common.median(s["raw_seq_s"])
    res.ratios += [
        Ratio("zstd_restore_gib_s", zstd_gibps, 1.0, ">=", "restore from the zstd snapshot, GiB/s", "GiB/s"),
        Ratio("zstd_vs_raw", zstd_gibps / raw_gibps, 0.0, ">=", "zstd / raw-layout restore speed (informational)"),
    ]
    res.notes += notes
    return res
