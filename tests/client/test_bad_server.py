"""A broken or hostile server gets a clear exception: never a hang, never unbounded
memory. Driven by a raw-socket fake server in a thread."""

from __future__ import annotations

import errno
import socket
import struct
import tracemalloc

import pytest

from pynbd.client import Client, NBDRequestError, PeerProtocolError, connect
from tests.client import fakeserver as fs
from tests.client.fakeserver import FakeServer, Req

T = 5.0


def serve_reply(payload_fn):  # type: ignore[no-untyped-def]
    def handler(s: socket.socket, req: Req) -> bool:
        s.sendall(payload_fn(req))
        return True
    return handler


def run_read(handler, length: int = 4096, structured: bool = True, offset: int = 0):  # type: ignore[no-untyped-def]
    with FakeServer(handler, structured=structured) as srv:
        c = connect(srv.uri, timeout=T, structured=structured)
        try:
            return c.read(offset, length)
        finally:
            c.hard_close()


def test_good_fake_server_baseline() -> None:
    def h(s: socket.socket, req: Req) -> bool:
        s.sendall(fs.data_chunk(req.cookie, req.offset, b"a" * 1024)
                  + fs.hole_chunk(req.cookie, req.offset + 1024, 1024)
                  + fs.data_chunk(req.cookie, req.offset + 2048, b"b" * 2048, fs.DONE))
        return True
    assert run_read(h) == b"a" * 1024 + bytes(1024) + b"b" * 2048


# --- handshake -----------------------------------------------------------------------

def _greet(raw: bytes, then_close: bool = True):  # type: ignore[no-untyped-def]
    def g(s: socket.socket) -> bool:
        s.sendall(raw)
        if not then_close:
            fs.recv_exact(s, 4)
            s.recv(1024)
        return False
    return g


@pytest.mark.parametrize("raw,match", [
    (struct.pack(">QQH", 0x1122334455667788, fs.IHAVEOPT, 3), "greeting magic"),
    (struct.pack(">QQ", fs.NBDMAGIC, 0x00420281861253) + bytes(136), "oldstyle"),
    (struct.pack(">QQ", fs.NBDMAGIC, 0xDEADBEEF), "IHAVEOPT"),
    (struct.pack(">QQH", fs.NBDMAGIC, fs.IHAVEOPT, 0), "fixed newstyle"),
    (b"NBDMAG", "closed"),
    (b"", "closed"),
])
def test_bad_greeting(raw: bytes, match: str) -> None:
    with FakeServer(greeting=_greet(raw)) as srv:
        c = Client.dial(srv.uri, timeout=T)
        with pytest.raises(PeerProtocolError, match=match):
            c.handshake()


def _options_then(reply: bytes):  # type: ignore[no-untyped-def]
    def g(s: socket.socket) -> bool:
        s.sendall(struct.pack(">QQH", fs.NBDMAGIC, fs.IHAVEOPT, 3))
        fs.recv_exact(s, 4)
        _, _opt, length = struct.unpack(">QII", fs.recv_exact(s, 16))
        fs.recv_exact(s, length)
        s.sendall(reply)
        return False
    return g


@pytest.mark.parametrize("reply,match", [
    (struct.pack(">QIII", 0x1234, fs.OPT_LIST, fs.REP_ACK, 0), "option reply magic"),
    (struct.pack(">QIII", fs.REPLY_MAGIC, fs.OPT_GO, fs.REP_ACK, 0), "while waiting"),
    # a 3 GiB reply: refused from the header alone, nothing is allocated
    (struct.pack(">QIII", fs.REPLY_MAGIC, fs.OPT_LIST, fs.REP_SERVER, 3 << 30), "exceeds"),
    (struct.pack(">QIII", fs.REPLY_MAGIC, fs.OPT_LIST, fs.REP_SERVER, 8)
     + struct.pack(">I", 1000) + b"abcd", "overruns"),
    (struct.pack(">QIII", fs.REPLY_MAGIC, fs.OPT_LIST, 77, 0), "unexpected option reply"),
    (struct.pack(">QIII", fs.REPLY_MAGIC, fs.OPT_LIST, fs.REP_SERVER, 100) + b"x" * 10,
     "closed"),
])
def test_bad_option_replies(reply: bytes, match: str) -> None:
    with FakeServer(greeting=_options_then(reply)) as srv:
        c = Client.dial(srv.uri, timeout=T)
        c.handshake()
        with pytest.raises(PeerProtocolError, match=match):
            c.list_exports()
        with pytest.raises(PeerProtocolError, match="unusable"):
            c.list_exports()


def test_go_ack_without_export_info() -> None:
    def g(s: socket.socket) -> bool:
        s.sendall(struct.pack(">QQH", fs.NBDMAGIC, fs.IHAVEOPT, 3))
        fs.recv_exact(s, 4)
        _, opt, length = struct.unpack(">QII", fs.recv_exact(s, 16))
        fs.recv_exact(s, length)
        fs.opt_reply(s, opt, fs.REP_ACK)
        return False
    with FakeServer(greeting=g) as srv:
        c = Client.dial(srv.uri, timeout=T)
        c.handshake()
        with pytest.raises(PeerProtocolError, match="NBD_INFO_EXPORT"):
            c.go()


# --- transmission --------------------------------------------------------------------

BAD_READ_REPLIES = [
    ("bad magic", lambda r: struct.pack(">IIQ", 0x12345678, 0, r.cookie), "reply magic"),
    ("unknown cookie simple", lambda r: fs.simple(r.cookie + 99), "unknown cookie"),
    ("unknown cookie chunk", lambda r: fs.none_chunk(r.cookie + 99), "unknown cookie"),
    ("unknown chunk type", lambda r: fs.chunk(r.cookie, 77, fs.DONE, b"xx"), "unknown"),
    ("reserved type 3", lambda r: fs.chunk(r.cookie, 3, fs.DONE, b""), "unknown"),
    ("simple reply to read", lambda r: fs.simple(r.cookie) + bytes(4096), "simple reply"),
    ("chunk before offset", lambda r: fs.data_chunk(r.cookie, 0, b"x" * 10, fs.DONE),
     "outside the request"),
    ("chunk past end", lambda r: fs.data_chunk(r.cookie, r.offset + 4000, b"x" * 200, fs.DONE),
     "outside the request"),
    ("hole past end", lambda r: fs.hole_chunk(r.cookie, r.offset + 4000, 200, fs.DONE),
     "outside the request"),
    ("overlap", lambda r: fs.data_chunk(r.cookie, r.offset, b"x" * 2048)
     + fs.data_chunk(r.cookie, r.offset + 1024, b"y" * 3072, fs.DONE), "overlaps"),
    ("duplicate", lambda r: fs.hole_chunk(r.cookie, r.offset, 4096)
     + fs.hole_chunk(r.cookie, r.offset, 4096, fs.DONE), "overlaps"),
    ("incomplete", lambda r: fs.data_chunk(r.cookie, r.offset, b"x" * 1024)
     + fs.none_chunk(r.cookie), "only 1024 bytes"),
    ("none without done", lambda r: fs.chunk(r.cookie, fs.CT_NONE, 0, b""), "DONE"),
    ("zero hole", lambda r: fs.hole_chunk(r.cookie, r.offset, 0, fs.DONE), "zero hole"),
    ("short data chunk", lambda r: fs.chunk(r.cookie, fs.CT_DATA, fs.DONE, b"x" * 8),
     "minimum 9"),
    # a 4 GiB data chunk for a 4 KiB read: refused from the header, nothing allocated
    ("huge data chunk", lambda r: fs.chunk(r.cookie, fs.CT_DATA, fs.DONE,
                                           struct.pack(">Q", r.offset), 0xFFFFFFFF),
     "outside the request"),
    ("huge error chunk", lambda r: fs.chunk(r.cookie, fs.CT_ERROR, fs.DONE,
                                            struct.pack(">IH", 5, 10), 0xFFFFFFF0), "too large"),
    ("error message overrun", lambda r: fs.chunk(r.cookie, fs.CT_ERROR, fs.DONE,
                                                 struct.pack(">IH", 5, 500) + b"x"), "overruns"),
    ("error value 0", lambda r: fs.error_chunk(r.cookie, 0), "error value 0"),
    ("block status chunk to read", lambda r: fs.chunk(
        r.cookie, fs.CT_BS, fs.DONE, struct.pack(">III", fs.CONTEXT_ID, 4096, 0)),
     "BLOCK_STATUS chunk in reply"),
    ("early close mid header", lambda r: fs.data_chunk(r.cookie, r.offset, b"")[:10], "closed"),
    ("early close mid data", lambda r: fs.data_chunk(r.cookie, r.offset, b"x" * 4096,
                                                     fs.DONE)[:1000], "closed"),
]


@pytest.mark.parametrize("name,make,match", BAD_READ_REPLIES, ids=[x[0] for x in BAD_READ_REPLIES])
def test_bad_read_replies(name: str, make, match: str) -> None:  # type: ignore[no-untyped-def]
    def handler(s: socket.socket, req: Req) -> bool:
        s.sendall(make(req))
        return False  # then close the connection
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=T)
        tracemalloc.start()
        try:
            with pytest.raises(PeerProtocolError, match=match):
                c.read(4096, 4096)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20, f"client allocated {peak} bytes"
        with pytest.raises(PeerProtocolError, match="unusable"):
            c.read(0, 512)
        assert c.close().method == "none"


def test_structured_chunk_without_negotiation() -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        s.sendall(fs.none_chunk(req.cookie))
        return False
    with FakeServer(handler, structured=False) as srv:
        c = connect(srv.uri, timeout=T)
        assert not c.structured
        with pytest.raises(PeerProtocolError, match="not negotiated"):
            c.flush()


def test_unknown_error_chunk_type_is_an_error_reply() -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        s.sendall(fs.error_chunk(req.cookie, 5, b"disk on fire", ctype=0x8000 + 99))
        return True
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=T)
        with pytest.raises(NBDRequestError, match="disk on fire") as ei:
            c.read(0, 4096)
        assert ei.value.errno == errno.EIO and ei.value.nbd_error == 5
        c.hard_close()


def test_error_offset_and_partial_data() -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        s.sendall(fs.data_chunk(req.cookie, req.offset, b"x" * 1024)
                  + fs.chunk(req.cookie, fs.CT_ERROR_OFFSET, 0,
                             struct.pack(">IH", 28, 3) + b"ENO"
                             + struct.pack(">Q", req.offset + 512))
                  + fs.none_chunk(req.cookie))
        return True
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=T)
        with pytest.raises(NBDRequestError) as ei:
            c.read(0, 4096)
        assert ei.value.errno == errno.ENOSPC and ei.value.error_offset == 512
        # the stream is still in sync: a second request works the same way
        with pytest.raises(NBDRequestError):
            c.read(0, 4096)
        c.hard_close()


def test_error_offset_outside_request() -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        s.sendall(fs.chunk(req.cookie, fs.CT_ERROR_OFFSET, fs.DONE,
                           struct.pack(">IH", 5, 0) + struct.pack(">Q", 1 << 40)))
        return False
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=T)
        with pytest.raises(PeerProtocolError, match="outside"):
            c.read(0, 4096)


def test_simple_error_reply() -> None:
    with FakeServer(serve_reply(lambda r: fs.simple(r.cookie, 1))) as srv:
        c = connect(srv.uri, timeout=T)
        with pytest.raises(NBDRequestError) as ei:
            c.write(0, b"x" * 100)
        assert ei.value.errno == errno.EPERM
        c.hard_close()


@pytest.mark.parametrize("body,flags,match", [
    (struct.pack(">III", 99, 4096, 0), fs.DONE, "unnegotiated context"),
    (struct.pack(">I", fs.CONTEXT_ID), fs.DONE, "invalid length"),
    (struct.pack(">III", fs.CONTEXT_ID, 0, 0), fs.DONE, "length 0"),
    (struct.pack(">IIIII", fs.CONTEXT_ID, 1 << 20, 0, 4096, 0), fs.DONE, "past the requested"),
])
def test_bad_block_status(body: bytes, flags: int, match: str) -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        s.sendall(fs.chunk(req.cookie, fs.CT_BS, flags, body))
        return False
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=T)
        with pytest.raises(PeerProtocolError, match=match):
            c.block_status(0, 1 << 20)


def test_huge_block_status_chunk_refused_before_allocation() -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        s.sendall(struct.pack(">IHHQI", fs.CHUNK_MAGIC, fs.DONE, fs.CT_BS, req.cookie,
                              (1 << 31) + 4))
        return False
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=T)
        with pytest.raises(PeerProtocolError, match="too large"):
            c.block_status(0, 4096)


def test_block_status_good_and_req_one_violation() -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        if req.flags & 8:  # REQ_ONE but two extents
            s.sendall(fs.chunk(req.cookie, fs.CT_BS, fs.DONE,
                               struct.pack(">IIIII", fs.CONTEXT_ID, 512, 0, 512, 3)))
            return False
        s.sendall(fs.chunk(req.cookie, fs.CT_BS, fs.DONE,
                           struct.pack(">IIIII", fs.CONTEXT_ID, 512, 0, 8192, 3)))
        return True
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=T)
        ext = c.block_status(1024, 4096)["base:allocation"]
        assert [(e.offset, e.length, e.hole, e.zero) for e in ext] == [
            (1024, 512, False, False), (1536, 8192, True, True)]
        with pytest.raises(PeerProtocolError, match="REQ_ONE"):
            c.block_status(0, 4096, 8)


def test_stalled_server_times_out() -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        try:
            s.recv(1)  # never answers; waits for the client to give up
        except OSError:
            pass
        return False
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=0.5)
        with pytest.raises(TimeoutError):
            c.read(0, 4096)
        with pytest.raises(PeerProtocolError, match="unusable"):
            c.read(0, 4096)


def test_early_close_with_requests_in_flight() -> None:
    with FakeServer(lambda s, r: False) as srv:
        c = connect(srv.uri, timeout=T)
        r1 = c.submit_read(0, 4096)
        with pytest.raises(PeerProtocolError, match="in flight"):
            c.wait(r1)


def test_eshutdown_leads_to_soft_disconnect() -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        s.sendall(fs.error_chunk(req.cookie, 108, b"server going away"))
        return True  # the fake server then expects NBD_CMD_DISC
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=T)
        with pytest.raises(NBDRequestError) as ei:
            c.write(0, b"x" * 512)
        assert ei.value.errno == errno.ESHUTDOWN
        assert c.server_shutting_down
        from pynbd.client import LocalProtocolError
        with pytest.raises(LocalProtocolError, match="shutting down"):
            c.read(0, 512)
        res = c.close()
        assert res.method == "disc" and not res.flushed
    assert [r.cmd for r in srv.requests] == [1, 2]  # WRITE, then DISC (no FLUSH)


def test_df_read_with_two_content_chunks() -> None:
    def handler(s: socket.socket, req: Req) -> bool:
        assert req.flags & 4  # NBD_CMD_FLAG_DF was sent
        s.sendall(fs.data_chunk(req.cookie, req.offset, b"x" * 2048)
                  + fs.hole_chunk(req.cookie, req.offset + 2048, 2048, fs.DONE))
        return False
    with FakeServer(handler) as srv:
        c = connect(srv.uri, timeout=T)
        assert c.can_df()
        from pynbd.client import CmdFlag
        with pytest.raises(PeerProtocolError, match="DF"):
            c.read(0, 4096, CmdFlag.DF)
