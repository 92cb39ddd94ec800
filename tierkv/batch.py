"""A write transaction on the store, with its invariants.

Primitives:
    Batch: one LMDB write transaction (``SSDStore.batch``); every persistent change goes through
        one, so a crash leaves either all of a batch or none of it. It keeps the store's
        invariants (block reference counts, the ``lru`` and ``expiry`` indexes, the byte
        counter) and makes room in the SSD budget: expired sessions first, then the least
        recently used unpinned session or unowned block.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import lmdb

from .errors import StoreFullError
from .records import U64BE, BlockMeta, SessionRecord, check_session_id, lru_key, ns

if TYPE_CHECKING:
    from .store import SSDStore

__all__ = ["Batch"]


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
    #: the transaction's id (LMDB's: the store's last once committed)
    txn_id: int = field(init=False, default=0)
    #: seconds LMDB's commit took (writing the dirty pages, then fdatasync), once committed
    commit_s: float = field(init=False, default=0.0)
    #: blocks kept as unowned on losing their last reference because a save had leased them
    kept_for_leases: int = field(init=False, default=0)
    #: keys this transaction marked as being deleted (``leases.py``); ``SSDStore.batch`` takes
    #: the marks off after the commit, those of blocks it kept too
    marked: set[bytes] = field(default_factory=set)
    #: leases to release once this transaction commits: (keys, owner) of each record it wrote
    leased: list[tuple[list[bytes], int]] = field(default_factory=list)
    #: leased unowned blocks taken to make room, nothing else being left to take
    leased_evicted: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.ssd_used = struct.unpack("<Q", bytes(self.txn.get(b"ssd_used", db=self.store.meta)))[0]
        self.txn_id = self.txn.id()

    def _get_bmeta(self, key: bytes) -> BlockMeta | None:
        raw = self.txn.get(key, db=self.store.bmeta)
        return None if raw is None else BlockMeta.unpack(raw)

    def _get_session(self, session: str) -> SessionRecord | None:
        raw = self.txn.get(check_session_id(session), db=self.store.sessions)
        return None if raw is None else SessionRecord.decode(session, raw)

    def _unindex_session(self, rec: SessionRecord) -> None:
        sid = check_session_id(rec.session)
        if not rec.pinned:
            self.txn.delete(lru_key(b"s", sid, rec.last_used), db=self.store.lru)
        if rec.ttl is not None:
            self.txn.delete(ns(rec.expires_at()) + sid, db=self.store.expiry)

    def _index_session(self, rec: SessionRecord) -> None:
        sid = check_session_id(rec.session)
        if not rec.pinned:
            self.txn.put(lru_key(b"s", sid, rec.last_used), b"", db=self.store.lru)
        if rec.ttl is not None:
            self.txn.put(ns(rec.expires_at()) + sid, b"", db=self.store.expiry)

    def _incref(self, key: bytes, n_tokens: int, meta: BlockMeta | None) -> None:
        """Take a reference on a block whose record (``meta``, None if it has none) was just read."""
        if meta is None:
            meta = BlockMeta(0, n_tokens, 0, time.time())
        elif meta.refs == 0:
            self.txn.delete(lru_key(b"b", key, meta.last_used), db=self.store.lru)
        meta.refs += 1
        self.txn.put(key, meta.pack(), db=self.store.bmeta)

    def _decref(self, key: bytes) -> tuple[bytes, BlockMeta] | None:
        """Drop a reference to a block. Returns the block and its bookkeeping where that was its
        last reference and it has a value not in ``keep``: ``_let_go`` decides whether it goes."""
        meta = self._get_bmeta(key)
        if meta is None:
            return None
        meta.refs -= 1
        if meta.refs > 0:
            self.txn.put(key, meta.pack(), db=self.store.bmeta)
            return None
        if key not in self.keep:  # a queued record here will name a kept one
            if meta.enc_bytes > 0:
                return key, meta
            self.delete_block(key, meta)  # no value: nothing a save could trust
            return None
        self._unown(key, meta)
        return None

    def _unown(self, key: bytes, meta: BlockMeta) -> None:
        """Keep a block with no references as an unowned one, in the LRU index."""
        meta.refs = 0
        self.txn.put(lru_key(b"b", key, meta.last_used), b"", db=self.store.lru)
        self.txn.put(key, meta.pack(), db=self.store.bmeta)

    def _let_go(self, keys: Iterable[bytes]) -> None:
        """Drop a reference to each block of ``keys``; delete those that lost their last one
        (``_decref``), except those a save has leased: marked first, then their leases looked at
        (``leases.py``). A leased block stays as an unowned block, evicted later."""
        blocks = [g for g in map(self._decref, keys) if g is not None]
        self._mark([k for k, _ in blocks])
        for key, meta in blocks:
            if not self.store.leases.held(key):
                self.delete_block(key, meta)
                continue
            self.kept_for_leases += 1  # a save (its lease) will name it
            self._unown(key, meta)

    def delete_block(self, key: bytes, meta: BlockMeta | None = None) -> None:
        """Delete a block's value and bookkeeping, whatever its reference count."""
        meta = meta or self._get_bmeta(key)
        if meta is None:
            return
        if meta.refs <= 0:
            self.txn.delete(lru_key(b"b", key, meta.last_used), db=self.store.lru)
        self.txn.delete(key, db=self.store.blocks)
        self.txn.delete(key, db=self.store.bmeta)
        self.ssd_used -= meta.enc_bytes
        self.deleted.append(key)

    def put_session(self, rec: SessionRecord, block_tokens: int,
                    missing: Callable[[bytes], bytes | bool] | None = None, lease: int | None = None) -> int:
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
        Without ``missing``, the record is written as it is. ``lease``: the save's lease
        owner (``leases.py``), released once this transaction commits.

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
        if lease is not None:
            self.leased.append((list(rec.keys), lease))
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
        self._let_go(old_keys - set(rec.keys))
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
        self._let_go(set(rec.keys))
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

    def put_value(self, key: bytes, value: bytes | memoryview, n_tokens: int, replace: bool = False) -> BlockMeta:
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
            self.txn.put(lru_key(b"b", key, meta.last_used), b"", db=self.store.lru)
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
        with no value (``put_session``'s check would then cut it back). Unowned blocks a save
        has leased (``leases.py``: its record will name them; each is marked as being deleted
        before its lease is looked at) are passed over while anything else can go, then taken:
        a lease is a hint, never a reason to refuse a write.

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
        leases = self.store.leases
        while self.ssd_used + needed > budget:
            cur = self.txn.cursor(db=self.store.lru)
            picked = leased = None
            for k in cur.iternext(values=False):
                k = bytes(k)
                if k[8:9] == b"s" and k[9:].decode("utf-8", "surrogatepass") in protect:
                    continue
                if k[8:9] == b"b" and k[9:] in self.keep:
                    continue  # unowned now, but named by a record this transaction or a queued one writes
                if k[8:9] == b"b":
                    self._mark([k[9:]])  # before its lease is looked at
                    if leases.held(k[9:]):
                        leased = leased or k  # a save is about to name it: last
                        continue
                picked = k
                break
            if picked is None and leased is not None:
                picked = leased
                self.leased_evicted += 1
            if picked is None:
                raise StoreFullError(
                    f"SSD budget ssd_bytes={budget} B is full of pinned or in-flight sessions "
                    f"({self.ssd_used} B used, {needed} B more needed); unpin or drop sessions, or raise ssd_bytes")
            self._evict(picked)

    def _mark(self, keys: list[bytes]) -> None:
        """Mark blocks this transaction means to delete (``leases.py``), before looking at their
        leases; ``SSDStore.batch`` takes the marks off after the commit, those of blocks this
        transaction kept after all (for a lease, or passed over) too: saves copy such blocks
        meanwhile, where trusting them cut more saves back in soaks (docs/reliability.md)."""
        new = [k for k in keys if k not in self.marked]
        self.store.leases.doom(new)
        self.marked.update(new)

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
            if U64BE.unpack(k[:8])[0] > now * 1e9:
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
