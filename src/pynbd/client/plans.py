"""Plans: what takes a client more than one round trip, written once for every driver.

A plan is a generator that yields :data:`Step` objects (receive the greeting, send an
option and wait for its answer, submit a request, wait for it, ...) and receives each
step's result. A driver runs it with :func:`run` or :func:`run_async`, performing each
step with its own I/O: the method :data:`PERFORMERS` names for the step's type. An
error performing a step is thrown into the plan at its ``yield``, so the plan's
``try``/``except``/``finally`` decide what it survives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from pynbd.client._common import Chunk, Request
from pynbd.client.tls import TLSConfig

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Greet:
    """Receive the server's greeting, send the client flags. Result: the Handshake."""


@dataclass(frozen=True, slots=True)
class Negotiate:
    """Send one option, collect every reply to it. Result: the OptionDone."""

    option: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class UpgradeTLS:
    """STARTTLS was acknowledged: run the TLS handshake on the transport."""

    config: TLSConfig


@dataclass(frozen=True, slots=True)
class Submit:
    """Send a request (validated by :meth:`ClientSession._start`). Result: its
    Request."""

    cmd: int
    offset: int = 0
    length: int = 0
    flags: int = 0
    view: memoryview | None = None
    payload: memoryview | None = None
    zeroed: bool = False
    chunks: list[Chunk] | None = None
    contexts: tuple[int, ...] | None = None
    want: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait for one request. Result: the Request; its NBDRequestError is raised."""

    req: Request


@dataclass(frozen=True, slots=True)
class WaitAny:
    """Wait until one of ``reqs`` is done. Result: that Request (errors not raised)."""

    reqs: tuple[Request, ...]


@dataclass(frozen=True, slots=True)
class WaitAll:
    """Wait for every one of ``reqs``, then raise the first error, if any."""

    reqs: tuple[Request, ...]


@dataclass(frozen=True, slots=True)
class Drain:
    """Wait for every request in flight. Result: the first request error's text
    ("" if none); other errors are raised."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send bytes as they are (NBD_CMD_DISC, NBD_OPT_ABORT)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Stop sending and wait, at most ``timeout`` seconds, for the server to close."""

    timeout: float


Step = (Greet | Negotiate | UpgradeTLS | Submit | Wait | WaitAny | WaitAll | Drain | Send
        | Goodbye)
Plan = Generator[Step, Any, T]
#: the driver method that performs each step
PERFORMERS: dict[type, str] = {
    Greet: "_do_greet", Negotiate: "_do_negotiate", UpgradeTLS: "_do_upgrade_tls",
    Submit: "_do_submit", Wait: "_do_wait", WaitAny: "_do_wait_any",
    WaitAll: "_do_wait_all", Drain: "_do_drain", Send: "_do_send", Goodbye: "_do_goodbye",
}


class _Runner:
    """A plan being run: the step it waits on, or its result once it returned."""

    def __init__(self, plan: Plan[Any]) -> None:
        self._plan = plan
        self.result: Any = None
        self.step: Step | None = self._next(plan.send, None)

    def _next(self, advance: Callable[[Any], Step], value: Any) -> Step | None:
        try:
            return advance(value)
        except StopIteration as stop:
            self.result = stop.value
            return None

    def resume(self, value: Any) -> None:
        self.step = self._next(self._plan.send, value)

    def fail(self, exc: BaseException) -> None:
        self.step = self._next(self._plan.throw, exc)

    def perform(self, perform: Callable[[Step], Any]) -> None:
        assert self.step is not None
        try:
            value = perform(self.step)
        except BaseException as exc:  # the plan decides what it survives
            self.fail(exc)
            return
        self.resume(value)


def run(plan: Plan[T], perform: Callable[[Step], Any]) -> T:
    """Run ``plan`` to its end, performing each step with ``perform``."""
    r = _Runner(plan)
    while r.step is not None:
        r.perform(perform)
    result: T = r.result
    return result


async def run_async(plan: Plan[T], perform: Callable[[Step], Awaitable[Any]]) -> T:
    """:func:`run` for a driver whose steps are coroutines."""
    r = _Runner(plan)
    while (step := r.step) is not None:
        try:
            value = await perform(step)
        except BaseException as exc:  # the plan decides what it survives
            r.fail(exc)
        else:
            r.resume(value)
    return r.result  # type: ignore[no-any-return]


