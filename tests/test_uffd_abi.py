"""lazypaged/uffd/abi.py against the installed kernel header.

A small C program, generated from the tables below and built with gcc, prints
what <linux/userfaultfd.h> says: every constant and ioctl number, the size of
every struct, the offset, size and signedness of every field, and the bytes
of a few ``uffd_msg`` records filled in by C. The tests compare those with
abi.py and with ``events.decode``.

The header on a build host may be older than the running kernel. A name it
lacks (POISON, MOVE, newer features) is reported as a skipped case of its
own, naming what the header lacks; it never passes silently.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lazypaged.uffd import Fork, PageFault, Remap, Remove, Unmap, abi, decode

GCC = shutil.which("gcc") or shutil.which("cc")
if GCC is None:
    pytest.skip("no C compiler (gcc/cc) to read <linux/userfaultfd.h> with", allow_module_level=True)

HEADER = "linux/userfaultfd.h"
TIMEOUT = 60  # seconds for one compiler run: generous on a shared 2-vCPU box

# (name in the C headers, attribute of abi.py)
CONSTANTS: list[tuple[str, str]] = [
    ("SYS_userfaultfd", "SYS_USERFAULTFD"),
    ("UFFD_USER_MODE_ONLY", "UFFD_USER_MODE_ONLY"),
    ("USERFAULTFD_IOC", "USERFAULTFD_IOC"),
    ("USERFAULTFD_IOC_NEW", "USERFAULTFD_IOC_NEW"),
    ("UFFD_API", "UFFD_API"),
    ("UFFDIO", "UFFDIO"),
    # ioctl bit numbers (positions in the ``ioctls`` masks)
    ("_UFFDIO_REGISTER", "_UFFDIO_REGISTER"),
    ("_UFFDIO_UNREGISTER", "_UFFDIO_UNREGISTER"),
    ("_UFFDIO_WAKE", "_UFFDIO_WAKE"),
    ("_UFFDIO_COPY", "_UFFDIO_COPY"),
    ("_UFFDIO_ZEROPAGE", "_UFFDIO_ZEROPAGE"),
    ("_UFFDIO_MOVE", "_UFFDIO_MOVE"),
    ("_UFFDIO_WRITEPROTECT", "_UFFDIO_WRITEPROTECT"),
    ("_UFFDIO_CONTINUE", "_UFFDIO_CONTINUE"),
    ("_UFFDIO_POISON", "_UFFDIO_POISON"),
    ("_UFFDIO_API", "_UFFDIO_API"),
    # full ioctl request numbers
    ("UFFDIO_API", "UFFDIO_API_IOCTL"),
    ("UFFDIO_REGISTER", "UFFDIO_REGISTER"),
    ("UFFDIO_UNREGISTER", "UFFDIO_UNREGISTER"),
    ("UFFDIO_WAKE", "UFFDIO_WAKE"),
    ("UFFDIO_COPY", "UFFDIO_COPY"),
    ("UFFDIO_ZEROPAGE", "UFFDIO_ZEROPAGE"),
    ("UFFDIO_MOVE", "UFFDIO_MOVE"),
    ("UFFDIO_WRITEPROTECT", "UFFDIO_WRITEPROTECT"),
    ("UFFDIO_CONTINUE", "UFFDIO_CONTINUE"),
    ("UFFDIO_POISON", "UFFDIO_POISON"),
    # events and fault flags
    ("UFFD_EVENT_PAGEFAULT", "UFFD_EVENT_PAGEFAULT"),
    ("UFFD_EVENT_FORK", "UFFD_EVENT_FORK"),
    ("UFFD_EVENT_REMAP", "UFFD_EVENT_REMAP"),
    ("UFFD_EVENT_REMOVE", "UFFD_EVENT_REMOVE"),
    ("UFFD_EVENT_UNMAP", "UFFD_EVENT_UNMAP"),
    ("UFFD_PAGEFAULT_FLAG_WRITE", "UFFD_PAGEFAULT_FLAG_WRITE"),
    ("UFFD_PAGEFAULT_FLAG_WP", "UFFD_PAGEFAULT_FLAG_WP"),
    ("UFFD_PAGEFAULT_FLAG_MINOR", "UFFD_PAGEFAULT_FLAG_MINOR"),
    # features
    ("UFFD_FEATURE_PAGEFAULT_FLAG_WP", "UFFD_FEATURE_PAGEFAULT_FLAG_WP"),
    ("UFFD_FEATURE_EVENT_FORK", "UFFD_FEATURE_EVENT_FORK"),
    ("UFFD_FEATURE_EVENT_REMAP", "UFFD_FEATURE_EVENT_REMAP"),
    ("UFFD_FEATURE_EVENT_REMOVE", "UFFD_FEATURE_EVENT_REMOVE"),
    ("UFFD_FEATURE_MISSING_HUGETLBFS", "UFFD_FEATURE_MISSING_HUGETLBFS"),
    ("UFFD_FEATURE_MISSING_SHMEM", "UFFD_FEATURE_MISSING_SHMEM"),
    ("UFFD_FEATURE_EVENT_UNMAP", "UFFD_FEATURE_EVENT_UNMAP"),
    ("UFFD_FEATURE_SIGBUS", "UFFD_FEATURE_SIGBUS"),
    ("UFFD_FEATURE_THREAD_ID", "UFFD_FEATURE_THREAD_ID"),
    ("UFFD_FEATURE_MINOR_HUGETLBFS", "UFFD_FEATURE_MINOR_HUGETLBFS"),
    ("UFFD_FEATURE_MINOR_SHMEM", "UFFD_FEATURE_MINOR_SHMEM"),
    ("UFFD_FEATURE_EXACT_ADDRESS", "UFFD_FEATURE_EXACT_ADDRESS"),
    ("UFFD_FEATURE_WP_HUGETLBFS_SHMEM", "UFFD_FEATURE_WP_HUGETLBFS_SHMEM"),
    ("UFFD_FEATURE_WP_UNPOPULATED", "UFFD_FEATURE_WP_UNPOPULATED"),
    ("UFFD_FEATURE_POISON", "UFFD_FEATURE_POISON"),
    ("UFFD_FEATURE_WP_ASYNC", "UFFD_FEATURE_WP_ASYNC"),
    ("UFFD_FEATURE_MOVE", "UFFD_FEATURE_MOVE"),
    # register modes and per-ioctl mode bits
    ("UFFDIO_REGISTER_MODE_MISSING", "UFFDIO_REGISTER_MODE_MISSING"),
    ("UFFDIO_REGISTER_MODE_WP", "UFFDIO_REGISTER_MODE_WP"),
    ("UFFDIO_REGISTER_MODE_MINOR", "UFFDIO_REGISTER_MODE_MINOR"),
    ("UFFDIO_COPY_MODE_DONTWAKE", "UFFDIO_COPY_MODE_DONTWAKE"),
    ("UFFDIO_COPY_MODE_WP", "UFFDIO_COPY_MODE_WP"),
    ("UFFDIO_ZEROPAGE_MODE_DONTWAKE", "UFFDIO_ZEROPAGE_MODE_DONTWAKE"),
    ("UFFDIO_WRITEPROTECT_MODE_WP", "UFFDIO_WRITEPROTECT_MODE_WP"),
    ("UFFDIO_WRITEPROTECT_MODE_DONTWAKE", "UFFDIO_WRITEPROTECT_MODE_DONTWAKE"),
    ("UFFDIO_CONTINUE_MODE_DONTWAKE", "UFFDIO_CONTINUE_MODE_DONTWAKE"),
    ("UFFDIO_CONTINUE_MODE_WP", "UFFDIO_CONTINUE_MODE_WP"),
    ("UFFDIO_POISON_MODE_DONTWAKE", "UFFDIO_POISON_MODE_DONTWAKE"),
    ("UFFDIO_MOVE_MODE_DONTWAKE", "UFFDIO_MOVE_MODE_DONTWAKE"),
    ("UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES", "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES"),
]

# Header macros that are not single ABI values (aggregates of the ones above).
AGGREGATES = re.compile(r"^UFFD_API_(FEATURES|IOCTLS|RANGE_IOCTLS\w*|REGISTER_MODES)$")
# Header macros abi.py must know about (the reverse direction of CONSTANTS).
ABI_MACRO = re.compile(r"^(_?UFFDIO\w*|UFFD_\w+|USERFAULTFD_IOC\w*)$")


@dataclass(frozen=True)
class Field:
    c_name: str  # member designator, as offsetof() takes it
    index: int  # field of the abi struct.Struct that holds it
    size: int | None = None  # bytes actually read, if less than the whole field


@dataclass(frozen=True)
class Layout:
    c_name: str
    attr: str  # struct.Struct attribute of abi.py
    fields: list[Field]
    guard: str | None = None  # macro that exists exactly when the struct does
    extra: list[Field] = field(default_factory=list)  # union members sharing a field


def _fields(*names: str) -> list[Field]:
    return [Field(n, i) for i, n in enumerate(names)]


RANGE_HEAD = ("range.start", "range.len")
LAYOUTS: list[Layout] = [
    Layout("uffdio_api", "UFFDIO_API_STRUCT", _fields("api", "features", "ioctls")),
    Layout("uffdio_range", "UFFDIO_RANGE_STRUCT", _fields("start", "len")),
    Layout("uffdio_register", "UFFDIO_REGISTER_STRUCT", _fields(*RANGE_HEAD, "mode", "ioctls")),
    Layout("uffdio_copy", "UFFDIO_COPY_STRUCT", _fields("dst", "src", "len", "mode", "copy")),
    Layout("uffdio_zeropage", "UFFDIO_ZEROPAGE_STRUCT", _fields(*RANGE_HEAD, "mode", "zeropage")),
    Layout("uffdio_writeprotect", "UFFDIO_WRITEPROTECT_STRUCT", _fields(*RANGE_HEAD, "mode"), "UFFDIO_WRITEPROTECT"),
    Layout("uffdio_continue", "UFFDIO_CONTINUE_STRUCT", _fields(*RANGE_HEAD, "mode", "mapped"), "UFFDIO_CONTINUE"),
    Layout("uffdio_poison", "UFFDIO_POISON_STRUCT", _fields(*RANGE_HEAD, "mode", "updated"), "UFFDIO_POISON"),
    Layout("uffdio_move", "UFFDIO_MOVE_STRUCT", _fields("dst", "src", "len", "mode", "move"), "UFFDIO_MOVE"),
    Layout(
        "uffd_msg",
        "UFFD_MSG_STRUCT",
        [
            *_fields("event", "reserved1", "reserved2", "reserved3"),
            Field("arg.pagefault.flags", 4),
            Field("arg.pagefault.address", 5),
            Field("arg.reserved.reserved3", 6),
        ],
        extra=[
            # events.decode reads these out of the three u64 of the union
            Field("arg.pagefault.feat.ptid", 6, 4),
            Field("arg.fork.ufd", 4, 4),
            Field("arg.remap.from", 4),
            Field("arg.remap.to", 5),
            Field("arg.remap.len", 6),
            Field("arg.remove.start", 4),
            Field("arg.remove.end", 5),
            Field("arg.reserved.reserved1", 4),
            Field("arg.reserved.reserved2", 5),
        ],
    ),
]

# uffd_msg records built by C, with what events.decode must make of them.
ADDR = 0x7F12_3456_7000
MESSAGES: list[tuple[str, object]] = [
    (
        "m.event = UFFD_EVENT_PAGEFAULT; m.arg.pagefault.flags = UFFD_PAGEFAULT_FLAG_WRITE;"
        f" m.arg.pagefault.address = {ADDR:#x}ULL; m.arg.pagefault.feat.ptid = 0x89abcdefU;",
        PageFault(ADDR, abi.UFFD_PAGEFAULT_FLAG_WRITE, 0x89ABCDEF),
    ),
    (
        "m.event = UFFD_EVENT_PAGEFAULT; m.arg.pagefault.flags = 0; m.arg.pagefault.address = 0x1000;",
        PageFault(0x1000, 0, 0),
    ),
    ("m.event = UFFD_EVENT_FORK; m.arg.fork.ufd = 4242;", Fork(4242)),
    (
        f"m.event = UFFD_EVENT_REMAP; m.arg.remap.from = {ADDR:#x}ULL;"
        f" m.arg.remap.to = {ADDR * 2:#x}ULL; m.arg.remap.len = 0x300000;",
        Remap(ADDR, ADDR * 2, 0x300000),
    ),
    (
        f"m.event = UFFD_EVENT_REMOVE; m.arg.remove.start = {ADDR:#x}ULL; m.arg.remove.end = {ADDR + 0x2000:#x}ULL;",
        Remove(ADDR, ADDR + 0x2000),
    ),
    (
        f"m.event = UFFD_EVENT_UNMAP; m.arg.remove.start = {ADDR:#x}ULL; m.arg.remove.end = {ADDR + 0x5000:#x}ULL;",
        Unmap(ADDR, ADDR + 0x5000),
    ),
]


def _c_source() -> str:
    out = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <string.h>",
        "#include <sys/ioctl.h>",
        "#include <sys/syscall.h>",
        "#include <linux/version.h>",
        f"#include <{HEADER}>",
        "#define SIGNED(e) ((__typeof__(e))-1 < (__typeof__(e))0)",
        "int main(void) {",
        '    printf("version %d\\n", LINUX_VERSION_CODE);',
    ]
    for c_name, _attr in CONSTANTS:
        out += [
            f"#ifdef {c_name}",
            f'    printf("const {c_name} %lld\\n", (long long)({c_name}));',
            "#endif",
        ]
    for lay in LAYOUTS:
        if lay.guard:
            out.append(f"#ifdef {lay.guard}")
        out.append(f'    printf("size {lay.c_name} %zu\\n", sizeof(struct {lay.c_name}));')
        for f in lay.fields + lay.extra:
            member = f"((struct {lay.c_name} *)0)->{f.c_name}"
            out.append(
                f'    printf("field {lay.c_name}.{f.c_name} %zu %zu %d\\n", '
                f"offsetof(struct {lay.c_name}, {f.c_name}), sizeof({member}), SIGNED({member}));"
            )
        if lay.guard:
            out.append("#endif")
    for i, (code, _expected) in enumerate(MESSAGES):
        out += [
            "    {",
            "        struct uffd_msg m;",
            "        memset(&m, 0, sizeof(m));",
            f"        {code}",
            f'        printf("msg {i} ");',
            '        for (size_t k = 0; k < sizeof(m); k++) printf("%02x", ((unsigned char *)&m)[k]);',
            '        printf("\\n");',
            "    }",
        ]
    out += ["    return 0;", "}"]
    return "\n".join(out) + "\n"


@dataclass
class Header:
    version: str
    consts: dict[str, int]
    sizes: dict[str, int]
    fields: dict[str, tuple[int, int, bool]]  # offset, size, signed
    msgs: dict[int, bytes]
    macros: set[str]

    def lacks(self, what: str) -> str:
        return f"the installed <{HEADER}> (Linux {self.version} headers) lacks {what}"


def _compile_error(proc: subprocess.CompletedProcess[str]) -> None:
    if "userfaultfd.h" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip(f"<{HEADER}> is not installed (kernel headers missing)")
    pytest.fail(f"gcc failed on the generated program:\n{proc.stderr}")


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> Header:
    assert GCC is not None
    tmp: Path = tmp_path_factory.mktemp("uffd_abi")
    src, exe = tmp / "probe.c", tmp / "probe"
    src.write_text(_c_source())
    built = subprocess.run(
        [GCC, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if built.returncode:
        _compile_error(built)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=TIMEOUT, check=True)
    macros = subprocess.run(
        [GCC, "-dM", "-E", "-x", "c", "-"],
        input=f"#include <{HEADER}>\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if macros.returncode:
        _compile_error(macros)

    h = Header("?", {}, {}, {}, {}, set())
    for line in run.stdout.splitlines():
        kind, name, *rest = line.split()
        if kind == "version":
            code = int(name)
            h.version = f"{code >> 16}.{(code >> 8) & 0xFF}"
        elif kind == "const":
            h.consts[name] = int(rest[0])
        elif kind == "size":
            h.sizes[name] = int(rest[0])
        elif kind == "field":
            h.fields[name] = (int(rest[0]), int(rest[1]), rest[2] == "1")
        elif kind == "msg":
            h.msgs[int(name)] = bytes.fromhex(rest[0])
    for line in macros.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "#define":
            h.macros.add(parts[1].split("(")[0])
    return h


# -- constants -------------------------------------------------------------------------


@pytest.mark.parametrize(("c_name", "attr"), CONSTANTS, ids=[c for c, _ in CONSTANTS])
def test_constant_matches_header(header: Header, c_name: str, attr: str) -> None:
    if c_name not in header.consts:
        pytest.skip(header.lacks(c_name))
    assert getattr(abi, attr) == header.consts[c_name], f"abi.{attr} != {c_name}"


def test_every_abi_constant_is_checked() -> None:
    """An int added to abi.py without a row in CONSTANTS would escape the check."""
    checked = {attr for _c, attr in CONSTANTS} | {"UFFD_MSG_SIZE"}  # the latter: test_msg_size
    helpers = {"_IOC_NONE", "_IOC_WRITE", "_IOC_READ", "_IOWR"}  # ioctl encoding, not header values
    ints = {n for n, v in vars(abi).items() if n.lstrip("_").isupper() and isinstance(v, int)}
    assert ints - helpers - checked == set()


def test_every_header_value_is_in_abi(header: Header) -> None:
    """The reverse: a value the header defines that abi.py does not know."""
    known = {c for c, _attr in CONSTANTS}
    wanted = {m for m in header.macros if ABI_MACRO.match(m) and not AGGREGATES.match(m)}
    assert wanted - known == set()


def test_msg_size(header: Header) -> None:
    assert abi.UFFD_MSG_SIZE == header.sizes["uffd_msg"] == 32


def test_name_tables_cover_every_bit() -> None:
    features = {getattr(abi, a) for _c, a in CONSTANTS if a.startswith("UFFD_FEATURE_")}
    assert set(abi.FEATURE_NAMES) == features
    assert all(bin(bit).count("1") == 1 for bit in features)
    numbers = {getattr(abi, a) for _c, a in CONSTANTS if a.startswith("_UFFDIO_")}
    assert set(abi.IOCTL_NAMES) == numbers
    assert len(set(abi.IOCTL_NAMES.values())) == len(numbers)


def test_ioctl_requests_carry_their_numbers() -> None:
    """The low byte of every request is its _UFFDIO_* number, the next byte the type."""
    for _c, attr in CONSTANTS:
        if attr.startswith("_UFFDIO_"):
            request = abi.UFFDIO_API_IOCTL if attr == "_UFFDIO_API" else getattr(abi, attr[1:])
            assert request & 0xFF == getattr(abi, attr)
            assert (request >> 8) & 0xFF == abi.UFFDIO


# -- struct layouts ------------------------------------------------------------------------------

SIZE_CASES = [pytest.param(lay, id=lay.c_name) for lay in LAYOUTS]
FIELD_CASES = [
    pytest.param(lay, f, id=f"{lay.c_name}.{f.c_name}") for lay in LAYOUTS for f in (*lay.fields, *lay.extra)
]


def _py_offset(s: struct.Struct, index: int) -> tuple[int, int, bool]:
    """Offset, size and signedness of field ``index`` of a '<'-prefixed Struct."""
    fmt = s.format
    assert fmt[0] == "<", f"unexpected format {fmt!r}"
    assert fmt[1:].isalpha(), f"unexpected format {fmt!r}"
    code = fmt[1 + index]
    return struct.calcsize(fmt[: 1 + index]), struct.calcsize("<" + code), code.islower()


@pytest.mark.parametrize("lay", SIZE_CASES)
def test_struct_size_matches_header(header: Header, lay: Layout) -> None:
    if lay.c_name not in header.sizes:
        pytest.skip(header.lacks(f"struct {lay.c_name} ({lay.guard} is not defined)"))
    s: struct.Struct = getattr(abi, lay.attr)
    assert s.size == header.sizes[lay.c_name]
    assert len(s.format) - 1 == len(lay.fields), "every field of the Struct is checked"


@pytest.mark.parametrize(("lay", "f"), FIELD_CASES)
def test_field_layout_matches_header(header: Header, lay: Layout, f: Field) -> None:
    key = f"{lay.c_name}.{f.c_name}"
    if key not in header.fields:
        pytest.skip(header.lacks(f"struct {lay.c_name}"))
    offset, size, signed = _py_offset(getattr(abi, lay.attr), f.index)
    c_offset, c_size, c_signed = header.fields[key]
    assert c_offset == offset
    if f.size is not None:  # read as the low bytes of a wider little-endian field
        assert c_size == f.size
        assert not c_signed
    else:
        assert (c_size, c_signed) == (size, signed)


# -- decode() against records laid out by C -----------------------------------------------------------


MSG_CASES = [pytest.param(i, e, id=type(e).__name__) for i, (_c, e) in enumerate(MESSAGES)]


@pytest.mark.parametrize(("i", "expected"), MSG_CASES)
def test_decode_reads_c_built_message(header: Header, i: int, expected: object) -> None:
    raw = header.msgs[i]
    assert len(raw) == abi.UFFD_MSG_SIZE
    assert decode(raw) == [expected]


def test_decode_reads_c_built_batch(header: Header) -> None:
    raw = b"".join(header.msgs[i] for i in range(len(MESSAGES)))
    assert decode(raw) == [e for _c, e in MESSAGES]
