"""Log hygiene: client-supplied text is truncated and escaped before it is logged, and
repeated refusals are counted and summarized instead of logged one line each."""

from __future__ import annotations

import logging
import time

#: client-supplied strings longer than this are cut in logs
MAX_LOGGED = 160


def safe(value: object, limit: int = MAX_LOGGED) -> str:
    """``value`` as printable ASCII: control and non-ASCII characters escaped
    (``\\x00``, ``\\u202e``), cut to ``limit`` characters with the length noted."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit * 4:
        text = text[:limit * 4]
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in out)
    full = len(value) if isinstance(value, str) else len(str(value))
    if len(out) > limit:
        return f"{out[:limit]}... ({full} characters)"
    return out


class RefusalLog:
    """Log the first refusal per (reason, address) in each window, then one summary.

    ``now`` is passed in by the caller (the event loop's clock), so a flood of refused
    connections costs a dict update each, not a log line each.
    """

    def __init__(self, logger: logging.Logger, window: float = 10.0,
                 max_addresses: int = 4096) -> None:
        self.log = logger
        self.window = window
        self.max_addresses = max_addresses
        self._start = time.monotonic()
        self._seen: dict[tuple[str, str], int] = {}
        self._count = 0
        self.total = 0

    def refused(self, reason: str, address: str, now: float) -> None:
        self.total += 1
        if now - self._start >= self.window:
            self.flush(now)
        key = (reason, address)
        n = self._seen.get(key)
        if n is None:
            if len(self._seen) < self.max_addresses:
                self._seen[key] = 1
                self.log.warning("%s: refused: %s (further refusals are summarized every "
                                 "%.0f s)", safe(address), reason, self.window)
        else:
            self._seen[key] = n + 1
        self._count += 1

    def flush(self, now: float) -> None:
        if self._count > len(self._seen):
            by_reason: dict[str, tuple[int, int]] = {}
            for (reason, _addr), n in self._seen.items():
                c, a = by_reason.get(reason, (0, 0))
                by_reason[reason] = (c + n, a + 1)
            for reason, (c, a) in sorted(by_reason.items()):
                self.log.warning("refused %d connections in the last %.0f s (%s) from %d "
                                 "address(es)", c, now - self._start, reason, a)
        self._seen.clear()
        self._count = 0
        self._start = now
