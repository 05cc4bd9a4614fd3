"""The copy engine behind ``pynbd copy`` (like nbdcopy's, which is separate from its CLI).

Copies between NBD exports, files (or block devices) and streams, sparse-aware: the
source's holes and zero ranges (NBD block status ``base:allocation``, or
``SEEK_DATA``/``SEEK_HOLE`` on files) are not read; on the destination they become
NBD_CMD_WRITE_ZEROES, or are skipped for a freshly truncated file or when the
destination is known to read as zeroes.

- ``endpoints``: NBD, file and stream endpoints behind one interface (handles that map
  extents, read, write, zero and forward);
- ``workqueue``: the pieces of the copy in offset order, shared by the workers;
- ``worker``: the worker loops (buffered in one thread, buffered with a reader and a
  writer thread, or forwarding without buffers: splice/sendfile in the kernel);
- ``hasher``: the checksum of pieces delivered by several workers, in offset order;
- ``engine``: :func:`copy` and :func:`digest_of`.

    total, digest = copy("nbd://src/", "out.img", Options(checksum="sha256"))
"""

from pynbd.copy.engine import DEFAULT_REQUEST_SIZE, DEFAULT_REQUESTS, Options, copy, digest_of
from pynbd.copy.errors import CopyError

__all__ = ["DEFAULT_REQUESTS", "DEFAULT_REQUEST_SIZE", "CopyError", "Options", "copy",
           "digest_of"]
