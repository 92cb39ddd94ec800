"""The SSD tier: one LMDB environment per store directory.

Primitives:
    SSDStore: opens/creates the environment, checks the store's identity, reads values and
        records, and opens write transactions (``batch``, a ``batch.Batch``).
    (``valuereader.ValueReader`` reads the values with pread on data.mdb, by their place in
    LMDB's map; ``SSDStore.values`` is one, on Linux. ``records`` holds the persisted records,
    ``batch`` the write side, ``leases`` the handshake between saves that trust blocks on SSD
    and write transactions that delete blocks; ``SSDStore.leases`` is its table.)
    describe_store: a store's identity and sizes, read without its spec.

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

import errno
import json
import os
import struct
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import lmdb
import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock, so whether another process holds a store open is unknown
    fcntl = None  # type: ignore[assignment]

from .batch import Batch
from .errors import ConfigError, ForeignStoreError, StoreFullError, StoreIOError
from .keys import common_prefix
from .leases import Leases
from .records import BlockMeta, SessionRecord, check_session_id, lru_key, ns
from .spec import FORMAT_VERSION
from .valuereader import OVERFLOW_HEADER_BYTES, ValueReader

__all__ = ["SSDStore", "describe_store"]

#: slots in LMDB's reader table, shared by every process that has the store open. Each restore
#: from SSD holds a read transaction until its blocks are read (its view of the store stays whole
#: meanwhile), and a server can have hundreds in flight: with 256 slots the 257th restore raised
#: StoreIOError (``test_hundreds_of_restores_in_flight``). 64 B each: 256 KiB of lock file.
#: The first process to open a store sizes the table; later ones use that size.
MAX_READERS = 4096

_LINUX = sys.platform.startswith("linux")
#: a file in the store directory on which every process that has the store open holds a shared
#: lock (``flock``), so ``tierkv verify --repair`` can tell whether another one does
HOLDERS_FILE = "holders.lock"
_open_paths: set[str] = set()
_open_paths_lock = threading.Lock()


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
        if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
            raise ConfigError(f"store path must be a str or a path object naming a directory, got {path!r}")
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
            self.leases = Leases(self.path)
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
            if getattr(self, "leases", None) is not None:
                self.leases.close()
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
            return rec if rec is not None and not rec.pinned and lru_key(b"s", ident, rec.last_used) == k else None
        raw = txn.get(ident, db=self.bmeta)
        meta = None if raw is None else BlockMeta.unpack(raw)
        return meta if meta is not None and meta.refs <= 0 and lru_key(b"b", ident, meta.last_used) == k else None

    def expiry_target(self, txn: lmdb.Transaction, k: bytes) -> SessionRecord | None:
        """The session record expiry entry ``k`` names, where the record expires at that moment;
        None: a stray entry (see ``lru_target``)."""
        rec = self._session_in(txn, k[8:])
        return rec if rec is not None and rec.ttl is not None and ns(rec.expires_at()) + k[8:] == k else None

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
        return raw is not None and BlockMeta.enc_bytes_of(raw) > 0

    def last_txnid(self) -> int:
        """The id of the store's last committed write transaction, by any process."""
        return self.env.info()["last_txnid"]

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
                b = None
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
                else:
                    for keys, owner in b.leased:  # their records are named now
                        self.leases.release(keys, owner)
                finally:
                    # after the commit: a save that finds a mark gone then finds the value gone
                    if b is not None:
                        self.leases.undoom(b.marked)
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
            if getattr(self, "leases", None) is not None:
                self.leases.close()
            self.env.close()
            self.env = None
            self._release_path()


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
