"""The cache manager: ``TierKV``, the hooks an inference loop calls.

Primitives:
    TierKV: save / lookup / restore / prefetch / drop_session / offload / flush / stats / close.

Control apart from data: every bookkeeping decision (which block is where, references, pins,
budgets, what to persist) is made under one lock over small records (``Block``,
``SessionRecord``); byte movement (packing, device<->host copies, encoding, LMDB writes, decoding)
happens outside it, in the caller for a save's first copy, in the writer thread for SSD writes and
demotions, and in the I/O pool for SSD reads.

Ordering: persistent changes are queued as ops in the order their in-memory effects were made,
and one writer thread applies them to LMDB in that order, so the store on disk always equals the
in-memory state as of some earlier moment. Keys the memory side has deleted but the writer has not
yet are "doomed" and never re-read from disk meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import hostmem
from .affinity import spread_initializer
from .blocks import Block, BlockLoad, BlockState, Epoch, pack_blocks
from .codec import CorruptValueError, header_bound, make_codec, parse_block, stored_span
from .config import TierKVConfig
from .errors import (BackgroundError, BudgetExceededError, ConfigError, ForkedProcessError,
                     SpecMismatchError, StoreClosedError, StoreFullError, StoreIOError, TierKVError,
                     UnknownSessionError)
from .handles import LoadHandle, RestoredKV, SaveHandle, _Part, via_host_staging
from .pagecache import advise_willneed
from .keys import as_tokens, block_keys, chain_seed, common_prefix, iter_block_keys, tokens_view
from .movers import MOVERS, Transfer, decode_layer_into, decode_layer_into_views, encode_payload, read_layers_direct
from .spec import KVSpec
from .stats import Stats
from .store import SessionRecord, SSDStore, check_session_id
from .tiers import MemoryTier

__all__ = ["TierKV"]

_KV = Sequence[Sequence[torch.Tensor]]
#: seconds a restore's mark of use may wait for a write batch before the writer makes one for it
TOUCH_WRITE_S = 2.0
#: backpressure: a memory tier may run over its budget by this much (at most its budget again)
#: while the writer catches up; beyond it, ``save`` waits for the writer, at most SAVE_WAIT_S
SAVE_SLACK_MAX = 1 << 30
SAVE_WAIT_S = 10.0
#: bytes per O_DIRECT request of a block's layers (``ssd_page_cache="bypass"``): on the test machine's
#: disk, requests of a few MiB went near its sequential rate and requests of one layer did not
#: (bench/direct_ceiling.py); runs of stored layers smaller than DIRECT_MIN_BYTES stay buffered
DIRECT_READ_BYTES = 4 << 20
DIRECT_MIN_BYTES = 1 << 20
#: the writer takes queued ops (whole ones, at least one) until their new values reach this many
#: bytes, for one transaction: LMDB holds a transaction's new pages in memory until its commit,
#: and spills them to disk past about 512 MiB; batches of everything queued (660 MB in a probe)
#: wrote far slower per byte than transactions of a session (bench/save_bound.py)
WRITE_BATCH_BYTES = 128 << 20


def _consecutive(layers: list[int]) -> Iterator[range]:
    """Runs of consecutive numbers in a sorted list, as ranges."""
    start = prev = None
    for x in layers:
        if start is not None and x != prev + 1:
            yield range(start, prev + 1)
            start = None
        if start is None:
            start = x
        prev = x
    if start is not None:
        yield range(start, prev + 1)


@dataclass(eq=False)
class _Op:
    """A persistent change for the writer thread."""

    kind: str                                   # "session" | "drop" | "write" | "barrier"
    session: str | None = None
    record: SessionRecord | None = None
    write: list[Block] = field(default_factory=list)
    free_after: bool = False                    # demotion: drop memory copies once written
    doomed: list[bytes] = field(default_factory=list)
    added: list[bytes] = field(default_factory=list)  # keys this session op took a reference on
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class TierKV:
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
        try:
            device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise ConfigError(f"device={cfg.device!r} is not a torch device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device!r} but CUDA is not available")
        pin = cfg.pin_host_memory if cfg.pin_host_memory is not None else hostmem.can_pin()
        if pin and not hostmem.can_pin():
            raise ConfigError("pin_host_memory=True needs CUDA: the CUDA driver page-locks host memory")
        self.device = device
        self.codec = make_codec(cfg.ssd_codec, cfg.zstd_level)
        self._header_bound = header_bound(spec, self.codec)
        ident = {"block_tokens": cfg.block_tokens, "codec": self.codec.name, "device_codec": "raw"}
        self.fingerprint = spec.fingerprint(**ident)
        self._ssd = SSDStore(path, self.fingerprint, dict(spec.describe(), **ident), cfg.ssd_bytes)
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
        self._ops: deque[_Op] = deque()
        self._writing = False                        # the writer holds a batch
        #: key -> (payload, future of its encoded value): the next batch's, encoded during a commit
        self._encoded_ahead: dict[bytes, tuple[Any, Any]] = {}
        self._unreported: list[BaseException] = []   # op errors no handle has raised yet
        self._bg_error: BaseException | None = None
        self._stats = Stats()
        self._closed = False
        self._pid = os.getpid()  # the process that owns the environment and threads
        self._stopping = False
        self._maint_blocked_until = 0.0
        self._pool = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="tierkv-io",
                                        initializer=spread_initializer(
                                            cfg.io_threads, cfg.io_affinity,
                                            refused=lambda: self._stats.count("io_affinity_refused")))
        self._writer = threading.Thread(target=self._writer_loop, name="tierkv-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> "TierKV":
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
        if self._closed:
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
        if meta is None:
            return None
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
        blocks, found = self._blocks, 0
        for key in rec.keys:
            blk = blocks.get(key) or self._block(key)
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
            self._sessions[session] = rec
            if rec.pinned:
                for key in set(rec.keys):
                    b = self._block(key)
                    if b is not None:
                        b.pins += 1
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

    def _forget_block(self, b: Block) -> None:
        """Delete a block from memory; the queued op deleting it on disk lists it as doomed."""
        if b.tier is not None:
            self._tiers[b.tier].remove(b)
        self._discard(b.key)
        self._doomed[b.key] += 1

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
        op = _Op("drop", session=rec.session, doomed=self._unref(rec.keys, rec.pinned))
        self._enqueue(op)

    def _enqueue(self, op: _Op) -> None:
        if op.session is not None:
            self._pending[op.session] += 1
        self._ops.append(op)
        self._wake.notify_all()

    # ------------------------------------------------------------------ save
    def save(self, tokens: Any, kv: _KV, session: str | None = None, *, tenant: str | None = None,
             ttl: float | None = None, pinned: bool | None = None) -> SaveHandle:
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
        if session is not None:
            check_session_id(session)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0
                                or not math.isfinite(ttl)):
            raise ConfigError(f"ttl must be a positive number of seconds, got {ttl!r}")
        B = self.block_tokens
        keys = block_keys(chain_seed(self.fingerprint, tenant), toks, B, partial=session is not None)
        target = self._tiers["device"] if self._tiers["device"].enabled else self._tiers["host"]
        self._wait_for_memory(target)

        with self._lock:
            self._check_open()
            missing = [i for i, k in enumerate(keys) if not self._available(self._block(k))]
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
                payloads[i] = target.alloc(min(B, len(toks) - i * B) * self.spec.bytes_per_token)
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
                for i, key in enumerate(keys):
                    b = self._block(key)
                    if i not in payloads and not self._available(b):
                        # Dropped by another thread since the first look: copy it now (rare), and
                        # wait for it as for the others
                        payloads[i] = target.alloc(min(B, len(toks) - i * B) * self.spec.bytes_per_token)
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
                    op = _Op("write", write=self._claim_writes(blocks) if write_through else [])
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
                    op = _Op("session", session=session, record=rec, doomed=doomed,
                             added=[b.key for b in blocks if b.key not in old_keys],
                             write=self._claim_writes(blocks) if write_through else [])
                self._enqueue(op)
                self._stats.count("saved_tokens", len(toks))
            return SaveHandle(op.done, lambda: self._op_error(op))

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

    def _claim_writes(self, blocks: Sequence[Block]) -> list[Block]:
        out = []
        for b in blocks:
            if not b.on_ssd and not b.write_queued and b.tier is not None:
                b.write_queued = True
                out.append(b)
        return out

    def _op_error(self, op: _Op) -> BaseException | None:
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
        rec = self._session(session) if session is not None else None
        if rec is not None and rec.tenant == tenant:
            lcp = common_prefix(rec.tokens, toks)
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
            rec = self._session(session) if session is not None else None
            if rec is None or rec.tenant != tenant:
                return sum(used for _, used in self._match(toks, session, tenant))
            lcp = common_prefix(rec.tokens, toks)
            n_blocks = (lcp + self.block_tokens - 1) // self.block_tokens
            found = min(self._available_blocks(rec), n_blocks)
            if found == n_blocks:
                return lcp
            return found * self.block_tokens

    def restore(self, tokens: Any, session: str | None = None, *, tenant: str | None = None,
                device: torch.device | str | None = None) -> RestoredKV:
        """The cached prefix of ``tokens``: its token count and KV as per-layer tensors on ``device``.

        Blocks already in memory are copied at once; blocks an earlier ``prefetch`` is loading are
        waited for; the rest are read from SSD now. A block failing its checksum ends the prefix
        there (a counted miss). To have at least one token left to prefill, pass ``tokens[:-1]``.
        """
        return self.restore_async(tokens, session, tenant=tenant, device=device).result()

    def restore_async(self, tokens: Any, session: str | None = None, *, tenant: str | None = None,
                      device: torch.device | str | None = None, allocate: Any = None) -> LoadHandle:
        """Start a restore and return its LoadHandle at once (``layer(i)``, ``result()``).

        Blocks only on SSD are decoded straight into the result tensors (on a CPU device; on a
        GPU into one host staging buffer, uploaded layer by layer), without a stop in the host tier. ``allocate(layer, index, shape, dtype, device)`` may supply the
        result tensors (e.g. views into a cache with headroom); it must return tensors of that
        shape whose last axis is contiguous.
        """
        return self._start_load(tokens, session, tenant, promote=False, device=device, allocate=allocate)

    def prefetch(self, tokens: Any, session: str | None = None, *, tenant: str | None = None,
                 device: torch.device | str | None = None) -> LoadHandle:
        """Start moving the cached prefix of ``tokens`` up to the device tier in the background.

        Returns a LoadHandle: ``wait()``, per-layer ``layer(i)``, or ``result()``. A later
        ``restore`` of the same tokens waits only for the blocks still in flight.
        """
        return self._start_load(tokens, session, tenant, promote=True, device=device)

    def _start_load(self, tokens: Any, session: str | None, tenant: str | None, promote: bool,
                    device: torch.device | str | None, allocate: Any = None) -> LoadHandle:
        self._check_open()
        toks = as_tokens(tokens)
        if session is not None:
            check_session_id(session)
        try:
            dev = torch.device(device) if device is not None else self.device
        except RuntimeError as e:
            raise ConfigError(f"device={device!r}: {e}") from None
        staged = via_host_staging(dev)
        direct_ok = not promote
        B = self.block_tokens
        now = time.time()
        parts: list[_Part] = []
        loads: list[BlockLoad] = []
        promote_now: list[Block] = []
        with self._lock:
            for i, (b, used) in enumerate(self._match(toks, session, tenant)):
                if b.tier is not None:
                    self._tiers[b.tier].touch(b)
                    parts.append(_Part(b, i * B, used, b.payload, None, b.tier))
                    if promote and b.tier == "host" and b.state is BlockState.READY:
                        promote_now.append(b)
                elif b.load is not None or not direct_ok:
                    if b.load is None:
                        b.load = BlockLoad(b, None, [threading.Event() for _ in self.spec.layers], self.spec.num_layers)
                        b.state = BlockState.LOADING
                        loads.append(b.load)
                    parts.append(_Part(b, i * B, used, None, b.load, "ssd"))
                else:
                    parts.append(_Part(b, i * B, used, None, None, "ssd", direct=True))
            self._stats.count("lookup_tokens", len(toks))
            self._stats.count("hit_tokens", sum(p.used for p in parts))
            for p in parts:
                self._stats.count(f"hit_blocks_{p.source}", 1)
            rec = self._sessions.get(session) if session is not None else None
            if rec is not None and rec.tenant == tenant:
                rec.last_used = max(rec.last_used, now)   # TTLs count from the last use
                self._touched[session] = rec.last_used
        handle = LoadHandle(self.spec, parts, dev, self._count_failed, allocate, staged=staged)
        direct = [p for p in parts if p.direct]
        if loads or direct:
            self._submit_decodes(loads, direct, handle, promote)
        for b in promote_now:
            self._pool.submit(self._guard, self._promote, b)
        return handle

    def _count_failed(self, first_token: int, lost_tokens: int) -> None:
        self._stats.count("hit_tokens", -lost_tokens)

    # ------------------------------------------------------------------ SSD reads
    def _submit_decodes(self, loads: list[BlockLoad], direct: list[_Part], handle: LoadHandle,
                        promote: bool) -> None:
        """Parse the values of ``loads`` (into host buffers) and ``direct`` parts (into the
        handle's result), then decode them layer-major on the I/O pool under one read txn.

        Layer-major even for a plain ``restore``: reading whole values block after block, with
        the kernel asked to read each one ahead, or in two sequential streams, was not faster
        (A/B timing probes on an 8K-token session).
        """
        host = self._tiers["host"]
        started = time.perf_counter()
        try:
            txn = self._ssd.env.begin(buffers=True)
        except Exception as e:  # noqa: BLE001 - translated and delivered to every waiter
            err = StoreIOError(f"cannot read the store: {e}")
            for bl in loads:
                self._load_failed(bl, err)
            for p in direct:
                self._direct_failed(p, err, handle, all_layers=True)
            return

        values = self._ssd.values
        where: dict[bytes, Any] = {}   # key -> (offset, size) in data.mdb, or the mapped value
        cursor = self._ssd.blocks_cursor(txn)
        for b in [bl.block for bl in loads] + [p.block for p in direct]:
            loc = values.locate(cursor, b.key) if values is not None else None
            if loc is None:
                raw = self._ssd.get_value(txn, b.key)  # inline, or no pread: through the map
                if raw is None:
                    continue
                if values is None:
                    advise_willneed(raw[:4096])  # headers first: parse them without a stall each
                loc = raw
            where[b.key] = loc

        files: list[Any] = []   # the values' readers, closed when the job is done

        def parse(b: Block) -> Any:
            loc = where.get(b.key)
            parsed = None
            if isinstance(loc, tuple):  # pread: the header now, each layer when it is decoded
                offset, size = loc
                head = values.read_head(offset, size, self._header_bound)
                if head is not None:
                    # a descriptor per value: its layers are one readahead stream (ValueReader.read_at)
                    files.append(values.read_at(offset, own_fd=True))
                    parsed = parse_block(size, self.fingerprint, self.spec, self.codec, self.block_tokens,
                                         head=head, read_at=files[-1], key=b.key)
                else:  # the location is not trusted: read through the map instead
                    self._stats.count("pread_fallbacks", 1)
                    loc = self._ssd.get_value(txn, b.key)
            if parsed is None:
                if loc is None:
                    raise CorruptValueError("value missing from the store")
                parsed = parse_block(loc, self.fingerprint, self.spec, self.codec, self.block_tokens, key=b.key)
            if parsed.n_tokens != b.n_tokens:
                raise CorruptValueError("value holds another token count than its record")
            return parsed

        def release() -> None:
            txn.abort()
            for f in files:
                f.close()
            if self._bypass and values is not None:  # what was read through the page cache goes
                values.drop_values([loc for loc in where.values() if isinstance(loc, tuple)])

        work: list[tuple[Any, Any]] = []   # (BlockLoad | _Part, parsed)
        try:
            for bl in loads:
                try:
                    parsed = parse(bl.block)
                    bl.buffer = host.alloc(bl.block.nbytes)
                    work.append((bl, parsed))
                except CorruptValueError as e:
                    self._load_failed(bl, e)
            for p in direct:
                try:
                    work.append((p, parse(p.block)))
                except CorruptValueError as e:
                    self._direct_failed(p, e, handle, all_layers=True)
        except BaseException:
            release()
            raise
        if not work:
            release()
            return
        L = self.spec.num_layers
        job = {"left": len(work) * L, "lock": threading.Lock(),
               "bytes": sum(item.block.nbytes for item, _ in work), "disk": sum(p.nbytes for _, p in work)}

        def count_down(n: int) -> bool:
            """``n`` (block, layer) tasks are done; True for the job's last. Its moves are
            counted here, before any waiter is woken: a caller woken by its last layer sees them."""
            with job["lock"]:
                job["left"] -= n
                last = job["left"] == 0
            if last:
                self._stats.moved("ssd->" + ("host" if not direct else "caller"), job["bytes"],
                                  time.perf_counter() - started)
                self._stats.count("ssd_read_bytes", job["disk"])
            return last

        def decode(item: Any, parsed: Any, layers: range, odirect: bool) -> None:
            """Decode ``layers`` of one block (one layer, or with ``odirect`` a group of stored
            layers read with one O_DIRECT request) into its host buffer or the handle's result."""
            last = False
            try:
                try:
                    if item.error is None and odirect:  # a handle's part (_direct_memory)
                        odirect = read_layers_direct(parsed, layers, align, handle._targets, item.start, item.used)
                        if odirect:
                            self._stats.count("ssd_direct_read_bytes", sum(
                                parsed.layers[layer][2][0][1] for layer in layers))
                    if item.error is None and not odirect:  # memory not aligned: layer by layer
                        for layer in layers:
                            if isinstance(item, BlockLoad):
                                decode_layer_into(self.codec, self.spec, parsed, layer, item.buffer)
                            else:
                                decode_layer_into_views(self.codec, self.spec, parsed, layer,
                                                        handle._targets(layer), item.start, item.used)
                finally:
                    last = count_down(len(layers))  # before this task's waiters wake, even on a failure
                if not isinstance(item, BlockLoad):
                    for layer in layers:
                        handle._direct_layer_done(layer)
                elif item.error is None:
                    for layer in layers:
                        item.layer_done[layer].set()
                    with self._lock:
                        item.remaining -= len(layers)
                        complete = item.remaining == 0
                    if complete:
                        self._load_complete(item, promote)
            except BaseException as e:  # noqa: BLE001 - every failure must reach the waiters
                if isinstance(item, BlockLoad):
                    self._load_failed(item, e)
                else:
                    self._direct_failed(item, e, handle, all_layers=False)
                    for layer in layers:
                        handle._direct_layer_done(layer)
                if not isinstance(e, CorruptValueError):
                    self._bg_error = self._bg_error or e
            finally:
                if last:
                    release()

        align = values.DIRECT_ALIGN if values is not None else 0
        groups, direct_runs = self._direct_plan(work, where, handle, values)
        for w in {w for w, _ in direct_runs}:
            # its other layers are read through the shared descriptor, without readahead: a
            # window read ahead would bring in layers an O_DIRECT request reads again
            work[w][1].read_at.share()

        # Layer-major order: layer 0 of every block first, so per-layer waits finish early. Read
        # through the map, the disk is asked for the bytes in that order up front; with pread
        # the decode threads read each (block, layer) range themselves, io_threads at a time.
        mapped = [parsed for _, parsed in work if parsed.read_at is None]
        for layer in range(L if mapped else 0):
            for parsed in mapped:
                planes = parsed.layers[layer][2]
                start, end = planes[0][0], planes[-1][0] + planes[-1][1]
                advise_willneed(parsed.buf[start:end])
        # The first layer of every block is wanted at once, each at a new place in the file where
        # the kernel's readahead has no history yet: ask for all of them up front, so the disk
        # serves them in parallel instead of two at a time (bench/ttft_parts.py records when
        # layer 0 is ready); later layers follow in file order under the kernel's own readahead.
        # (Not for a group read with O_DIRECT: it would read the same bytes twice.)
        if values is not None:
            values.advise_willneed([(where[item.block.key][0] + parsed.layers[0][2][0][0],
                                     sum(length for _, length, _ in parsed.layers[0][2]))
                                    for w, (item, parsed) in enumerate(work)
                                    if parsed.read_at is not None and not any(0 in r for r in direct_runs.get((w, 0), ()))])
        # A few workers pulling from one queue, not a future per (block, layer): submitting
        # thousands of futures while the workers hold the GIL made the caller wait for the GIL
        # on every submit (profiled: tens of microseconds each).
        order: list[tuple[Any, Any, range, bool]] = []
        for g, layers in enumerate(groups):
            for w, (item, parsed) in enumerate(work):
                runs = direct_runs.get((w, g), ())
                for layer in layers:
                    run = next((r for r in runs if r[0] == layer), None)
                    if run is not None:
                        order.append((item, parsed, run, True))
                    elif not any(layer in r for r in runs):
                        order.append((item, parsed, range(layer, layer + 1), False))
        tasks = iter(order)
        take = threading.Lock()

        def worker() -> None:
            while True:
                with take:
                    task = next(tasks, None)
                if task is None:
                    return
                decode(*task)

        for _ in range(min(self.config.io_threads, len(order))):
            self._pool.submit(worker)

    def _direct_plan(self, work: list[tuple[Any, Any]], where: dict[bytes, Any], handle: LoadHandle,
                     values: Any) -> tuple[list[range], dict[tuple[int, int], list[range]]]:
        """Which layers of which SSD blocks to read with O_DIRECT (``ssd_page_cache="bypass"``).

        The layers are taken in groups of about DIRECT_READ_BYTES; within a group, each run
        of consecutive layers stored as they are (not compressed) that holds at least
        DIRECT_MIN_BYTES, lies page-aligned in the file, has no page in the page cache, and
        lands in memory that takes O_DIRECT, is read with one request straight into its
        destination (bench/direct_ceiling.py: O_DIRECT requests of a few MiB went near the
        disk's sequential rate on the test machine, requests of a layer each did not). Returns
        the groups, and per (index in ``work``, group) the runs to read so; every other layer is
        read as before, one task each."""
        L = self.spec.num_layers
        if not self._bypass or values is None or values.direct_fd() < 0:
            return [range(layer, layer + 1) for layer in range(L)], {}
        layer_bytes = max(b - a for a, b in (self.spec.layer_span(i, self.block_tokens) for i in range(L)))
        per = max(1, DIRECT_READ_BYTES // max(1, layer_bytes))
        groups = [range(g, min(L, g + per)) for g in range(0, L, per)]
        fits = self._direct_memory(handle, values.DIRECT_ALIGN)
        runs: dict[tuple[int, int], list[range]] = {}
        for w, (item, parsed) in enumerate(work):
            if parsed.read_at is None or not fits(item):
                continue
            base = where[item.block.key][0]
            for g, layers in enumerate(groups):
                stored = [layer for layer in layers if stored_span(parsed, range(layer, layer + 1)) is not None]
                for run in _consecutive(stored):
                    off, length = stored_span(parsed, run)
                    if length >= DIRECT_MIN_BYTES and values.direct_ok(base + off, length):
                        runs.setdefault((w, g), []).append(run)
        return groups, runs

    def _direct_memory(self, handle: LoadHandle, align: int) -> Callable[[Any], bool]:
        """Whether the memory an SSD block (a BlockLoad or a handle's part) is read into takes
        O_DIRECT requests well: result tensors the caller allocated (memory that exists already,
        as a server's KV memory does) in which every run a whole block fills starts on an
        ``align`` boundary. read_layers_direct checks each destination again before it reads.

        Memory allocated for this load (fresh results, a prefetch's host buffers, staging
        buffers) is read through the page cache instead, and the values are dropped from it
        when the load is done (``release``): O_DIRECT faults such memory in inside the read,
        before the disk is asked, where a buffered read faults it while the kernel's
        readahead keeps the disk busy (reload runs 41-43, docs/benchmarks.md "O_DIRECT
        reads")."""
        steps: set[int] | None = set()   # per result tensor: its bytes per token
        if handle._staged or handle._fresh:
            steps = None
        else:
            for layer, outs in zip(self.spec.layers, handle._outs):
                for t, out in zip(layer.tensors, outs):
                    es = out.element_size()
                    if out.data_ptr() % align or any(st * es % align for st in out.stride()[:t.seq_axis]):
                        steps = None
                        break
                    steps.add(out.stride()[t.seq_axis] * es)
                if steps is None:
                    break

        def fits(item: Any) -> bool:
            if isinstance(item, BlockLoad):
                return False
            return (steps is not None and item.used == item.block.n_tokens
                    and all(st * item.start % align == 0 for st in steps))
        return fits

    def _direct_failed(self, p: _Part, error: BaseException, handle: LoadHandle, all_layers: bool) -> None:
        """A block decoded straight into a result failed: a counted miss; mark it corrupt."""
        with self._lock:
            first = p.error is None
            p.error = p.error or error
            if isinstance(error, CorruptValueError):
                p.block.corrupt = True
                if first:
                    self._stats.count("corrupt_blocks", 1)
        if all_layers:
            for layer in range(self.spec.num_layers):
                handle._direct_layer_done(layer)

    def _load_complete(self, bl: BlockLoad, promote: bool) -> None:
        b = bl.block
        with self._lock:
            if self._blocks.get(b.key) is b and b.load is bl:
                b.load = None
                b.state = BlockState.READY
                self._tiers["host"].add(b, bl.buffer)
                self._wake.notify_all()
            else:
                promote = False
        if promote:  # before done: a waiter on a prefetch finds the block on the device
            try:
                self._promote(b)
            finally:
                bl.done.set()
        else:
            bl.done.set()

    def _load_failed(self, bl: BlockLoad, error: BaseException) -> None:
        b = bl.block
        with self._lock:
            if b.load is bl:
                b.load = None
                b.state = BlockState.READY
                if isinstance(error, CorruptValueError):
                    b.corrupt = True
            if isinstance(error, CorruptValueError) and bl.error is None:
                self._stats.count("corrupt_blocks", 1)
        bl.fail(error)

    def _promote(self, b: Block) -> None:
        """Move a host block up to the device tier (prefetch)."""
        dev = self._tiers["device"]
        with self._lock:
            if not dev.enabled or b.tier != "host" or b.state is not BlockState.READY or self._blocks.get(b.key) is not b:
                return
            b.state = BlockState.MOVING
            src = b.payload
        t0 = time.perf_counter()
        try:
            new = MOVERS[("host", "device")](Transfer("host", "device", (b,), (src,)), self._tiers)[0]
        finally:
            with self._lock:
                b.state = BlockState.READY
        if new is not src:  # a copy, not a change of tier in the same memory
            self._stats.moved("host->device", b.nbytes, time.perf_counter() - t0)
        with self._lock:
            if b.tier == "host" and b.payload is src and self._blocks.get(b.key) is b:
                self._tiers["host"].remove(b)
                dev.add(b, new)
                self._wake.notify_all()

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - surfaced by the next call
            self._bg_error = self._bg_error or e

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
                            for b in (self._block(k) for k in rec.keys) if b is not None)
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
            op = _Op("write", write=to_write, free_after=True)
            self._enqueue(op)
        self.flush()
        if op.error is not None:
            raise op.error

    # ------------------------------------------------------------------ writer thread
    def _writer_loop(self) -> None:
        while True:
            with self._wake:
                while (not self._ops and not self._stopping and not self._over_budget()
                       and not self._touches_due()):
                    self._wake.wait(timeout=1.0)
                if self._stopping and not self._ops:
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
                self._bg_error = self._bg_error or e
                self._writing = False
                for op in ops:
                    op.error = op.error or BackgroundError(f"writer failed: {e!r}")
                    op.done.set()
                return
            self._writing = False
            for op in ops:
                if op.kind == "barrier":
                    op.done.set()

    def _encode(self, b: Block, payload: torch.Tensor) -> bytes:
        return encode_payload(self.codec, self.fingerprint, self.spec, b, payload, self._align)

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
        self._encoded_ahead = {key: (payload, self._pool.submit(self._encode, b, payload))
                               for key, (b, payload) in todo.items()}

    def _next_batch_len(self) -> int:
        """How many queued ops the next transaction takes (locked): whole ops, at least one,
        until their new values reach WRITE_BATCH_BYTES."""
        taken, size = 0, 0
        for op in self._ops:
            if taken and size >= WRITE_BATCH_BYTES:
                break
            size += sum(b.nbytes for b in op.write)
            taken += 1
        return taken

    def _take_batch(self) -> list[_Op]:
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

    def _apply(self, ops: list[_Op]) -> None:
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
            got = ahead.get(key)  # encoded while the last batch committed: the same payload only
            futures[key] = got[1] if got is not None and got[0] is payload else self._pool.submit(self._encode, b, payload)
        values = {key: f.result() for key, f in futures.items()}
        raw = sum(b.nbytes for b, _ in items)
        enc = sum(len(v) for v in values.values())
        self._stats.count("ssd_encode_us", int((time.perf_counter() - t0) * 1e6))
        self._encode_ahead(todo)
        try:
            self._commit(ops, values, touched, protect, keep)
            failed: list[tuple[_Op, BaseException]] = []
        except (StoreFullError, StoreIOError) as e:
            with self._lock:  # not written: keep the uses for the next batch
                for sid, t in touched.items():
                    self._touched[sid] = max(t, self._touched.get(sid, t))
            if len(ops) == 1:
                failed = [(ops[0], e)]
            else:
                failed = []
                for op in ops:
                    try:
                        self._commit([op], values, {}, protect, keep)
                    except (StoreFullError, StoreIOError) as e1:
                        failed.append((op, e1))
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
                self._unreported.append(err)
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

    def _commit(self, ops: list[_Op], values: dict[bytes, bytes], touched: dict[str, float],
                protect: set[str], keep: set[bytes]) -> None:
        now = time.time()
        self._last_batch = time.monotonic()
        started = time.perf_counter()
        with self._ssd.batch() as batch:
            batch.keep = keep
            # uses made since the last batch first: eviction picks by last use and expiry, and a
            # session restored a moment ago must not go as the least recently used
            for sid, t in touched.items():
                batch.touch_session(sid, t)
            need = sum(len(values[b.key]) for op in ops for b in op.write if b.key in values)
            batch.make_room(need, now, protect)
            for op in ops:
                if op.kind == "drop":
                    batch.drop_session(op.session)
                    continue
                for b in op.write:
                    if b.key in values:
                        batch.put_value(b.key, values[b.key], b.n_tokens, replace=b.repair)
                if op.kind == "session":
                    batch.put_session(op.record, self.block_tokens)
            evicted_sessions = [s for s in batch.dropped if s not in {op.session for op in ops if op.kind == "drop"}]
            evicted_keys = set(batch.deleted)
        self._stats.count("ssd_batches", 1)
        self._stats.count("ssd_transaction_us", int((time.perf_counter() - started) * 1e6))
        self._stats.count("ssd_commit_us", int(batch.commit_s * 1e6))
        if self._bypass:  # committed and synced: the values' pages are clean, let them go
            self._ssd.drop_cached([b.key for op in ops if op.kind != "drop" for b in op.write if b.key in values])
        if evicted_sessions or evicted_keys:
            self._reconcile_evictions(evicted_sessions, evicted_keys)

    def _roll_back(self, op: _Op) -> None:
        """Undo in memory what a failed op did, so memory again matches the disk (locked).

        A failed session save reverts to the session's last committed record (reloaded lazily);
        blocks that only it referenced and that never reached SSD are released; failed writes of
        unowned blocks release those cache entries rather than retrying forever.
        """
        if op.kind == "session":
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
                if dev.excess():
                    excess = dev.excess()
                    for b in dev.victims():
                        victims.append(b)
                        excess -= b.nbytes
                        if excess <= 0 or len(victims) >= 64:
                            break
                    src = "device"
                if not victims and host.excess():
                    excess = host.excess()
                    for b in host.victims():
                        if b.on_ssd:
                            host.remove(b)
                            self._stats.count("host_evicted_blocks", 1)
                            excess -= b.nbytes
                        elif not b.write_queued:
                            victims.append(b)
                            excess -= b.nbytes
                        if excess <= 0 or len(victims) >= 64:
                            break
                    src = "host"
                if not victims:
                    self._wake.notify_all()  # host evictions above may have made room
                    return
                for b in victims:
                    b.state = BlockState.MOVING if src == "device" else BlockState.WRITING
                    if src == "host":
                        b.write_queued = True
                payloads = tuple(b.payload for b in victims)
            if src == "device" and host.enabled:
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
                op = _Op("write", write=victims, free_after=True)
                self._apply([op])
                if op.error is not None:
                    # Full: leave them in memory, retry in a second; the error reaches flush().
                    self._maint_blocked_until = time.monotonic() + 1.0
                    return

    # ------------------------------------------------------------------ flush / stats / close
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write and demotion is done; raise the first unreported error."""
        self._check_open()
        op = _Op("barrier")
        with self._lock:
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
        self._check_open()
        with self._lock:
            resident = {name: t.used for name, t in self._tiers.items()}
            counts = {name: len(t) for name, t in self._tiers.items()}
        resident["ssd"] = self._ssd.ssd_used()
        out = self._stats.snapshot(resident, counts, {n: t.budget for n, t in self._tiers.items()}
                                   | {"ssd": self.config.ssd_bytes})
        out["host_pool"] = self._host_pool.snapshot() if self._host_pool is not None else None
        return out

    def close(self) -> None:
        """Persist what write-back still holds only in memory, stop the threads, close LMDB.

        Idempotent. Raises the first background error, after closing. In a process forked from
        the one that opened it, only marks it closed: the environment and threads are the
        parent's, and closing LMDB here would release the parent's reader slots.
        """
        if self._closed:
            return
        if os.getpid() != self._pid:
            self._closed = True
            return
        error: BaseException | None = None
        if self._bg_error is None:
            try:
                if self.config.persist == "write_back":
                    with self._lock:
                        dirty = [b for b in self._blocks.values()
                                 if b.tier is not None and not b.on_ssd and not b.write_queued
                                 and b.state is BlockState.READY]
                        for b in dirty:
                            b.write_queued = True
                        self._enqueue(_Op("write", write=dirty))
                self.flush()
            except TierKVError as e:
                error = e
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        self._writer.join()
        self._pool.shutdown(wait=True)
        if self._host_pool is not None:
            self._host_pool.close()
        self._closed = True
        self._ssd.close()
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
