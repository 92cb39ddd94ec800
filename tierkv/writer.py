"""The SSD writer thread: the engine's persistent changes applied to LMDB, in order.

Primitives:
    Op: one persistent change (a session's new record and blocks, a drop, blocks to write or
        demote, a barrier for ``flush``), queued by the engine in the order its effect in memory
        was made.
    SSDWriter: the writer thread's half of ``TierKV`` (one of its base classes): takes queued ops
        in transactions of bounded size, encodes new values on the I/O pool (the next batch's while
        one commits), commits them, then mirrors the outcome in the records (written, rolled back,
        evicted); between batches demotes blocks from memory tiers over budget (device -> host ->
        SSD).

Ordering: one thread applies the ops in queue order, so the store on disk always equals the
in-memory state as of some earlier moment, and a crash leaves a prefix of the ops.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .blocks import Block, BlockState, Epoch
from .codec import Codec
from .config import TierKVConfig
from .errors import BackgroundError, StoreFullError, StoreIOError
from .movers import MOVERS, Transfer, encode_payload
from .spec import KVSpec
from .stats import Stats
from .records import SessionRecord
from .store import SSDStore
from .tiers import MemoryTier

__all__ = ["EncodeBuffers", "Op", "SSDWriter", "TOUCH_WRITE_S", "WRITE_BATCH_BYTES"]

#: seconds a restore's mark of use may wait for a write batch before the writer makes one for it
TOUCH_WRITE_S = 2.0
#: the writer takes queued ops (whole ones, at least one) until their new values reach this many
#: bytes, for one transaction: LMDB holds a transaction's new pages in memory until its commit,
#: and spills them to disk past about 512 MiB; batches of everything queued (660 MB in a probe)
#: wrote far slower per byte than transactions of a session (bench/save_bound.py)
WRITE_BATCH_BYTES = 128 << 20
#: encoded values larger than this go into buffers the writer reuses: glibc's allocator serves
#: anything larger (past its largest mmap threshold) from a mapping of its own, new memory the
#: kernel faults in and zeroes for each value and unmaps after (docs/benchmarks.md, "Session 59");
#: smaller ones it serves from its heaps, memory used before
REUSE_ABOVE = 32 << 20
#: free reused buffers the writer keeps at least (more while it has lent more at once: up to
#: that much, memory it held anyway), until idle for IDLE_RELEASE_S: a batch's values are given
#: back one by one as LMDB copies them in, and the next batch's encodes take them
KEEP_BUFFERS_BYTES = 2 * WRITE_BATCH_BYTES
IDLE_RELEASE_S = 1.0


class EncodeBuffers:
    """The writer's buffers for large encoded values, reused from one value to the next.

    ``take(n)``: a writable view of ``n`` bytes, of a free buffer large enough or of a new one;
    None for ``n`` up to ``REUSE_ABOVE`` (a new ``bytes`` costs no more there).
    ``give(value)``: a value ``take`` made, once nothing reads it (LMDB has copied it into its
    transaction); kept for reuse while the free ones total at most ``keep_bytes``, or the most
    it had lent at once since the last ``clear`` where that is more (a batch's values, given
    back, are what the next batch's encodes take). Other values are ignored.
    ``clear()``: let go of the free ones. Thread-safe (encodes run on the I/O pool).
    """

    def __init__(self, stats: Stats, keep_bytes: int | None = None, reuse_above: int | None = None) -> None:
        self._stats = stats
        self._keep = KEEP_BUFFERS_BYTES if keep_bytes is None else keep_bytes
        self._above = REUSE_ABOVE if reuse_above is None else reuse_above
        self._lock = threading.Lock()
        self._free: list[np.ndarray] = []
        self._lent: dict[int, np.ndarray] = {}
        self._lent_bytes = 0
        self._peak = 0  # the most lent at once since the last clear

    def take(self, n: int) -> memoryview | None:
        if n <= self._above:
            return None
        with self._lock:
            fits = [i for i, free in enumerate(self._free) if free.size >= n]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].size))
            else:
                buf = np.empty(n, dtype=np.uint8)
            self._lent[id(buf)] = buf
            self._lent_bytes += buf.size
            self._peak = max(self._peak, self._lent_bytes)
        self._stats.count("encode_buffers_reused" if fits else "encode_buffers_new", 1)
        return memoryview(buf)[:n]  # type: ignore[arg-type]  # numpy arrays are buffers

    def give(self, value: object) -> None:
        if not isinstance(value, memoryview):
            return
        with self._lock:
            buf = self._lent.pop(id(value.obj), None)
            if buf is None:
                return
            self._lent_bytes -= buf.size
            if buf.size + sum(b.size for b in self._free) <= max(self._keep, self._peak):
                self._free.append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._peak = self._lent_bytes

    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.size for b in self._free)


@dataclass(eq=False)
class Op:
    """A persistent change for the writer thread."""

    kind: str                                   # "session" | "drop" | "write" | "barrier"
    session: str | None = None
    record: SessionRecord | None = None
    write: list[Block] = field(default_factory=list)
    free_after: bool = False                    # demotion: drop memory copies once written
    doomed: list[bytes] = field(default_factory=list)
    added: list[bytes] = field(default_factory=list)  # keys this session op took a reference on
    kept: int | None = None                     # blocks of ``record`` its commit kept, where it cut it
    cut_lease: str | None = None                # then how the save's lease on the next block stood
    lease: int | None = None                    # the save's lease owner (leases.py), released at its commit
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class SSDWriter:
    """The writer thread's half of ``TierKV``; see the module docstring.

    Runs on the engine's records under the engine's lock, as the engine does: the attributes
    below are the engine's (set in ``TierKV.__init__``), listed here as what this half uses; of
    the engine's methods it calls ``_discard`` (a block record removed) and ``_forget_vanished``
    (a block whose value another process removed).
    """

    spec: KVSpec
    codec: Codec
    fingerprint: bytes
    block_tokens: int
    config: TierKVConfig
    _align: int
    _bypass: bool
    _ssd: SSDStore
    _tiers: dict[str, MemoryTier]
    _stats: Stats
    _pool: ThreadPoolExecutor
    _lock: threading.RLock
    _wake: threading.Condition
    _blocks: dict[bytes, Block]
    _sessions: dict[str, SessionRecord]
    _epoch: Epoch
    _doomed: Counter[bytes]
    _dropping: Counter[str]
    _pending: Counter[str]
    _touched: dict[str, float]
    _ops: deque[Op]
    _writing: bool
    _last_batch: float
    _encoded_ahead: dict[bytes, tuple[Any, Any]]
    _encode_buffers: EncodeBuffers
    _unreported: list[BaseException]
    _unreported_demotion: BaseException | None
    _bg_error: BaseException | None
    _stopping: bool
    _maint_blocked_until: float
    _last_write_back_ops: list[Op] | None
    _store_seen: int

    def _writer_loop(self) -> None:
        """The writer thread: a batch of queued ops at a time, then demotions, until close."""
        while True:
            with self._wake:
                idle_since = time.monotonic()
                while (not self._ops and not self._stopping and not self._over_budget()
                       and not self._touches_due()):
                    if time.monotonic() - idle_since >= IDLE_RELEASE_S:
                        self._encode_buffers.clear()  # idle: hold no memory for the next burst
                    self._wake.wait(timeout=IDLE_RELEASE_S)
                if self._stopping and not self._ops and not self._last_write_back():
                    return
                ops = self._take_batch()
                self._writing = True
            try:
                work = [op for op in ops if op.kind != "barrier"]
                # uses marked by restores ride with the next batch, or go alone once due, or when
                # a flush or close asks for everything queued
                if work or (self._touched and (len(work) < len(ops) or self._touches_due())):
                    self._apply(work)
                self._maintain()
            except BaseException as e:  # noqa: BLE001 - surfaced by the next call
                with self._wake:
                    self._bg_error = self._bg_error or e
                    self._writing = False
                    # the batch, and every op queued behind it, which no thread will take now:
                    # left queued, a flush or a save's wait() waited forever
                    for op in [*ops, *self._ops]:
                        op.error = op.error or BackgroundError(f"writer failed: {e!r}")
                        op.done.set()
                    self._ops.clear()
                return
            self._writing = False
            for op in ops:
                if op.kind == "barrier":
                    op.done.set()

    def _last_write_back(self) -> bool:
        """(Closing, the lock held, once.) Queue write-back's blocks that are still only in
        memory; True if it queued any. Done here, once the store has stopped, rather than by
        close() before its flush: saves from other threads could land until the store stopped,
        and blocks a demotion was moving were not ready then, so they were lost at close and
        their sessions restored only up to them (a miss). Here no demotion is in flight (this
        thread makes them); a prefetch's move up a tier is waited for, briefly."""
        if self._last_write_back_ops is not None or self.config.persist != "write_back" or self._bg_error is not None:
            return False
        deadline = time.monotonic() + 1.0
        while (any(b.state is BlockState.MOVING for b in self._blocks.values())
               and time.monotonic() < deadline):
            self._wake.wait(0.01)
        dirty = [b for b in self._blocks.values()
                 if b.tier is not None and not b.on_ssd and not b.write_queued and b.state is BlockState.READY]
        for b in dirty:
            b.write_queued = True
        # no session: nothing for _pending to count
        self._last_write_back_ops = [Op("write", write=part) for part in self._write_parts(dirty)]
        self._ops.extend(self._last_write_back_ops)
        return bool(dirty)

    def _part_bytes(self) -> int:
        """Payload bytes one write transaction takes at most (whole ops; a session's save is
        never cut): WRITE_BATCH_BYTES, or a quarter of the SSD budget where that is less, so
        that each transaction can make its own room by evicting what is least recently used."""
        return max(1, min(WRITE_BATCH_BYTES, self._ssd.ssd_bytes // 4))

    def _write_parts(self, blocks: list[Block]) -> list[list[Block]]:
        """``blocks`` in order, cut into parts of at most ``_part_bytes`` (a block each at least),
        one write op each: what memory alone holds (write-back's last write at close, an
        ``offload``) can be far more than one transaction should take, or than the SSD budget
        holds. Written whole, it was one transaction of everything, and one past the budget was
        refused whole (StoreFullError), with nothing written; in parts, each evicts the least
        recently used sessions as any save does, and the newest stay."""
        limit, size = self._part_bytes(), 0
        parts: list[list[Block]] = []
        for b in blocks:
            if not parts or size + b.nbytes > limit:
                parts.append([])
                size = 0
            parts[-1].append(b)
            size += b.nbytes
        return parts

    def _encode(self, b: Block, payload: torch.Tensor, reuse: bool = False) -> bytes | memoryview:
        """``b``'s value; with ``reuse``, a large one in a reused buffer, which the caller gives
        back to ``_encode_buffers`` once LMDB has copied it."""
        return encode_payload(self.codec, self.fingerprint, self.spec, b, payload, self._align,
                              into=self._encode_buffers.take if reuse else None)

    def _encode_ahead(self, taken: dict[bytes, Any]) -> None:
        """Start encoding the next batch's values (the ops ``_take_batch`` will take next) on
        the I/O pool, so that they encode while this batch commits: the commit mostly waits on
        the kernel's copies into the page cache and on the disk. The next ``_apply`` uses a
        result only for the same payload object; anything else is encoded again."""
        with self._lock:
            todo = {}
            for op in itertools.islice(self._ops, self._next_batch_len()):
                for b in op.write:
                    if b.payload is not None and b.key not in taken and b.key not in todo:
                        todo[b.key] = (b, b.payload)
        self._encoded_ahead = {key: (payload, self._pool.submit(self._encode, b, payload, True))
                               for key, (b, payload) in todo.items()}

    def _give_back_encoded(self, encoded: Future) -> None:
        """(A done callback.) An encode ahead that no batch used: its buffer, back for reuse."""
        if not encoded.cancelled() and encoded.exception() is None:
            self._encode_buffers.give(encoded.result())

    def _next_batch_len(self) -> int:
        """How many queued ops the next transaction takes (locked): whole ops, at least one,
        until their new values reach ``_part_bytes``."""
        taken, size, limit = 0, 0, self._part_bytes()
        for op in self._ops:
            if taken and size >= limit:
                break
            size += sum(b.nbytes for b in op.write)
            taken += 1
        return taken

    def _take_batch(self) -> list[Op]:
        """The ops for the next transaction, in queue order (locked). The rest stay queued, in
        order, so a barrier still completes only after everything queued before it."""
        return [self._ops.popleft() for _ in range(self._next_batch_len())]

    def _touches_due(self) -> bool:
        """Restores have marked sessions used, and no batch has written that for a while: write
        it, so that other processes sharing the store (which evict by last use) and a restart
        after a crash see it. A process that only restores would otherwise never write it."""
        return bool(self._touched) and time.monotonic() - self._last_batch >= TOUCH_WRITE_S

    def _writer_busy(self) -> bool:
        """Whether the SSD writer has work: a batch in hand or ops queued (a hint, read unlocked)."""
        return self._writing or bool(self._ops)

    def _over_budget(self) -> bool:
        if time.monotonic() < self._maint_blocked_until:
            return False
        return any(t.excess() and any(True for _ in t.victims()) for t in self._tiers.values())

    def _apply(self, ops: list[Op]) -> None:
        """Encode new values, then apply ``ops`` in one transaction (one by one if that fails)."""
        with self._lock:
            todo = {}
            for op in ops:
                for b in op.write:
                    if b.payload is not None and b.key not in todo:
                        todo[b.key] = (b, b.payload)
            touched, self._touched = self._touched, {}
            protect = set(self._pending)
            keep = {k for s in protect if s in self._sessions for k in self._sessions[s].keys}
        t0 = time.perf_counter()
        items = list(todo.values())
        ahead, self._encoded_ahead = self._encoded_ahead, {}
        futures = {}
        for key, (b, payload) in todo.items():
            got = ahead.pop(key, None)  # encoded while the last batch committed: the same payload only
            if got is not None and got[0] is payload:
                futures[key] = got[1]
            else:
                futures[key] = self._pool.submit(self._encode, b, payload, True)
                if got is not None:
                    ahead[key] = got
        for _, unused in ahead.values():
            unused.add_done_callback(self._give_back_encoded)
        values: dict[bytes, bytes | memoryview | None] = {key: f.result() for key, f in futures.items()}
        raw = sum(b.nbytes for b, _ in items)
        enc = sum(len(v or b"") for v in values.values())
        self._stats.count("ssd_encode_us", int((time.perf_counter() - t0) * 1e6))
        # The next batch's values encode during this commit. Where this one's are in reused
        # buffers, not before they are copied into the transaction (then given back): the next
        # ones take those buffers, not new memory, and still encode during LMDB's commit.
        reused = any(isinstance(v, memoryview) for v in values.values())
        if not reused:
            self._encode_ahead(todo)
        try:
            self._commit(ops, values, touched, protect, keep, encode_next=todo if reused else None)
            failed: list[tuple[Op, BaseException]] = []
        except (StoreFullError, StoreIOError) as e:
            with self._lock:  # not written: keep the uses for the next batch
                for sid, t in touched.items():
                    self._touched[sid] = max(t, self._touched.get(sid, t))
            if len(ops) == 1:
                failed = [(ops[0], e)]
            else:
                failed = []
                for op in ops:
                    for b in op.write:  # given back by the failed commit: encoded again
                        if b.key in values and values[b.key] is None:
                            values[b.key] = self._encode(b, todo[b.key][1], reuse=True)
                    try:
                        self._commit([op], values, {}, protect, keep)
                    except (StoreFullError, StoreIOError) as e1:
                        failed.append((op, e1))
        for value in values.values():  # those no commit took
            self._encode_buffers.give(value)
        self._stats.moved("host->ssd", raw, time.perf_counter() - t0)
        self._stats.count("ssd_raw_written", raw)
        self._stats.count("ssd_enc_written", enc)
        failed_ops = {id(op) for op, _ in failed}
        with self._lock:
            for op, err in failed:
                self._roll_back(op)
                if isinstance(err, StoreFullError) and self.config.full_policy == "miss":
                    self._stats.count("dropped_saves", 1)
                    continue
                op.error = err
                if op.free_after and self._unreported_demotion in self._unreported:
                    # a demotion failing again (retried each second while the SSD is full): one
                    # unreported error stands for them, the latest, not one more per retry
                    self._unreported[self._unreported.index(self._unreported_demotion)] = err
                else:
                    self._unreported.append(err)
                if op.free_after:
                    self._unreported_demotion = err
            for op in ops:
                ok = id(op) not in failed_ops
                for b in op.write:
                    b.write_queued = False
                    if ok and self._blocks.get(b.key) is b:
                        b.on_ssd = True
                        b.corrupt = False
                        b.repair = False
                    if b.state is BlockState.WRITING:
                        b.state = BlockState.READY
                    if ok and op.free_after and b.tier is not None and self._blocks.get(b.key) is b:
                        self._tiers[b.tier].remove(b)
                if ok and op.kept is not None:
                    self._cut_back(op)
                for key in op.doomed:
                    self._doomed[key] -= 1
                    if self._doomed[key] <= 0:
                        del self._doomed[key]
                        self._epoch.bump()  # _block(key) reads the disk again
                if op.session is not None:
                    self._pending[op.session] -= 1
                    if self._pending[op.session] <= 0:
                        del self._pending[op.session]
                    if op.kind == "drop":
                        self._dropping[op.session] -= 1
                        if self._dropping[op.session] <= 0:
                            del self._dropping[op.session]
                op.done.set()
            self._wake.notify_all()

    def _commit(self, ops: list[Op], values: dict[bytes, bytes | memoryview | None], touched: dict[str, float],
                protect: set[str], keep: set[bytes], encode_next: dict[bytes, Any] | None = None) -> None:
        """Write ``ops`` in one transaction. Each of ``values`` (none None on entry) is given
        back to ``_encode_buffers`` as soon as LMDB has copied it, and set to None.
        ``encode_next``: this batch's (``_encode_ahead``'s ``taken``): once every value is in
        the transaction, the next batch's encodes start, during LMDB's commit."""
        now = time.time()
        self._last_batch = time.monotonic()
        started = time.perf_counter()
        with self._ssd.batch() as batch:
            batch.keep = keep
            # uses made since the last batch first: eviction picks by last use and expiry, and a
            # session restored a moment ago must not go as the least recently used
            for sid, t in touched.items():
                batch.touch_session(sid, t)
            need = sum(len(values[b.key] or b"") for op in ops for b in op.write if b.key in values)
            batch.make_room(need, now, protect)
            put: set[bytes] = set()
            for op in ops:
                if op.kind == "drop":
                    batch.drop_session(op.session)
                    continue
                for b in op.write:
                    if b.key in values and b.key not in put:  # a key twice in a batch: one value
                        value = values[b.key]
                        assert value is not None
                        batch.put_value(b.key, value, b.n_tokens, replace=b.repair)
                        put.add(b.key)
                        values[b.key] = None  # copied into the transaction: its buffer is free
                        self._encode_buffers.give(value)
                if op.kind == "session":
                    kept = batch.put_session(op.record, self.block_tokens, self._missing_value, op.lease)
                    op.kept = kept if kept < len(op.record.keys) else None
                    if op.kept is not None and op.lease is not None:  # how it got past the lease
                        op.cut_lease = self._ssd.leases.standing(op.record.keys[kept], op.lease)
            if encode_next is not None:
                self._encode_ahead(encode_next)
            self._stats.count("blocks_kept_for_leases", batch.kept_for_leases)
            self._stats.count("leased_blocks_evicted", batch.leased_evicted)
            cut_away = {op.session for op in ops if op.kind == "drop" or op.kept == 0}
            evicted_sessions = [s for s in batch.dropped if s not in cut_away]
            evicted_keys = set(batch.deleted)
        self._stats.count("ssd_batches", 1)
        self._stats.count("ssd_transaction_us", int((time.perf_counter() - started) * 1e6))
        self._stats.count("ssd_commit_us", int(batch.commit_s * 1e6))
        if self._bypass:  # committed and synced: the values' pages are clean, let them go
            self._ssd.drop_cached([b.key for op in ops if op.kind != "drop" for b in op.write if b.key in values])
        if evicted_sessions or evicted_keys:
            self._reconcile_evictions(evicted_sessions, evicted_keys)
        if batch.txn_id == self._store_seen + 1:  # no other process's transaction in between
            with self._lock:  # memory now mirrors what this one deleted (drops' ops beforehand)
                self._store_seen = batch.txn_id

    def _missing_value(self, key: bytes) -> bytes | bool:
        """``Batch.put_session``'s question about a block a record being committed newly
        references whose value the store does not have (another process evicted or dropped it
        after the save looked): its value, encoded now, where this process holds the block in
        memory believing it on SSD; True where it holds it unwritten with write-back (its write
        comes when it is demoted); False where it holds no copy.

        With write-through, a block held unwritten is written now too. A save's own new blocks
        are written before its record in the same transaction, so the check meets one only
        where the write that claimed it failed (an earlier op of the batch, retried alone, hit a
        full store and was rolled back), and nothing else would write it until it is demoted:
        killed before, the process left an acknowledged write-through record naming a block
        with no value (the one path found to the block without a value that a two-process bf16
        write-through soak of session 42 left behind; ``test_write_through_commit_writes_a_block_whose_write_failed``).
        """
        write_back = self.config.persist != "write_through"
        b = self._blocks.get(key)
        if write_back and b is not None and b.payload is not None and not b.on_ssd:
            # the common case, write-back's own new blocks, read without the lock: True only
            # leaves the record as it was before this check existed
            return True
        with self._lock:
            b = self._blocks.get(key)
            if b is None or b.payload is None:
                return False
            if write_back and not b.on_ssd:
                return True
            payload = b.payload
        self._stats.count("values_written_again", 1)
        return bytes(self._encode(b, payload))  # a new bytes already: not copied again

    def _cut_back(self, op: Op) -> None:
        """Mirror in memory a session record its commit cut back (``op.kept`` blocks; none: not
        written): the store had no value for the next block, and this process no copy. Locked."""
        rec, kept = op.record, op.kept
        lost = self._blocks.get(rec.keys[kept])
        if lost is not None:
            self._forget_vanished(lost)  # not on SSD any more: the availability epoch moves
        if self._sessions.get(op.session) is not rec:
            # a later save's record replaced it (its commit checks its own blocks): most often
            # the one before a save down another branch, whose blocks past the branch point this
            # process let go of unwritten, as they were about to be unreferenced anyway
            return
        self._stats.count("sessions_cut", 1)
        if op.cut_lease is not None:
            self._stats.count(f"cut_lease_{op.cut_lease}", 1)
        for key in set(rec.keys[kept:]) - set(rec.keys[:kept]):
            b = self._blocks.get(key)
            if b is None:
                continue
            b.refs -= 1
            b.pins -= rec.pinned
            if b.refs <= 0 and not b.on_ssd and b.tier is None and b.state is BlockState.READY:
                self._discard(key)
        if kept == 0:
            del self._sessions[op.session]
        else:
            self._sessions[op.session] = rec.cut(kept, self.block_tokens)

    def _roll_back(self, op: Op) -> None:
        """Undo in memory what a failed op did, so memory again matches the disk (locked).

        A failed session save reverts to the session's last committed record (reloaded lazily);
        blocks that only it referenced and that never reached SSD are released; failed writes of
        unowned blocks release those cache entries rather than retrying forever.
        """
        if op.kind == "session":
            if op.lease is not None:  # never committed: its leases keep nothing now
                self._ssd.leases.release(op.record.keys, op.lease)
            if self._sessions.get(op.session) is op.record:
                del self._sessions[op.session]
            for key in op.added:
                b = self._blocks.get(key)
                if b is not None:
                    b.refs -= 1
                    b.pins -= op.record.pinned
        for key in op.added or [b.key for b in op.write]:
            b = self._blocks.get(key)
            if b is not None and b.refs <= 0 and not b.on_ssd and b.state is not BlockState.LOADING:
                if b.tier is not None:
                    self._tiers[b.tier].remove(b)
                self._discard(key)

    def _reconcile_evictions(self, sessions: list[str], keys: set[bytes]) -> None:
        """Mirror in memory what SSD eviction dropped (sessions without queued changes)."""
        with self._lock:
            for sid in sessions:
                rec = self._sessions.pop(sid, None)
                self._touched.pop(sid, None)
                if rec is not None:
                    for key in set(rec.keys):
                        b = self._blocks.get(key)
                        if b is not None:
                            b.refs -= 1
                            b.pins -= rec.pinned
            for key in keys:
                b = self._blocks.get(key)
                if b is None:
                    continue
                b.on_ssd = False
                if b.refs <= 0 and b.state is BlockState.READY:
                    if b.tier is not None:
                        self._tiers[b.tier].remove(b)
                    self._discard(key)
            self._stats.count("ssd_evicted_sessions", len(sessions))

    def _let_go(self, tier: MemoryTier, b: Block) -> int:
        """(Locked.) Forget the copy in ``tier`` of ``b``, which SSD holds too; returns its bytes."""
        tier.remove(b)
        self._stats.count(f"{tier.name}_evicted_blocks", 1)
        return b.nbytes

    def _maintain(self) -> None:
        """Demote least-recently-used blocks from tiers over budget (device → host → SSD)."""
        dev, host = self._tiers["device"], self._tiers["host"]
        while True:
            with self._lock:
                self._wake.notify_all()  # savers waiting for memory (_wait_for_memory): progress
                if self._stopping and self._ops:
                    return
                victims: list[Block] = []
                src = None
                if dev.excess() and host.enabled:
                    excess = dev.excess()
                    for b in dev.victims():
                        victims.append(b)
                        excess -= b.nbytes
                        if excess <= 0 or len(victims) >= 64:
                            break
                    src = "device"
                # to SSD: from the host tier (a disabled one passes saves through), and from the
                # device tier where there is no host tier
                for tier in (host,) if host.enabled else (dev, host):
                    if victims or not tier.excess():
                        continue
                    excess = tier.excess()
                    for b in tier.victims():
                        if b.on_ssd:  # a copy on SSD already: released
                            excess -= self._let_go(tier, b)
                        elif not b.write_queued:
                            victims.append(b)
                            excess -= b.nbytes
                        if excess <= 0 or len(victims) >= 64:
                            break
                    src = "ssd"
                if not victims:
                    self._wake.notify_all()  # evictions above may have made room
                    return
                for b in victims:
                    # a block written to SSD is WRITING, never MOVING: only the device-to-host
                    # copy below resets MOVING, and a block left MOVING was never a victim again
                    b.state = BlockState.MOVING if src == "device" else BlockState.WRITING
                    if src == "ssd":
                        b.write_queued = True
                payloads = tuple(b.payload for b in victims)
            if src == "device":
                t0 = time.perf_counter()
                try:
                    new = MOVERS[("device", "host")](Transfer("device", "host", tuple(victims), payloads),
                                                     self._tiers)
                finally:
                    with self._lock:
                        for b in victims:
                            b.state = BlockState.READY
                # bytes copied (none where both tiers are plain CPU memory: movers.same_memory)
                self._stats.moved("device->host", sum(b.nbytes for b, old, payload in zip(victims, payloads, new)
                                                      if payload is not old), time.perf_counter() - t0)
                with self._lock:
                    for b, old, payload in zip(victims, payloads, new):
                        if b.tier == "device" and b.payload is old and self._blocks.get(b.key) is b:
                            dev.remove(b)
                            host.add(b, payload)
            else:
                op = Op("write", write=victims, free_after=True)
                self._apply([op])
                with self._lock:
                    # not written (the SSD full of pinned or in-flight data) and still held: leave
                    # them in memory and try again in a second, whatever full_policy says (with
                    # "miss" the op carries no error, and this loop retried at once, for ever);
                    # with "raise" the error reaches flush()
                    failed = any(b.tier is not None and not b.on_ssd for b in victims)
                if failed:
                    self._maint_blocked_until = time.monotonic() + 1.0
                    return
