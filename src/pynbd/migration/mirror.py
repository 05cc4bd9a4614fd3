"""The mirror: copy a served export to a destination while clients keep writing, then
hand over (see docs/migration.md for the whole protocol).

The copy loop lives here: connection attempts and retries, the zero pass, copying dirty
runs under the speed limit until what is left fits the downtime budget, the final copy,
and the status. The handover's decisions are a pure state machine
(:mod:`pynbd.migration.handover`) whose effects :mod:`pynbd.migration.handover_run`
carries out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynbd.backends.base import STATE_ZERO
from pynbd.migration.digests import ChunkDigests
from pynbd.migration.dirty import DEFAULT_CHUNK, DirtyMap, DirtyTracker
from pynbd.migration.handover_run import hand_over, step_down_export
from pynbd.migration.states import MirrorResult, MirrorState
from pynbd.migration.throttle import TokenBucket
from pynbd.migration.transport import (
    ConnectFailed,
    RejectedError,
    Transport,
    TransportError,
)
from pynbd.server.exports import Export, IOGate
from pynbd.util.zeros import is_zero

__all__ = ["Broken", "Failed", "Mirror", "MirrorOptions", "step_down_export"]

log = logging.getLogger("pynbd.migration")


@dataclass
class MirrorOptions:
    to: str
    max_speed: int = 0
    unlink: bool = False
    downtime_ms: int = 300
    max_attempts: int = 5
    psk_file: str | None = None
    secure: bool = False
    #: allow a destination nobody authenticates (msgr2 without a key, plain NBD over TCP
    #: to another host)
    insecure: bool = False
    run_bytes: int = 4 * 1024 * 1024
    chunk: int = DEFAULT_CHUNK
    pause_timeout: float = 5.0
    #: after stepping down, disconnect the export's clients after this many seconds
    disconnect_delay: float = 0.5
    #: seconds to wait for any one answer of the destination (0: the transport's default,
    #: 60 s; for NBD also ``PYNBD_MIGRATION_NBD_TIMEOUT``)
    timeout: float = 0.0


class Broken(Exception):
    """The operator abandoned the mirror."""


class Failed(Exception):
    pass


class Mirror:
    """One migration of one export. ``run`` is the whole job (on its own thread)."""

    def __init__(self, export: Export, opts: MirrorOptions,
                 factory: Callable[[], Transport], record: str | None,
                 epoch_base: int = 0, image_path: str | None = None,
                 on_step_down: Callable[[Mirror], None] | None = None) -> None:
        self.export = export
        self.opts = opts
        self.factory = factory
        self.record = record
        self.epoch_base = epoch_base
        self.image_path = image_path
        self.on_step_down = on_step_down
        self.size = export.info.size
        gate = export.gate
        if gate is None:
            raise RuntimeError("export has no I/O gate (attach migration before serving)")
        self.gate: IOGate = gate
        self.bucket = TokenBucket(opts.max_speed)
        self.dirty = DirtyMap(self.size, opts.chunk, all_dirty=True)
        self.tracker = DirtyTracker(self.dirty)
        #: digest of each chunk as sent (transports that verify: msgr2)
        self.sent: ChunkDigests | None = None
        self._zeroed = False
        self.state = MirrorState.STARTING
        self.result: MirrorResult | None = None
        self.error = ""
        self.epoch = epoch_base
        self.authoritative = True
        self.attempts = 0
        self.bytes_done = 0
        self.bytes_zeroed = 0
        self.started = time.monotonic()
        self.finished: float | None = None
        self.pause_ms: float | None = None
        self.handover_ms: dict[str, float] = {}
        self.outcome_queries = 0
        self._busy = 0.0
        self._busy_bytes = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._break = threading.Event()
        self._connected = threading.Event()
        self.done = threading.Event()
        self.paused_by_us = False
        self._thread: threading.Thread | None = None
        self.transport: Transport | None = None
        self.description = ""

    # --- control -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, daemon=True, name="mirror")
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected (the copy runs), False when finished or timed out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected.wait(0.05):
                return True
            if self.done.is_set():
                return False
        return False

    def set_speed(self, bps: int) -> None:
        self.opts.max_speed = bps
        self.bucket.rate = bps

    def request_break(self) -> None:
        if self.state in (MirrorState.COMMITTING, MirrorState.IN_DOUBT):
            raise RuntimeError(f"cannot break a migration that is {self.state}: the outcome "
                               "is being decided by the destination")
        self._break.set()
        t = self.transport
        if t is not None:
            t.abort()  # do not wait for a destination that stopped answering

    def _check_break(self) -> None:
        if self._break.is_set():
            raise Broken("broken by the operator")

    # --- status ------------------------------------------------------------------------

    def _note(self, n: int) -> None:
        self.bytes_done += n
        now = time.monotonic()
        s = self._samples
        s.append((now, self.bytes_done))
        while len(s) > 2 and now - s[0][0] > 3.0:
            s.popleft()

    def speed(self) -> float:
        s = list(self._samples)
        if len(s) < 2:
            return 0.0
        now = time.monotonic()
        t0, b0 = s[0]
        span = max(now - t0, 1e-3)
        return (s[-1][1] - b0) / span

    def status(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.monotonic()
        dirty = self.dirty.dirty_bytes
        speed = self.speed()
        rate = speed
        if self.bucket.rate and not self.bucket.lifted:
            rate = min(rate or self.bucket.rate, self.bucket.rate)
        eta = round(dirty / rate, 3) if rate > 0 else None
        if self.result is not None:
            eta = 0.0 if self.result is MirrorResult.COMPLETED else None
        return {
            "role": "source",
            "state": self.state,
            "result": self.result,
            "error": self.error,
            "to": self.opts.to,
            "transport": self.description,
            "bytes_done": self.bytes_done,
            "bytes_zeroed": self.bytes_zeroed,
            "bytes_left": dirty,
            "dirty_bytes": dirty,
            "size_bytes": self.size,
            "speed_bytes_per_second": round(speed),
            "elapsed_seconds": round(end - self.started, 3),
            "eta_seconds": eta,
            "speed_limit_bytes_per_second": self.opts.max_speed,
            "attempts": self.attempts,
            "max_attempts": self.opts.max_attempts,
            "epoch": self.epoch,
            "authoritative": self.authoritative,
            "paused": self.gate.paused,
            "pause_ms": self.pause_ms,
            "handover_ms": self.handover_ms,
            "outcome_queries": self.outcome_queries,
            "downtime_ms": self.opts.downtime_ms,
        }

    # --- the job -----------------------------------------------------------------------

    def run(self) -> None:
        export = self.export
        export.tracker = self.tracker
        try:
            self._find_holes()
            self._attempts()
        except Broken as exc:
            self._finish(MirrorResult.BROKEN, str(exc))
        except RejectedError as exc:
            self._finish(MirrorResult.REJECTED, str(exc))
        except ConnectFailed as exc:
            self._finish(MirrorResult.CONNECT_FAILED, str(exc))
        except Failed as exc:
            self._finish(MirrorResult.FAILED, str(exc))
        except Exception as exc:
            log.exception("mirror failed")
            self._finish(MirrorResult.FAILED, f"internal error: {exc}")
        finally:
            if self.transport is not None:
                with contextlib.suppress(Exception):
                    self.transport.close()
            if export.tracker is self.tracker:
                export.tracker = None
            if self.paused_by_us and self.result is not MirrorResult.COMPLETED and \
                    self.state is not MirrorState.IN_DOUBT:
                self.gate.resume()
                self.paused_by_us = False
            self.finished = time.monotonic()
            self.done.set()

    def _finish(self, result: MirrorResult, error: str = "") -> None:
        self.result = result
        self.error = error
        if result is not MirrorResult.COMPLETED:
            self.state = MirrorState(result.value)
            log.warning("migration to %s ended: %s%s", self.opts.to, result,
                        f": {error}" if error else "")

    def _find_holes(self) -> None:
        """Chunks wholly inside holes are sent as WRITE_ZEROES without being read."""
        backend = self.export.backend
        if not backend.can_extents:
            return
        chunk = self.opts.chunk
        holes = bytearray(self.dirty.nchunks)
        pos = 0
        size = self.size
        while pos < size:
            exts = backend.extents(pos, size - pos)
            if not exts:
                break
            for e in exts:
                end = min(pos + e.length, size)
                if e.flags & STATE_ZERO:
                    a = (pos + chunk - 1) // chunk
                    b = end // chunk if end < size else self.dirty.nchunks
                    if b > a:
                        holes[a:b] = b"\x01" * (b - a)
                pos = end
                if pos >= size:
                    break
        self.tracker.set_holes(holes)

    def _attempts(self) -> None:
        backoff = 0.2
        while True:
            self._check_break()
            self.attempts += 1
            self.state = MirrorState.CONNECTING
            t = self.factory()
            self.description = t.description
            try:
                t.connect(self.size)
                if t.wants_digests and self.sent is None:
                    self.sent = ChunkDigests(self.size, self.opts.chunk)
                if self._connected.is_set():
                    self._resume_from(t)
                self.transport = t
                self._connected.set()
                if not self._zeroed:
                    self.state = MirrorState.ZEROING
                    self._zero_pass(t)
                    self._zeroed = True
                if self._copy(t):
                    return
            except TransportError as exc:
                for off, n in t.take_unconfirmed():
                    self.dirty.mark(off, n)
                # the next attempt resumes with our lease; a mirror that stops here
                # (broken, out of attempts) lets the destination go
                last = self._break.is_set() or self.attempts >= self.opts.max_attempts
                with contextlib.suppress(Exception):
                    t.close(release=last)
                self.transport = None
                if self.paused_by_us:
                    self.gate.resume()
                    self.paused_by_us = False
                if isinstance(exc, ConnectFailed) and not self._connected.is_set():
                    raise
                self.error = str(exc)
                log.warning("migration attempt %d/%d failed: %s", self.attempts,
                            self.opts.max_attempts, exc)
                if self.attempts >= self.opts.max_attempts:
                    raise Failed(f"gave up after {self.attempts} attempts: {exc}") from exc
                self.state = MirrorState.RETRYING
                if self._break.wait(backoff):
                    self._check_break()
                backoff = min(backoff * 2, 5.0)
            except BaseException:
                if self.transport is not t:  # (run() closes self.transport)
                    with contextlib.suppress(Exception):
                        t.close()
                raise

    def _resume_from(self, t: Transport) -> None:
        """Reconnected: re-send what the destination cannot prove it has."""
        theirs = t.chunk_digests(self.opts.chunk)
        if theirs is None or self.sent is None:
            return
        again = self.sent.differing(theirs)
        for i in again:
            self.dirty.mark(i * self.opts.chunk, self.opts.chunk)
        log.info("resumed: %d chunks must be sent again, %d verified on the destination",
                 len(again), sum(self.sent.valid))

    def _zero_pass(self, t: Transport) -> None:
        """First, every known hole: WRITE_ZEROES/ZERO on the destination, no reading."""
        tr = self.tracker
        kz = tr.known_zero
        chunk = self.opts.chunk
        runs: list[tuple[int, int]] = []
        with tr.lock:
            n = self.dirty.nchunks
            i = kz.find(b"\x01", 0, n)
            while i >= 0:
                j = kz.find(b"\x00", i, n)
                if j < 0:
                    j = n
                a, b = i * chunk, min(j * chunk, self.size)
                self.dirty.clear(a, b - a)
                runs.append((i, j))
                i = kz.find(b"\x01", j, n)
        done = 0
        try:
            for i, j in runs:
                a, b = i * chunk, min(j * chunk, self.size)
                self._zero(t, a, b - a)
                done += 1
        except BaseException:
            for i, j in runs[done:]:
                self.dirty.mark(i * chunk, min(j * chunk, self.size) - i * chunk)
            raise

    def _next_run(self, pos: int, limit: int) -> tuple[int, int] | None:
        for run in self.dirty.take(limit, start=pos):
            return run
        return None

    def _run_limit(self, throttled: bool) -> int:
        limit = self.opts.run_bytes
        rate = self.bucket.rate
        if throttled and rate > 0 and not self.bucket.lifted:
            limit = max(self.opts.chunk, min(limit, rate // 8))
        return limit

    def _rate_estimate(self) -> float:
        """Bytes/s the final (unthrottled) copy can be expected to reach."""
        raw = self._busy_bytes / self._busy if self._busy > 0.05 else 0.0
        if self.bucket.rate and not self.bucket.lifted:
            return raw / 2  # throttled: only the time spent sending is known
        return min(raw, self.speed()) if raw else self.speed()

    def _copy(self, t: Transport) -> bool:
        """Copy until converged and handed over (True)."""
        pos = 0
        # a third of the downtime budget for the remaining data, the rest for the final
        # flush and the commit
        budget = self.opts.downtime_ms / 3000.0
        prflushed = False
        patience = 0  # bytes to copy after the pre-flush before settling for "fits"
        while True:
            self._check_break()
            self.state = MirrorState.COPYING
            left = self.dirty.dirty_bytes
            fits = left <= self._rate_estimate() * budget
            if left == 0 or fits:
                if not prflushed:
                    # make what was copied durable while clients still run, so the final
                    # flush inside the pause only covers the remainder
                    self.state = MirrorState.PRE_FLUSH
                    t.flush()
                    prflushed = True
                    patience = self.bytes_done + 2 * self.dirty.dirty_bytes + (8 << 20)
                    continue
                # after the pre-flush: catch up with what the clients wrote meanwhile
                # (down to a quarter of the budget) unless they keep up with us
                if left == 0 or left <= self._rate_estimate() * budget / 4 or \
                        self.bytes_done >= patience:
                    if hand_over(self, t):
                        return True
                    prflushed = False
                    continue
            elif prflushed and left > 4 * self._rate_estimate() * budget:
                prflushed = False  # the clients outran us: flush again before the pause
            run = self._next_run(pos, self._run_limit(True))
            if run is None:
                continue
            off, n = run
            pos = off + n
            if pos >= self.size:
                pos = 0
            self._send_run(t, off, n, throttle=True)

    def _send_run(self, t: Transport, off: int, n: int, throttle: bool) -> None:
        """Send [off, off+n) (chunk aligned; just taken from the dirty map)."""
        try:
            self._send_run_inner(t, off, n, throttle)
        except BaseException:
            self.dirty.mark(off, n)
            raise

    def _send_run_inner(self, t: Transport, off: int, n: int, throttle: bool) -> None:
        chunk = self.opts.chunk
        kz = self.tracker.known_zero
        first = off // chunk
        last = (off + n + chunk - 1) // chunk
        i = first
        while i < last:
            j = i
            zero = bool(kz[i])
            while j < last and bool(kz[j]) == zero:
                j += 1
            a = i * chunk
            b = min(j * chunk, self.size)
            if zero:
                self._zero(t, a, b - a)
            else:
                self._send_data(t, a, b, throttle)
            i = j

    def _send_data(self, t: Transport, a: int, b: int, throttle: bool) -> None:
        """Read [a, b) (chunk aligned) and send it: all-zero chunks as ZERO, the rest
        as data, in runs."""
        chunk = self.opts.chunk
        buf = bytearray(b - a)
        mv = memoryview(buf)
        self.export.backend.pread_into(mv, a)
        pos = 0
        while pos < len(buf):
            zero = is_zero(mv[pos:pos + chunk])
            end = pos + chunk
            while end < len(buf) and is_zero(mv[end:end + chunk]) == zero:
                end += chunk
            end = min(end, len(buf))
            if zero:
                self._zero(t, a + pos, end - pos)
            else:
                if throttle:
                    self.bucket.consume(end - pos, self._break.is_set)
                t0 = time.monotonic()
                piece = mv[pos:end]
                if self.sent is not None:
                    self.sent.wrote(a + pos, piece)
                t.write(a + pos, bytes(piece) if t.wants_digests else piece)
                self._busy += time.monotonic() - t0
                self._busy_bytes += end - pos
                self._note(end - pos)
            pos = end

    def _zero(self, t: Transport, off: int, length: int) -> None:
        t.zero(off, length)
        self.bytes_zeroed += length
        if self.sent is not None:
            self.sent.zeroed(off, length)

    def final_copy(self, t: Transport) -> None:
        """Everything still dirty, unthrottled (the clients are paused)."""
        self.bucket.lifted = True
        try:
            pos = 0
            while True:
                self._check_break()
                run = self._next_run(pos, self.opts.run_bytes)
                if run is None:
                    break
                self._send_run(t, run[0], run[1], throttle=False)
                pos = run[0] + run[1]
        finally:
            self.bucket.lifted = False
