"""Pieces shared by the operations filters (rate, delay, error, log, stats): operation
names, parameter parsing for run-time changes, and the admission hold that lets a
filter delay a request without a sleeping thread."""

from __future__ import annotations

import re
from typing import Any

from pynbd.backends.base import Backend, ConfigError, Param
from pynbd.filters.base import GO, Admission, Filter, Verdict

#: the operations a filter can select, in the order they are shown
OPS = ("read", "write", "trim", "zero", "flush", "cache", "extents")

#: names users may also write for them (nbdkit's and the NBD spec's)
OP_ALIASES = {
    "pread": "read", "pwrite": "write", "write-zeroes": "zero", "write_zeroes": "zero",
    "block-status": "extents", "block_status": "extents", "discard": "trim",
}

#: the NBD command names admission sees -> operation names
CMD_OPS = {
    "READ": "read", "WRITE": "write", "TRIM": "trim", "WRITE_ZEROES": "zero",
    "FLUSH": "flush", "CACHE": "cache", "BLOCK_STATUS": "extents",
}


def parse_ops(text: str) -> frozenset[str]:
    """``read,write`` (or ``all``) -> the set of operation names."""
    out: set[str] = set()
    for word in re.split(r"[,+\s]+", text.strip().lower()):
        if not word:
            continue
        if word == "all":
            out.update(OPS)
            continue
        op = OP_ALIASES.get(word, word)
        if op not in OPS:
            raise ValueError(f"unknown operation {word!r} (known: {', '.join(OPS)}, all)")
        out.add(op)
    if not out:
        raise ValueError("no operation named (known: " + ", ".join(OPS) + ", all)")
    return frozenset(out)


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|ms|us|µs|ns|)\s*")
_SCALE = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}

#: one hour: a longer injected latency is a typo, not a test
MAX_DELAY = 3600.0


def parse_duration(text: str) -> float:
    """``0.5``, ``2s``, ``250ms``, ``100us``, ``1000ns`` -> seconds (0 to one hour)."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(f"invalid duration {text!r} (expected e.g. 0.5, 2s, 250ms, 100us)")
    secs = float(m.group(1)) * _SCALE[m.group(2)]
    if secs > MAX_DELAY:
        raise ValueError(f"{text!r} is longer than {MAX_DELAY:.0f} s")
    return secs


def parse_changes(owner: str, spec: dict[str, Param], given: dict[str, str],
                  fixed: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Validate run-time changes: only the keys given, each converted by its Param;
    unknown keys and keys in ``fixed`` (cannot change while serving) are ConfigError.
    Nothing is applied when anything is wrong."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigError(f"{owner}: unknown parameter {unknown[0]!r} "
                          f"(known: {', '.join(sorted(spec))})")
    frozen = sorted(set(given) & fixed)
    if frozen:
        raise ConfigError(f"{owner}: {frozen[0]} cannot be changed at run time")
    out: dict[str, Any] = {}
    for key, text in given.items():
        try:
            out[key] = spec[key].type(text)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{owner}: {key}={text!r}: {exc}") from None
    return out


class HoldingFilter(Filter):
    """A filter that may hold a connection's next request for a while (a rate limit, an
    injected latency) through admission: the server parks the request and asks again
    after the delay, no thread sleeps.

    The server admits a connection's requests in order and asks again for the one it
    parked before any later one, so the per-connection state here is about that one
    request. Subclasses implement :meth:`hold` (seconds to wait, 0 to let it go).
    When this filter lets a request go but a filter below holds it, asking again goes
    straight to that filter: the request is not charged twice.
    """

    admits = True
    #: reads pass through unchanged, so zero-copy stays possible
    sendfile_fd = property(lambda self: getattr(self.next, "sendfile_fd", None))

    def __init__(self, next: Backend, **params: Any) -> None:
        super().__init__(next, **params)
        #: per connection: this filter let the current request go, a lower one holds it
        self._passed = False

    def open_connection(self, export: str, read_only: bool) -> Backend:
        mine = super().open_connection(export, read_only)
        if mine is self:  # the next layer is shared: this filter still needs its own
            import copy

            mine = copy.copy(self)
        assert isinstance(mine, HoldingFilter)
        mine._passed = False
        mine.connection_opened()
        return mine

    def connection_opened(self) -> None:
        """Reset per-connection state on the connection's own copy."""

    def hold(self, cmd: str, offset: int, length: int, now: float) -> float:
        """Seconds to hold this request before asking again (0: let it go)."""
        return 0.0

    def admit(self, cmd: str, offset: int, length: int, now: float) -> Admission:
        if not self._passed:
            wait = self.hold(cmd, offset, length, now)
            if wait > 0:
                return Admission(Verdict.WAIT, delay=wait)
        nxt = self.next
        if not isinstance(nxt, Filter):
            return GO
        self._passed = True
        r = nxt.admit(cmd, offset, length, now)
        if r.verdict is not Verdict.WAIT:
            self._passed = False
        return r

    # reads that can be served without blocking stay that way below this filter
    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        return self.next.pread_nowait(buf, offset)
