"""The I/O pause: live migration's handover (and checkpoints) quiesce an export without
disconnecting anyone. Not a user filter: the server puts it on an export's stack when
the export is first paused or stepped down (an export never paused pays nothing)."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pynbd.backends.base import Backend
from pynbd.filters.base import GO, Admission, Filter, Verdict


@dataclass
class PauseState:
    """Shared by every connection's pause layer of one export in one worker."""

    paused: bool = False
    stepped_down: bool = False
    reason: str = ""

    @property
    def engaged(self) -> bool:
        return self.paused or self.stepped_down


class PauseFilter(Filter):
    admits = True
    #: reads pass through unchanged: zero-copy stays possible
    sendfile_fd = property(lambda self: getattr(self.next, "sendfile_fd", None))

    def __init__(self, next: Backend, state: PauseState) -> None:
        super().__init__(next)
        self.state = state

    def admit(self, cmd: str, offset: int, length: int, now: float) -> Admission:
        st = self.state
        if st.stepped_down:
            return Admission(Verdict.REFUSE, errno=errno.ESHUTDOWN,
                             message=f"export has stepped down: {st.reason}")
        if st.paused:
            return Admission(Verdict.WAIT)  # until resumed
        nxt = self.next
        return nxt.admit(cmd, offset, length, now) if isinstance(nxt, Filter) else GO
