"""The msgr2 transport: a mirror's link to a ``pynbd listen`` destination.

The session is lossless: a dropped TCP connection is re-established by the msgr2 layer
and unacknowledged messages are resent, so the mirror does not notice. When the session
itself is lost (destination restarted, reconnect timeout), the mirror reconnects with a
new session and asks for the destination's per-chunk digests (resume).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from pynbd.migration import wire
from pynbd.migration.transport import (
    ConnectFailed,
    InDoubtError,
    RejectedError,
    Transport,
    TransportError,
)
from pynbd.msgr2.aio import ClientSession, Msgr2Client, SessionOptions
from pynbd.msgr2.auth import AuthNone, PskAuth
from pynbd.msgr2.errors import Msgr2Error

log = logging.getLogger("pynbd.migration")

parse_msgr2_uri = wire.parse_msgr2_uri

REPLY_TIMEOUT = 60.0
COMMIT_TIMEOUT = 30.0
#: WRITE/ZERO messages the mirror may queue ahead of the sender (4 MiB each at most)
MAX_QUEUED = 8


class Lease:
    """The copy lease a destination handed to this mirror (shared by its attempts): it
    lets a new msgr2 session of the same mirror take the copy over from its old one."""

    def __init__(self) -> None:
        self.secret: bytes | None = None


class BusyError(TransportError):
    """Another source session owns the destination's copy (it may go away: retry)."""


class Msgr2Transport(Transport):
    supports_commit = True
    wants_digests = True
    description = "msgr2"

    def __init__(self, host: str, port: int, psk: bytes | None = None, secure: bool = False,
                 options: SessionOptions | None = None,
                 reply_timeout: float | None = None, lease: Lease | None = None) -> None:
        #: the copy lease (kept across the mirror's attempts)
        self.lease = lease if lease is not None else Lease()
        #: this session owns the destination's copy (release it on close)
        self.owner = False
        #: seconds to wait for FLUSHED, DIGEST_LIST, COMMIT_REPLY, OUTCOME_REPLY...
        self.reply_timeout = reply_timeout or REPLY_TIMEOUT
        self.host = host
        self.port = port
        self.psk = psk
        self.secure = secure
        self.options = options or SessionOptions(keepalive_interval=1.0,
                                                 keepalive_timeout=10.0,
                                                 connect_timeout=10.0, reconnect_timeout=15.0,
                                                 max_unacked_bytes=64 * 1024 * 1024)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.session: ClientSession | None = None
        self.waiters: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self.tokens = itertools.count(1)
        self.hello: dict[str, Any] = {}
        self.reader: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None
        self.watchdog: asyncio.Task[None] | None = None
        self.sender: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[tuple[int, bytes, bytes, asyncio.Future[None] | None]] | \
            None = None
        #: messages queued by the mirror thread but not yet handed to msgr2
        self._slots = threading.BoundedSemaphore(MAX_QUEUED)
        self._cookie: int | None = None

    # --- loop plumbing -----------------------------------------------------------------

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self.thread = threading.Thread(target=run, daemon=True, name="msgr2-mirror")
        self.thread.start()
        ready.wait()

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        assert self.loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError("no answer from the destination") from None

    # --- session -----------------------------------------------------------------------

    async def _connect(self) -> None:
        auth: AuthNone | PskAuth = PskAuth(self.psk) if self.psk else AuthNone()
        mode = "secure" if self.secure else "crc"
        self.session = await Msgr2Client.connect(self.host, self.port, auth=auth, mode=mode,
                                                 lossless=True, options=self.options)
        self.reader = asyncio.ensure_future(self._read_loop())
        self._queue = asyncio.Queue()
        self.sender = asyncio.ensure_future(self._send_loop())
        est = self.session.established
        self._cookie = est.server_cookie if est is not None else None
        self.watchdog = asyncio.ensure_future(self._watch_reset())

    async def _watch_reset(self) -> None:
        """A reconnect that reached a destination that lost our session (it restarted) is
        a new session: what we sent since its last ACK is gone. Fail loudly."""
        s = self.session
        assert s is not None
        while self.failed is None and not s.closed:
            await asyncio.sleep(0.1)
            est = s.established
            if est is not None and est.server_cookie != self._cookie:
                self._fail(TransportError("the destination lost the session (restarted?)"))
                return
        if s.closed and self.failed is None:
            self._fail(TransportError("msgr2 session closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(TransportError(f"msgr2 session failed: {exc}"))
        self.waiters.clear()
        q = self._queue
        while q is not None and not q.empty():
            item = q.get_nowait()
            if item[3] is not None and not item[3].done():
                item[3].set_exception(TransportError(f"msgr2 session failed: {exc}"))

    async def _send_loop(self) -> None:
        """The one place that sends: messages leave in the order they were queued."""
        s = self.session
        q = self._queue
        assert s is not None and q is not None
        while True:
            msg_type, front, data, done = await q.get()
            try:
                await s.send(msg_type, front, data)
            except (Msgr2Error, OSError) as exc:
                if done is not None and not done.done():
                    done.set_exception(exc)
                self._fail(exc)
                return
            finally:
                if done is None:
                    self._slots.release()
            if done is not None and not done.done():
                done.set_result(None)

    async def _send(self, msg_type: int, front: bytes, data: bytes = b"") -> None:
        """Queue a message behind every earlier one and wait until it was handed over."""
        assert self.loop is not None and self._queue is not None
        if self.failed is not None:
            raise TransportError(f"msgr2 session failed: {self.failed}")
        done: asyncio.Future[None] = self.loop.create_future()
        self._queue.put_nowait((msg_type, front, data, done))
        await done

    def _post(self, msg_type: int, front: bytes, data: bytes = b"") -> None:
        """From the mirror thread: queue a message without waiting (bounded)."""
        while not self._slots.acquire(timeout=0.5):
            if self.failed is not None:
                break
        if self.failed is not None:
            raise TransportError(f"msgr2 session failed: {self.failed}")
        assert self.loop is not None and self._queue is not None
        self.loop.call_soon_threadsafe(self._queue.put_nowait, (msg_type, front, data, None))

    async def _read_loop(self) -> None:
        s = self.session
        assert s is not None
        try:
            while True:
                msg = await s.recv()
                if msg.type == wire.FLUSHED:
                    token, err = wire.FLUSHED_S.unpack_from(msg.front)
                    obj: dict[str, Any] = {"token": token, "errno": err}
                else:
                    obj = wire.dec(msg.front)
                fut = self.waiters.pop(int(obj.get("token", -1)), None)
                if fut is not None and not fut.done():
                    fut.set_result((obj, bytes(msg.data)))
        except (Msgr2Error, OSError, ValueError) as exc:
            self._fail(exc)

    async def _request(self, msg_type: int, front: dict[str, Any] | None,
                       raw_front: bytes | None = None,
                       token: int | None = None) -> tuple[dict[str, Any], bytes]:
        s = self.session
        assert s is not None and self.loop is not None
        if token is None:
            token = next(self.tokens)
        if self.failed is not None:
            raise TransportError(f"msgr2 session failed: {self.failed}")
        fut: asyncio.Future[tuple[dict[str, Any], bytes]] = self.loop.create_future()
        self.waiters[token] = fut
        if front is not None:
            raw_front = wire.enc(dict(front, token=token))
        assert raw_front is not None
        await self._send(msg_type, raw_front)
        return await fut

    def _wrap(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.failed is not None:
            raise TransportError(f"msgr2 session failed: {self.failed}")
        try:
            return fn()
        except TransportError:
            raise
        except (Msgr2Error, OSError, TimeoutError) as exc:
            raise TransportError(f"{what}: {exc}") from exc

    def _hello_request(self, size: int, purpose: str) -> dict[str, Any]:
        req: dict[str, Any] = {"size": size, "purpose": purpose}
        s = self.session
        if purpose == "copy" and self.lease.secret is not None and s is not None:
            # the same mirror coming back: prove it, bound to this session's cookies
            req["resume"] = wire.resume_proof(self.lease.secret, s.session.client_cookie,
                                              s.session.server_cookie)
        return req

    def connect(self, size: int, purpose: str = "copy") -> None:
        self._start_loop()
        try:
            self._call(self._connect(), 30.0)
        except (Msgr2Error, OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to msgr2://{self.host}:{self.port}: {exc}") \
                from exc
        req = self._hello_request(size, purpose)
        reply, _ = self._wrap("hello", lambda: self._call(
            self._request(wire.HELLO, req), 30.0))
        self.hello = reply
        if not reply.get("ok"):
            err = str(reply.get("error") or "destination refused")
            if reply.get("busy"):
                raise BusyError(f"destination busy: {err}")
            raise RejectedError(err)
        if int(reply.get("size", -1)) != size:
            raise RejectedError(f"destination size {reply.get('size')} does not match local "
                                f"size {size}")
        if purpose == "copy":
            lease = reply.get("lease")
            if isinstance(lease, str):
                try:
                    self.lease.secret = bytes.fromhex(lease)
                except ValueError:
                    self.lease.secret = None
            self.owner = True

    def connect_for_query(self, size: int) -> None:
        self.connect(size, purpose="query")

    def last_epoch(self) -> int:
        return int(self.hello.get("epoch", 0))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        payload = data if isinstance(data, bytes) else bytes(data)
        self._post(wire.WRITE, wire.OFFSET.pack(offset), payload)

    def zero(self, offset: int, length: int) -> None:
        self._post(wire.ZERO, wire.RANGE.pack(offset, length))

    def flush(self) -> None:
        token = next(self.tokens)
        reply, _ = self._wrap("flush", lambda: self._call(
            self._request(wire.FLUSH, None, wire.OFFSET.pack(token), token), self.reply_timeout))
        if reply.get("errno"):
            raise TransportError(f"destination flush failed (errno {reply['errno']})")

    def chunk_digests(self, chunk: int) -> bytes | None:
        """All per-chunk digests, asked for in slices that fit a msgr2 segment."""
        out = bytearray()
        first = 0
        while True:
            req = {"chunk": chunk, "first": first, "count": wire.DIGESTS_PER_REPLY}
            reply, data = self._wrap("digests", lambda r=req: self._call(  # type: ignore[misc]
                self._request(wire.DIGESTS, r), self.reply_timeout))
            if int(reply.get("chunk", 0)) != chunk:
                return None
            out += data
            first += len(data) // 32
            if not data or first >= int(reply.get("total", 0)):
                return bytes(out)

    def commit(self, size: int, epoch: int, digest: str,
               on_sent: Callable[[], None] | None = None) -> None:
        if self.failed is not None:
            # certainly not sent, but let the destination say so (it then refuses it)
            raise InDoubtError(f"msgr2 session failed: {self.failed}")
        assert self.loop is not None
        token = next(self.tokens)
        fut: asyncio.Future[tuple[dict[str, Any], bytes]] = self.loop.create_future()
        self.waiters[token] = fut
        front = wire.enc({"token": token, "size": size, "epoch": epoch, "digest": digest})
        try:
            self._call(self._send(wire.COMMIT, front), COMMIT_TIMEOUT)
        except (TransportError, Msgr2Error, OSError, TimeoutError) as exc:
            raise InDoubtError(f"COMMIT may or may not have left: {exc}") from exc
        if on_sent is not None:
            on_sent()

        async def wait() -> tuple[dict[str, Any], bytes]:
            return await fut

        try:
            reply, _ = self._call(wait(), COMMIT_TIMEOUT)
        except (TransportError, Msgr2Error, OSError, TimeoutError) as exc:
            raise InDoubtError(f"no answer to COMMIT {epoch}: {exc}") from exc
        if not reply.get("committed"):
            raise RejectedError(str(reply.get("error") or "commit refused"))

    def query_outcome(self, epoch: int) -> bool:
        reply, _ = self._wrap("outcome", lambda: self._call(
            self._request(wire.OUTCOME, {"epoch": epoch}), self.reply_timeout))
        if reply.get("busy") or not isinstance(reply.get("committed"), bool):
            raise BusyError(f"destination busy: {reply.get('error') or 'no answer'}")
        return bool(reply["committed"])

    def abort(self) -> None:
        loop = self.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already stopped
                loop.call_soon_threadsafe(self._fail, TransportError("aborted"))

    def close(self, release: bool = True) -> None:
        """Close the session; the owner of the copy first releases it (RELEASE), so the
        destination is free for another source at once, unless ``release`` is False (the
        mirror retries and comes back with its lease)."""
        loop = self.loop
        if loop is None:
            return
        s = self.session
        # (also after abort(), e.g. `pynbd break`: the session itself still works)
        release = release and self.owner

        async def shut() -> None:
            for task in (self.reader, self.watchdog, self.sender):
                if task is not None:
                    task.cancel()
            if s is not None and release and not s.closed:
                with contextlib.suppress(Exception):
                    await s.send(wire.RELEASE, wire.enc({"token": 0}))
                self.owner = False
            if s is not None:
                with contextlib.suppress(Exception):
                    await s.close(timeout=2.0)

        with contextlib.suppress(Exception):
            self._call(shut(), 5.0)
        loop.call_soon_threadsafe(loop.stop)
        if self.thread is not None:
            self.thread.join(5)
        self.loop = None
