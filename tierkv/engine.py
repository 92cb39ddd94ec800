"""The cache manager: ``TierKV``, the hooks an inference loop calls.

Primitives:
    TierKV: save / lookup / restore / prefetch / drop_session / offload / flush / stats / close.

Control apart from data: every bookkeeping decision (which block is where, references, pins,
budgets, what to persist) is made under one lock over small records (``Block``,
``SessionRecord``); byte movement (packing, device<->host copies, encoding, LMDB writes, decoding)
happens outside it, in the caller for a save's first copy, in the writer thread for SSD writes and
demotions (``writer.SSDWriter``, the half of ``TierKV`` that thread runs), and in the I/O pool for
SSD reads (``reads.SSDReads``, which reports back to ``loads.Loads``, the half of ``TierKV``
that decides where each block of a restore or prefetch comes from and takes in the reads'
outcomes).

Ordering: persistent changes are queued as ops (``writer.Op``) in the order their in-memory
effects were made, and one writer thread applies them to LMDB in that order, so the store on disk
always equals the in-memory state as of some earlier moment. Keys the memory side has deleted but
the writer has not yet are "doomed" and never re-read from disk meanwhile.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from . import hostmem
from .affinity import spread_initializer
from .blocks import Block, BlockState, Epoch, pack_blocks
from .codec import header_bound, make_codec
from .config import TierKVConfig, check_device, check_needed_from, check_timeout
from .errors import (BackgroundError, BudgetExceededError, ConfigError, ForkedProcessError,
                     SpecMismatchError, StoreClosedError, TierKVError, UnknownSessionError)
from .handles import LoadHandle, RestoredKV, SaveHandle, via_host_staging
from .keys import as_tokens, block_keys, chain_seed, common_prefix, iter_block_keys, tokens_view
from .loads import Loads
from .reads import SSDReads
from .records import BlockMeta, SessionRecord, check_session_id
from .spec import KVSpec
from .stats import Stats
from .store import SSDStore
from .tiers import MemoryTier
from .writer import EncodeBuffers, Op, SSDWriter

__all__ = ["TierKV"]

_KV = Sequence[Sequence[torch.Tensor]]
#: backpressure: a memory tier may run over its budget by this much (at most its budget again)
#: while the writer catches up; beyond it, ``save`` waits for the writer, at most SAVE_WAIT_S
SAVE_SLACK_MAX = 1 << 30
SAVE_WAIT_S = 10.0


class TierKV(SSDWriter, Loads):
    """A tiered KV cache: device memory → host DRAM → LMDB on SSD.

    Args:
        path: store directory (created if missing).
        spec: the model's KV layout; a store is refused to any other spec.
        config: a TierKVConfig; or pass its fields as keyword settings instead.

    Use it as a context manager, or call ``close()``.
    """

    def __init__(self, path: str, spec: KVSpec, *, config: TierKVConfig | None = None, **settings: Any) -> None:
        if config is not None and settings:
            raise ConfigError("pass either config= or keyword settings, not both")
        if not isinstance(spec, KVSpec):
            raise ConfigError(f"spec must be a tierkv.KVSpec, got {type(spec).__name__}")
        self.config = cfg = config or TierKVConfig.from_settings(**settings)
        self.spec = spec
        self.block_tokens = cfg.block_tokens
        default = "cuda" if torch.cuda.is_available() else "cpu"
        device = check_device(cfg.device if cfg.device is not None else default)
        pin = cfg.pin_host_memory if cfg.pin_host_memory is not None else hostmem.can_pin()
        if pin and not hostmem.can_pin():
            raise ConfigError("pin_host_memory=True needs CUDA: the CUDA driver page-locks host memory")
        self.device = device
        self.codec = make_codec(cfg.ssd_codec, cfg.zstd_level)
        self._header_bound = header_bound(spec, self.codec)
        ident = {"block_tokens": cfg.block_tokens, "codec": self.codec.name, "device_codec": "raw"}
        self.fingerprint = spec.fingerprint(**ident)
        self._ssd = SSDStore(path, self.fingerprint, dict(spec.describe(), **ident), cfg.ssd_bytes)
        #: the store's last write transaction as far as this process's memory mirrors it: at open
        #: (memory holds nothing yet), then each of its own commits that directly follows it. While
        #: it is still the store's last, no other process has removed a value since; once another
        #: process has written in between, it stays behind for good (every save then looks)
        self._store_seen = self._ssd.last_txnid()
        # values are written with their planes on a page of data.mdb, whatever ssd_page_cache
        # says now: a store written today may be read with O_DIRECT tomorrow
        self._align = self._ssd.value_alignment
        self._bypass = cfg.ssd_page_cache == "bypass"
        if self._bypass and self._ssd.values is not None:
            self._ssd.values.no_readahead()
        self.path = self._ssd.path
        # Full blocks in CPU memory come from slabs a background thread makes ready ahead of
        # saves (tierkv/hostmem.py): page-locked (a new page-locked block cost 4.4 ms on an H200
        # machine), locked from the start, a quarter of the host tier; or else plain memory,
        # prefaulted (a copy into new memory pays for its page faults), as much as saves ask
        # (SlabPool.expect). A device tier in CPU memory shares the pool: blocks move between
        # the two tiers without a copy.
        cpu_budgets = [cfg.host_bytes] + ([cfg.device_bytes] if device.type == "cpu" else [])
        self._host_pool = hostmem.SlabPool(
            cfg.block_tokens * spec.bytes_per_token, sum(b + min(b, SAVE_SLACK_MAX) for b in cpu_budgets),
            cfg.host_bytes // 4 if pin else 0, pin=pin) if sum(cpu_budgets) > 0 else None
        self._tiers = {
            "device": MemoryTier("device", device, cfg.device_bytes,
                                 pool=self._host_pool if device.type == "cpu" else None),
            "host": MemoryTier("host", torch.device("cpu"), cfg.host_bytes, pin, self._host_pool),
        }
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._blocks: dict[bytes, Block] = {}
        self._epoch = Epoch()  # moves when any block's availability does (see _available_blocks)
        self._sessions: dict[str, SessionRecord] = {}
        self._doomed: Counter[bytes] = Counter()     # deleted in memory, deletion still queued
        self._dropping: Counter[str] = Counter()     # dropped in memory, drop still queued
        self._pending: Counter[str] = Counter()      # sessions with queued ops
        self._touched: dict[str, float] = {}         # last_used updates to persist
        self._last_batch = time.monotonic()          # when the writer last began a batch
        self._ops: deque[Op] = deque()
        self._writing = False                        # the writer holds a batch
        #: key -> (payload, future of its encoded value): the next batch's, encoded during a commit
        self._encoded_ahead: dict[bytes, tuple[Any, Any]] = {}
        self._unreported: list[BaseException] = []   # op errors no handle has raised yet
        self._unreported_demotion: BaseException | None = None  # the last demotion's, if among them
        self._bg_error: BaseException | None = None
        self._stats = Stats()
        self._encode_buffers = EncodeBuffers(self._stats)  # the writer's, for values past 32 MiB
        self._closed = False
        self._pid = os.getpid()  # the process that owns the environment and threads
        self._stopping = False                       # close() has begun: no new calls start
        self._close_lock = threading.Lock()          # a second close() waits for the first
        self._loads_starting = 0                     # _start_load calls that may still use the I/O pool
        self._last_write_back_ops: list[Op] | None = None   # the writer's last write-back, as it stops
        self._maint_blocked_until = 0.0
        self._pool = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="tierkv-io",
                                        initializer=spread_initializer(
                                            cfg.io_threads, cfg.io_affinity,
                                            refused=lambda: self._stats.count("io_affinity_refused")))
        self._reads = SSDReads(self._ssd, spec, self.codec, self.fingerprint, cfg.block_tokens, self._header_bound,
                               self._bypass, self._pool, cfg.io_threads, self._tiers["host"], self._stats,
                               on_layers_loaded=self._layers_loaded, on_load_failed=self._load_failed,
                               on_direct_failed=self._direct_failed, on_background_error=self._background_error)
        self._writer = threading.Thread(target=self._writer_loop, name="tierkv-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> "TierKV":
        self._check_open()  # a with-block over a closed store fails at its start, not its first call
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if os.getpid() != self._pid:
            raise ForkedProcessError(
                f"this TierKV of {self.path} was opened in process {self._pid}, and this is a process "
                "forked from it: LMDB environments and the engine's threads do not survive fork. Open "
                "the store in each process after forking, or start workers with multiprocessing's "
                "'spawn' or 'forkserver' method")
        if self._closed or self._stopping:
            raise StoreClosedError(f"store {self.path} is closed; open a new TierKV")
        if self._bg_error is not None:
            raise BackgroundError(f"a background thread failed: {self._bg_error!r}; close and reopen "
                                  "the store") from self._bg_error

    # ------------------------------------------------------------------ record lookups (locked)
    def _block(self, key: bytes) -> Block | None:
        b = self._blocks.get(key)
        if b is not None or self._doomed[key]:
            return b
        meta = self._ssd.get_bmeta(key)
        return None if meta is None else self._known_block(key, meta)

    def _blocks_of(self, keys: Sequence[bytes]) -> list[Block | None]:
        """``_block`` of each key, reading the store's bookkeeping of all the keys this process
        has no record of in one read transaction. Key by key, a fresh save of a long session
        opened a read per block, twice (its copy check and its bookkeeping), under the lock
        (bench/ops.py's per-block save; docs/benchmarks.md, "Bookkeeping")."""
        blocks, doomed = self._blocks, self._doomed
        unknown = [k for k in keys if k not in blocks and not doomed[k]]
        if unknown:
            for key, meta in self._ssd.get_bmetas(unknown).items():
                self._known_block(key, meta)
        return [blocks.get(k) for k in keys]

    def _known_block(self, key: bytes, meta: BlockMeta) -> Block:
        """This process's record of a block the store's bookkeeping describes."""
        b = Block(key, meta.n_tokens, meta.n_tokens * self.spec.bytes_per_token,
                  on_ssd=meta.enc_bytes > 0, refs=meta.refs, epoch=self._epoch)
        self._blocks[key] = b
        return b

    @staticmethod
    def _available(b: Block | None) -> bool:
        return b is not None and b.available

    def _discard(self, key: bytes) -> None:
        """Remove a block's record (``_block`` may still find it on disk, or not: the epoch moves)."""
        if self._blocks.pop(key, None) is not None:
            self._epoch.bump()

    def _available_blocks(self, rec: SessionRecord) -> int:
        """How many leading blocks of a session are available: walked once per availability epoch,
        not on every lookup (a 1M-token session is 3,907 block records; bench/ops.py times its lookup)."""
        if rec.available_at is not None and rec.available_at[0] == self._epoch.value:
            return rec.available_at[1]
        found = 0
        for blk in self._blocks_of(rec.keys):
            if blk is None or not blk.available:
                break
            found += 1
        rec.available_at = (self._epoch.value, found)  # after the walk: loading records bumps it
        return found

    def _session(self, session: str, now: float | None = None) -> SessionRecord | None:
        rec = self._sessions.get(session)
        loaded = rec is None
        if rec is None:
            if self._dropping[session]:
                return None
            rec = self._ssd.get_session(session)
            if rec is None:
                return None
            self._adopt(rec)
        now = time.time() if now is None else now
        if rec.expired(now) and not loaded:
            # another process sharing the store may have used it since this one loaded it: its
            # TTL counts from that use, which is on disk (TierKV._touches_due)
            try:
                disk = self._ssd.get_session(session)
            except TierKVError:
                disk = None
            if disk is not None and disk.last_used > rec.last_used:
                rec.last_used = disk.last_used
        if rec.expired(now):
            self._drop_locked(rec)
            return None
        return rec

    def _adopt(self, rec: SessionRecord) -> None:
        """Make a record read from the store this process's copy of its session; a pinned one
        pins its blocks (each once, however often it holds one)."""
        self._sessions[rec.session] = rec
        if rec.pinned:
            for b in self._blocks_of(list(set(rec.keys))):
                if b is not None:
                    b.pins += 1

    def _session_for(self, session: str, toks: np.ndarray) -> tuple[SessionRecord | None, int]:
        """``_session``, for a lookup, restore or prefetch of ``toks``, and the number of leading
        tokens of ``toks`` the record holds. Where this process's copy of the record does not
        hold all of ``toks`` and no change of the session is queued here, the stored record is
        asked whether it holds more of them, and read again if so: another process sharing the
        store may have saved the session since (a worker fleet with no sticky routing: turn 5
        of an agent lands where turn 3 did), further, or down another branch (a regenerated
        answer: the same length or shorter). Before, this process restored only the prefix its
        own copy shared with ``toks``. Where ``toks`` only run past the copy's end (a new turn)
        and the stored record is no longer, the check reads its header alone; else the stored
        tokens are compared in place (``SSDStore.session_match``). A new turn's tokens always
        run past the copy, so the check is made once per call, not per layer or block."""
        rec = self._session(session)
        if rec is None:
            return None, 0
        lcp = common_prefix(rec.tokens, toks)
        if lcp == len(toks) or self._pending[session]:
            return rec, lcp
        try:
            if self._ssd.session_match(session, toks, lcp) <= lcp:
                return rec, lcp
            disk = self._ssd.get_session(session)
        except TierKVError:
            return rec, lcp  # unreadable there: this copy still serves, exact
        if disk is None:
            return rec, lcp
        del self._sessions[session]  # let go of this copy, and of the pins it put on blocks
        if rec.pinned:
            for key in set(rec.keys):
                b = self._blocks.get(key)
                if b is not None:
                    b.pins -= 1
        self._adopt(disk)
        self._stats.count("sessions_reread")
        rec = self._session(session)  # the stored record's own TTL may have run out
        return (None, 0) if rec is None else (rec, common_prefix(rec.tokens, toks))

    def _forget_block(self, b: Block) -> None:
        """Delete a block from memory; the queued op deleting it on disk lists it as doomed."""
        if b.tier is not None:
            self._tiers[b.tier].remove(b)
        self._discard(b.key)
        self._doomed[b.key] += 1

    def _forget_vanished(self, b: Block) -> None:
        """A block's value left the store after this process matched it: another thread dropped
        or evicted it, or another process sharing the store did. This process's record of it is
        stale; unless the block is in memory, loading or queued for a write, it is let go, so the
        next look at its key reads the store's bookkeeping again and lookups stop promising it
        (until a save brings it back, in this process or another). Called under the lock."""
        if (self._blocks.get(b.key) is not b or b.tier is not None or b.load is not None
                or b.write_queued):
            return
        b.on_ssd = False  # not available: the epoch moves, and sessions' prefixes are walked again
        if not b.pins:  # a pinned block's record keeps its pin count: it stays, not on SSD
            self._discard(b.key)

    def _unref(self, keys: Sequence[bytes], pinned: bool) -> list[bytes]:
        doomed = []
        for key in set(keys):
            b = self._block(key)
            if b is None:
                continue
            b.refs -= 1
            if pinned:
                b.pins -= 1
            if b.refs <= 0:
                self._forget_block(b)
                doomed.append(key)
        return doomed

    def _drop_locked(self, rec: SessionRecord) -> None:
        self._sessions.pop(rec.session, None)
        self._touched.pop(rec.session, None)
        self._dropping[rec.session] += 1
        op = Op("drop", session=rec.session, doomed=self._unref(rec.keys, rec.pinned))
        self._enqueue(op)

    def _enqueue(self, op: Op) -> None:
        """Queue ``op`` for the writer (locked). Once a background thread has failed, fail it
        at once: the store refuses calls from then on, and a failed writer takes no more ops."""
        if self._bg_error is not None:
            op.error = BackgroundError(f"a background thread failed: {self._bg_error!r}; close and reopen the store")
            op.done.set()
            return
        if op.session is not None:
            self._pending[op.session] += 1
        self._ops.append(op)
        self._wake.notify_all()

    # ------------------------------------------------------------------ save
    def save(self, tokens: Any, kv: _KV, session: str | None = None, *, tenant: str | None = None,
             ttl: float | None = None, pinned: bool | None = None, known_from: Any = None) -> SaveHandle:
        """Cache ``kv`` for ``tokens`` (and make it ``session``'s state, if given).

        Args:
            tokens: every token id the KV covers (list, numpy or torch, 1-D).
            kv: one tuple of tensors per layer in the spec's shapes, covering ``len(tokens)``.
            session: session id; its record then maps to exactly these tokens, trailing partial
                block included. Without one, only full blocks are cached, by content.
            tenant: salt of the block keys; KV is shared only within a tenant.
            ttl: seconds of idleness after which the session expires (``None`` keeps the
                previous TTL, or none).
            pinned: keep the session from eviction (``None`` keeps the previous setting).
            known_from: an int, or one int per layer: the first token whose KV ``kv`` holds for
                that layer; the rows before it are not KV (a restore with ``needed_from`` left
                them unread). A block with such rows is never copied from ``kv``: where the store
                holds it, the save names it as it is; where it does not, the save ends before it
                (its tokens, and every later one, are not saved: ``stats()["saves_cut_unknown"]``,
                and a save cut to nothing leaves the session as it was).

        Returns:
            A SaveHandle; ``save`` itself returns once the new blocks are copied into the first
            memory tier, without waiting for disk I/O, unless saves have outrun the writer so far
            that a memory tier is over its budget by more than its slack: then it first waits for
            the writer (backpressure; at most ``SAVE_WAIT_S``).
        """
        self._check_open()
        toks = as_tokens(tokens)
        if len(toks) == 0:
            raise SpecMismatchError("cannot save zero tokens")
        self.spec.check_kv(kv, len(toks))
        if self.config.nan_policy == "refuse":
            for i, layer in enumerate(kv):
                for x in layer:
                    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                        raise SpecMismatchError(f"layer {i}: KV holds NaN or Inf (nan_policy='refuse')")
        known = check_needed_from(known_from, self.spec.num_layers, "known_from")
        if session is not None:
            check_session_id(session)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0
                                or not math.isfinite(ttl)):
            raise ConfigError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if pinned is not None and not isinstance(pinned, bool):  # "no" would pin
            raise ConfigError(f"pinned must be True, False or None, got {pinned!r}")
        B = self.block_tokens
        # blocks before this one hold rows the caller did not give (known_from): never copied
        unknown = -(-min(max(known), len(toks)) // B) if known else 0

        def block_bytes(i: int) -> int:  # the payload of the save's block i (the last may be partial)
            return min(B, len(toks) - i * B) * self.spec.bytes_per_token

        keys = block_keys(chain_seed(self.fingerprint, tenant), toks, B, partial=session is not None)
        keys_of_lease = keys
        target = self._tiers["device"] if self._tiers["device"].enabled else self._tiers["host"]
        self._wait_for_memory(target)

        lease, being_deleted = None, set()
        with self._lock:
            self._check_open()  # under the lock, close() has not closed the lease table
            if session is not None:  # before _to_copy reads the store (leases.py)
                lease = self._ssd.leases.new_owner()
                being_deleted = self._ssd.leases.grant(keys, lease)
            missing = self._to_copy(keys, being_deleted)
            cut = next((i for i in missing if i < unknown), None)
            if cut is not None:  # not held here, and not given: the session ends before it
                keys, toks, missing = keys[:cut], toks[:cut * B], [i for i in missing if i < cut]
                self._stats.count("saves_cut_unknown", 1)
                if lease is not None:
                    self._ssd.leases.release(keys_of_lease[cut:], lease)
                if not keys:
                    return self._save_of_nothing(lease, keys_of_lease)
            if target is self._tiers["host"] and target.enabled:
                self._release_clean(target, sum(map(block_bytes, missing)), set(keys))
        # The slab pool's thread holds off until this save returns: prefaulting alongside the
        # copy slowed it as much as the faults it spared, and alongside the bookkeeping after it
        # added milliseconds to the return (likely the process's memory-map lock, which the
        # prefault holds and a new allocation's mmap waits for; bench/save_block.py)
        with target.pool.copying() if target.pool is not None else contextlib.nullcontext():
            # First copy, outside the lock: into the first memory tier.
            payloads = {}
            t0 = time.perf_counter()
            cuda = target.device if target.device.type == "cuda" else next((x.device for x in kv[0] if x.is_cuda), None)
            for i in missing:
                payloads[i] = target.alloc(block_bytes(i))
            # while the writer works, the copy stays on this thread (blocks.serial_pieces): split
            # across torch's intra-op threads, they spin and take cores from the writer
            pack_blocks(self.spec, kv, B, payloads, serial=self._writer_busy())
            if cuda is not None and payloads:
                # the copies were queued on this thread's stream, after the work that produced the KV:
                # wait for that stream only, not for every stream of the device
                torch.cuda.current_stream(cuda).synchronize()
            self._stats.moved("caller->" + target.name, sum(p.numel() for p in payloads.values()),
                              time.perf_counter() - t0)
            if target.pool is not None:  # the pool makes that much ready, once this save has returned
                target.pool.expect(sum(p.numel() for p in payloads.values() if p.numel() == target.pool.slot_bytes))

            now = time.time()
            with self._lock:
                self._check_open()
                old = self._session(session, now) if session is not None else None
                if old is not None and old.tenant != tenant:
                    raise ConfigError(f"session {session!r} belongs to another tenant; use another session id")
                is_pinned = bool(pinned if pinned is not None else (old.pinned if old else False))
                new_bytes = sum(p.numel() for p in payloads.values())
                if is_pinned and target.enabled and target.pinned_bytes() + new_bytes > target.budget:
                    raise BudgetExceededError(
                        f"pinned sessions would hold {target.pinned_bytes() + new_bytes} B of the {target.name} "
                        f"tier's {target.budget} B budget; unpin sessions or raise {target.name}_bytes")
                blocks = []
                self._blocks_of(keys)  # records of them all, in one read of the store
                for i, key in enumerate(keys):
                    b = self._blocks.get(key)
                    if i not in payloads and not self._available(b) and i < unknown:
                        # dropped since the first look, and not given: the session ends before it
                        keys, toks = keys[:i], toks[:i * B]
                        self._stats.count("saves_cut_unknown", 1)
                        if not keys:
                            return self._save_of_nothing(lease, keys_of_lease)
                        if lease is not None:
                            self._ssd.leases.release(keys_of_lease[i:], lease)
                        break
                    if i not in payloads and not self._available(b):
                        # Dropped by another thread since the first look: copy it now (rare), and
                        # wait for it as for the others
                        payloads[i] = target.alloc(block_bytes(i))
                        pack_blocks(self.spec, kv, B, {i: payloads[i]})
                        if cuda is not None:
                            torch.cuda.current_stream(cuda).synchronize()
                    if i in payloads and not self._available(b):
                        n = min(B, len(toks) - i * B)
                        if b is None:
                            b = Block(key, n, n * self.spec.bytes_per_token, epoch=self._epoch)
                            self._blocks[key] = b
                        if b.corrupt and b.on_ssd:
                            # its value on SSD failed a checksum: this copy is written over it, and
                            # until then the block counts as not on SSD (so it is written, never
                            # dropped from memory as if a good copy were on disk)
                            b.on_ssd = False
                            b.repair = True
                        b.corrupt = False
                        target.add(b, payloads[i])
                    elif b.tier is not None:
                        self._tiers[b.tier].touch(b)
                    blocks.append(b)
                write_through = self.config.persist == "write_through"
                if session is None:
                    op = Op("write", write=self._claim_writes(blocks) if write_through else [])
                else:
                    old_keys = set(old.keys) if old else set()
                    new_keys = set(keys)
                    was_pinned = bool(old and old.pinned)
                    for b in blocks:
                        if b.key not in old_keys:
                            b.refs += 1
                            b.pins += is_pinned
                        elif was_pinned != is_pinned:
                            b.pins += 1 if is_pinned else -1
                    doomed = self._unref([k for k in old_keys if k not in new_keys], was_pinned)
                    rec = SessionRecord(session, toks, keys, old.created if old else now, now,
                                        ttl if ttl is not None else (old.ttl if old else None), is_pinned, tenant)
                    self._sessions[session] = rec
                    self._touched.pop(session, None)
                    op = Op("session", session=session, record=rec, doomed=doomed, lease=lease,
                             added=[b.key for b in blocks if b.key not in old_keys],
                             write=self._claim_writes(blocks) if write_through else [])
                self._enqueue(op)
                self._stats.count("saved_tokens", len(toks))
            return SaveHandle(op.done, lambda: self._op_error(op))

    def _save_of_nothing(self, lease: int | None, keys: list[bytes]) -> SaveHandle:
        """A save cut to no block (``known_from``): nothing changes; its lease is let go."""
        if lease is not None:
            self._ssd.leases.release(keys, lease)
        done = threading.Event()
        done.set()
        return SaveHandle(done, lambda: None)

    def _to_copy(self, keys: list[bytes], being_deleted: set[bytes]) -> list[int]:
        """Indexes of the blocks a save must copy: those not available here, and those this
        process holds only as "on SSD" whose value is no longer stored (another process evicted
        or dropped it: this process's record was stale). Without the check, such a save's record
        named blocks with no value, and a restore ended before them until the next save. Blocks
        held in memory as "on SSD" are checked too: one whose value is gone counts as not on SSD
        from here on (``stats()["stale_blocks_rewritten"]``), so this save writes it with
        write-through, or demotion does, rather than letting the memory copy go as if the disk
        had one (the record was then cut back at its commit: 26 of the 27 cuts of a two-process
        bf16 soak, with the save's lease intact). One read for all the "on SSD" blocks it had
        records of before this call, one for the keys it had none of (``_blocks_of``: those
        records are fresh, not checked again); none while the store's last write transaction is
        still one whose deletions this process's memory mirrors (``_store_seen``: a process
        alone on its store never looks: for a 1M-token session it is 3,907 reads, docs/benchmarks.md
        "Bookkeeping"). Called under the lock.

        A session's save has leased the blocks first (``leases.py``), before this reads the
        store, so that a write transaction (another process's, or this process's writer's) that
        looks at their leases after that keeps the values the save trusts until its record
        commits (blocks held in memory too: kept, their values need not be written again). Those
        a transaction had marked as being deleted by then (``being_deleted``, from the grant)
        are not trusted: copied like blocks not on SSD, or, held in memory, written again.
        """
        # only where another process has written since this one's memory mirrored the store;
        # loads in flight are left out: a load finds out for itself (a vanished block)
        look = self._ssd.last_txnid() != self._store_seen
        on_ssd = [b for b in map(self._blocks.get, keys)
                  if b is not None and b.on_ssd and b.available and b.load is None] if look else []
        blocks = self._blocks_of(keys)
        stored = self._ssd.values_stored([b.key for b in on_ssd]) if on_ssd else set()
        for b in on_ssd:
            if b.key in stored:
                continue
            if b.tier is None:
                self._forget_vanished(b)  # not available any more, unless a write is queued
            elif not b.write_queued:
                b.on_ssd = False  # held in memory: written again, from this copy
                self._stats.count("stale_blocks_rewritten")
        for b in filter(None, map(self._blocks.get, being_deleted)):
            if b.on_ssd and b.load is None and not b.write_queued:
                # kept as a record, not on SSD (the save's second look must not read it from the
                # store again): copied, or, held in memory, written again
                self._stats.count("blocks_copied_being_deleted")
                b.on_ssd = False
        return [i for i, b in enumerate(blocks) if not self._available(b)]

    def _wait_for_memory(self, target: MemoryTier) -> None:
        """Backpressure. Saves arriving faster than the writer can move blocks to SSD left every
        memory tier growing without bound
        (``test_saves_faster_than_the_disk_wait_instead_of_growing_memory`` failed). A tier may run over its budget by its slack (its budget
        again, at most SAVE_SLACK_MAX) while the writer catches up; beyond that, ``save`` waits
        until the writer has brought it back under, at most SAVE_WAIT_S, then goes on (counted:
        the writer may be stuck, e.g. on a full store, and a save must not hang)."""
        tiers = [t for t in (target, self._tiers["host"]) if t.enabled]

        def over() -> bool:
            return any(t.used > t.budget + min(t.budget, SAVE_SLACK_MAX) for t in tiers)

        if not over():  # unlocked read: the usual case costs nothing
            return
        t0 = time.monotonic()
        with self._wake:
            self._wake.notify_all()  # the writer demotes what it can
            while over() and not self._stopping and self._bg_error is None:
                left = t0 + SAVE_WAIT_S - time.monotonic()
                if left <= 0:
                    self._stats.count("save_wait_timeouts")
                    break
                self._wake.wait(timeout=min(left, 0.1))
        self._stats.count("save_waits")
        self._stats.count("save_wait_us", int((time.monotonic() - t0) * 1e6))

    def _release_clean(self, tier: MemoryTier, nbytes: int, keep: set[bytes]) -> None:
        """(Locked.) Before a save copies ``nbytes`` into the host ``tier``: let go of its least
        recently used blocks that are on SSD already (as the writer's ``_maintain`` does between
        its batches) until they fit in its budget, so that the save copies into their places in
        the slab pool rather than new memory. Blocks of the save itself (``keep``) stay. In a
        burst of large saves the writer was in a transaction of seconds, and the blocks it had
        written stayed in memory meanwhile, the tier over budget, while each save's blocks came
        from new memory (docs/benchmarks.md, "Session 61")."""
        excess = tier.used + nbytes - tier.budget
        if excess <= 0:
            return
        for b in tier.victims():
            if b.on_ssd and b.key not in keep:
                excess -= self._let_go(tier, b)
                if excess <= 0:
                    return

    def _claim_writes(self, blocks: Sequence[Block]) -> list[Block]:
        out = []
        for b in blocks:
            if not b.on_ssd and not b.write_queued and b.tier is not None:
                b.write_queued = True
                out.append(b)
        return out

    def _op_error(self, op: Op) -> BaseException | None:
        with self._lock:
            if op.error is not None and op.error in self._unreported:
                self._unreported.remove(op.error)
        return op.error

    # ------------------------------------------------------------------ lookup / restore / prefetch
    def _match(self, toks: np.ndarray, session: str | None, tenant: str | None) -> Iterator[tuple[Block, int]]:
        """Blocks of the longest cached prefix of ``toks``, each with the tokens it contributes.

        A generator: ``lookup`` only sums it, so a 1M-token session does not leave thousands of
        tuples alive for the garbage collector (they made lookup's p99 70 ms; bench/ops.py).
        """
        B = self.block_tokens
        rec, lcp = self._session_for(session, toks) if session is not None else (None, 0)
        if rec is not None and rec.tenant == tenant:
            keys: Any = rec.keys[:(lcp + B - 1) // B]
        else:
            lcp = (len(toks) // B) * B
            keys = iter_block_keys(chain_seed(self.fingerprint, tenant), toks, B, partial=False)
        for i, key in enumerate(keys):
            b = self._block(key)
            if not self._available(b):
                return
            yield b, min(b.n_tokens, lcp - i * B)

    def lookup(self, tokens: Any, session: str | None = None, *, tenant: str | None = None) -> int:
        """Number of leading tokens of ``tokens`` whose KV is cached (in any tier).

        With a session, its exact tokens count, trailing partial block included; without one (or
        for an unknown session), full blocks are matched by content.
        """
        self._check_open()
        toks = tokens_view(tokens)  # may be this thread's scratch: used only before returning
        if session is not None:
            check_session_id(session)
        with self._lock:
            self._check_open()  # again under the lock: close() may have begun meanwhile
            rec, lcp = self._session_for(session, toks) if session is not None else (None, 0)
            if rec is None or rec.tenant != tenant:
                return sum(used for _, used in self._match(toks, session, tenant))
            n_blocks = (lcp + self.block_tokens - 1) // self.block_tokens
            found = min(self._available_blocks(rec), n_blocks)
            if found == n_blocks:
                return lcp
            return found * self.block_tokens

    def restore(self, tokens: Any, session: str | None = None, *, tenant: str | None = None,
                device: torch.device | str | None = None, needed_from: Any = None) -> RestoredKV:
        """The cached prefix of ``tokens``: its token count and KV as per-layer tensors on ``device``.

        Blocks already in memory are copied at once; blocks an earlier ``prefetch`` is loading are
        waited for; the rest are read from SSD now. A block failing its checksum ends the prefix
        there (a counted miss). To have at least one token left to prefill, pass ``tokens[:-1]``.
        ``needed_from``: see ``restore_async``.
        """
        return self.restore_async(tokens, session, tenant=tenant, device=device, needed_from=needed_from).result()

    def restore_async(self, tokens: Any, session: str | None = None, *, tenant: str | None = None,
                      device: torch.device | str | None = None, allocate: Any = None,
                      needed_from: Any = None) -> LoadHandle:
        """Start a restore and return its LoadHandle at once (``layer(i)``, ``result()``).

        Blocks only on SSD are decoded straight into the result tensors (on a CPU device; on a
        GPU into one host staging buffer, uploaded layer by layer), without a stop in the host tier. ``allocate(layer, index, shape, dtype, device)`` may supply the
        result tensors (e.g. views into a cache with headroom); it must return tensors of that
        shape whose last axis is contiguous.

        ``needed_from`` (an int, or one int per layer): the first token whose KV the caller
        needs, where it holds the tokens before it (a server's own prefix cache) or its layer
        attends to a window that no longer reaches them. A block wholly before it is not read
        for that layer, and its rows of the result are not written: they keep what the
        ``allocate``'d memory held, or are zeros. The prefix's length, its lookup and a failed
        block's truncation are as without it.
        """
        return self._start_load(tokens, session, tenant, promote=False, device=device, allocate=allocate,
                                needed_from=needed_from)

    def prefetch(self, tokens: Any, session: str | None = None, *, tenant: str | None = None,
                 device: torch.device | str | None = None) -> LoadHandle:
        """Start moving the cached prefix of ``tokens`` up to the device tier in the background.

        Returns a LoadHandle: ``wait()``, per-layer ``layer(i)``, or ``result()``. A later
        ``restore`` of the same tokens waits only for the blocks still in flight.
        """
        return self._start_load(tokens, session, tenant, promote=True, device=device)

    def _start_load(self, tokens: Any, session: str | None, tenant: str | None, promote: bool,
                    device: torch.device | str | None, allocate: Any = None, needed_from: Any = None) -> LoadHandle:
        self._check_open()
        toks = as_tokens(tokens)
        needed = check_needed_from(needed_from, self.spec.num_layers)
        if session is not None:
            check_session_id(session)
        dev = check_device(device) if device is not None else self.device
        staged = via_host_staging(dev)
        with self._lock:
            # Under the lock, once close() has begun no load starts; one that has started holds
            # close() back from shutting the I/O pool down until its reads are submitted (it
            # would refuse them, and the matched blocks would stay LOADING for good)
            self._check_open()
            self._loads_starting += 1
        try:
            return self._start_load_open(toks, session, tenant, promote, dev, staged, allocate, needed)
        finally:
            with self._lock:
                self._loads_starting -= 1
                if self._loads_starting == 0:
                    self._wake.notify_all()

    # ------------------------------------------------------------------ sessions
    def _known_session(self, session: str) -> SessionRecord:
        """The live record of ``session`` (call with the lock held), or UnknownSessionError."""
        self._check_open()
        check_session_id(session)
        rec = self._session(session)
        if rec is None:
            raise UnknownSessionError(f"no session {session!r} in store {self.path}")
        return rec

    def drop_session(self, session: str) -> None:
        """Forget a session; blocks no other session uses are deleted from every tier.

        Raises:
            UnknownSessionError: no such session.
        """
        with self._lock:
            self._drop_locked(self._known_session(session))

    def session_info(self, session: str) -> dict[str, Any]:
        """A session's token count, block count, times, TTL, pin and tenant.

        Raises:
            UnknownSessionError: no such session.
        """
        with self._lock:
            rec = self._known_session(session)
            where = Counter(("memory:" + b.tier) if b.tier else ("ssd" if b.on_ssd else "missing")
                            for b in self._blocks_of(rec.keys) if b is not None)
            return {"session": session, "tokens": len(rec.tokens), "blocks": len(rec.keys),
                    "created": rec.created, "last_used": rec.last_used,
                    "ttl": rec.ttl, "pinned": rec.pinned, "tenant": rec.tenant, "blocks_by_tier": dict(where)}

    def offload(self, session: str | None = None) -> None:
        """Push a session's blocks (or every block) out of memory to SSD, and wait for it.

        What an idle agent session goes through over hours, done now: blocks not yet on SSD are
        written, then their memory copies are released.
        """
        self.flush()  # let queued writes land first: their blocks are then simply released
        with self._lock:
            self._check_open()
            if session is None:
                blocks = [b for b in self._blocks.values() if b.tier is not None]
            else:
                rec = self._known_session(session)
                blocks = [b for b in (self._blocks.get(k) for k in rec.keys) if b is not None and b.tier]
            free_now = [b for b in blocks if b.on_ssd and b.state is BlockState.READY]
            for b in free_now:
                self._tiers[b.tier].remove(b)
            to_write = [b for b in blocks if not b.on_ssd and b.state is BlockState.READY and not b.write_queued]
            for b in to_write:
                b.write_queued = True
                b.state = BlockState.WRITING
            ops = [Op("write", write=part, free_after=True) for part in self._write_parts(to_write)]
            for op in ops:
                self._enqueue(op)
        self.flush()
        error = next((op.error for op in ops if op.error is not None), None)
        if error is not None:
            raise error

    # ------------------------------------------------------------------ flush / stats / close
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write and demotion is done; raise the first unreported error."""
        self._check_open()
        timeout = check_timeout(timeout)
        op = Op("barrier")
        with self._lock:
            self._check_open()  # an op queued once close() has begun would never be taken
            self._enqueue(op)
        if not op.done.wait(timeout):
            raise TierKVError(f"flush did not finish within {timeout} s")
        self._check_open()
        with self._lock:
            if self._unreported:
                err = self._unreported.pop(0)
                raise err

    def stats(self) -> dict[str, Any]:
        """Counters: hits per tier, misses, corrupt blocks, bytes copied and GB/s per direction,
        resident bytes per tier, compression ratio."""
        with self._lock:
            self._check_open()  # under the lock: the LMDB environment is closed under it
            resident = {name: t.used for name, t in self._tiers.items()}
            counts = {name: len(t) for name, t in self._tiers.items()}
            resident["ssd"] = self._ssd.ssd_used()
        out = self._stats.snapshot(resident, counts, {n: t.budget for n, t in self._tiers.items()}
                                   | {"ssd": self.config.ssd_bytes})
        out["host_pool"] = self._host_pool.snapshot() if self._host_pool is not None else None
        # leases of saves (here or in another process) that this process's saves wrote over in
        # the lease table (leases.py: a slot keeps two owners of one key): a record that trusted
        # such a block may be cut back at its commit
        out["leases_displaced"] = self._ssd.leases.displaced
        # keys this process's saves found marked only through their mark bucket's overflow
        # (leases.py: all four entries held other keys' marks): at most that many of
        # blocks_copied_being_deleted were not needed
        out["marks_shared"] = self._ssd.leases.shared_marks
        return out

    def close(self) -> None:
        """Persist what write-back still holds only in memory, stop the threads, close LMDB.

        Idempotent. Raises the first background error, after closing. In a process forked from
        the one that opened it, only marks it closed: the environment and threads are the
        parent's, and closing LMDB here would release the parent's reader slots.
        """
        with self._close_lock:  # a second close() returns once the first has finished
            if self._closed:
                return
            if os.getpid() != self._pid:
                self._closed = True
                return
            self._close()

    def _close(self) -> None:
        error: BaseException | None = None
        if self._bg_error is None:
            try:
                self.flush()  # what is queued, and its first unreported error
            except TierKVError as e:
                error = e
        with self._lock:
            self._stopping = True  # from here on, calls raise StoreClosedError and queue nothing
            self._wake.notify_all()
            while self._loads_starting:  # loads that began before: their reads go to the pool first
                self._wake.wait()
        self._writer.join()  # having written write-back's memory-only blocks (_last_write_back)
        if error is None:
            error = next((op.error for op in self._last_write_back_ops or () if op.error is not None), None)
        self._pool.shutdown(wait=True)
        self._reads.close()
        if self._host_pool is not None:
            self._host_pool.close()
        with self._lock:  # a call that took the lock before close() began has finished with LMDB
            self._closed = True
            self._ssd.close()
            # Let go of what memory held now, not when the garbage collector next breaks this
            # object's reference cycles (its threads' callbacks): until then a closed store kept
            # its tiers' payloads, up to both budgets of host memory and, on a GPU, device memory
            # (bench/soak.py). Results and buffers a caller still holds stay valid.
            for tier in self._tiers.values():
                tier.clear()
            self._blocks.clear()
            self._sessions.clear()
            self._encoded_ahead.clear()
            self._encode_buffers.clear()
        if error is not None:
            raise error
        if self._bg_error is not None:
            raise BackgroundError(f"a background thread failed: {self._bg_error!r}") from self._bg_error

    def __del__(self) -> None:  # last resort; close() is the contract
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - nothing to report to at interpreter teardown
                pass
