"""Random request sequences over a raw socket against a live ``pynbd serve``.

Every request (valid or not: unknown commands, stray flags, ranges past the end) must get
exactly one reply with its cookie and an error from the spec's list, the stream must
stay in sync, and READs must return what a simple model of the export says (the model
is updated only by requests the server acknowledged).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.server.rawnbd import (
    CMD_BS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_ZERO,
    Raw,
    is_dropped,
)
from tests.support.pynbd_server import PynbdServer

SIZE = 1024 * 1024
ERRORS = {1, 5, 22, 28, 75, 95}  # EPERM EIO EINVAL ENOSPC EOVERFLOW ENOTSUP


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PynbdServer]:
    srv = PynbdServer(["--bind", "127.0.0.1", "--port", "0", "memory:1M"],
                      cwd=tmp_path_factory.mktemp("fuzz"))
    try:
        yield srv
    finally:
        srv.stop()
    assert "Traceback" not in srv.stderr, srv.stderr[-3000:]


offsets = st.one_of(st.integers(0, SIZE), st.sampled_from([SIZE - 1, SIZE, SIZE + 1,
                                                          2**63, 2**64 - 1]))
lengths = st.one_of(st.integers(0, 70000), st.sampled_from([1, 4096, 65536, 2**20,
                                                           2**25, 2**25 + 1, 2**32 - 1]))
commands = st.one_of(st.sampled_from([CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE,
                                      CMD_ZERO, CMD_BS]), st.integers(8, 0xFFFF))
flags = st.one_of(st.just(0), st.sampled_from([1, 2, 4, 8, 16, 1 | 2, 1 << 5, 1 << 15]),
                  st.integers(0, 0xFFFF))
requests = st.lists(st.tuples(commands, flags, offsets, lengths, st.integers(0, 255)),
                    min_size=1, max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(reqs=requests, structured=st.booleans())
def test_random_requests_stay_in_sync(server: PynbdServer, reqs: list[tuple[int, int, int,
                                                                             int, int]],
                                      structured: bool) -> None:
    c = Raw(("127.0.0.1", server.port)).connect("", structured, meta=structured)
    try:
        # known contents: fill the first 64 KiB, model the rest as unknown
        base = bytes(range(256)) * 256
        assert c.call(CMD_WRITE, 0, len(base), payload=base)[0] == 0
        known = bytearray(base)
        unknown_from = len(base)  # bytes past this are not tracked
        for i, (cmd, fl, off, length, fill) in enumerate(reqs):
            if cmd == CMD_WRITE:
                # payload lengths past 64 MiB drop the connection by design; keep it sane
                length = min(length, 2**20)
                payload = bytes([fill]) * length
            else:
                payload = b""
            if cmd == CMD_READ and length > 2**20:
                length = 2**25 + 1  # only the refused oversize case for big reads
            cookie = 1000 + i
            c.request(cmd, off, length, fl, cookie, payload)
            got_cookie, err, data = c.response(length if cmd == CMD_READ else 0)
            assert got_cookie == cookie
            assert err == 0 or err in ERRORS, err
            if err:
                continue
            if cmd != CMD_FLUSH:  # FLUSH's offset/length are reserved (ignored)
                assert off + length <= SIZE, (cmd, fl, off, length)  # success only in range
            if cmd == CMD_READ:
                assert len(data) == length
                end = min(off + length, unknown_from)
                if off < end:
                    assert data[:end - off] == known[off:end]
            elif cmd == CMD_TRIM:
                # trimmed bytes read as old data or zeros: stop tracking from there
                if length and off < unknown_from:
                    unknown_from = off
            elif cmd in (CMD_WRITE, CMD_ZERO):
                end = min(off + length, unknown_from)
                if off < end:
                    new = (bytes([fill]) if cmd == CMD_WRITE else b"\0") * (end - off)
                    known[off:end] = new
        assert c.call(CMD_READ, 0, 4096)[0] == 0
        c.disc()
    finally:
        c.close()


def test_reply_cookies_are_echoed_exactly(server: PynbdServer) -> None:
    c = Raw(("127.0.0.1", server.port)).connect("", True)
    for cookie in (0, 1, 2**32, 2**63, 2**64 - 1):
        c.request(CMD_READ, 0, 512, 0, cookie)
        got, err, _ = c.response(512)
        assert (got, err) == (cookie, 0)
        c.send(struct.pack(">IHHQQI", 0x25609513, 0, 0x4242, cookie, 0, 0))
        got, err, _ = c.response()
        assert (got, err) == (cookie, 22)
    c.disc()


option_codes = st.one_of(st.sampled_from([3, 4, 5, 6, 8, 9, 10, 11, 0x4E42A001]),
                         st.integers(12, 2**32 - 1))


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


option_data = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda n, infos: _string(n) + struct.pack(">H", len(infos))
              + b"".join(struct.pack(">H", i) for i in infos),
              st.sampled_from([b"", b"x", b"\xff"]), st.lists(st.integers(0, 70), max_size=5)),
    st.builds(lambda n, qs: _string(n) + struct.pack(">I", len(qs))
              + b"".join(_string(q) for q in qs),
              st.sampled_from([b"", b"nope"]),
              st.lists(st.sampled_from([b"base:", b"base:allocation", b"qemu:x", b"x",
                                        b""]), max_size=4)),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(opts=st.lists(st.tuples(option_codes, option_data), max_size=10))
@example(opts=[(11, b"")])  # extended headers ACKed: 32-byte requests from then on
def test_random_options_stay_in_sync(server: PynbdServer, opts: list[tuple[int, bytes]]) -> None:
    """Any sequence of options that do not end negotiation (no EXPORT_NAME, ABORT or GO)
    is answered reply by reply, ending in ACK or an error, and a GO still works."""
    c = Raw(("127.0.0.1", server.port))
    try:
        c.greeting()
        extended = False
        for opt, data in opts:
            reps = c.option(opt, data)
            final = reps[-1][0]
            assert final == 1 or final & (1 << 31), reps
            for rep, _ in reps[:-1]:
                assert rep in (2, 3, 4), reps  # SERVER, INFO, META_CONTEXT
            extended |= opt == 11 and final == 1  # NBD_OPT_EXTENDED_HEADERS ACKed
        if extended:
            # 32-byte headers from now on: STRUCTURED_REPLY is refused, GO works and
            # a read gets an extended OFFSET_DATA reply
            assert c.option(8)[-1][0] == (1 << 31) + 10  # ERR_EXT_HEADER_REQD
            c.go("", structured=False)
            c.send(struct.pack(">IHHQQQ", 0x21E41C71, 0, CMD_READ, 9, 0, 4096))
            magic, flags, rtype, cookie, offset, length = struct.unpack(">IHHQQQ", c.recv(32))
            assert (magic, flags, rtype, cookie, offset, length) == \
                (0x6E8A278C, 1, 1, 9, 0, 8 + 4096)
            c.recv(length)
            c.send(struct.pack(">IHHQQQ", 0x21E41C71, 0, 2, 10, 0, 0))  # DISC
            assert is_dropped(c.sock)
        else:
            c.go("", structured=True)
            assert c.call(CMD_READ, 0, 4096)[0] == 0
            c.disc()
    finally:
        c.close()
