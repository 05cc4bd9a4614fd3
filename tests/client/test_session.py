"""The client session (pynbd.client.session), the layer both drivers share.

Its plans run here on a third driver that needs no sockets: the session against the
server core in memory (tests/protocol/pump.py's server side), recording every step.
Then the two real drivers are held to the same behaviour where they used to differ:
leaving a ``with`` block with requests in flight, closing when the server stays silent,
and the names that changed.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from pynbd.client import CloseResult, LocalProtocolError, PeerProtocolError, aio, connect, plans
from pynbd.client._common import Request
from pynbd.client.blocking import Client
from pynbd.client.session import ClientSession
from pynbd.protocol.client import NEED_DATA, Handshake, OptionDone, ReadData
from pynbd.protocol.constants import BASE_ALLOCATION, Opt
from pynbd.protocol.server import ExportInfo, ServerConfig
from tests.client.fakeserver import FakeServer
from tests.protocol.pump import Pump

KIB, MIB = 1024, 1024 * 1024
DISK = ExportInfo("", MIB, can_trim=True)
BARE = ExportInfo("bare", 64 * KIB, can_flush=False, meta_contexts=())
TIMEOUT = 20.0


class MemoryClient(ClientSession):
    """A third driver: the session on the server core, in memory; records its steps."""

    def __init__(self, config: ServerConfig | None = None, piece: int = 5) -> None:
        super().__init__(None, None, True)
        self.pump = Pump((DISK, BARE), config, piece)
        self.pump.client = self._conn  # the pump's server side answers this core
        self.piece = piece
        self.steps: list[plans.Step] = []
        self.completed: list[Request] = []
        self.peak_in_flight = 0
        self._events: list[Handshake | OptionDone] = []

    def run(self, plan: plans.Plan[Any]) -> Any:
        return plans.run(plan, self._record)

    def _record(self, step: plans.Step) -> Any:
        self.steps.append(step)
        return self._perform(step)

    def step_names(self) -> list[str]:
        return [type(s).__name__ for s in self.steps]

    def options(self) -> list[int]:
        return [s.option for s in self.steps if isinstance(s, plans.Negotiate)]

    def _hard_close(self) -> None:
        self._closed = True

    # --- the in-memory transport -------------------------------------------------------

    def _feed(self) -> None:
        p = self.pump
        if not p.to_client:
            p._serve()
        if not p.to_client:
            raise AssertionError("the client waits for a reply the server never sends")
        self._conn.receive_data(p.to_client[:self.piece])
        del p.to_client[:self.piece]

    def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            r = self._route()
            if r is NEED_DATA:
                self._feed()
            elif isinstance(r, ReadData):
                dest = self._payload
                assert dest is not None
                while len(dest):
                    if not self.pump.to_client:
                        self.pump._serve()
                    k = min(len(dest), len(self.pump.to_client))
                    dest[:k] = self.pump.to_client[:k]
                    del self.pump.to_client[:k]
                    self._conn.payload_received(k)
                    dest = dest[k:]
                self._payload = None
            elif isinstance(r, Request):
                self.completed.append(r)
            else:
                assert isinstance(r, Handshake | OptionDone)
                self._events.append(r)

    def _event(self) -> Handshake | OptionDone:
        self._until(lambda: bool(self._events))
        return self._events.pop(0)

    # --- steps -------------------------------------------------------------------------

    def _do_greet(self, step: plans.Greet) -> Handshake:
        ev = self._event()
        self.pump.to_server += self._conn.take_output()
        assert isinstance(ev, Handshake)
        return ev

    def _do_negotiate(self, step: plans.Negotiate) -> OptionDone:
        self.pump.to_server += self._conn.send_option(step.option, step.data)
        ev = self._event()
        assert isinstance(ev, OptionDone)
        return ev

    def _do_upgrade_tls(self, step: plans.UpgradeTLS) -> None:
        pass  # the pump's server "completes" the TLS handshake at once

    def _do_submit(self, step: plans.Submit) -> Request:
        req, header = self._start(step.cmd, step.offset, step.length, step.flags, step.view,
                                  step.zeroed, step.chunks, None, step.contexts)
        req.want = step.want
        self.pump.to_server += header
        if step.payload is not None:
            self.pump.to_server += step.payload
        self.peak_in_flight = max(self.peak_in_flight, len(self._ops))
        return req

    def _do_wait(self, step: plans.Wait) -> Request:
        self._until(lambda: step.req.done)
        if step.req.error is not None:
            raise step.req.error
        return step.req

    def _do_wait_any(self, step: plans.WaitAny) -> Request:
        self._until(lambda: any(r.done for r in step.reqs))
        return next(r for r in step.reqs if r.done)

    def _do_wait_all(self, step: plans.WaitAll) -> None:
        self._until(lambda: all(r.done for r in step.reqs))
        for r in step.reqs:
            if r.error is not None:
                raise r.error

    def _do_drain(self, step: plans.Drain) -> str:
        first = len(self.completed)
        self._until(lambda: not self._ops)
        return next((str(r.error) for r in self.completed[first:] if r.error), "")

    def _do_send(self, step: plans.Send) -> None:
        self.pump.to_server += step.data

    def _do_goodbye(self, step: plans.Goodbye) -> None:
        self.pump._serve()


def connected(config: ServerConfig | None = None, export: str = "",
              **kw: Any) -> MemoryClient:
    c = MemoryClient(config)
    args = {"structured": True, "meta_contexts": (BASE_ALLOCATION,), "safe_close": True,
            "extended_headers": True, **kw}
    c.run(c._connect_plan(export, **args))
    return c


# --- plans, on the in-memory driver ---------------------------------------------------

@dataclass(frozen=True)
class Connecting:
    config: dict[str, Any]
    kw: dict[str, Any]
    options: tuple[int, ...]
    extended: bool
    structured: bool
    safe_close: bool
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)


CONNECTS = {
    "everything": Connecting({}, {}, (Opt.EXTENDED_HEADERS, Opt.SET_META_CONTEXT,
                                      Opt.X_CLOSE, Opt.GO), True, True, True),
    "no-extended-headers": Connecting(
        {"extended_headers": False}, {},
        (Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.X_CLOSE,
         Opt.GO), False, True, True),
    "client-opts-out": Connecting(
        {}, {"extended_headers": False, "safe_close": False},
        (Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.GO), False, True, False),
    "simple-replies": Connecting({}, {"structured": False},
                                 (Opt.X_CLOSE, Opt.GO), False, False, True, ()),
    "no-safe-close": Connecting({"x_close": False}, {},
                                (Opt.EXTENDED_HEADERS, Opt.SET_META_CONTEXT, Opt.X_CLOSE,
                                 Opt.GO), True, True, False),
}


@pytest.mark.parametrize("case", list(CONNECTS))
def test_connect_plan(case: str) -> None:
    k = CONNECTS[case]
    c = connected(ServerConfig(**k.config), **k.kw)
    assert c.step_names()[0] == "Greet"
    assert c.options() == list(k.options)
    assert (c.extended, c.structured, c.can_safe_close()) == \
        (k.extended, k.structured, k.safe_close)
    assert sorted(c.meta_contexts.values()) == list(k.contexts)
    assert c.size == MIB and c.max_request == 64 * MIB


@dataclass(frozen=True)
class Closing:
    config: dict[str, Any]
    export: str
    result: CloseResult
    steps: tuple[str, ...]


CLOSES = {
    "safe-close": Closing({}, "", CloseResult(True, True, "x_close"),
                          ("Drain", "Submit", "Wait", "Goodbye")),
    "flush-and-disc": Closing({"x_close": False}, "", CloseResult(False, True, "flush+disc"),
                              ("Drain", "Submit", "Wait", "Send", "Goodbye")),
    "disc-without-flush": Closing({"x_close": False}, "bare", CloseResult(False, False, "disc"),
                                  ("Drain", "Send", "Goodbye")),
}


@pytest.mark.parametrize("case", list(CLOSES))
def test_close_plan(case: str) -> None:
    k = CLOSES[case]
    c = connected(ServerConfig(**k.config), k.export)
    before = len(c.steps)
    assert c.run(c._close_plan()) == k.result
    assert tuple(c.step_names()[before:]) == k.steps
    assert c._closed and c.pump.server_closed
    # a second close says the same and does nothing
    assert c.run(c._close_plan()) == k.result
    assert len(c.steps) == before + len(k.steps)


def test_close_finishes_requests_in_flight_first() -> None:
    c = connected()
    reqs = [c._perform(plans.Submit(0, i * 4096, 4096, view=memoryview(bytearray(4096))))
            for i in range(4)]
    c.strict = False  # let the server refuse one
    bad = c._perform(plans.Submit(0, MIB, 4096, view=memoryview(bytearray(4096))))
    assert c.in_flight == 5
    result = c.run(c._close_plan())
    assert all(r.done and r.error is None for r in reqs)
    assert bad.done and bad.error is not None
    assert result.safe and result.error == str(bad.error)


def test_close_in_the_option_phase_aborts() -> None:
    c = MemoryClient()
    c.run(c._handshake_plan())
    assert c.run(c._close_plan()) == CloseResult(False, False, "abort")
    assert c.step_names() == ["Greet", "Send", "Goodbye"]
    assert type(c.pump.server_events[-1]).__name__ == "Aborted"


def test_split_plan_keeps_a_window() -> None:
    """A read over the maximum payload goes out in pieces, at most WINDOW at a time."""
    c = connected()
    data = bytes(range(256)) * 256
    c.run(c._window_plan([plans.Submit(1, 0, len(data), payload=memoryview(data))]))
    c.max_request = 1024
    buf = bytearray(len(data))
    c.run(c._split_plan(0, 0, memoryview(buf), 0, True))
    assert buf == data
    assert c.step_names().count("Submit") == 1 + len(data) // 1024
    assert c.peak_in_flight == plans_window()


def plans_window() -> int:
    from pynbd.client.session import WINDOW
    return WINDOW


def test_effect_plan_is_one_request_when_it_fits() -> None:
    c = connected()
    c.run(c._effect_plan(4, 0, MIB, 0))  # TRIM
    assert c.step_names()[-2:] == ["Submit", "Wait"]


def test_block_status_plan_by_name() -> None:
    c = connected()
    got = c.run(c._block_status_plan(0, MIB, 0, (BASE_ALLOCATION,)))
    assert list(got) == [BASE_ALLOCATION]
    assert sum(e.length for e in got[BASE_ALLOCATION]) == MIB
    with pytest.raises(LocalProtocolError, match="not negotiated"):
        c.run(c._block_status_plan(0, MIB, 0, ("qemu:dirty-bitmap:x",)))


def test_leaving_with_requests_in_flight_drops() -> None:
    c = connected()
    c._perform(plans.Submit(0, 0, 4096, view=memoryview(bytearray(4096))))
    assert c._drop_on_exit(RuntimeError)
    assert c.close_result == CloseResult(False, False, "none",
                                         "RuntimeError with 1 request(s) in flight")
    with pytest.raises(PeerProtocolError, match=r"unusable.*dropped"):
        c._check_usable()
    # without an exception, or with nothing in flight, the driver closes as usual
    d = connected()
    assert not d._drop_on_exit(None) and not d._drop_on_exit(RuntimeError)


# --- the two drivers, alike -----------------------------------------------------------

def _silent(sock: object, req: object) -> bool:
    return True  # never answers: the reply the client waits for does not come


@dataclass
class Outcome:
    close_result: CloseResult | None = None
    request_error: type[BaseException] | None = None
    notes: list[str] = field(default_factory=list)


def leave_blocking(uri: str) -> Outcome:
    out = Outcome()
    c = connect(uri, timeout=TIMEOUT)
    with pytest.raises(RuntimeError, match="leaving"), c:
        req = c.submit_read(0, 4096)
        raise RuntimeError("leaving")
    out.close_result = c.close_result
    try:
        c.wait(req)
    except BaseException as exc:
        out.request_error = type(exc)
    return out


def leave_aio(uri: str) -> Outcome:
    out = Outcome()

    async def main() -> None:
        c = await aio.connect(uri, timeout=TIMEOUT)
        task = asyncio.ensure_future(c.read(0, 4096))
        await asyncio.sleep(0)  # the read is sent and waits for its reply
        assert c.in_flight == 1
        with pytest.raises(RuntimeError, match="leaving"):
            async with c:
                raise RuntimeError("leaving")
        out.close_result = c.close_result
        try:
            await task
        except BaseException as exc:
            out.request_error = type(exc)

    asyncio.run(asyncio.wait_for(main(), 60))
    return out


@pytest.mark.parametrize("leave", [leave_blocking, leave_aio], ids=["blocking", "aio"])
def test_leaving_a_with_block_with_requests_in_flight(leave: Callable[[str], Outcome]
                                                      ) -> None:
    """Both drivers drop the connection at once (the asyncio client used to wait for
    the silent server forever) and fail the request."""
    with FakeServer(_silent) as srv:
        out = leave(srv.uri)
    assert out.close_result == CloseResult(False, False, "none",
                                           "RuntimeError with 1 request(s) in flight")
    assert out.request_error is not None
    assert issubclass(out.request_error, LocalProtocolError | PeerProtocolError)


def close_blocking(uri: str) -> CloseResult:
    c = connect(uri, timeout=1.0)
    c.submit_read(0, 4096)
    return c.close()


def close_aio(uri: str) -> CloseResult:
    async def main() -> CloseResult:
        c = await aio.connect(uri, timeout=1.0)
        task = asyncio.ensure_future(c.read(0, 4096))
        await asyncio.sleep(0)
        result = await c.close()
        with pytest.raises(TimeoutError):
            await task
        return result

    return asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("close", [close_blocking, close_aio], ids=["blocking", "aio"])
def test_close_with_a_silent_server_ends_at_the_timeout(close: Callable[[str], CloseResult]
                                                        ) -> None:
    with FakeServer(_silent) as srv:
        result = close(srv.uri)
    assert (result.safe, result.flushed, result.method) == (False, False, "none")
    assert "timed out" in result.error


def test_old_names_warn_and_work() -> None:
    with FakeServer(_silent) as srv:
        c = Client.dial(srv.uri, timeout=TIMEOUT)
        with pytest.warns(DeprecationWarning, match="handshake"):
            hs = c.connect()
        assert isinstance(hs, Handshake)
        c.hard_close()

    async def main(uri: str) -> None:
        c = await aio.AsyncClient.dial(uri, timeout=TIMEOUT)
        with pytest.warns(DeprecationWarning, match="handshake"):
            assert isinstance(await c.connect(), Handshake)
        c.hard_close()

    with FakeServer(_silent) as srv:
        asyncio.run(main(srv.uri))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Client.list_exports and aio.AsyncClient.list_exports  # the new names


def test_old_list_name_warns_and_works(servers: Any) -> None:
    srv = servers.start("pynbd", "tcp")
    c = Client.dial(srv.uri(), timeout=TIMEOUT)
    c.handshake()
    with pytest.warns(DeprecationWarning, match="list_exports"):
        old = c.list()
    assert old == c.list_exports() and srv.export in [e.name for e in old]
    c.close()

    async def main() -> None:
        a = await aio.AsyncClient.dial(srv.uri(), timeout=TIMEOUT)
        await a.handshake()
        with pytest.warns(DeprecationWarning, match="list_exports"):
            assert await a.list() == await a.list_exports()
        await a.close()

    asyncio.run(main())
