"""``pynbd fuse``: an NBD export as one file in a FUSE mount (like libnbd's nbdfuse).

:mod:`pynbd.fuse.export` is the NBD side (block-device semantics over the blocking
client, multi-connection, loss detection); :mod:`pynbd.fuse.mount` is the FUSE side,
through the ``mfusepy`` binding to libfuse 3 (``pip install 'pynbd[fuse]'`` and the
Debian package ``fuse3``). See docs/fuse.md.
"""

from pynbd.fuse.export import ExportFile, ExportGone, open_export

__all__ = ["ExportFile", "ExportGone", "open_export"]
