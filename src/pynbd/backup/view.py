"""A point-in-time view as an export: ``NAME@CHECKPOINT``, read-only, the image exactly
as it was when the checkpoint was taken (see filters/cbw.py for how it stays frozen)."""

from __future__ import annotations

from pynbd.backends.base import Backend, Extent, ThreadModel
from pynbd.filters.cbw import ViewState


class ViewBackend(Backend):
    #: added at run time: worker processes get it from the backup operations, not from
    #: the export list they start with
    runtime_only = True
    read_only = True
    can_flush = False
    can_fua = False
    can_trim = False
    can_zero = False
    can_fast_zero = False
    can_cache = False
    can_extents = True
    #: nothing changes under a reader: every connection sees the same bytes
    can_multi_conn = True
    #: reads may go to disk (the scratch file, the live image): on worker threads
    blocking = True

    def __init__(self, live: Backend, state: ViewState, name: str) -> None:
        self.live = live
        self.state = state
        self.name = f"view:{name}"
        self.size = state.size
        self.rotational = live.rotational
        self.block_size = live.block_size

    @property
    def thread_model(self) -> ThreadModel:  # type: ignore[override]
        return self.live.thread_model

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self.state.read(self.live, buf, offset)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.state.extents(self.live, offset, length)

    def worker_spec(self) -> dict[str, object] | None:
        return {"kind": "view"}  # never reopened from a spec (runtime_only)

    def close(self) -> None:
        self.state.close()  # never the live export's backend
