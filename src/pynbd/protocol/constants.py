"""NBD protocol constants, named as in the ratified spec (doc/proto.md).

Values come from proto.md, never from the reference nbd.h (which still has the old
BLOCK_STATUS chunk type 3). ``X_`` names are pynbd's probe-safe safe-close extension,
documented in docs/safe-close.md.
"""

from __future__ import annotations

import enum

NBD_DEFAULT_PORT = 10809

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

#: Payloads up to this size must never be treated as a denial of service (spec).
MAX_PAYLOAD = 32 * 1024 * 1024
#: pynbd's default maximum READ/WRITE payload (nbdkit's limit; the reference
#: implementation's nbd-tester-client sends 47.5 MiB writes). A server option.
DEFAULT_MAX_REQUEST = 64 * 1024 * 1024
#: the largest maximum NBD_INFO_BLOCK_SIZE can express ("no fixed limit")
MAX_BLOCK_SIZE_FIELD = 0xFFFFFFFF
#: block status replies carry at most this many extents per chunk (spec: SHOULD)
MAX_EXTENTS_PER_CHUNK = 1 << 20
#: Strings (export names, descriptions, queries) may not exceed this (spec).
MAX_STRING = 4096


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11
    X_CLOSE = 0x4E42A001  # pynbd safe-close extension


_REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9
    ERR_EXT_HEADER_REQD = _REP_ERR + 10

    @property
    def is_error(self) -> bool:
        return bool(self.value & _REP_ERR)


def rep_is_error(value: int) -> bool:
    return bool(value & _REP_ERR)


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12
    X_SEND_CLOSE = 1 << 15  # pynbd safe-close extension


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8
    X_CLOSE = 0x7F01  # pynbd safe-close extension


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


_REPLY_TYPE_ERR = 1 << 15


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = _REPLY_TYPE_ERR + 1
    ERROR_OFFSET = _REPLY_TYPE_ERR + 2


def reply_type_is_error(value: int) -> bool:
    return bool(value & _REPLY_TYPE_ERR)


_OPT_NAMES = {o.value: o.name for o in Opt}
_CMD_NAMES = {c.value: c.name for c in Cmd}


def opt_name(opt: int) -> str:
    """``NBD_OPT_GO``, or ``option 0x2a`` for an option the spec does not name."""
    name = _OPT_NAMES.get(opt)
    return f"option {opt:#x}" if name is None else "NBD_OPT_" + name


def cmd_name(cmd: int) -> str:
    """``NBD_CMD_READ``, or ``NBD_CMD_0x2a`` for a command the spec does not name."""
    return "NBD_CMD_" + _CMD_NAMES.get(cmd, hex(cmd))


class Errno(enum.IntEnum):
    """NBD error values (the wire values, not the host's errno)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class AllocationFlag(enum.IntFlag):
    """``base:allocation`` metadata context flags."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
#: qemu's context: which layer of a backing chain holds the data (0 absent, 1 local,
#: N >= 2 backing depth N); see qemu's docs/interop/nbd.rst
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"


def errno_to_nbd(err: int | None) -> Errno:
    """Map a host errno to the NBD error the spec allows on the wire."""
    import errno as _e

    mapping = {
        _e.EPERM: Errno.EPERM,
        _e.EACCES: Errno.EPERM,
        _e.EROFS: Errno.EPERM,
        _e.EIO: Errno.EIO,
        _e.ENOMEM: Errno.ENOMEM,
        _e.EINVAL: Errno.EINVAL,
        _e.ENOSPC: Errno.ENOSPC,
        _e.EDQUOT: Errno.ENOSPC,
        _e.EFBIG: Errno.ENOSPC,
        _e.EOVERFLOW: Errno.EOVERFLOW,
        _e.ENOTSUP: Errno.ENOTSUP,
        _e.EOPNOTSUPP: Errno.ENOTSUP,
        _e.ESHUTDOWN: Errno.ESHUTDOWN,
    }
    if err is None:
        return Errno.EIO
    return mapping.get(err, Errno.EIO)


def nbd_to_errno(err: int) -> int:
    """Map an NBD wire error back to the host errno (unknown values become EINVAL)."""
    import errno as _e

    mapping: dict[int, int] = {
        Errno.EPERM: _e.EPERM,
        Errno.EIO: _e.EIO,
        Errno.ENOMEM: _e.ENOMEM,
        Errno.EINVAL: _e.EINVAL,
        Errno.ENOSPC: _e.ENOSPC,
        Errno.EOVERFLOW: _e.EOVERFLOW,
        Errno.ENOTSUP: _e.ENOTSUP,
        Errno.ESHUTDOWN: _e.ESHUTDOWN,
    }
    return mapping.get(err, _e.EINVAL)
