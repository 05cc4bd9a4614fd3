"""Messages between a mirroring source and a ``pynbd listen`` destination over msgr2.

Every message is a msgr2 MESSAGE frame on a lossless session (so a dropped TCP
connection resumes without resending what the peer acknowledged). Control messages carry
a JSON object in the front segment; bulk messages a little-endian struct. All replies
echo the request's ``token``.

====================  =====  ==========================================================
message               type   encoding
====================  =====  ==========================================================
HELLO      src->dst   0x5001 front JSON {"token", "size", "purpose": "copy"|"query",
                             "resume": proof (optional, see below)}
HELLO_REPLY dst->src  0x5002 front JSON {"token", "ok", "error", "busy", "size", "epoch",
                             "state", "authoritative", "lease" (accepted copy only)}
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
OUTCOME_REPLY dst->src 0x500C front JSON {"token", "epoch", "committed"} (committed null
                             and "busy": true while another session owns the copy and is
                             connected: no decision)
RELEASE    src->dst   0x500D front JSON {"token"}; the owner gives up the copy session
====================  =====  ==========================================================

One copy session owns the destination at a time. The owner's HELLO_REPLY carries a
``lease`` (32 random bytes, hex) that only the owner learns. A HELLO from another msgr2
session is refused (``busy``) while the owner is connected, unless it carries
``resume`` = HMAC-SHA256(lease, "pynbd-migration-resume-v1" || client cookie || server
cookie) computed with the cookies of the session it is sent on (:func:`resume_proof`):
the same source coming back on a new session. The proof is bound to the msgr2 session
(both cookies are random per session), so a HELLO captured from one session and
replayed on another is worthless.
"""

from __future__ import annotations

import hashlib
import hmac
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
RELEASE = 0x500D

#: digests per DIGEST_LIST (32 MiB of data segment)
DIGESTS_PER_REPLY = 1 << 20

OFFSET = struct.Struct("<Q")
RANGE = struct.Struct("<QQ")
FLUSHED_S = struct.Struct("<Qi")


LEASE_LEN = 32
#: seconds the owner's connection must be gone before another source may take over
DEFAULT_TAKEOVER_AFTER = 30.0
_RESUME_CTX = b"pynbd-migration-resume-v1"


def resume_proof(lease: bytes, client_cookie: int, server_cookie: int) -> str:
    """Proof that the sender of a HELLO holds ``lease``, bound to the msgr2 session it is
    sent on (identified by its two random 64-bit cookies)."""
    msg = _RESUME_CTX + OFFSET.pack(client_cookie) + OFFSET.pack(server_cookie)
    return hmac.new(lease, msg, hashlib.sha256).hexdigest()


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
