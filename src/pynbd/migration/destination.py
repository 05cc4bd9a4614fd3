"""The migration destination (``pynbd listen``): receives an image over msgr2, verifies
it, and takes over only on a verified COMMIT (see docs/migration.md)."""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pynbd.backends.base import STATE_ZERO
from pynbd.backends.file import FileBackend
from pynbd.migration import wire
from pynbd.migration.digests import DIGEST_SIZE, ChunkDigests, image_digest, zero_digest
from pynbd.migration.dirty import DEFAULT_CHUNK
from pynbd.migration.faults import halt_point
from pynbd.migration.records import read_record, record_path, write_record
from pynbd.migration.states import DestinationState
from pynbd.msgr2.aio import ReceivedMessage, ServerSession
from pynbd.msgr2.errors import Msgr2Error

log = logging.getLogger("pynbd.migration")

MAX_PENDING = 8
#: messages only the session that owns the copy may send
_COPY_MESSAGES = frozenset((wire.WRITE, wire.ZERO, wire.FLUSH, wire.DIGESTS, wire.COMMIT,
                            wire.RELEASE))
_NAMES = {wire.WRITE: "WRITE", wire.ZERO: "ZERO", wire.FLUSH: "FLUSH", wire.DIGESTS: "DIGESTS",
          wire.COMMIT: "COMMIT", wire.RELEASE: "RELEASE"}
DEFAULT_TAKEOVER_AFTER = wire.DEFAULT_TAKEOVER_AFTER


@dataclass
class _Owner:
    """The one source session that may write, flush, ask for digests and commit."""

    ss: ServerSession
    lease: bytes
    since: float
    peer: str
    #: when its session ended without a RELEASE (monotonic), else None
    ended: float | None = None


def _peer(ss: ServerSession) -> str:
    link = ss.link
    t = link.transport if link is not None else None
    peer = t.get_extra_info("peername") if t is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return "?"


def _cookies(ss: ServerSession) -> tuple[int, int]:
    return ss.session.client_cookie, ss.session.server_cookie


def _releaser(msg: ReceivedMessage) -> Callable[[asyncio.Future[Any]], None]:
    def done(_f: asyncio.Future[Any]) -> None:
        msg.release()
    return done


class Destination:
    def __init__(self, path: str, chunk: int = DEFAULT_CHUNK,
                 takeover_after: float = DEFAULT_TAKEOVER_AFTER) -> None:
        self.path = path
        self.record = record_path(path)
        self.backend = FileBackend(path)
        self.size = self.backend.size
        self.chunk = chunk
        #: the digest of every chunk as it is on disk (where known)
        self.chunks = ChunkDigests(self.size, chunk)
        self.nchunks = self.chunks.nchunks
        rec = read_record(self.record) or {}
        if rec and rec.get("role") != "destination":
            raise ValueError(f"{self.record} is a {rec.get('role')} record: this image is a "
                             "migration source")
        self.epoch = int(rec.get("epoch", 0))
        self.aborted: set[int] = {int(x) for x in rec.get("aborted", [])}
        self.state = DestinationState.AUTHORITATIVE \
            if rec.get("state") == DestinationState.AUTHORITATIVE else (
                DestinationState.RECEIVING if rec else DestinationState.IDLE)
        self.bytes_received = 0
        self.writes = 0
        self.zeroes = 0
        self.digest_requests = 0
        self.sessions = 0
        self.commits_refused = 0
        self.started = time.monotonic()
        #: the session that owns the copy (see docs/migration.md, "One source at a time")
        self.owner: _Owner | None = None
        self.takeover_after = takeover_after
        self.hellos_refused = 0
        self.takeovers = 0
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="listen-io")
        self.on_commit: Callable[[], None] | None = None
        self.exit_after_commit = False
        self.committed_event: asyncio.Event | None = None
        self.serving: str | None = None
        self._bg: set[asyncio.Future[None]] = set()

    @property
    def authoritative(self) -> bool:
        return self.state is DestinationState.AUTHORITATIVE

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
            "hellos_refused": self.hellos_refused,
            "takeovers": self.takeovers,
            "owner": self._owner_status(),
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
                        self.chunks.set(i, zero_digest(min(c, self.size - i * c)))
                pos = end
                if pos >= self.size:
                    break
        self._all_digests()

    def _read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.backend.pread_into(memoryview(buf), offset)
        return buf

    def _apply_write(self, offset: int, data: bytes | memoryview) -> None:
        self.backend.pwrite(memoryview(data), offset)
        self.chunks.wrote(offset, data)

    def _apply_zero(self, offset: int, length: int) -> None:
        self.backend.zero(offset, length, may_trim=True)
        self.chunks.zeroed(offset, length)

    def _all_digests(self) -> bytes:
        return self.chunks.complete(self._read)

    def _flush(self) -> int:
        try:
            self.backend.flush()
        except OSError as exc:
            return exc.errno or 5
        return 0

    def _commit(self, size: int, epoch: int, digest: str) -> tuple[bool, str]:
        halt_point("dest:commit-received")
        if self.state is DestinationState.AUTHORITATIVE:
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
        write_record(self.record, {"role": "destination",
                                   "state": DestinationState.AUTHORITATIVE, "epoch": epoch,
                                   "aborted": sorted(self.aborted), "digest": digest,
                                   "size": size})
        self.state = DestinationState.AUTHORITATIVE
        self.epoch = epoch
        log.info("COMMIT %d verified and durable: this copy is authoritative now", epoch)
        halt_point("dest:durable")
        return True, ""

    def _outcome(self, epoch: int) -> bool:
        if self.state is DestinationState.AUTHORITATIVE and self.epoch == epoch:
            return True
        if epoch not in self.aborted:
            self.aborted.add(epoch)
            state = self.state if self.state is not DestinationState.IDLE \
                else DestinationState.RECEIVING
            write_record(self.record, {"role": "destination", "state": state,
                                       "epoch": self.epoch, "aborted": sorted(self.aborted)})
            log.warning("epoch %d declared not committed; a late COMMIT %d will be refused",
                        epoch, epoch)
        return False

    def _base(self) -> dict[str, Any]:
        return {"size": self.size, "epoch": max([self.epoch, *self.aborted]),
                "state": self.state, "authoritative": self.authoritative}

    def _mark_receiving(self) -> None:
        if self.state is DestinationState.IDLE:
            write_record(self.record, {"role": "destination",
                                       "state": DestinationState.RECEIVING,
                                       "epoch": self.epoch, "aborted": sorted(self.aborted)})
            self.state = DestinationState.RECEIVING

    # --- who owns the copy (on the event loop) ------------------------------------------

    def _owner_gone_for(self, owner: _Owner, now: float) -> float | None:
        """Seconds since the owner was last heard of, or None while it is connected."""
        ss = owner.ss
        link = ss.link
        if not ss.closed and link is not None and link.conn.ready and \
                not link.closed.is_set():
            return None
        if owner.ended is not None:
            last = owner.ended
        elif link is not None:
            last = link.last_rx
        else:
            last = owner.since
        return max(0.0, now - last)

    def _owner_status(self) -> dict[str, Any] | None:
        o = self.owner
        if o is None:
            return None
        gone = self._owner_gone_for(o, time.monotonic())
        return {"peer": o.peer, "connected": gone is None,
                "gone_seconds": None if gone is None else round(gone, 3),
                "owned_seconds": round(time.monotonic() - o.since, 3)}

    def _claim(self, ss: ServerSession, req: dict[str, Any]) -> str | None:
        """Make ``ss`` the owner of the copy, or say why not (None = it owns it now)."""
        now = time.monotonic()
        owner = self.owner
        peer = _peer(ss)
        if owner is not None and owner.ss is ss:
            return None
        if owner is not None:
            proof = req.get("resume")
            expect = wire.resume_proof(owner.lease, *_cookies(ss))
            if isinstance(proof, str) and hmac.compare_digest(proof.encode(), expect.encode()):
                why = "the source came back on a new session (it proved it holds the lease)"
            else:
                gone = self._owner_gone_for(owner, now)
                if gone is None or gone < self.takeover_after:
                    state = "connected" if gone is None else f"gone for {gone:.1f} s"
                    return (f"another source session owns this copy (from {owner.peer}, "
                            f"{state}); it must release it, or be gone for "
                            f"{self.takeover_after:g} s, before another source may take "
                            "over")
                why = f"the previous source session has been gone for {gone:.1f} s"
            log.warning("%s takes over the copy from %s: %s", peer, owner.peer, why)
            self.takeovers += 1
            self._drop(owner)
        self.owner = _Owner(ss, os.urandom(wire.LEASE_LEN), now, peer)
        return None

    def _drop(self, owner: _Owner) -> None:
        if self.owner is owner:
            self.owner = None
        if not owner.ss.closed:
            task = asyncio.ensure_future(owner.ss.close(timeout=0.5))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _on_hello(self, ss: ServerSession, req: dict[str, Any],
                        io: Callable[..., Any]) -> dict[str, Any]:
        purpose = req.get("purpose", "copy")
        if purpose == "query":
            return dict(self._base(), ok=True)
        if purpose != "copy":
            return dict(self._base(), ok=False, error=f"unknown HELLO purpose {purpose!r}")
        size = int(req.get("size", -1))
        if self.authoritative:
            return dict(self._base(), ok=False, error=f"destination is authoritative (epoch "
                                                      f"{self.epoch}): it already took over")
        if size != self.size:
            return dict(self._base(), ok=False, error=f"remote size {self.size} does not "
                                                      f"match local size {size}")
        refusal = self._claim(ss, req)
        if refusal is not None:
            self.hellos_refused += 1
            log.warning("copy HELLO from %s refused: %s", _peer(ss), refusal)
            return dict(self._base(), ok=False, busy=True, error=refusal)
        owner = self.owner
        assert owner is not None
        await io(self._mark_receiving)
        return dict(self._base(), ok=True, lease=owner.lease.hex())

    # --- the session handler -----------------------------------------------------------

    async def handle(self, ss: ServerSession) -> None:
        await _SourceSession(self, ss).run()

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


class _SourceSession:
    """One source's msgr2 session on the destination: what it may send when, and what
    each message does. Writes and zeroes go to the single I/O thread in arrival order;
    at most MAX_PENDING of them are in flight."""

    def __init__(self, dest: Destination, ss: ServerSession) -> None:
        self.dest = dest
        self.ss = ss
        self.loop = asyncio.get_running_loop()
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.greeted = False
        # this session owned the copy at some point (so a copy message after it lost
        # ownership means it was replaced, not that it never asked)
        self.was_owner = False
        self.handlers: dict[int, Callable[[ReceivedMessage], Awaitable[None]]] = {
            wire.WRITE: self._write, wire.ZERO: self._zero, wire.FLUSH: self._flush,
            wire.RELEASE: self._release, wire.HELLO: self._hello,
            wire.DIGESTS: self._digests, wire.COMMIT: self._commit,
            wire.OUTCOME: self._outcome,
        }

    def owns(self) -> bool:
        o = self.dest.owner
        return o is not None and o.ss is self.ss

    async def io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(self.dest.executor, fn, *args)

    async def run(self) -> None:
        dest, ss = self.dest, self.ss
        dest.sessions += 1
        try:
            while True:
                msg = await ss.recv()
                self._check(msg.type)
                handler = self.handlers.get(msg.type)
                if handler is None:
                    raise ValueError(f"unknown message type {msg.type:#x}")
                await handler(msg)
                pending = self.pending
                while pending and (pending[0].done() or len(pending) > MAX_PENDING):
                    await pending.popleft()
        except (Msgr2Error, OSError, ConnectionError) as exc:
            log.info("source session ended: %s", exc)
            o = dest.owner
            if o is not None and o.ss is ss and o.ended is None:
                # not released: nobody else may take over before --takeover-after
                link = ss.link
                o.ended = link.last_rx if link is not None else time.monotonic()
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("protocol error from %s: %s; closing the session", _peer(ss), exc)
            if self.owns():
                # the owner broke the rules: it loses the copy
                dest.owner = None
        finally:
            for f in self.pending:
                try:
                    await f
                except OSError as exc:
                    log.warning("write failed: %s", exc)

    def _check(self, t: int) -> None:
        """Only the owner writes, flushes, reads digests and commits: not a session that
        never said HELLO, asked a query, was refused, was replaced by the same source on
        a new session, or released. Nothing but HELLO comes before a HELLO."""
        authoritative = self.dest.authoritative
        if t in _COPY_MESSAGES and not self.owns():
            name = _NAMES[t]
            if authoritative and t in (wire.WRITE, wire.ZERO):
                raise ValueError(f"{name} to an authoritative image")
            if self.was_owner:
                raise ValueError(f"{name} from a session that no longer owns the "
                                 "copy (released, or replaced by a newer one)")
            raise ValueError(f"{name} before HELLO" if not self.greeted else
                             f"{name} in a session that does not own the copy")
        if t in (wire.WRITE, wire.ZERO):
            if authoritative:
                raise ValueError(f"{_NAMES[t]} to an authoritative image")
        elif t != wire.HELLO and not self.greeted:
            raise ValueError(f"message {t:#x} before a successful HELLO")

    # --- the copy (the owner only) ------------------------------------------------

    async def _write(self, msg: ReceivedMessage) -> None:
        dest = self.dest
        (off,) = wire.OFFSET.unpack_from(msg.front)
        data = msg.data
        if off + len(data) > dest.size:
            raise ValueError("WRITE beyond the end of the image")
        dest.bytes_received += len(data)
        dest.writes += 1
        # written straight from the receive buffer, which goes back to the session's
        # pool (on this loop's thread) once the write is done
        wfut = self.loop.run_in_executor(dest.executor, dest._apply_write, off, data)
        wfut.add_done_callback(_releaser(msg))
        self.pending.append(wfut)

    async def _zero(self, msg: ReceivedMessage) -> None:
        dest = self.dest
        off, n = wire.RANGE.unpack_from(msg.front)
        if off + n > dest.size:
            raise ValueError("ZERO beyond the end of the image")
        dest.zeroes += 1
        self.pending.append(self.loop.run_in_executor(dest.executor, dest._apply_zero, off, n))

    async def _flush(self, msg: ReceivedMessage) -> None:
        (token,) = wire.OFFSET.unpack_from(msg.front)
        err = await self.io(self.dest._flush)
        await self.ss.send(wire.FLUSHED, wire.FLUSHED_S.pack(token, err))

    async def _release(self, msg: ReceivedMessage) -> None:
        # everything it sent before is applied (same I/O thread, in order)
        owner = self.dest.owner
        assert owner is not None
        log.info("the source (%s) released the copy session", owner.peer)
        self.dest.owner = None

    # --- requests and their replies ---------------------------------------------------

    async def _hello(self, msg: ReceivedMessage) -> None:
        req = wire.dec(msg.front)
        reply = await self.dest._on_hello(self.ss, req, self.io)
        ok = bool(reply.get("ok"))
        self.greeted = self.greeted or ok
        if ok and self.owns():
            self.was_owner = True
        await self.ss.send(wire.HELLO_REPLY, wire.enc(dict(reply, token=req.get("token"))))

    async def _digests(self, msg: ReceivedMessage) -> None:
        dest = self.dest
        req = wire.dec(msg.front)
        dest.digest_requests += 1
        data = await self.io(dest._all_digests)
        chunk = dest.chunk if int(req.get("chunk", 0)) == dest.chunk else 0
        first = max(0, int(req.get("first", 0)))
        count = min(int(req.get("count", dest.nchunks)), wire.DIGESTS_PER_REPLY,
                    max(0, dest.nchunks - first))
        part = data[first * DIGEST_SIZE:(first + count) * DIGEST_SIZE]
        await self.ss.send(wire.DIGEST_LIST, wire.enc(
            {"token": req.get("token"), "chunk": chunk, "first": first, "count": count,
             "total": dest.nchunks}), part if chunk else b"")

    async def _commit(self, msg: ReceivedMessage) -> None:
        dest = self.dest
        req = wire.dec(msg.front)
        ok, err = await self.io(dest._commit, int(req["size"]), int(req["epoch"]),
                                str(req["digest"]))
        if not ok:
            dest.commits_refused += 1
            log.warning("COMMIT %s refused: %s", req.get("epoch"), err)
        await self.ss.send(wire.COMMIT_REPLY, wire.enc(
            {"token": req.get("token"), "epoch": req["epoch"], "committed": ok,
             "error": err}))
        if ok:
            halt_point("dest:replied")
            dest._committed()

    async def _outcome(self, msg: ReceivedMessage) -> None:
        dest = self.dest
        req = wire.dec(msg.front)
        token = req.get("token")
        epoch = int(req["epoch"])
        o = dest.owner
        if o is not None and o.ss is not self.ss and \
                dest._owner_gone_for(o, time.monotonic()) is None:
            # the owner is connected, so it is not in doubt: nobody else gets to
            # declare its epochs not committed
            await self.ss.send(wire.OUTCOME_REPLY, wire.enc(
                {"token": token, "epoch": epoch, "committed": None, "busy": True,
                 "error": "the source that owns the copy is connected (from "
                          f"{o.peer}); ask again once it is gone"}))
            return
        ok = await self.io(dest._outcome, epoch)
        await self.ss.send(wire.OUTCOME_REPLY, wire.enc(
            {"token": token, "epoch": epoch, "committed": ok}))
