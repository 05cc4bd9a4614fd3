"""Storage backends behind one small interface (see base.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pynbd.backends.base import (
    API_VERSION,
    STATE_HOLE,
    STATE_ZERO,
    Backend,
    BackendError,
    ConfigError,
    Extent,
    Param,
    ThreadModel,
    parse_bool,
    parse_params,
)
from pynbd.backends.loader import FilterSpec, open_stack, open_target, parse_filter, parse_kv
from pynbd.util.sizes import parse_size

__all__ = ["API_VERSION", "STATE_HOLE", "STATE_ZERO", "Backend", "BackendError", "CephOptions",
           "ConfigError", "Extent", "FilterSpec", "Param", "ThreadModel", "open_backend",
           "open_target", "open_worker_backend", "parse_bool", "parse_filter", "parse_kv",
           "parse_params", "parse_size"]


@dataclass(frozen=True)
class CephOptions:
    conf: str | None = None
    name: str | None = None
    keyring: str | None = None


def open_backend(target: str, read_only: bool = False,
                 ceph: CephOptions | None = None, params: dict[str, str] | None = None,
                 filters: list[FilterSpec] | None = None) -> Backend:
    """Open a TARGET as the CLI and config file spell it, with its parameters and
    filters: ``memory:SIZE``, ``rbd:POOL/IMAGE[@SNAP]``, ``python:PLUGIN``, any scheme a
    package registers, ``file:PATH`` or any other string (a file or block device)."""
    params = dict(params or {})
    if target.startswith("rbd:") and ceph is not None:
        for key, value in (("conf", ceph.conf), ("name", ceph.name),
                           ("keyring", ceph.keyring)):
            if value and key not in params:
                params[key] = value
    return open_stack(target, params, list(filters or []), read_only)


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
    if kind == "target":
        return open_target(str(spec["target"]), dict(spec["params"]),  # type: ignore[call-overload]
                           read_only)
    if kind == "stack":
        from pynbd.backends.loader import open_filter

        top = open_worker_backend(spec["base"])  # type: ignore[arg-type]
        filters: list[dict[str, Any]] = list(spec["filters"])  # type: ignore[call-overload]
        for f in reversed(filters):
            top = open_filter(FilterSpec(str(f["name"]), dict(f["params"])), top,
                              f.get("state"))
        return top
    raise ValueError(f"cannot reopen a backend of kind {kind!r} in a worker process")
