"""``--filter error``: make chosen operations fail with a chosen errno, at a rate or while
a trigger file exists, like nbdkit's error filter (for testing clients' error paths).

    --filter error:error=ENOSPC,ops=write,rate=0.1,seed=1
    --filter error:ops=flush                       # every flush fails with EIO
    --filter error:ops=read,file=/tmp/inject       # reads fail while /tmp/inject exists

The error is raised in the layer's call, before the layers below see it, so it also
reaches the server's own calls (the flush of a safe close or of a disconnect). The
random choice uses one generator per worker process, seeded with ``seed=`` when given
(then each worker process draws the same sequence).
"""

from __future__ import annotations

import errno as _errno
import os
import random
import threading
from typing import Any

from pynbd.backends.base import Backend, BackendError, Extent, Param
from pynbd.filters.base import Filter
from pynbd.filters.opsfilter import OPS, parse_changes, parse_ops

#: errnos the NBD protocol carries (others would reach the client as EIO)
ERRNOS = ("EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP",
          "ESHUTDOWN", "EACCES", "EROFS", "EDQUOT", "EFBIG", "EOPNOTSUPP")


def parse_errno(text: str) -> int:
    name = text.strip().upper()
    if name not in ERRNOS:
        raise ValueError(f"{text!r} is not an errno NBD can carry (use one of "
                         f"{', '.join(ERRNOS)})")
    return int(getattr(_errno, name))


def parse_probability(text: str) -> float:
    """``0.1``, ``10%`` -> a probability between 0 and 1."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"{text!r}: expected a probability (0 to 1, or 0% to 100%)") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{text!r}: expected a probability (0 to 1, or 0% to 100%)")
    return v


def _opt_int(text: str) -> int | None:
    return int(text) if text.strip() else None


class ErrorConfig:
    """What to inject; one object shared by the filter's per-connection copies, so a
    run-time change reaches every connection."""

    __slots__ = ("error", "file", "ops", "rate", "rng")

    def __init__(self, error: int, ops: frozenset[str], rate: float, seed: int | None,
                 file: str) -> None:
        self.error = error
        self.ops = ops
        self.rate = rate
        self.file = file
        self.rng = random.Random(seed)


class ErrorFilter(Filter):
    params = {
        "error": Param("the errno to inject: " + ", ".join(ERRNOS[:9]), parse_errno,
                       _errno.EIO),
        "ops": Param("operations to fail: read, write, trim, zero, flush, cache, extents "
                     "or all", parse_ops, frozenset(OPS)),
        "rate": Param("probability that a chosen operation fails (0..1 or N%)",
                      parse_probability, 1.0),
        "seed": Param("seed of the random choice (reproducible failures)", _opt_int, None),
        "file": Param("fail only while this file exists", str, ""),
    }

    def __init__(self, next: Backend, *, error: int = _errno.EIO,
                 ops: frozenset[str] = frozenset(OPS), rate: float = 1.0,
                 seed: int | None = None, file: str = "") -> None:
        super().__init__(next)
        self.cfg = ErrorConfig(error, ops, rate, seed, file)
        self.injected = dict.fromkeys(OPS, 0)
        self._lock = threading.Lock()

    def _check(self, op: str) -> None:
        cfg = self.cfg
        if op not in cfg.ops:
            return
        if cfg.file and not os.path.exists(cfg.file):
            return
        rate = cfg.rate
        if rate < 1.0 and cfg.rng.random() >= rate:
            return
        with self._lock:
            self.injected[op] += 1
        e = cfg.error
        raise BackendError(e, f"{os.strerror(e)} (injected by the error filter)")

    # no zero-copy reads past this layer (Filter's default): every read must pass
    # through _check, even after a run-time change adds reads to ``ops``

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._check("read")
        self.next.pread_into(buf, offset)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        self._check("read")
        return self.next.pread_nowait(buf, offset)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self._check("write")
        self.next.pwrite(buf, offset, fua)

    def flush(self) -> None:
        self._check("flush")
        self.next.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check("trim")
        self.next.trim(offset, length, fua)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self._check("zero")
        self.next.zero(offset, length, may_trim, fast, fua)

    def cache(self, offset: int, length: int) -> None:
        self._check("cache")
        self.next.cache(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._check("extents")
        return self.next.extents(offset, length)

    def configure(self, params: dict[str, str]) -> None:
        c = parse_changes("filter error", type(self).params, params)
        cfg = self.cfg
        if "error" in c:
            cfg.error = c["error"]
        if "ops" in c:
            cfg.ops = c["ops"]
        if "rate" in c:
            cfg.rate = c["rate"]
        if "file" in c:
            cfg.file = c["file"]
        if "seed" in c:
            cfg.rng = random.Random(c["seed"])

    def stats(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"injected": dict(self.injected),
                "error": _errno.errorcode.get(cfg.error, str(cfg.error)),
                "ops": ",".join(op for op in OPS if op in cfg.ops)}
