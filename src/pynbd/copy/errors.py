"""What makes a copy fail, and how long it waits for a stalled peer before it does."""

from __future__ import annotations

#: seconds without progress (a worker, the checksum or a reader/writer pair waiting on
#: each other) before the copy gives up with a CopyError
STALL_LIMIT = 600.0


class CopyError(Exception):
    """The copy cannot go on: a bad endpoint, a short read or write, a stall."""
