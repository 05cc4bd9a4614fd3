"""The migration destination (``pynbd listen``): receives an image over msgr2, verifies
it, and takes over only on a verified COMMIT (see docs/migration.md)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pynbd.backends.base import STATE_ZERO
from pynbd.backends.file import FileBackend
from pynbd.migration import wire
from pynbd.migration.dirty import DEFAULT_CHUNK
from pynbd.migration.faults import halt_point
from pynbd.migration.mirror import DIGEST_SIZE, chunk_digest, image_digest, zero_digest
from pynbd.migration.records import read_record, record_path, write_record
from pynbd.msgr2.aio import ReceivedMessage, ServerSession
from pynbd.msgr2.errors import Msgr2Error

log = logging.getLogger("pynbd.migration")

MAX_PENDING = 8
_COPY_MESSAGES = frozenset((wire.WRITE, wire.ZERO, wire.FLUSH, wire.DIGESTS, wire.COMMIT))


def _releaser(msg: ReceivedMessage) -> Callable[[asyncio.Future[Any]], None]:
    def done(_f: asyncio.Future[Any]) -> None:
        msg.release()
    return done


class Destination:
    def __init__(self, path: str, chunk: int = DEFAULT_CHUNK) -> None:
        self.path = path
        self.record = record_path(path)
        self.backend = FileBackend(path)
        self.size = self.backend.size
        self.chunk = chunk
        self.nchunks = (self.size + chunk - 1) // chunk
        self.digests = bytearray(self.nchunks * DIGEST_SIZE)
        self.valid = bytearray(self.nchunks)
        rec = read_record(self.record) or {}
        if rec and rec.get("role") != "destination":
            raise ValueError(f"{self.record} is a {rec.get('role')} record: this image is a "
                             "migration source")
        self.epoch = int(rec.get("epoch", 0))
        self.aborted: set[int] = {int(x) for x in rec.get("aborted", [])}
        self.state = "authoritative" if rec.get("state") == "authoritative" else (
            "receiving" if rec else "idle")
        self.bytes_received = 0
        self.writes = 0
        self.zeroes = 0
        self.digest_requests = 0
        self.sessions = 0
        self.commits_refused = 0
        self.started = time.monotonic()
        self.active: ServerSession | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="listen-io")
        self.on_commit: Callable[[], None] | None = None
        self.exit_after_commit = False
        self.committed_event: asyncio.Event | None = None
        self.serving: str | None = None
        self._bg: set[asyncio.Future[None]] = set()

    @property
    def authoritative(self) -> bool:
        return self.state == "authoritative"

    def status(self) -> dict[str, Any]:
        return {
            "role": "destination",
            "state": self.state,
            "authoritative": self.authoritative,
            "epoch": self.epoch,
            "aborted_epochs": sorted(self.aborted),
            "size_bytes": self.size,
            "bytes_received": self.bytes_received,
            "writes": self.writes,
            "zeroes": self.zeroes,
            "digest_requests": self.digest_requests,
            "sessions": self.sessions,
            "commits_refused": self.commits_refused,
            "elapsed_seconds": round(time.monotonic() - self.started, 3),
            "serving": self.serving,
            "image": self.path,
        }

    # --- I/O (always on the single I/O thread, in arrival order) -----------------------

    def scan(self) -> None:
        """Digest every chunk of the image as it is now (holes are cheap)."""
        pos = 0
        c = self.chunk
        while pos < self.size:
            exts = self.backend.extents(pos, self.size - pos)
            for e in exts:
                end = min(pos + e.length, self.size)
                if e.flags & STATE_ZERO:
                    a = (pos + c - 1) // c
                    b = end // c if end < self.size else self.nchunks
                    for i in range(a, b):
                        d = zero_digest(min(c, self.size - i * c))
                        self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = d
                        self.valid[i] = 1
                pos = end
                if pos >= self.size:
                    break
        for i in range(self.nchunks):
            if not self.valid[i]:
                self._rehash(i)

    def _rehash(self, i: int) -> None:
        a = i * self.chunk
        n = min(self.chunk, self.size - a)
        buf = bytearray(n)
        self.backend.pread_into(memoryview(buf), a)
        self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = chunk_digest(buf)
        self.valid[i] = 1

    def _apply_write(self, offset: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        self.backend.pwrite(mv, offset)
        c = self.chunk
        first = offset // c
        last = (offset + len(data) + c - 1) // c
        for i in range(first, last):
            a = i * c
            b = min(a + c, self.size)
            if a >= offset and b <= offset + len(data):
                self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = chunk_digest(
                    mv[a - offset:b - offset])
                self.valid[i] = 1
            else:
                self.valid[i] = 0

    def _apply_zero(self, offset: int, length: int) -> None:
        self.backend.zero(offset, length, may_trim=True)
        c = self.chunk
        for i in range(offset // c, (offset + length + c - 1) // c):
            a = i * c
            b = min(a + c, self.size)
            if a >= offset and b <= offset + length:
                self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = zero_digest(b - a)
                self.valid[i] = 1
            else:
                self.valid[i] = 0

    def _all_digests(self) -> bytes:
        for i in range(self.nchunks):
            if not self.valid[i]:
                self._rehash(i)
        return bytes(self.digests)

    def _flush(self) -> int:
        try:
            self.backend.flush()
        except OSError as exc:
            return exc.errno or 5
        return 0

    def _commit(self, size: int, epoch: int, digest: str) -> tuple[bool, str]:
        halt_point("dest:commit-received")
        if self.state == "authoritative":
            if epoch == self.epoch:
                return True, ""
            return False, f"already authoritative at epoch {self.epoch}"
        if epoch in self.aborted:
            return False, f"epoch {epoch} was declared not committed"
        if epoch <= self.epoch:
            return False, f"stale epoch {epoch} (have {self.epoch})"
        if size != self.size:
            return False, f"size {size} does not match {self.size}"
        mine = image_digest(self._all_digests(), self.size, self.chunk)
        if mine != digest:
            return False, "image digest mismatch: the copy is incomplete or corrupt"
        self.backend.flush()
        write_record(self.record, {"role": "destination", "state": "authoritative",
                                   "epoch": epoch, "aborted": sorted(self.aborted),
                                   "digest": digest, "size": size})
        self.state = "authoritative"
        self.epoch = epoch
        log.info("COMMIT %d verified and durable: this copy is authoritative now", epoch)
        halt_point("dest:durable")
        return True, ""

    def _outcome(self, epoch: int) -> bool:
        if self.state == "authoritative" and self.epoch == epoch:
            return True
        if epoch not in self.aborted:
            self.aborted.add(epoch)
            write_record(self.record, {"role": "destination", "state": self.state
                                       if self.state != "idle" else "receiving",
                                       "epoch": self.epoch, "aborted": sorted(self.aborted)})
            log.warning("epoch %d declared not committed; a late COMMIT %d will be refused",
                        epoch, epoch)
        return False

    def _hello(self, size: int, purpose: str) -> dict[str, Any]:
        base = {"size": self.size, "epoch": max([self.epoch, *self.aborted]),
                "state": self.state, "authoritative": self.authoritative}
        if purpose == "query":
            return dict(base, ok=True)
        if self.authoritative:
            return dict(base, ok=False, error=f"destination is authoritative (epoch "
                                              f"{self.epoch}): it already took over")
        if size != self.size:
            return dict(base, ok=False, error=f"remote size {self.size} does not match "
                                              f"local size {size}")
        if self.state == "idle":
            write_record(self.record, {"role": "destination", "state": "receiving",
                                       "epoch": self.epoch, "aborted": sorted(self.aborted)})
            self.state = "receiving"
        return dict(base, ok=True, state=self.state)

    # --- the session handler -----------------------------------------------------------

    async def handle(self, ss: ServerSession) -> None:
        loop = asyncio.get_running_loop()
        ex = self.executor
        pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        greeted = False
        # only a source whose copy HELLO was accepted writes, and never into an image
        # that took over (a query HELLO is accepted whatever the size or state)
        copying = False
        self.sessions += 1

        async def io(fn: Callable[..., Any], *args: Any) -> Any:
            fut = loop.run_in_executor(ex, fn, *args)
            return await fut

        try:
            while True:
                msg = await ss.recv()
                t = msg.type
                if copying and self.active is not ss and t in _COPY_MESSAGES:
                    # messages a replaced session had already queued are not applied
                    raise ValueError("a newer source session took over")
                if t in (wire.WRITE, wire.ZERO) and (not copying or self.authoritative):
                    name = "WRITE" if t == wire.WRITE else "ZERO"
                    if self.authoritative:
                        raise ValueError(f"{name} to an authoritative image")
                    raise ValueError(f"{name} before HELLO" if not greeted else
                                     f"{name} in a session that did not HELLO for a copy")
                if t == wire.WRITE:
                    (off,) = wire.OFFSET.unpack_from(msg.front)
                    data = msg.data
                    if off + len(data) > self.size:
                        raise ValueError("WRITE beyond the end of the image")
                    self.bytes_received += len(data)
                    self.writes += 1
                    # written straight from the receive buffer, which goes back to the
                    # session's pool (on this loop's thread) once the write is done
                    wfut = loop.run_in_executor(ex, self._apply_write, off, data)
                    wfut.add_done_callback(_releaser(msg))
                    pending.append(wfut)
                elif t == wire.ZERO:
                    off, n = wire.RANGE.unpack_from(msg.front)
                    if off + n > self.size:
                        raise ValueError("ZERO beyond the end of the image")
                    self.zeroes += 1
                    pending.append(loop.run_in_executor(ex, self._apply_zero, off, n))
                elif t != wire.HELLO and not greeted:
                    raise ValueError(f"message {t:#x} before a successful HELLO")
                elif t == wire.FLUSH:
                    (token,) = wire.OFFSET.unpack_from(msg.front)
                    err = await io(self._flush)
                    await ss.send(wire.FLUSHED, wire.FLUSHED_S.pack(token, err))
                else:
                    req = wire.dec(msg.front)
                    token = req.get("token")
                    if t == wire.HELLO:
                        purpose = str(req.get("purpose", "copy"))
                        reply = await io(self._hello, int(req.get("size", -1)), purpose)
                        greeted = bool(reply.get("ok"))
                        copying = greeted and purpose != "query"
                        if copying and self.active is not ss:
                            # one source at a time: an accepted copy session replaces
                            # the previous one (a refused HELLO or a query does not)
                            old = self.active
                            if old is not None:
                                log.info("a new source session takes over from the "
                                         "previous one")
                                task = asyncio.ensure_future(old.close(timeout=0.5))
                                self._bg.add(task)
                                task.add_done_callback(self._bg.discard)
                            self.active = ss
                        await ss.send(wire.HELLO_REPLY, wire.enc(dict(reply, token=token)))
                    elif t == wire.DIGESTS:
                        self.digest_requests += 1
                        data = await io(self._all_digests)
                        chunk = self.chunk if int(req.get("chunk", 0)) == self.chunk else 0
                        first = max(0, int(req.get("first", 0)))
                        count = min(int(req.get("count", self.nchunks)),
                                    wire.DIGESTS_PER_REPLY, max(0, self.nchunks - first))
                        part = data[first * DIGEST_SIZE:(first + count) * DIGEST_SIZE]
                        await ss.send(wire.DIGEST_LIST, wire.enc(
                            {"token": token, "chunk": chunk, "first": first, "count": count,
                             "total": self.nchunks}), part if chunk else b"")
                    elif t == wire.COMMIT:
                        ok, err = await io(self._commit, int(req["size"]), int(req["epoch"]),
                                           str(req["digest"]))
                        if not ok:
                            self.commits_refused += 1
                            log.warning("COMMIT %s refused: %s", req.get("epoch"), err)
                        await ss.send(wire.COMMIT_REPLY, wire.enc(
                            {"token": token, "epoch": req["epoch"], "committed": ok,
                             "error": err}))
                        if ok:
                            halt_point("dest:replied")
                            self._committed()
                    elif t == wire.OUTCOME:
                        ok = await io(self._outcome, int(req["epoch"]))
                        await ss.send(wire.OUTCOME_REPLY, wire.enc(
                            {"token": token, "epoch": req["epoch"], "committed": ok}))
                    else:
                        raise ValueError(f"unknown message type {t:#x}")
                while pending and (pending[0].done() or len(pending) > MAX_PENDING):
                    await pending.popleft()
        except (Msgr2Error, OSError, ConnectionError) as exc:
            log.info("source session ended: %s", exc)
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("protocol error from the source: %s; closing the session", exc)
        finally:
            for f in pending:
                try:
                    await f
                except OSError as exc:
                    log.warning("write failed: %s", exc)
            if self.active is ss:
                self.active = None

    def _committed(self) -> None:
        if self.on_commit is not None:
            try:
                self.on_commit()
            except Exception:
                log.exception("starting to serve after the commit failed")
        if self.committed_event is not None:
            self.committed_event.set()

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.backend.close()


def create_image(path: str, size: int) -> None:
    """Create (or extend to) a sparse image of ``size`` bytes if it does not exist."""
    if os.path.exists(path):
        return
    with open(path, "wb") as f:
        f.truncate(size)
