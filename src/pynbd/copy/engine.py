"""One copy from start to end: open both endpoints, pick how many workers and how they
move the data, run them, report progress, and close (see the package docstring)."""

from __future__ import annotations

import collections
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynbd.client import Request, connect
from pynbd.client.uri import is_uri
from pynbd.copy.endpoints import Endpoint, Handle, Token, open_endpoint
from pynbd.copy.errors import CopyError
from pynbd.copy.hasher import OrderedHasher
from pynbd.copy.worker import Progress, Worker
from pynbd.copy.workqueue import WorkQueue
from pynbd.util.zeros import is_zero

if TYPE_CHECKING:
    import hashlib

DEFAULT_REQUEST_SIZE = 1 << 20
DEFAULT_REQUESTS = 16


def _env_switch(name: str) -> bool | None:
    return {"1": True, "0": False}.get(os.environ.get(name, ""))


@dataclass
class Options:
    connections: int = 4
    #: worker threads (each drives one source and one destination connection);
    #: like nbdcopy's --threads, defaults to the number of CPUs
    threads: int = os.cpu_count() or 1
    requests: int = DEFAULT_REQUESTS
    request_size: int = DEFAULT_REQUEST_SIZE
    allocated: bool = False
    #: the destination already reads as zeroes: zero ranges are not written (ignored
    #: for a stream destination, which gets every byte)
    destination_is_zero: bool = False
    checksum: str | None = None
    #: NBD -> NBD and file -> NBD without buffers (splice/sendfile, see
    #: Worker._run_forward); None = whenever possible (no checksum, no TLS)
    zero_copy: bool | None = _env_switch("PYNBD_COPY_ZERO_COPY")
    #: a reader and a writer thread per connection pair (else one thread does both);
    #: None = only when there is a single pair (several pairs already overlap each other)
    split_threads: bool | None = _env_switch("PYNBD_COPY_SPLIT")
    progress: Callable[[int, int | None], None] | None = None
    #: ask NBD servers for extended headers (64-bit requests and extents)
    extended_headers: bool = True


def _can_forward(shs: list[Handle], dhs: list[Handle], opts: Options) -> bool:
    """Can the workers move data without buffers (:meth:`Worker._run_forward`)?"""
    if opts.zero_copy is False or opts.checksum is not None:
        return False
    return all(h.forward_destination for h in dhs) and all(h.forward_source for h in shs)


def _copy_sequential(src: Endpoint, dst: Endpoint, dh: Handle, opts: Options,
                     skip_zero: bool, hasher: hashlib._Hash | None,
                     progress: Progress) -> int:
    """stdin -> anything: in order, all-zero blocks become zero writes."""
    sh = src.open_handles(1)[0]
    total = 0
    pending: collections.deque[tuple[Token, memoryview]] = collections.deque()
    free: list[memoryview] = []
    allocated = 0
    while True:  # each round consumes input, or ends
        if not free:
            if allocated < opts.requests:
                free.append(memoryview(bytearray(opts.request_size)))
                allocated += 1
            else:
                done, v = pending.popleft()
                dh.wait(done)
                free.append(v)
        buf = free.pop()
        n = sh.read_next(buf)
        if n == 0:
            break
        if dst.size is not None and total + n > dst.size:
            raise CopyError(f"{dst.name}: destination is smaller than the input")
        view = buf[:n]
        if hasher is not None:
            hasher.update(view)
        if is_zero(view):
            t = None if skip_zero else dh.submit_zero(total, n, opts.allocated)
        else:
            t = dh.submit_write(total, view)
        pending.append((t, buf))
        total += n
        progress.add(n)
        if n < len(buf):
            break
    for done, _ in pending:
        dh.wait(done)
    return total


def _copy_parallel(src: Endpoint, dst: Endpoint, opts: Options, skip_zero: bool,
                   progress: Progress) -> tuple[int, str | None]:
    """Random-access source: workers, each with a source and a destination handle."""
    assert src.size is not None
    n = max(1, min(opts.connections, opts.threads))
    if dst.sequential:
        n = 1
    shs = src.open_handles(n)
    dhs = dst.open_handles(n)
    n = min(len(shs), len(dhs))
    # with a single-connection side, share nothing: use one worker
    if src.max_connections == 1 or dst.max_connections == 1:
        n = 1
    shs, dhs = shs[:n], dhs[:n]
    hasher = OrderedHasher(opts.checksum) if opts.checksum else None
    queue = WorkQueue(src.extent_handle(shs), src.size, opts.request_size, dst.max_zero)
    forward = _can_forward(shs, dhs, opts)
    split = opts.split_threads if opts.split_threads is not None else n == 1
    workers = [Worker(shs[i], dhs[i], queue, progress, requests=opts.requests,
                      request_size=opts.request_size, allocated=opts.allocated,
                      skip_zero=skip_zero, hasher=hasher)
               for i in range(n)]
    for w in workers:
        w.forward = forward
        w.split = split
    if n == 1:
        workers[0].run()
    else:
        threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for w in workers:
        if w.error is not None:
            raise w.error
    return src.size, hasher.hexdigest() if hasher is not None else None


def _close_all(*endpoints: Endpoint | None) -> None:
    errors = []
    for ep in endpoints:
        if ep is not None:
            try:
                ep.close()
            except Exception as exc:
                errors.append(exc)
    if errors and sys.exc_info()[0] is None:
        raise errors[0]


def copy(src_spec: str, dst_spec: str, opts: Options,
         timeout: float | None = None) -> tuple[int, str | None]:
    """Copy ``src_spec`` to ``dst_spec`` (NBD URIs, files or ``-``); returns (bytes
    copied, hex digest or None). ``opts.request_size`` is adjusted to both sides."""
    src = open_endpoint(src_spec, False, opts.connections, timeout,
                        extended_headers=opts.extended_headers)
    dst: Endpoint | None = None
    try:
        dst = open_endpoint(dst_spec, True, opts.connections, timeout, src.size,
                            extended_headers=opts.extended_headers)
        # what both servers advertise (64 MiB for pynbd and nbdkit, 32 MiB for qemu-nbd)
        opts.request_size = max(4096, min(opts.request_size, dst.max_request,
                                          src.max_request))
        if src.size is not None and dst.size is not None and dst.size < src.size:
            raise CopyError(f"{dst_spec}: destination ({dst.size} bytes) is smaller than "
                            f"the source ({src.size} bytes)")
        # a stream destination has no earlier contents: it gets every byte
        skip_zero = opts.destination_is_zero and not dst.sequential
        progress = Progress()
        stop = threading.Event()
        reporter = None
        if opts.progress is not None:
            cb = opts.progress
            total_size = src.size

            def report() -> None:
                while not stop.wait(0.2):
                    cb(progress.done, total_size)
                cb(progress.done, total_size)
            reporter = threading.Thread(target=report, daemon=True)
            reporter.start()
        try:
            digest: str | None
            if src.sequential:
                import hashlib
                h = hashlib.new(opts.checksum) if opts.checksum else None
                dh = dst.open_handles(1)[0]
                total = _copy_sequential(src, dst, dh, opts, skip_zero, h, progress)
                digest = h.hexdigest() if h is not None else None
            else:
                total, digest = _copy_parallel(src, dst, opts, skip_zero, progress)
            dst.finish(total)
        finally:
            stop.set()
            if reporter is not None:
                reporter.join(5)
        return total, digest
    finally:
        _close_all(src, dst)


def digest_of(spec: str, algorithm: str, size: int, timeout: float | None,
              request_size: int = DEFAULT_REQUEST_SIZE) -> str:
    """Re-read ``size`` bytes of an endpoint and hash them (for --verify)."""
    import hashlib
    h = hashlib.new(algorithm)
    if is_uri(spec):
        with connect(spec, timeout=timeout) as c:
            depth = 8
            step = min(request_size, c.max_request)
            q: collections.deque[Request] = collections.deque()
            pos = 0
            while pos < size or q:
                while pos < size and len(q) < depth:
                    q.append(c.submit_read(pos, min(step, size - pos)))
                    pos += min(step, size - pos)
                r = c.wait(q.popleft())
                assert r.view is not None
                h.update(r.view)
        return h.hexdigest()
    with open(spec, "rb") as f:
        left = size
        while left > 0:
            data = f.read(min(left, 4 << 20))
            if not data:
                raise CopyError(f"{spec}: shorter than {size} bytes")
            h.update(data)
            left -= len(data)
    return h.hexdigest()
