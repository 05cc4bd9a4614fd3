"""Messages between a mirroring source and a ``pynbd listen`` destination over msgr2.

Every message is a msgr2 MESSAGE frame on a lossless session (so a dropped TCP
connection resumes without resending what the peer acknowledged). Control messages carry
a JSON object in the front segment; bulk messages a little-endian struct. All replies
echo the request's ``token``.

====================  =====  ==========================================================
message               type   encoding
====================  =====  ==========================================================
HELLO      src->dst   0x5001 front JSON {"token", "size", "chunk", "purpose": "copy"|"query"}
HELLO_REPLY dst->src  0x5002 front JSON {"token", "ok", "error", "size", "epoch", "state",
                             "authoritative"}
WRITE      src->dst   0x5003 front <Q offset; data segment = the bytes
ZERO       src->dst   0x5004 front <QQ offset, length (reads as zeros afterwards)
FLUSH      src->dst   0x5005 front <Q token; the destination fsyncs the image
FLUSHED    dst->src   0x5006 front <Qi token, errno (0 = durable)
DIGESTS    src->dst   0x5007 front JSON {"token", "chunk", "first", "count"}
DIGEST_LIST dst->src  0x5008 front JSON {"token", "chunk", "first", "count", "total"};
                             data = count 32-byte sha256 digests of chunks first.. of
                             what the destination holds (chunk 0 = not this chunk size)
COMMIT     src->dst   0x5009 front JSON {"token", "size", "epoch", "digest", "chunk"}
COMMIT_REPLY dst->src 0x500A front JSON {"token", "epoch", "committed", "error"}
OUTCOME    src->dst   0x500B front JSON {"token", "epoch"}
OUTCOME_REPLY dst->src 0x500C front JSON {"token", "epoch", "committed"}
====================  =====  ==========================================================
"""

from __future__ import annotations

import json
import struct
from typing import Any

HELLO = 0x5001
HELLO_REPLY = 0x5002
WRITE = 0x5003
ZERO = 0x5004
FLUSH = 0x5005
FLUSHED = 0x5006
DIGESTS = 0x5007
DIGEST_LIST = 0x5008
COMMIT = 0x5009
COMMIT_REPLY = 0x500A
OUTCOME = 0x500B
OUTCOME_REPLY = 0x500C

#: digests per DIGEST_LIST (32 MiB of data segment)
DIGESTS_PER_REPLY = 1 << 20

OFFSET = struct.Struct("<Q")
RANGE = struct.Struct("<QQ")
FLUSHED_S = struct.Struct("<Qi")


def enc(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def dec(front: bytes) -> dict[str, Any]:
    obj = json.loads(front)
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    return obj


def parse_msgr2_uri(uri: str) -> tuple[str, int]:
    """``msgr2://HOST:PORT`` (IPv6 as ``[addr]``) -> (host, port)."""
    from urllib.parse import urlsplit

    u = urlsplit(uri)
    if u.scheme != "msgr2" or not u.hostname or u.port is None:
        raise ValueError(f"expected msgr2://HOST:PORT, not {uri!r}")
    return u.hostname, u.port
