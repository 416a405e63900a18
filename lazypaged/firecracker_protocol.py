"""Firecracker's UFFD handshake, sans-IO.

Firecracker's UFFD memory backend connects to a Unix socket and sends one
message: a UTF-8 JSON array with one object per guest memory region, with
the uffd attached (SCM_RIGHTS). It registered the regions itself and
expects no reply. Each object carries:

* ``base_host_virt_addr``: where the region is mapped in Firecracker;
* ``size``: its length in bytes;
* ``offset``: where its bytes start in the snapshot's memory file;
* ``page_size`` (bytes) or, from older releases, ``page_size_kib`` — which,
  despite its name, also holds bytes.

The JSON may arrive over several reads; ``HandshakeDecoder.feed`` returns
the regions once the array is complete. Anything that is not a valid
handshake raises ``FirecrackerProtocolError``; nothing else escapes.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, Final

#: A VM has a handful of regions; 1 MiB of JSON is far beyond any real one
#: and bounds what a client can make us buffer.
MAX_HANDSHAKE: Final = 1 << 20
MAX_REGIONS: Final = 1024
MIN_PAGE: Final = 4096
_U64: Final = (1 << 64) - 1


class FirecrackerProtocolError(ValueError):
    """The peer's handshake is not a valid Firecracker region list."""


@dataclass(frozen=True, slots=True)
class GuestRegion:
    base: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        return self.base + self.size


def _uint(obj: dict[str, Any], key: str, i: int) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U64:
        raise FirecrackerProtocolError(f"region {i}: {key!r} must be an unsigned 64-bit integer, not {v!r}")
    return v


def parse_regions(doc: Any) -> list[GuestRegion]:
    """Validate a decoded JSON document; regions sorted by address."""
    if not isinstance(doc, list) or not doc:
        raise FirecrackerProtocolError("the handshake must be a non-empty JSON array of regions")
    if len(doc) > MAX_REGIONS:
        raise FirecrackerProtocolError(f"{len(doc)} regions, more than {MAX_REGIONS}")
    regions = []
    for i, obj in enumerate(doc):
        if not isinstance(obj, dict):
            raise FirecrackerProtocolError(f"region {i} must be a JSON object")
        base, size, offset = (_uint(obj, k, i) for k in ("base_host_virt_addr", "size", "offset"))
        key = "page_size" if "page_size" in obj else "page_size_kib"
        page = _uint(obj, key, i)
        if page < MIN_PAGE or page & (page - 1):
            raise FirecrackerProtocolError(f"region {i}: page size {page} is not a power of two ≥ {MIN_PAGE}")
        if size == 0 or size % page or base % page:
            raise FirecrackerProtocolError(
                f"region {i}: base {base:#x} and size {size:#x} must be non-zero multiples of the page size {page}"
            )
        if offset % MIN_PAGE:
            raise FirecrackerProtocolError(f"region {i}: offset {offset:#x} is not page-aligned")
        if base + size > _U64 or offset + size > _U64:
            raise FirecrackerProtocolError(f"region {i} wraps around")
        regions.append(GuestRegion(base, size, offset, page))
    regions.sort(key=lambda r: r.base)
    for a, b in itertools.pairwise(regions):
        if b.base < a.end:
            raise FirecrackerProtocolError(f"regions at {a.base:#x} and {b.base:#x} overlap")
    return regions


class HandshakeDecoder:
    """Accumulates the handshake's bytes until the JSON array is complete.

    Completeness is found by scanning for the bracket that closes the
    top-level array (outside strings), so a handshake cut anywhere by the
    socket is simply waited for, and garbage is refused as soon as it shows.
    """

    def __init__(self, limit: int = MAX_HANDSHAKE) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._pos = 0  # bytes scanned so far
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._started = False

    def feed(self, data: bytes) -> list[GuestRegion] | None:
        """The regions once complete; None while more bytes are needed."""
        self._buf += data
        if len(self._buf) > self._limit:
            raise FirecrackerProtocolError(f"handshake longer than {self._limit} bytes")
        end = self._scan()
        if end < 0:
            return None
        if self._buf[end:].strip():
            raise FirecrackerProtocolError("bytes follow the handshake's JSON array")
        try:
            doc = json.loads(self._buf[:end].decode())
        except UnicodeDecodeError as e:
            raise FirecrackerProtocolError(f"handshake is not UTF-8: {e.reason}") from None
        except json.JSONDecodeError as e:
            raise FirecrackerProtocolError(f"handshake is not JSON: {e.msg} at byte {e.pos}") from None
        except RecursionError:
            raise FirecrackerProtocolError("handshake JSON is nested too deeply") from None
        return parse_regions(doc)

    def _scan(self) -> int:
        """Index just past the closing bracket of the array, or -1."""
        buf = self._buf
        for k in range(self._pos, len(buf)):
            c = buf[k]
            if not self._started:
                if c in b" \t\r\n":
                    continue
                if c != 0x5B:  # "["
                    raise FirecrackerProtocolError("the handshake must be a JSON array")
                self._started, self._depth = True, 1
            elif self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:  # closing quote
                    self._in_string = False
            elif c == 0x22:
                self._in_string = True
            elif c in b"[{":
                self._depth += 1
            elif c in b"]}":
                self._depth -= 1
                if self._depth == 0:
                    self._pos = k + 1
                    return k + 1
        self._pos = len(buf)
        return -1

    def finish(self) -> list[GuestRegion]:
        """The peer closed: the JSON must be complete now."""
        out = self.feed(b"")
        if out is None:
            raise FirecrackerProtocolError("the connection closed before the handshake's JSON was complete")
        return out
