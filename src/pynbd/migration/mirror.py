"""The mirror: copy a served export to a destination while clients keep writing, then
hand over (see docs/migration.md for the whole protocol)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynbd.backends.base import STATE_ZERO
from pynbd.migration.dirty import DEFAULT_CHUNK, DirtyMap
from pynbd.migration.faults import halt_point
from pynbd.migration.records import write_record
from pynbd.migration.transport import (
    ConnectFailed,
    InDoubtError,
    RejectedError,
    Transport,
    TransportError,
)
from pynbd.server.exports import Export, IOGate, WriteTracker
from pynbd.server.sharedmap import shared_bytes

log = logging.getLogger("pynbd.migration")

# Exit codes of ``pynbd mirror --wait`` (and the ``result`` field of the status).
EXIT_COMPLETED = 0
EXIT_CONTROL_ERROR = 1
EXIT_CONTROL_UNREACHABLE = 3
EXIT_CONNECT_FAILED = 10
EXIT_REJECTED = 11
EXIT_BROKEN = 12
EXIT_FAILED = 13
EXIT_IN_DOUBT = 14

RESULT_EXIT = {
    "completed": EXIT_COMPLETED,
    "connect-failed": EXIT_CONNECT_FAILED,
    "rejected": EXIT_REJECTED,
    "broken": EXIT_BROKEN,
    "failed": EXIT_FAILED,
    "in-doubt": EXIT_IN_DOUBT,
}

DIGEST = hashlib.sha256
DIGEST_SIZE = 32


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    return DIGEST(data).digest()


def image_digest(chunk_digests: bytes | bytearray | memoryview, size: int, chunk: int) -> str:
    """The whole-image digest: sha256 over (size, chunk size, every per-chunk sha256)."""
    h = hashlib.sha256(f"pynbd-image:{size}:{chunk}:".encode())
    h.update(chunk_digests)
    return h.hexdigest()


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


class TokenBucket:
    """Bytes/s limit; the rate can change at any time; 0 = unlimited."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.tokens = 0.0
        self._clock = clock
        self._sleep = sleep
        self.last = clock()
        self.lifted = False

    def consume(self, n: int, cancelled: Callable[[], bool]) -> float:
        """Take n bytes' worth of tokens, sleeping as needed; returns seconds slept."""
        slept = 0.0
        while True:
            rate = self.rate
            now = self._clock()
            if rate <= 0 or self.lifted:
                self.last = now
                self.tokens = 0.0
                return slept
            burst = max(rate * 0.1, 65536.0)
            self.tokens = min(self.tokens + (now - self.last) * rate, burst)
            self.last = now
            if self.tokens >= 0:
                self.tokens -= n
                return slept
            if cancelled():
                return slept
            d = min(0.05, -self.tokens / rate)
            self._sleep(d)
            slept += d


class _Tracker(WriteTracker):
    """Told about every client write: marks it dirty and forgets it was a hole.

    Its maps live in shared memory: worker processes mark them through a
    ``TrackerView`` (``share()``), with the same effect as :meth:`mark`.
    """

    def __init__(self, dirty: DirtyMap) -> None:
        self.dirty = dirty
        self.lock = threading.Lock()
        n = dirty.nchunks
        self.known_zero, self._kz_fd = shared_bytes(n)
        self.touched, self._t_fd = shared_bytes(n)

    def share(self) -> tuple[dict[str, object], list[int]]:
        # the order of mark(): forget "hole" (touched = 1, known-zero = 0), then dirty
        meta = {"shift": self.dirty.chunk.bit_length() - 1, "nchunks": self.dirty.nchunks,
                "regions": [{"fill": 1}, {"fill": 0}, {"fill": 1}]}
        return meta, [self._t_fd, self._kz_fd, self.dirty.fd]

    def mark(self, offset: int, length: int) -> None:
        # forget "hole" before marking dirty: whoever saw the hole flag and sent ZERO
        # will see this range dirty again afterwards (see Mirror._zero_pass)
        a, b = self.dirty.chunk_range(offset, length)
        if b > a:
            self.touched[a:b] = b"\x01" * (b - a)
            self.known_zero[a:b] = bytes(b - a)
        self.dirty.mark(offset, length)

    def set_holes(self, holes: bytearray) -> None:
        with self.lock:
            for i in range(len(holes)):
                if holes[i] and not self.touched[i]:
                    self.known_zero[i] = 1

    def __del__(self) -> None:
        for fd in (self._kz_fd, self._t_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


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
        self.tracker = _Tracker(self.dirty)
        self.sent: bytearray | None = None
        self._sent_valid = bytearray()
        self._zeroed = False
        self.state = "starting"
        self.result: str | None = None
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
        self._paused_by_us = False
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
        if self.state in ("committing", "in-doubt"):
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
            eta = 0.0 if self.result == "completed" else None
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
            self._finish("broken", str(exc))
        except RejectedError as exc:
            self._finish("rejected", str(exc))
        except ConnectFailed as exc:
            self._finish("connect-failed", str(exc))
        except Failed as exc:
            self._finish("failed", str(exc))
        except Exception as exc:
            log.exception("mirror failed")
            self._finish("failed", f"internal error: {exc}")
        finally:
            if self.transport is not None:
                with contextlib.suppress(Exception):
                    self.transport.close()
            if export.tracker is self.tracker:
                export.tracker = None
            if self._paused_by_us and self.result != "completed" and self.state != "in-doubt":
                self.gate.resume()
                self._paused_by_us = False
            self.finished = time.monotonic()
            self.done.set()

    def _finish(self, result: str, error: str = "") -> None:
        self.result = result
        self.error = error
        if result != "completed":
            self.state = result
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
            self.state = "connecting"
            t = self.factory()
            self.description = t.description
            try:
                t.connect(self.size)
                if t.wants_digests and self.sent is None:
                    self.sent = bytearray(self.dirty.nchunks * DIGEST_SIZE)
                    self._sent_valid = bytearray(self.dirty.nchunks)
                if self._connected.is_set():
                    self._resume_from(t)
                self.transport = t
                self._connected.set()
                if not self._zeroed:
                    self.state = "zeroing"
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
                if self._paused_by_us:
                    self.gate.resume()
                    self._paused_by_us = False
                if isinstance(exc, ConnectFailed) and not self._connected.is_set():
                    raise
                self.error = str(exc)
                log.warning("migration attempt %d/%d failed: %s", self.attempts,
                            self.opts.max_attempts, exc)
                if self.attempts >= self.opts.max_attempts:
                    raise Failed(f"gave up after {self.attempts} attempts: {exc}") from exc
                self.state = "retrying"
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
        ours = self.sent
        valid = self._sent_valid
        n = self.dirty.nchunks
        again = 0
        for i in range(n):
            if not valid[i]:
                continue
            a = i * DIGEST_SIZE
            if theirs[a:a + DIGEST_SIZE] != ours[a:a + DIGEST_SIZE]:
                valid[i] = 0
                self.dirty.mark(i * self.opts.chunk, self.opts.chunk)
                again += 1
        log.info("resumed: %d chunks must be sent again, %d verified on the destination",
                 again, sum(valid))

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
                self._zero(t, a, b - a, i, j)
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
            self.state = "copying"
            left = self.dirty.dirty_bytes
            fits = left <= self._rate_estimate() * budget
            if left == 0 or fits:
                if not prflushed:
                    # make what was copied durable while clients still run, so the final
                    # flush inside the pause only covers the remainder
                    self.state = "pre-flush"
                    t.flush()
                    prflushed = True
                    patience = self.bytes_done + 2 * self.dirty.dirty_bytes + (8 << 20)
                    continue
                # after the pre-flush: catch up with what the clients wrote meanwhile
                # (down to a quarter of the budget) unless they keep up with us
                if left == 0 or left <= self._rate_estimate() * budget / 4 or \
                        self.bytes_done >= patience:
                    if self._handover(t):
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
        backend = self.export.backend
        sent = self.sent
        while i < last:
            j = i
            zero = bool(kz[i])
            while j < last and bool(kz[j]) == zero:
                j += 1
            a = i * chunk
            b = min(j * chunk, self.size)
            if zero:
                self._zero(t, a, b - a, i, j)
            else:
                buf = bytearray(b - a)
                mv = memoryview(buf)
                backend.pread_into(mv, a)
                # split into data and all-zero pieces, chunk by chunk
                k = i
                while k < j:
                    ca = (k - i) * chunk
                    is_zero = _is_zero(mv[ca:ca + chunk])
                    m = k + 1
                    while m < j and _is_zero(mv[(m - i) * chunk:(m - i + 1) * chunk]) == is_zero:
                        m += 1
                    pa = (k - i) * chunk
                    pb = min((m - i) * chunk, len(buf))
                    if is_zero:
                        self._zero(t, a + pa, pb - pa, k, m)
                    else:
                        if throttle:
                            self.bucket.consume(pb - pa, self._break.is_set)
                        t0 = time.monotonic()
                        piece = mv[pa:pb]
                        if sent is not None:
                            for c in range(k, m):
                                s = (c - i) * chunk
                                d = chunk_digest(mv[s:min(s + chunk, len(buf))])
                                sent[c * DIGEST_SIZE:(c + 1) * DIGEST_SIZE] = d
                                self._sent_valid[c] = 1
                        t.write(a + pa, bytes(piece) if t.wants_digests else piece)
                        self._busy += time.monotonic() - t0
                        self._busy_bytes += pb - pa
                        self._note(pb - pa)
                    k = m
            i = j

    def _zero(self, t: Transport, off: int, length: int, ci: int, cj: int) -> None:
        t.zero(off, length)
        self.bytes_zeroed += length
        if self.sent is not None:
            chunk = self.opts.chunk
            for c in range(ci, cj):
                clen = min(chunk, self.size - c * chunk)
                self.sent[c * DIGEST_SIZE:(c + 1) * DIGEST_SIZE] = zero_digest(clen)
                self._sent_valid[c] = 1

    # --- handover ----------------------------------------------------------------------

    def _handover(self, t: Transport) -> bool:
        self.state = "pausing"
        if not self.gate.pause(self.opts.pause_timeout):
            self.gate.resume()
            log.info("clients did not go idle within %.1f s; copying on", self.opts.pause_timeout)
            return False
        self._paused_by_us = True
        paused_at = time.monotonic()
        self.bucket.lifted = True
        self.state = "final-copy"
        phases: dict[str, float] = {}
        self.handover_ms = phases
        final_bytes = self.dirty.dirty_bytes
        try:
            pos = 0
            while True:
                self._check_break()
                run = self._next_run(pos, self.opts.run_bytes)
                if run is None:
                    break
                self._send_run(t, run[0], run[1], throttle=False)
                pos = run[0] + run[1]
            t1 = time.monotonic()
            phases["final_copy"] = round((t1 - paused_at) * 1000, 1)
            phases["final_bytes"] = final_bytes
            t.flush()
            phases["flush"] = round((time.monotonic() - t1) * 1000, 1)
        finally:
            self.bucket.lifted = False
        if not t.supports_commit:
            self.epoch = self.epoch_base + 1
            write_record(self.record, {"role": "source", "state": "stepped-down",
                                       "epoch": self.epoch, "to": self.opts.to,
                                       "transport": t.description, "verified": False})
            self._step_down(paused_at, record=False)
            return True
        assert self.sent is not None
        digest = image_digest(self.sent, self.size, self.opts.chunk)
        epoch = max(self.epoch_base, t.last_epoch()) + 1
        halt_point("source:before-commit")
        write_record(self.record, {"role": "source", "state": "committing", "epoch": epoch,
                                   "to": self.opts.to, "psk_file": self.opts.psk_file,
                                   "secure": self.opts.secure,
                                   "insecure": self.opts.insecure, "size": self.size,
                                   "digest": digest})
        self.epoch = epoch
        self.state = "committing"
        t2 = time.monotonic()
        try:
            t.commit(self.size, epoch, digest, lambda: halt_point("source:commit-sent"))
        except RejectedError as exc:
            # the destination definitely did not take over: we stay authoritative
            log.error("destination refused COMMIT %d: %s; sending everything again", epoch, exc)
            write_record(self.record, {"role": "source", "state": "resumed", "epoch": epoch,
                                       "to": self.opts.to})
            self.epoch_base = epoch
            self.dirty.mark_all()
            raise TransportError(f"commit refused: {exc}") from exc
        except InDoubtError as exc:
            log.warning("COMMIT %d: outcome unknown (%s): asking the destination", epoch, exc)
            with contextlib.suppress(Exception):
                t.close(release=False)
            self.transport = None
            committed = resolve_in_doubt(self, epoch)
            if not committed:
                write_record(self.record, {"role": "source", "state": "resumed",
                                           "epoch": epoch, "to": self.opts.to})
                self.epoch_base = epoch
                self.gate.resume()
                self._paused_by_us = False
                raise TransportError("destination did not commit; copying on") from exc
            self._step_down(paused_at)
            return True
        phases["commit"] = round((time.monotonic() - t2) * 1000, 1)
        halt_point("source:acked")
        self._step_down(paused_at)
        return True

    def _step_down(self, paused_at: float | None, record: bool = True) -> None:
        # Step down first (clients waiting in the pause get ESHUTDOWN now), record it
        # after: a crash in between leaves "committing", which a restart resolves by
        # asking the destination, so nothing is lost by the order.
        step_down_export(self.export, f"migrated to {self.opts.to} (epoch {self.epoch})",
                         self.on_step_down, self)
        if paused_at is not None:
            self.pause_ms = round((time.monotonic() - paused_at) * 1000, 1)
        if record and self.record is not None:
            write_record(self.record, {"role": "source", "state": "stepped-down",
                                       "epoch": self.epoch, "to": self.opts.to,
                                       "transport": self.description,
                                       "verified": self.description != "nbd"})
        self.authoritative = False
        self._paused_by_us = False
        if self.opts.unlink and self.image_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.image_path)
            log.info("unlinked %s", self.image_path)
        self.state = "completed"
        self.result = "completed"
        log.info("migration to %s completed (epoch %d%s)", self.opts.to, self.epoch,
                 "" if self.pause_ms is None else f", pause {self.pause_ms} ms")


def step_down_export(export: Export, reason: str,
                     callback: Callable[[Mirror], None] | None = None,
                     mirror: Mirror | None = None) -> None:
    assert export.gate is not None
    export.gate.step_down(reason)
    if callback is not None and mirror is not None:
        callback(mirror)


def resolve_in_doubt(m: Mirror, epoch: int) -> bool:
    """Ask the destination whether epoch N committed; never returns before it knows.

    Clients stay paused throughout. After ``max_attempts`` failed queries the result is
    ``in-doubt`` (``mirror --wait`` exits with EXIT_IN_DOUBT) but the queries go on."""
    m.state = "in-doubt"
    m.authoritative = False
    delay = 0.2
    while True:
        m.outcome_queries += 1
        t = m.factory()
        try:
            t.connect_for_query(m.size)
            committed = t.query_outcome(epoch)
        except (TransportError, RejectedError, OSError) as exc:
            m.error = f"outcome of epoch {epoch} unknown: {exc}"
            if m.outcome_queries >= m.opts.max_attempts and m.result is None:
                m.result = "in-doubt"
                log.error("migration in doubt after %d queries: clients stay paused; "
                          "still asking %s", m.outcome_queries, m.opts.to)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        finally:
            with contextlib.suppress(Exception):
                t.close()
        m.result = None
        m.error = ""
        if committed:
            log.info("destination says epoch %d committed: stepping down", epoch)
            return True
        log.warning("destination says epoch %d did not commit: this copy stays authoritative",
                    epoch)
        m.authoritative = True
        return False


_ZERO_DIGESTS: dict[int, bytes] = {}
_ZEROS = bytes(DEFAULT_CHUNK * 16)


def zero_digest(n: int) -> bytes:
    d = _ZERO_DIGESTS.get(n)
    if d is None:
        d = chunk_digest(bytes(n))
        _ZERO_DIGESTS[n] = d
    return d


def _is_zero(mv: memoryview) -> bool:
    n = len(mv)
    if n <= len(_ZEROS):
        return mv == memoryview(_ZEROS)[:n]
    return bytes(mv).count(0) == n
