"""Storage backends behind one small interface (see base.py)."""

from __future__ import annotations

from dataclasses import dataclass

from pynbd.backends.base import Backend, BackendError, Extent
from pynbd.util.sizes import parse_size

__all__ = ["Backend", "BackendError", "CephOptions", "Extent", "open_backend",
           "open_worker_backend", "parse_size"]


@dataclass(frozen=True)
class CephOptions:
    conf: str | None = None
    name: str | None = None
    keyring: str | None = None


def open_backend(target: str, read_only: bool = False,
                 ceph: CephOptions | None = None) -> Backend:
    """Open a TARGET as the CLI and config file spell it.

    ``memory:SIZE`` is the sparse memory backend, ``rbd:POOL/IMAGE[@SNAP]`` an RBD image,
    ``file:PATH`` or any other string a file or block device (the default backend).
    """
    if target.startswith("memory:"):
        from pynbd.backends.memory import MemoryBackend

        return MemoryBackend(parse_size(target[len("memory:"):]), read_only=read_only)
    if target.startswith("rbd:"):
        from pynbd.backends.rbd import RbdBackend

        c = ceph or CephOptions()
        backend: Backend = RbdBackend.from_target(target, conf=c.conf, name=c.name, keyring=c.keyring,
                                      read_only=read_only)
        return backend
    from pynbd.backends.file import FileBackend

    path = target[len("file:"):] if target.startswith("file:") else target
    return FileBackend(path, read_only=read_only)


def open_worker_backend(spec: dict[str, object]) -> Backend:
    """Reopen a backend in a server worker process from its ``worker_spec()``."""
    kind = spec.get("kind")
    read_only = bool(spec.get("read_only"))
    if kind == "file":
        from pynbd.backends.file import FileBackend

        return FileBackend(str(spec["path"]), read_only=read_only, fd=int(spec["fd"]))  # type: ignore[call-overload]
    if kind == "memory":
        from pynbd.backends.memory import MemoryBackend

        return MemoryBackend(int(spec["size"]), read_only=read_only, fd=int(spec["fd"]))  # type: ignore[call-overload]
    raise ValueError(f"cannot reopen a backend of kind {kind!r} in a worker process")
