"""The SSD tier: one LMDB environment per store directory.

Primitives:
    SessionRecord: a session as persisted (token ids, block keys, times, TTL, pin, tenant).
    BlockMeta: a block's persisted bookkeeping (reference count, tokens, encoded size).
    SSDStore: opens/creates the environment, checks the store's identity, reads values.
    (``valuereader.ValueReader`` reads the values with pread on data.mdb, by their place in
    LMDB's map; ``SSDStore.values`` is one, on Linux.)
    Batch: one write transaction; every persistent change goes through one, so a crash leaves
        either all of a batch or none of it.

Databases inside the environment::

    meta      b"format" | b"fingerprint" | b"spec" | b"ssd_used"
    blocks    16-byte key -> encoded value (see codec.py)
    bmeta     16-byte key -> refs u32, n_tokens u32, encoded bytes u64 (0 = no value), last_used f64
    sessions  session id (UTF-8) -> SessionRecord bytes
    lru       u64 BE last_used_ns | kind (b"s" session, b"b" unowned block) | id -> b""
    expiry    u64 BE expires_ns | session id -> b""

Opening reads only ``meta``: no scan of blocks or sessions. SSD eviction walks ``expiry`` and then
``lru`` from their oldest end. Pinned sessions have no ``lru`` entry, so they are never chosen.
Nothing here unpickles: records are fixed structs, JSON and raw arrays.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import lmdb
import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock, so whether another process holds a store open is unknown
    fcntl = None  # type: ignore[assignment]

from .errors import ConfigError, ForeignStoreError, StoreFullError, StoreIOError
from .keys import KEY_BYTES, common_prefix
from .spec import FORMAT_VERSION
from .valuereader import OVERFLOW_HEADER_BYTES, ValueReader

__all__ = ["SessionRecord", "BlockMeta", "SSDStore", "Batch", "check_session_id"]

_BMETA = struct.Struct("<IIQd")
_U64BE = struct.Struct(">Q")
#: slots in LMDB's reader table, shared by every process that has the store open. Each restore
#: from SSD holds a read transaction until its blocks are read (its view of the store stays whole
#: meanwhile), and a server can have hundreds in flight: with 256 slots the 257th restore raised
#: StoreIOError (``test_hundreds_of_restores_in_flight``). 64 B each: 256 KiB of lock file.
#: The first process to open a store sizes the table; later ones use that size.
MAX_READERS = 4096
_SESSION_MAGIC = b"TKS1"
MAX_SESSION_ID_BYTES = 400  # LMDB's default max key size is 511 bytes

_LINUX = sys.platform.startswith("linux")
#: a file in the store directory on which every process that has the store open holds a shared
#: lock (``flock``), so ``tierkv verify --repair`` can tell whether another one does
HOLDERS_FILE = "holders.lock"
_open_paths: set[str] = set()
_open_paths_lock = threading.Lock()


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


def _ns(t: float) -> bytes:
    return _U64BE.pack(max(0, int(t * 1e9)))


def _lru_key(kind: bytes, ident: bytes, last_used: float) -> bytes:
    return _ns(last_used) + kind + ident


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Translate LMDB errors into tierkv's hierarchy."""
    try:
        yield
    except lmdb.MapFullError:
        raise StoreFullError(f"{what}: the LMDB map is full; raise ssd_bytes or drop sessions") from None
    except lmdb.MapResizedError:
        raise StoreIOError(f"{what}: another process grew the store past this process's map (a file "
                           "larger than this file system's first 16 TiB); reopen the store") from None
    except lmdb.ReadonlyError as e:
        raise StoreIOError(f"{what}: the store is read-only ({e}); open a writable directory") from None
    except lmdb.Error as e:
        if "No space left" in str(e) or "ENOSPC" in str(e):
            raise StoreFullError(f"{what}: the file system holding the store is full ({e}); "
                                 "free space, lower ssd_bytes or drop sessions") from None
        raise StoreIOError(f"{what}: LMDB failed: {e}") from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StoreFullError(f"{what}: the file system holding the store is full; free space or "
                                 "lower ssd_bytes") from None
        raise StoreIOError(f"{what}: {e}") from e


class SSDStore:
    """The LMDB environment of a store directory.

    Args:
        path: directory of the store (created with owner-only permissions).
        fingerprint: the store fingerprint (spec + block size + codec); a store created with
            another one is refused with ForeignStoreError.
        description: JSON-serialisable description saved for error messages.
        ssd_bytes: budget of encoded value bytes; the map is sized to fit it plus B-tree overhead.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: bytes, description: dict, ssd_bytes: int) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.ssd_bytes = ssd_bytes
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"store path {self.path} is a file; give a directory (it is created if missing)")
        with _open_paths_lock:
            if self.path in _open_paths:
                raise ConfigError(f"store {self.path} is already open in this process; share that TierKV object")
            _open_paths.add(self.path)
        self._holder: int | None = None
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self._holder = self._hold()
            # No readahead on Linux (MADV_RANDOM): a cold B-tree page faults in alone, not with a
            # read_ahead_kb window of the values around it (8 MiB on the test machine); values
            # are read with pread there (ValueReader).
            self._open_env(readahead=not _LINUX)
        except (lmdb.Error, OSError) as e:
            self._release_path()
            if isinstance(e, PermissionError) or "ermission" in str(e) or "Read-only" in str(e):
                raise StoreIOError(f"cannot open store {self.path}: {e}; the directory must be writable") from None
            raise StoreIOError(f"cannot open store {self.path}: {e}") from None
        try:
            self._check_truncation()  # before any B-tree page is touched
            self.clear_dead_readers()  # left by processes that died mid-read (also before each write)
            self._open_dbs()
            self._check_identity(fingerprint, description)
            self.fingerprint = fingerprint
            self.values = ValueReader.open(self)
            if self.values is None and _LINUX:
                # No pread here, so values are read through the map, and a map without
                # readahead reads every 4 KiB page of a cold value as a request of its own:
                # reopen the environment with readahead (a fault then reads a window around it)
                self.env.close()
                with _translated("reopening the store"):
                    self._open_env(readahead=True)
                    self._open_dbs()
        except BaseException:
            if self.env is not None:
                self.env.close()
            self._release_path()
            raise

    def _map_sizes(self) -> list[int]:
        """LMDB map sizes to try, largest first. The map is address space, not memory or disk,
        and its size caps how far data.mdb may grow; tierkv's own budget is ``ssd_bytes``.

        - The budget plus slack: overflow pages round each value up to 4 KiB, the B-trees need
          room, and a transaction cannot reuse the pages it frees itself.
        - The file as it is plus that slack: a store reopened with a lower ``ssd_bytes`` holds
          more than the new budget until its next write evicts down to it; a map sized from the
          budget alone left no room for that write, and every save failed with StoreFullError.
        - The file system's size (up to 16 TiB), tried first: a map the file can never outgrow.
          When another process, opened with a larger ``ssd_bytes``, grows the file past this
          process's map, LMDB refuses every new transaction here (MDB_MAP_RESIZED), and
          remapping is only safe with no transaction open in the process.
        """
        slack = self.ssd_bytes // 4 + (64 << 20)
        try:
            held = os.path.getsize(os.path.join(self.path, "data.mdb"))
        except OSError:
            held = 0
        need = max(self.ssd_bytes, held) + slack
        try:
            st = os.statvfs(self.path)
            whole = min(st.f_blocks * st.f_frsize, 16 << 40)
        except OSError:
            whole = 0
        return [whole, need] if whole > need else [need]

    def _open_env(self, readahead: bool) -> None:
        self.env = None
        sizes = self._map_sizes()
        for i, map_size in enumerate(sizes):
            try:
                self.env = lmdb.open(self.path, map_size=map_size, subdir=True, max_dbs=8, mode=0o600,
                                     max_readers=MAX_READERS, readahead=readahead, lock=True)
                return
            except lmdb.Error:
                if i == len(sizes) - 1:  # e.g. a ulimit on address space: the smaller map
                    raise

    def _open_dbs(self) -> None:
        self.meta = self.env.open_db(b"meta")
        self.blocks = self.env.open_db(b"blocks")
        self.bmeta = self.env.open_db(b"bmeta")
        self.sessions = self.env.open_db(b"sessions")
        self.lru = self.env.open_db(b"lru")
        self.expiry = self.env.open_db(b"expiry")

    def _release_path(self) -> None:
        if self._holder is not None:
            os.close(self._holder)  # lets go of the shared lock
            self._holder = None
        with _open_paths_lock:
            _open_paths.discard(self.path)

    def _hold(self) -> int | None:
        """Take a shared lock on the store's ``HOLDERS_FILE`` for as long as this process has the
        store open (it dies with the process, however it ends). It waits while ``verify
        --repair`` holds the file alone (``alone``). None where ``flock`` is missing."""
        if fcntl is None:
            return None
        fd = os.open(os.path.join(self.path, HOLDERS_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:  # a file system without flock: nothing to tell others by
            os.close(fd)
            return None
        return fd

    @contextmanager
    def alone(self) -> Iterator[bool | None]:
        """Whether this is the only process holding the store open (None: cannot tell here).
        While it says True, no other process can open the store: opening waits.

        Why: a block record with no value is, in a store another process holds open with
        write-back, a value still in that process's memory; with no other process, one that a
        process stopped before writing back (killed, or crashed), which nothing will write now."""
        if self._holder is None:
            yield None
            return
        try:
            fcntl.flock(self._holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False  # Linux dropped the shared lock in the failed conversion: taken again below
        try:
            yield got
        finally:
            fcntl.flock(self._holder, fcntl.LOCK_SH)

    def _check_truncation(self) -> None:
        """Refuse a data file shorter than the pages LMDB says are in use: reading a mapped page
        past the end of the file would kill the process with SIGBUS."""
        used = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        size = os.path.getsize(self.data_file())
        if size < used:
            raise StoreIOError(f"store {self.path} is truncated: data.mdb has {size} B of the {used} B "
                               "its meta page says are in use; restore it from a backup or delete the store")

    def _check_identity(self, fingerprint: bytes, description: dict) -> None:
        with _translated("opening the store"), self.env.begin(write=True) as txn:
            fmt = txn.get(b"format", db=self.meta)
            if fmt is None:
                txn.put(b"format", struct.pack("<I", FORMAT_VERSION), db=self.meta)
                txn.put(b"fingerprint", fingerprint, db=self.meta)
                txn.put(b"spec", json.dumps(description).encode(), db=self.meta)
                txn.put(b"ssd_used", struct.pack("<Q", 0), db=self.meta)
                return
            version = struct.unpack("<I", fmt)[0]
            if version != FORMAT_VERSION:
                raise ForeignStoreError(f"store {self.path} has tierkv format {version}; this tierkv reads "
                                        f"format {FORMAT_VERSION}; use another path or the matching tierkv")
            if txn.get(b"fingerprint", db=self.meta) != fingerprint:
                theirs = json.loads(txn.get(b"spec", db=self.meta) or b"{}")
                raise ForeignStoreError(
                    f"store {self.path} holds KV of another model or layout "
                    f"(model {theirs.get('model_id')!r}, block_tokens {theirs.get('block_tokens')}, "
                    f"codec {theirs.get('codec')!r}); open it with that spec and settings, or use another path")

    # -- reads (any thread) --------------------------------------------------------------------
    @contextmanager
    def reader(self) -> Iterator[lmdb.Transaction]:
        """A read transaction whose ``get`` returns zero-copy buffers into the map."""
        with _translated("reading"), self.env.begin(buffers=True) as txn:
            yield txn

    def get_value(self, txn: lmdb.Transaction, key: bytes) -> memoryview | None:
        return txn.get(key, db=self.blocks)

    def blocks_cursor(self, txn: lmdb.Transaction) -> lmdb.Cursor:
        """A cursor on the values, for ``ValueReader.locate``."""
        return txn.cursor(db=self.blocks)

    def get_session(self, session: str) -> SessionRecord | None:
        with self.reader() as txn:
            raw = txn.get(check_session_id(session), db=self.sessions)
            return None if raw is None else SessionRecord.decode(session, raw)

    def values_stored(self, keys: list[bytes]) -> set[bytes]:
        """Those of ``keys`` whose bookkeeping says their value is stored, in one read."""
        with self.reader() as txn:
            return {key for key in keys if self.records_value(txn, key)}

    def session_match(self, session: str, toks: np.ndarray, beyond: int) -> int:
        """How many leading tokens of ``toks`` the session's record as stored shares with them,
        where that can be more than ``beyond``; else 0 (also: no record, or not one whose header
        can be read; ``get_session`` says what is wrong with it). The tokens are compared where
        they lie in the map, without decoding the record (a 1M-token session's is 4 MB), and
        only where the stored record is long enough to beat ``beyond``: a header read else."""
        with self.reader() as txn:
            raw = txn.get(check_session_id(session), db=self.sessions)
            stored = None if raw is None else SessionRecord.stored_tokens(raw)
            if stored is None or min(len(stored), len(toks)) <= beyond:
                return 0
            return common_prefix(stored, toks)

    def lru_target(self, txn: lmdb.Transaction, k: bytes) -> SessionRecord | BlockMeta | None:
        """What LRU entry ``k`` names, where the bookkeeping accounts for the entry: a session
        record last used at that moment and not pinned, or a block with no references, of that
        last use. None: a stray entry, naming nothing to evict. A writer race before a23b9d9
        left such entries (``Batch.put_session``); eviction lets go of them, ``verify --repair``
        too."""
        kind, ident = k[8:9], k[9:]
        if kind == b"s":
            rec = self._session_in(txn, ident)
            return rec if rec is not None and not rec.pinned and _lru_key(b"s", ident, rec.last_used) == k else None
        raw = txn.get(ident, db=self.bmeta)
        meta = None if raw is None else BlockMeta.unpack(raw)
        return meta if meta is not None and meta.refs <= 0 and _lru_key(b"b", ident, meta.last_used) == k else None

    def expiry_target(self, txn: lmdb.Transaction, k: bytes) -> SessionRecord | None:
        """The session record expiry entry ``k`` names, where the record expires at that moment;
        None: a stray entry (see ``lru_target``)."""
        rec = self._session_in(txn, k[8:])
        return rec if rec is not None and rec.ttl is not None and _ns(rec.expires_at()) + k[8:] == k else None

    def _session_in(self, txn: lmdb.Transaction, sid: bytes) -> SessionRecord | None:
        """The record of session id ``sid`` in ``txn``; None where there is none or it is damaged
        (``tierkv verify`` reports those)."""
        raw = txn.get(sid, db=self.sessions)
        try:
            return None if raw is None else SessionRecord.decode(sid.decode("utf-8", "surrogatepass"), raw)
        except StoreIOError:
            return None

    def stray_index_entries(self, txn: lmdb.Transaction) -> list[tuple[str, bytes]]:
        """The eviction index entries the bookkeeping does not account for, as (index, key)."""
        out = [("lru", bytes(k)) for k in txn.cursor(db=self.lru).iternext(values=False)
               if self.lru_target(txn, bytes(k)) is None]
        return out + [("expiry", bytes(k)) for k in txn.cursor(db=self.expiry).iternext(values=False)
                      if self.expiry_target(txn, bytes(k)) is None]

    def get_bmeta(self, key: bytes) -> BlockMeta | None:
        return self.get_bmetas((key,)).get(key)

    def get_bmetas(self, keys: Sequence[bytes]) -> dict[bytes, BlockMeta]:
        """The bookkeeping of those of ``keys`` the store has, in one read."""
        with self.reader() as txn:
            raws = ((key, txn.get(key, db=self.bmeta)) for key in keys)
            return {key: BlockMeta.unpack(raw) for key, raw in raws if raw is not None}

    def records_value(self, txn: lmdb.Transaction, key: bytes) -> bool:
        """Whether ``key``'s bookkeeping in ``txn`` says its value is stored. A block can have a
        record and no value: one that a session saved with write-back still holds only in
        memory (its record is written at once, its value when demoted), in this process or
        another one sharing the store."""
        raw = txn.get(key, db=self.bmeta)
        return raw is not None and BlockMeta.unpack(raw).enc_bytes > 0

    def ssd_used(self) -> int:
        with self.reader() as txn:
            return struct.unpack("<Q", bytes(txn.get(b"ssd_used", db=self.meta)))[0]

    def count_sessions(self) -> int:
        with self.reader() as txn:
            return txn.stat(self.sessions)["entries"]

    def iter_sessions(self) -> Iterator[str]:
        """Every persisted session id (a scan; for tools, never on a hot path)."""
        with self.reader() as txn:
            for k in txn.cursor(db=self.sessions).iternext(values=False):
                yield bytes(k).decode("utf-8", "surrogatepass")

    def data_file(self) -> str:
        return os.path.join(self.path, "data.mdb")

    def drop_cached(self, keys: list[bytes]) -> None:
        """Ask the kernel to drop these values' pages from the page cache (best effort; off
        Linux, or without a ValueReader, nothing). Called after a commit: LMDB has written and
        synced them, so the pages are clean and go at once."""
        if self.values is None or not keys:
            return
        with self.reader() as txn:
            cur = self.blocks_cursor(txn)
            found = [loc for loc in (self.values.locate(cur, key) for key in keys) if loc is not None]
        self.values.drop_values(found)

    @property
    def value_alignment(self) -> tuple[int, int]:
        """(page, shift): a large value's first byte lies ``shift`` bytes into a page of data.mdb
        (after its overflow page's header), so a value padded to ``(offset + shift) % page == 0``
        has that offset on a page of the file (``encode_block``'s ``align``)."""
        return self.env.stat()["psize"], OVERFLOW_HEADER_BYTES

    # -- writes (the writer thread) ------------------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator["Batch"]:
        """One write transaction; commits on success, aborts on any exception."""
        try:
            with _translated("writing"):
                self.clear_dead_readers()
                txn = self.env.begin(write=True)
                try:
                    b = Batch(self, txn)
                    yield b
                    txn.put(b"ssd_used", struct.pack("<Q", b.ssd_used), db=self.meta)
                    t = time.perf_counter()
                    txn.commit()
                    b.commit_s = time.perf_counter() - t
                except BaseException:
                    txn.abort()
                    raise
        except StoreIOError as e:
            # LMDB reports a short write at commit as EIO; a full file system is the usual cause.
            st = os.statvfs(self.path)
            if st.f_bavail * st.f_frsize < (16 << 20):
                raise StoreFullError(f"writing: the file system holding {self.path} is full "
                                     f"({st.f_bavail * st.f_frsize} B free); free space, lower ssd_bytes "
                                     "or drop sessions") from e
            raise

    def clear_dead_readers(self) -> int:
        """Free the reader slots of processes that died inside a read transaction (one killed in
        the middle of a restore); returns how many were freed.

        Why: LMDB reuses a freed page only once no reader's snapshot predates its release, and a
        dead process's slot keeps its snapshot forever. A store evicting to stay within
        ``ssd_bytes`` could then reuse nothing: its file grew with every write until the map (or
        the disk) was full, and every later save failed with StoreFullError although the budget
        had room
        (``test_process_killed_mid_read_does_not_pin_the_store``). LMDB tells a live process
        from a dead one by the lock each process holds on the lock file, so a reused PID is not
        taken for the dead one. Cheap enough to run before every write batch.
        """
        return self.env.reader_check()

    def close(self) -> None:
        """Close the environment (idempotent)."""
        if getattr(self, "env", None) is not None:
            if getattr(self, "values", None) is not None:
                self.values.close()
            self.env.close()
            self.env = None
            self._release_path()


@dataclass
class Batch:
    """A write transaction with the store's invariants (refcounts, indexes, byte counter)."""

    store: SSDStore
    txn: lmdb.Transaction
    ssd_used: int = field(init=False)
    #: keys whose value and bookkeeping this batch deleted
    deleted: list[bytes] = field(default_factory=list)
    #: sessions this batch dropped
    dropped: list[str] = field(default_factory=list)
    #: keys that must survive a drop to refcount 0 (a queued change will reference them again):
    #: they become unowned blocks in the LRU index instead of being deleted
    keep: set[bytes] = field(default_factory=set)
    #: seconds LMDB's commit took (writing the dirty pages, then fdatasync), once committed
    commit_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.ssd_used = struct.unpack("<Q", bytes(self.txn.get(b"ssd_used", db=self.store.meta)))[0]

    def _get_bmeta(self, key: bytes) -> BlockMeta | None:
        raw = self.txn.get(key, db=self.store.bmeta)
        return None if raw is None else BlockMeta.unpack(raw)

    def _get_session(self, session: str) -> SessionRecord | None:
        raw = self.txn.get(check_session_id(session), db=self.store.sessions)
        return None if raw is None else SessionRecord.decode(session, raw)

    def _unindex_session(self, rec: SessionRecord) -> None:
        sid = check_session_id(rec.session)
        if not rec.pinned:
            self.txn.delete(_lru_key(b"s", sid, rec.last_used), db=self.store.lru)
        if rec.ttl is not None:
            self.txn.delete(_ns(rec.expires_at()) + sid, db=self.store.expiry)

    def _index_session(self, rec: SessionRecord) -> None:
        sid = check_session_id(rec.session)
        if not rec.pinned:
            self.txn.put(_lru_key(b"s", sid, rec.last_used), b"", db=self.store.lru)
        if rec.ttl is not None:
            self.txn.put(_ns(rec.expires_at()) + sid, b"", db=self.store.expiry)

    def _incref(self, key: bytes, n_tokens: int, meta: BlockMeta | None) -> None:
        """Take a reference on a block whose record (``meta``, None if it has none) was just read."""
        if meta is None:
            meta = BlockMeta(0, n_tokens, 0, time.time())
        elif meta.refs == 0:
            self.txn.delete(_lru_key(b"b", key, meta.last_used), db=self.store.lru)
        meta.refs += 1
        self.txn.put(key, meta.pack(), db=self.store.bmeta)

    def _decref(self, key: bytes) -> None:
        meta = self._get_bmeta(key)
        if meta is None:
            return
        meta.refs -= 1
        if meta.refs <= 0 and key in self.keep:
            meta.refs = 0
            self.txn.put(_lru_key(b"b", key, meta.last_used), b"", db=self.store.lru)
            self.txn.put(key, meta.pack(), db=self.store.bmeta)
        elif meta.refs <= 0:
            self.delete_block(key, meta)
        else:
            self.txn.put(key, meta.pack(), db=self.store.bmeta)

    def delete_block(self, key: bytes, meta: BlockMeta | None = None) -> None:
        """Delete a block's value and bookkeeping, whatever its reference count."""
        meta = meta or self._get_bmeta(key)
        if meta is None:
            return
        if meta.refs <= 0:
            self.txn.delete(_lru_key(b"b", key, meta.last_used), db=self.store.lru)
        self.txn.delete(key, db=self.store.blocks)
        self.txn.delete(key, db=self.store.bmeta)
        self.ssd_used -= meta.enc_bytes
        self.deleted.append(key)

    def put_session(self, rec: SessionRecord, block_tokens: int,
                    missing: Callable[[bytes], bytes | bool] | None = None) -> int:
        """Write a session record, moving block references from its old record to the new one.

        ``rec`` is the engine's own copy, whose ``last_used`` its threads move on every use
        (under the engine's lock, which the writer does not hold): it is read once, into a
        snapshot, so the record stored and its LRU and expiry entries name the same moment.
        Before, a use between the two left an LRU entry its record did not account for; the
        record's drop left it behind, and eviction picked it forever (``bench/soak.py`` hung).

        ``missing`` (the writer's) is asked, in this transaction, about each block the record
        newly references whose value is not stored: another process may have evicted or dropped
        it since the save looked. It answers with the value, which is stored now; True, when
        the saving process will write it later (write-back: the value is in its memory); or
        False, when it cannot. Then, unless another record accounts for the block (another
        process's write-back), the value is gone for good, and the record is cut back to the
        blocks before it, or not written if it is the first (an older record is dropped).
        Without ``missing``, the record is written as it is.

        Returns how many of the record's blocks the stored record keeps.
        """
        rec = dataclasses.replace(rec)
        old = self._get_session(rec.session)
        old_keys = set(old.keys) if old else set()
        new: dict[bytes, tuple[int, BlockMeta | None]] = {}  # tokens and bookkeeping of each
        kept = len(rec.keys)
        for i, key in enumerate(rec.keys):
            if key in old_keys or key in new:
                continue
            n = min(block_tokens, len(rec.tokens) - i * block_tokens)
            meta = self._get_bmeta(key)
            if missing is not None and (meta is None or meta.enc_bytes == 0):
                got = missing(key)
                if isinstance(got, bytes):
                    meta = self.put_value(key, got, n)
                elif got is False and meta is None:
                    kept = i
                    break
            new[key] = (n, meta)
        if kept == 0:
            if old is not None:
                self.drop_session(rec.session)
            return 0
        if kept < len(rec.keys):
            rec = rec.cut(kept, block_tokens)
        for key, (n, meta) in new.items():  # all before the cut: the loop stopped there
            self._incref(key, n, meta)
        if old is not None:
            self._unindex_session(old)
        self.txn.put(check_session_id(rec.session), rec.encode(), db=self.store.sessions)
        self._index_session(rec)
        for key in old_keys - set(rec.keys):
            self._decref(key)
        return kept

    def touch_session(self, session: str, last_used: float) -> None:
        rec = self._get_session(session)
        if rec is None or rec.last_used >= last_used:
            return
        self._unindex_session(rec)
        rec.last_used = last_used
        self.txn.put(check_session_id(session), rec.encode(), db=self.store.sessions)
        self._index_session(rec)

    def drop_session(self, session: str) -> bool:
        """Delete a session; blocks no other session references are deleted with it."""
        rec = self._get_session(session)
        if rec is None:
            return False
        self._unindex_session(rec)
        self.txn.delete(check_session_id(session), db=self.store.sessions)
        for key in set(rec.keys):
            self._decref(key)
        self.dropped.append(session)
        return True

    def cut_before_unwritten(self, session: str, block_tokens: int) -> None:
        """Cut a session back to the blocks before its first one with no value stored, dropping
        it if that is its first (``tierkv verify --repair``, for write-back left behind)."""
        rec = self._get_session(session)
        if rec is None:
            return
        first = next((i for i, k in enumerate(rec.keys) if not self.has_value(k)), None)
        if first == 0:
            self.drop_session(session)
        elif first is not None:
            self.put_session(rec.cut(first, block_tokens), block_tokens)

    def delete_unreferenced_unwritten(self) -> int:
        """Delete the block records that have no value and no session referencing them; how many."""
        gone = [(bytes(k), m) for k, m in ((k, BlockMeta.unpack(raw)) for k, raw in self.txn.cursor(db=self.store.bmeta))
                if m.enc_bytes == 0 and m.refs <= 0]
        for key, meta in gone:
            self.delete_block(key, meta)
        return len(gone)

    def has_value(self, key: bytes) -> bool:
        meta = self._get_bmeta(key)
        return meta is not None and meta.enc_bytes > 0

    def put_value(self, key: bytes, value: bytes, n_tokens: int, replace: bool = False) -> BlockMeta:
        """Store a block's encoded value; a block no session references enters the LRU index.
        Returns the block's bookkeeping as it now stands.

        ``replace``: write over a value already stored (one that failed its checksum).
        """
        meta = self._get_bmeta(key)
        if meta is not None and meta.enc_bytes:
            if not replace:
                return meta  # already there (content-addressed: same key, same bytes)
            self.ssd_used -= meta.enc_bytes
        if meta is None:
            meta = BlockMeta(0, n_tokens, 0, time.time())
            self.txn.put(_lru_key(b"b", key, meta.last_used), b"", db=self.store.lru)
        self.txn.put(key, value, db=self.store.blocks)
        meta.enc_bytes = len(value)
        self.txn.put(key, meta.pack(), db=self.store.bmeta)
        self.ssd_used += len(value)
        return meta

    def make_room(self, needed: int, now: float, protect: set[str]) -> None:
        """Evict until ``needed`` more bytes fit in the SSD budget.

        Order: expired sessions, then the least recently used unpinned session or unowned block.
        Sessions in ``protect`` (changes still queued) are skipped, and so are unowned blocks in
        ``keep``, which their records will name: evicted, such a record would name a block
        with no value (``put_session``'s check would then cut it back).

        Raises:
            StoreFullError: pinned or protected data alone leaves too little room.
        """
        budget = self.store.ssd_bytes
        if self.ssd_used + needed <= budget:
            return
        if needed > budget:
            raise StoreFullError(f"a write of {needed} B exceeds ssd_bytes={budget} B; raise ssd_bytes")
        for k in self._expired(now):
            self._expire(k, protect)
            if self.ssd_used + needed <= budget:
                return
        while self.ssd_used + needed > budget:
            cur = self.txn.cursor(db=self.store.lru)
            picked = None
            for k in cur.iternext(values=False):
                k = bytes(k)
                if k[8:9] == b"s" and k[9:].decode("utf-8", "surrogatepass") in protect:
                    continue
                if k[8:9] == b"b" and k[9:] in self.keep:
                    continue  # unowned now, but named by a record this transaction or a queued one writes
                picked = k
                break
            if picked is None:
                raise StoreFullError(
                    f"SSD budget ssd_bytes={budget} B is full of pinned or in-flight sessions "
                    f"({self.ssd_used} B used, {needed} B more needed); unpin or drop sessions, or raise ssd_bytes")
            self._evict(picked)

    def _evict(self, k: bytes) -> None:
        """Evict what LRU entry ``k`` names, if its bookkeeping accounts for that entry, and let
        go of the entry whatever it names: each pass of ``make_room`` removes one entry, so it
        ends. An entry its bookkeeping does not account for (a session record that is gone, or
        holds another last use; a block with references) names nothing to evict; such entries
        were left by a race fixed in ``put_session``, and stores written before the fix may
        hold them (one made ``make_room`` loop forever)."""
        target = self.store.lru_target(self.txn, k)
        if isinstance(target, SessionRecord):
            self.drop_session(target.session)
        elif target is not None:
            self.delete_block(k[9:], target)
        self.txn.delete(k, db=self.store.lru)

    def _expired(self, now: float) -> list[bytes]:
        """Expiry entries due by ``now``, soonest first."""
        victims = []
        for k in self.txn.cursor(db=self.store.expiry).iternext(values=False):
            k = bytes(k)
            if _U64BE.unpack(k[:8])[0] > now * 1e9:
                break
            victims.append(k)
        return victims

    def _expire(self, k: bytes, protect: set[str]) -> None:
        """Drop the session expiry entry ``k`` names, if its record accounts for the entry; an
        entry it does not (left by the race ``put_session`` fixed: the record's TTL now ends
        later, or it has none) is let go, and the session kept."""
        if k[8:].decode("utf-8", "surrogatepass") in protect:
            return
        rec = self.store.expiry_target(self.txn, k)
        if rec is not None:
            self.drop_session(rec.session)
        else:
            self.txn.delete(k, db=self.store.expiry)

    def purge_expired(self, now: float, protect: set[str]) -> None:
        """Drop every session whose TTL has run out."""
        for k in self._expired(now):
            self._expire(k, protect)


def describe_store(path: str | os.PathLike) -> dict:
    """Read a store's identity and sizes without opening it for writing or knowing its spec."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise ConfigError(f"{path} is not a tierkv store (no data.mdb)")
    try:
        env = lmdb.open(path, subdir=True, max_dbs=8, readonly=True, lock=False)
    except lmdb.Error as e:
        raise StoreIOError(f"cannot read store {path}: {e}") from None
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            spec = json.loads(txn.get(b"spec", db=meta) or b"{}")
            used = struct.unpack("<Q", txn.get(b"ssd_used", db=meta))[0]
            sessions = txn.stat(env.open_db(b"sessions", txn=txn, create=False))["entries"]
            blocks = txn.stat(env.open_db(b"blocks", txn=txn, create=False))["entries"]
    except (lmdb.Error, KeyError, TypeError, struct.error, ValueError) as e:
        raise StoreIOError(f"store {path} is unreadable or not a tierkv store: {e}") from None
    finally:
        env.close()
    return {"path": path, "model_id": spec.get("model_id"), "format": spec.get("format"),
            "block_tokens": spec.get("block_tokens"), "codec": spec.get("codec"),
            "layers": len(spec.get("layers", [])), "sessions": sessions, "blocks_on_ssd": blocks,
            "ssd_bytes_used": used, "data_file_bytes": os.path.getsize(os.path.join(path, "data.mdb"))}
