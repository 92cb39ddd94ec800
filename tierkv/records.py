"""Session and block records as the store persists them, and the keys of its indexes.

Primitives:
    SessionRecord: a session as persisted (token ids, block keys, times, TTL, pin, tenant).
    BlockMeta: a block's persisted bookkeeping (reference count, tokens, encoded size).
    check_session_id: a session id as LMDB key bytes, or ConfigError.
    ns, lru_key: the keys of the ``lru`` and ``expiry`` indexes (``store.py`` describes the
        databases), which begin with a big-endian nanosecond time, so a cursor walks them
        oldest first.

Both records are fixed layouts (structs, JSON, raw arrays) read back without unpickling; a
session record carries a CRC32, and a damaged one raises StoreIOError.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, StoreIOError
from .keys import KEY_BYTES

__all__ = ["SessionRecord", "BlockMeta", "check_session_id", "MAX_SESSION_ID_BYTES", "U64BE", "ns", "lru_key"]

_BMETA = struct.Struct("<IIQd")
U64BE = struct.Struct(">Q")
_SESSION_MAGIC = b"TKS1"
MAX_SESSION_ID_BYTES = 400  # LMDB's default max key size is 511 bytes


def check_session_id(session: str) -> bytes:
    """Return the session id as LMDB key bytes, or raise ConfigError."""
    if not isinstance(session, str) or not session:
        raise ConfigError(f"session id must be a non-empty str, got {session!r}")
    raw = session.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_SESSION_ID_BYTES or "\x00" in session:
        raise ConfigError(f"session id must be at most {MAX_SESSION_ID_BYTES} UTF-8 bytes without NUL")
    return raw


@dataclass
class SessionRecord:
    """A session: its token ids, the keys of its blocks and its lifecycle fields."""

    session: str
    tokens: np.ndarray
    keys: list[bytes]
    created: float
    last_used: float
    ttl: float | None = None
    pinned: bool = False
    tenant: str | None = None
    # (engine availability epoch, leading available blocks): a memo, never stored
    available_at: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    def expires_at(self) -> float | None:
        return None if self.ttl is None else self.last_used + self.ttl

    def expired(self, now: float) -> bool:
        exp = self.expires_at()
        return exp is not None and exp <= now

    def cut(self, n_blocks: int, block_tokens: int) -> "SessionRecord":
        """This record cut back to its first ``n_blocks`` blocks (full ones: the cut is before a
        block of the record), its tokens with them; nothing else changes."""
        return dataclasses.replace(self, keys=self.keys[:n_blocks],
                                   tokens=self.tokens[:n_blocks * block_tokens].copy(), available_at=None)

    def encode(self) -> bytes:
        head = json.dumps({"created": self.created, "last_used": self.last_used, "ttl": self.ttl,
                           "pinned": self.pinned, "tenant": self.tenant}).encode()
        body = b"".join([_SESSION_MAGIC, struct.pack("<III", len(head), len(self.tokens), len(self.keys)),
                         head, self.tokens.astype("<u4").tobytes(), b"".join(self.keys)])
        return body + struct.pack("<I", zlib.crc32(body))

    @staticmethod
    def stored_tokens(raw: bytes | memoryview) -> np.ndarray | None:
        """The token ids an encoded record holds, as a view of ``raw`` (valid while it is), found
        from its header alone: no copy, no checksum (None: not a record's header; ``decode``
        says what is wrong with it)."""
        if len(raw) < 16 or bytes(raw[:4]) != _SESSION_MAGIC:
            return None
        n_head, n_tok = struct.unpack_from("<II", raw, 4)
        if 16 + n_head + 4 * n_tok > len(raw):
            return None
        return np.frombuffer(raw, dtype="<u4", count=n_tok, offset=16 + n_head)

    @classmethod
    def decode(cls, session: str, raw: bytes | memoryview) -> "SessionRecord":
        raw = bytes(raw)
        try:
            if raw[:4] != _SESSION_MAGIC or struct.unpack("<I", raw[-4:])[0] != zlib.crc32(raw[:-4]):
                raise ValueError("bad magic or checksum")
            n_head, n_tok, n_keys = struct.unpack_from("<III", raw, 4)
            pos = 16
            head = json.loads(raw[pos:pos + n_head])
            pos += n_head
            tokens = np.frombuffer(raw, dtype="<u4", count=n_tok, offset=pos)
            pos += 4 * n_tok
            keys = [raw[pos + i * KEY_BYTES: pos + (i + 1) * KEY_BYTES] for i in range(n_keys)]
            if pos + n_keys * KEY_BYTES != len(raw) - 4:
                raise ValueError("length mismatch")
            return cls(session, tokens, keys, float(head["created"]), float(head["last_used"]),
                       head["ttl"], bool(head["pinned"]), head["tenant"])
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise StoreIOError(f"session record {session!r} is damaged ({e}); drop it with drop_session") from None


@dataclass
class BlockMeta:
    """Persisted bookkeeping of one block."""

    refs: int
    n_tokens: int
    enc_bytes: int  # 0 while the value is not on SSD
    last_used: float

    def pack(self) -> bytes:
        return _BMETA.pack(self.refs, self.n_tokens, self.enc_bytes, self.last_used)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> "BlockMeta":
        return cls(*_BMETA.unpack(bytes(raw)))

    @staticmethod
    def enc_bytes_of(raw: bytes | memoryview) -> int:
        """``enc_bytes`` of a packed record, without building one (a save checks thousands)."""
        return _BMETA.unpack_from(raw)[2]


def ns(t: float) -> bytes:
    return U64BE.pack(max(0, int(t * 1e9)))


def lru_key(kind: bytes, ident: bytes, last_used: float) -> bytes:
    return ns(last_used) + kind + ident
