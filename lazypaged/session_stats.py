"""What a session counts, and how it ended."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class SessionStats:
    faults: int = 0
    pages_total: int = 0
    pages_missing: int = 0
    bytes_copied: int = 0
    bytes_zero: int = 0
    bytes_fault: int = 0
    bytes_fill: int = 0
    bytes_poisoned: int = 0
    source_errors: int = 0
    fault_ns: int = 0
    #: Fault service time histogram: bucket k counts faults of < 2**k µs.
    latency_us_log2: list[int] = field(default_factory=lambda: [0] * 32)
    started: float = field(default_factory=time.monotonic)
    first_fault_at: float | None = None
    ended: float | None = None

    def percentile_us(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile fault latency."""
        total = sum(self.latency_us_log2)
        if not total:
            return None
        want, seen = q * total, 0
        for k, n in enumerate(self.latency_us_log2):
            seen += n
            if seen >= want:
                return float(1 << k)
        return float(1 << 31)

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


@dataclass(frozen=True)
class Outcome:
    """How a session ended: ``complete``, ``target_exited`` or ``failed``."""

    state: str
    code: str = ""
    message: str = ""


